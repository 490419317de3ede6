"""Issue 13: whatever a user types or hands over, every command answers in one line with a non-zero
exit, never a traceback; unusual but valid input works. (ask/chat/eval/route's bad files,
models and questions are in test_vqa.py; the checkpoint lifecycle under kills in test_train.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny
import torch
from click.testing import CliRunner
from PIL import Image

import medmoe
from medmoe import cli, data, demo, vqa

QUESTION = "What modality is this image?"


def run(*args, input=None):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # what a user would have seen as a traceback
    assert "Traceback" not in result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny random model, a small labelled record file and a contrastive model."""
    tmp = tmp_path_factory.mktemp("input")
    tiny.make_model(tmp / "model")
    records = tiny.make_dataset(tmp / "d", per_modality=2)
    from medmoe import contrastive

    texts = [t for ts in data.captions(data.load_examples(records)).values() for t in ts]
    contrastive.init_model(tmp / "clip", texts, tiny.MODALITIES, "tiny")
    return tmp, records


def error_line(result, code=1):
    """The one line a failing command prints (progress bars aside)."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if "%|" not in line]
    return lines[-1]


# ----------------------------------------------------------------------------- numbers out of range

NUMBERS = [  # (command line with MODEL/DATA/IMAGE/OUT placeholders, the option that is out of range)
    ("ask IMAGE Q --model MODEL --max-new-tokens 0", "--max-new-tokens"),
    ("chat IMAGE --model MODEL --max-new-tokens -3", "--max-new-tokens"),
    ("eval --data DATA --model MODEL --batch-size 0", "--batch-size"),
    ("eval --data DATA --model MODEL --limit 0", "--limit"),
    ("eval --data DATA --model MODEL --max-new-tokens 0", "--max-new-tokens"),
    ("route IMAGE --model MODEL --batch-size 0", "--batch-size"),
    ("route --data DATA --model MODEL --limit -1", "--limit"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --batch-size 0", "--batch-size"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --epochs 0", "--epochs"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --max-steps 0", "--max-steps"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --grad-accum 0", "--grad-accum"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --lr 0", "--lr"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --lr -1e-3", "--lr"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --warmup 1.5", "--warmup"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --clip -1", "--clip"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --keep 0", "--keep"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --save-every -1", "--save-every"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --workers -1", "--workers"),
    ("train --stage 3 --model MODEL --data DATA --out OUT --num-experts 0", "--num-experts"),
    ("train --stage 3 --model MODEL --data DATA --out OUT --top-k 0", "--top-k"),
    ("train --stage 2 --model MODEL --data DATA --out OUT --seed -1", "--seed"),
    ("init OUT --data DATA --seed 99999999999999999999", "--seed"),
    ("convert OUT --model MODEL --max-seq-len 0", "--max-seq-len"),
    ("demo --out OUT --seed -1", "--seed"),
    ("serve --model MODEL --port 70000", "--port"),
]


@pytest.mark.parametrize("line, option", NUMBERS, ids=[n[0].split()[0] + " " + n[1] for n in NUMBERS])
def test_numbers_out_of_range_are_one_line(made, tmp_path, line, option):
    tmp, records = made
    image = data.load_examples(records)[0].image
    places = {"MODEL": tmp / "model", "DATA": records, "IMAGE": image, "OUT": tmp_path / "out", "Q": QUESTION}
    result = run(*[places.get(word, word) for word in line.split()])
    assert result.exit_code == 2, result.output  # Click's usage error: the option and its range
    assert f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # refused before any work


# ----------------------------------------------------------------------------- files that parse but are wrong


def broken_copy(src, dst, config):
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("command", ["info", "convert", "train", "classify", "probe"])
def test_configs_of_the_wrong_shape_are_one_line(made, tmp_path, command):
    """A config.json that is a list, or whose number is written as a string, for the commands that
    read a model outside test_vqa.py's four (ask, chat, eval, route)."""
    tmp, records = made
    contrastive = command in ("classify", "probe")
    config = json.loads((tmp / ("clip" if contrastive else "model") / "config.json").read_text())
    section = "swin" if contrastive else "llm"
    field = "embed_dim" if contrastive else "hidden_size"
    for bad, message in (([config], "config.json: expected a JSON object, found a list"),
                         ({**config, section: {**config[section], field: "48"}}, f'{field} is "48": expected an integer')):
        model = broken_copy(tmp / ("clip" if contrastive else "model"), tmp_path / "m", bad)
        args = {"info": ["info", model], "convert": ["convert", tmp_path / "out", "--model", model, "--dtype", "bf16"],
                "train": ["train", "--stage", "2", "--model", model, "--data", records, "--out", tmp_path / "out"],
                "classify": ["classify", "--data", records, "--model", model],
                "probe": ["probe", "--train", records, "--test", records, "--model", model]}[command]
        line = error_line(run(*args))
        assert line.startswith("error: ") and message in line and str(model) in line, line
        shutil.rmtree(model)


@pytest.mark.parametrize("index, message", [
    ('{"metadata": {}}', "expected a weight_map object"),
    ('{"weight_map": ["model-1.safetensors"]}', "expected a weight_map object"),
    ('{"weight_map": {"w": "../../etc/passwd"}}', "shard names must be file names"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, found a list"),
])
def test_a_bad_shard_index_is_one_line(tmp_path, index, message):
    from hf_models import save_llm

    save_llm("llama", tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(index)
    line = error_line(run("convert", tmp_path / "out", "--llm", tmp_path / "hf"))
    assert "model.safetensors.index.json" in line and message in line, line


@pytest.mark.parametrize("command", ["eval", "init", "train"])
def test_a_record_file_of_the_wrong_shape_is_one_line(made, tmp_path, command):
    tmp, _ = made
    (tmp_path / "r.json").write_text(json.dumps({"image": "a.png", "question": "q"}))
    args = {"eval": ["eval", "--data", tmp_path / "r.json", "--model", tmp / "model"],
            "init": ["init", tmp_path / "new", "--data", tmp_path / "r.json"],
            "train": ["train", "--stage", "2", "--model", tmp / "model", "--data", tmp_path / "r.json", "--out", tmp_path / "o"]}[command]
    line = error_line(run(*args))
    assert "r.json: expected a list, found a JSON object" in line


# ----------------------------------------------------------------------------- images: unusual but valid, DICOM by content


def unusual_images(folder):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    images = {
        "gray16.png": Image.fromarray((ramp * 65535).astype(np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 200, 200, 0)),
        "rgba.png": Image.new("RGBA", (32, 32), (200, 10, 10, 128)),
        "palette.png": Image.new("RGB", (32, 32), (30, 200, 30)).convert("P"),
        "float.tiff": Image.fromarray((ramp * 1000 - 500).astype(np.float32)),
    }
    for name, img in images.items():
        img.save(folder / name)
    pydicom = pytest.importorskip("pydicom")
    shutil.copyfile(pydicom.data.get_testdata_file("CT_small.dcm"), folder / "IM000001")  # a PACS export: no extension
    return [*images, "IM000001"]


def test_unusual_images_are_answered(made, tmp_path):
    tmp, _ = made
    for name in unusual_images(tmp_path):
        result = run("ask", tmp_path / name, QUESTION, "--model", tmp / "model", "--max-new-tokens", 2)
        assert result.exit_code == 0, (name, result.output)


def test_dicom_is_known_by_its_content(made, tmp_path, monkeypatch):
    pydicom = pytest.importorskip("pydicom")
    shutil.copyfile(pydicom.data.get_testdata_file("CT_small.dcm"), tmp_path / "IM000001")
    assert data.is_dicom(str(tmp_path / "IM000001")) and not data.is_dicom(str(tiny.make_dataset(tmp_path / "d", per_modality=1)))
    reference = np.asarray(data.load_dicom(str(tmp_path / "IM000001")))
    assert np.array_equal(np.asarray(data.load_image(str(tmp_path / "IM000001"))), reference)
    assert np.array_equal(np.asarray(data.load_image((tmp_path / "IM000001").read_bytes())), reference)  # as `serve` reads it
    monkeypatch.setitem(sys.modules, "pydicom", None)  # the dicom extra not installed
    tmp, _ = made
    line = error_line(run("ask", tmp_path / "IM000001", QUESTION, "--model", tmp / "model"))
    assert "IM000001: a DICOM file; reading it needs the dicom extra" in line


# ----------------------------------------------------------------------------- training, evaluation, the demo


def test_training_on_only_unreadable_images_is_one_line(made, tmp_path):
    tmp, records = made
    (tmp_path / "images").mkdir()
    rows = data.read_records(records)
    for r in rows:
        (tmp_path / r["image"]).write_text("not an image")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("train", "--stage", "2", "--model", tmp / "model", "--data", tmp_path / "t.jsonl", "--out", tmp_path / "o")
    assert "no usable record: every image was unreadable" in error_line(result)


def test_eval_refuses_repeated_ids_and_another_models_answers(made, tmp_path):
    tmp, records = made
    rows = data.read_records(records)[:3]
    images = os.path.dirname(records)
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({**r, "id": "same"}) + "\n" for r in rows))
    line = error_line(run("eval", "--data", tmp_path / "dup.jsonl", "--images", images, "--model", tmp / "model"))
    assert "record id 'same' appears more than once" in line
    out = tmp_path / "p.jsonl"
    first = run("eval", "--data", records, "--model", tmp / "model", "--out", out, "--limit", 3, "--max-new-tokens", 2)
    assert first.exit_code == 0, first.output
    tiny.make_model(tmp_path / "other", seed=1)  # same shapes, other weights
    before = out.read_text()
    line = error_line(run("eval", "--data", records, "--model", tmp_path / "other", "--out", out, "--limit", 3))
    assert "holds answers of another model" in line and str(tmp / "model") in line
    assert out.read_text() == before  # nothing of the first model's answers lost
    again = run("eval", "--data", records, "--model", tmp / "model", "--out", out, "--limit", 3, "--max-new-tokens", 2)
    assert again.exit_code == 0 and out.read_text() == before  # the same model resumes: all answered already


def test_an_interrupted_demo_stops_with_the_interruption(tmp_path, monkeypatch):
    """Ctrl-C during a stage: the demo says so and stops (no next stage on a missing model)."""
    calls = []

    def interrupted(args, log=print):
        calls.append(args.stage)
        return {"interrupted": True, "main": True}

    def assemble(data_dir, *args, **kwargs):  # the packaged images take a while: a tiny set instead
        for name in ("train.jsonl", "test.jsonl"):
            path = tiny.make_dataset(data_dir, per_modality=1, name=name)
            rows = [{**r, "organ": "chest"} for r in data.read_records(path)]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return {"images": {"train": 4, "test": 4}, "records": {"train": 8, "test": 8}}

    monkeypatch.setattr(demo, "assemble", assemble)
    monkeypatch.setattr(demo.trainer, "train", interrupted)
    result = CliRunner().invoke(cli.main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 130 and calls == [1], result.output
    assert "the demo stopped in stage 1: `medmoe demo` starts it over" in result.stderr
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- generation, Ctrl-C


def test_generation_never_emits_ids_the_tokenizer_lacks(made, tmp_path):
    """Released Phi-2 checkpoints carry 51,200 embedding rows for about 50,300 tokens. Here the
    rows beyond the tokenizer are the only ones the LM head favours."""
    tmp, records = made
    model = medmoe.load_model(tmp / "model")
    known = data.load_tokenizer(tmp / "model").get_vocab_size()
    extra = 10
    llm = model.llm
    with torch.no_grad():
        grown = torch.nn.Embedding(known + extra, llm.embed.weight.shape[1])
        grown.weight[:known] = llm.embed.weight
        head = torch.nn.Linear(llm.embed.weight.shape[1], known + extra, bias=False)
        head.weight.zero_()
        head.weight[known:] = torch.randn(extra, head.weight.shape[1])
    model.cfg.llm.vocab_size, llm.embed, llm.lm_head = known + extra, grown, head
    medmoe.save_model(model, tmp_path / "padded", tokenizer_json=str(tmp / "model" / "tokenizer.json"))
    a = vqa.Assistant(tmp_path / "padded")
    image = data.load_examples(records)[0].image
    prompts = [a.prompt([(QUESTION, None)])]
    unguarded = a.model.generate(prompts, a.pixels(image), max_new_tokens=4, stop_ids=[])[0]
    assert max(unguarded) >= known  # the test can fail: left alone, the model picks the padding rows
    guarded = [int(t[0]) for t in a.token_steps(a.pixels(image), prompts, max_new_tokens=4)]
    assert guarded and max(guarded) < known


def test_ctrl_c_while_still_importing_says_aborted():
    command = shutil.which("medmoe")
    if command is None:
        pytest.skip("the medmoe command is not installed (pip install -e .)")
    for delay in (0.3, 0.8):  # torch alone takes longer than this to import
        proc = subprocess.Popen([command, "info", "/nonexistent"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        interrupted, finished = proc.returncode == 130 and "Aborted" in err, proc.returncode == 1 and "no config.json" in err
        assert interrupted or finished, (proc.returncode, err)


def test_a_hugging_face_config_with_a_number_as_a_string_is_one_line(tmp_path):
    from hf_models import save_llm

    save_llm("llama", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_attention_heads": "4"}))
    line = error_line(run("convert", tmp_path / "out", "--llm", tmp_path / "hf"))
    assert 'config.json: num_attention_heads is "4": expected a number' in line, line
