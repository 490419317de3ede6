"""ask, chat, eval and route: answers against a cache-free greedy oracle, routing against the
router applied by hand, eval resume, and bad input for every command (one line, exit 1)."""

import json
import re
import shutil

import pytest
import tiny
import torch
from click.testing import CliRunner
from PIL import Image

import medmoe
from medmoe import cli, data, vqa

QUESTION = "What modality is this image?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model upcycled to 4 experts named after the modalities."""
    tmp = tmp_path_factory.mktemp("vqa")
    tiny.make_model(tmp / "dense", seed=3)
    model = medmoe.load_model(tmp / "dense")
    torch.manual_seed(0)
    model.upcycle(medmoe.MoEConfig(num_experts=4, modalities=tiny.MODALITIES))
    with torch.no_grad():  # give each expert its own weights, so routing changes the output
        for layer in model.llm.moe_layers():
            for p in layer.experts.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    medmoe.save_model(model, tmp / "moe", tokenizer_json=str(tmp / "dense" / "tokenizer.json"))
    return tmp / "moe"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return tiny.make_dataset(folder, per_modality=3, seed=5, name="test.jsonl")


def run(*args, input=None):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output + result.stderr
    return result


def oracle(assistant, image, turns, max_new_tokens=8):
    """Greedy decoding by full forward passes over the growing sequence: no KV cache, no padding."""
    model = assistant.model
    ids, out = assistant.prompt(turns), []
    pixels = assistant.pixels(image)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model([ids + out], pixels)
            t = int(logits[0, -1].argmax())
            if t in assistant.stop:
                break
            out.append(t)
    return assistant.tok.decode(out, skip_special_tokens=True).strip()


def first_image(dataset):
    return data.load_examples(dataset)[0].image


def test_ask_streams_the_greedy_answer(model_dir, dataset):
    image = first_image(dataset)
    expected = oracle(vqa.Assistant(model_dir), image, [(QUESTION, None)])
    assert expected  # the random model says something within 8 tokens: the comparison means something
    streamed = run("ask", image, QUESTION, "--model", model_dir, "--max-new-tokens", 8)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.strip() == expected
    as_json = json.loads(run("ask", image, QUESTION, "--model", model_dir, "--max-new-tokens", 8, "--json").stdout)
    assert as_json["answer"] == expected and as_json["question"] == QUESTION


def test_ask_with_bf16_weights_computes_in_fp32(model_dir, dataset):
    image = first_image(dataset)
    bf16w = vqa.Assistant(model_dir, dtype=torch.float32, matrix_dtype=torch.bfloat16)
    assert bf16w.model.llm.lm_head.weight.dtype == torch.bfloat16 and bf16w.model.llm.dtype == torch.float32
    assert bf16w.compile  # on a CPU too: eager, each matrix would be upcast for every token
    result = run("ask", image, QUESTION, "--model", model_dir, "--max-new-tokens", 8, "--dtype", "bf16w")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == oracle(bf16w, image, [(QUESTION, None)])
    # predictions record it apart from fp32 and bf16, so a resumed eval never mixes them
    records = {vqa.model_record(a)["dtype"] for a in (bf16w, vqa.Assistant(model_dir), vqa.Assistant(model_dir, dtype=torch.bfloat16))}
    assert records == {"torch.float32, matrices torch.bfloat16", "torch.float32", "torch.bfloat16"}


def test_bf16w_on_a_quantized_checkpoint_is_one_line(model_dir, dataset, tmp_path):
    assert run("convert", tmp_path / "int8", "--model", model_dir, "--quantize", "int8").exit_code == 0
    result = run("ask", first_image(dataset), QUESTION, "--model", tmp_path / "int8", "--dtype", "bf16w")
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "need a float checkpoint" in result.stderr


def test_model_found_from_environment(model_dir, dataset, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMOE_MODEL", str(model_dir))
    assert run("ask", first_image(dataset), QUESTION, "--max-new-tokens", 2).exit_code == 0
    monkeypatch.delenv("MEDMOE_MODEL")
    monkeypatch.setenv("MEDMOE_HOME", str(tmp_path))  # no demo model built there
    result = run("ask", first_image(dataset), QUESTION)
    assert result.exit_code == 1 and "medmoe demo" in result.stderr


def manual_routing(assistant, image, ids):
    """Each MoE layer's top-1 expert per token, from its FFN input and router weights by hand (and those inputs)."""
    model, inputs = assistant.model, {}
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0][0]))
             for i, b in enumerate(model.llm.layers) if isinstance(b.ffn, medmoe.MoE)]
    with torch.no_grad():
        model([ids], assistant.pixels(image))
    for h in hooks:
        h.remove()
    return {i: router_logits_by_hand(model, i, x).argmax(-1) for i, x in inputs.items()}, inputs


def router_logits_by_hand(model, i, x):
    return x @ model.llm.layers[i].ffn.router.weight.T + model.llm.layers[i].ffn.router.bias


def test_routing_counts_match_the_router(model_dir, dataset):
    a = vqa.Assistant(model_dir)
    image = first_image(dataset)
    ids = a.prompt([(QUESTION, "ct")])
    r = vqa.route(a, a.pixels(image), [ids])[0]
    patches = a.model.cfg.vision.num_patches
    manual, _ = manual_routing(a, image, ids)
    image_pos = torch.arange(len(ids))  # the prompt holds one position per image feature
    start = ids.index(medmoe.IMAGE_TOKEN)
    is_image = (image_pos >= start) & (image_pos < start + patches)
    for j, (_, chosen) in enumerate(sorted(manual.items())):
        assert r.counts[j, 0].tolist() == torch.bincount(chosen[is_image], minlength=4).float().tolist()
        after = ~is_image & (image_pos >= start)  # text after the image; the system prompt before it is not counted
        assert r.counts[j, 1].tolist() == torch.bincount(chosen[after], minlength=4).float().tolist()
    assert r.counts[:, 0].sum(-1).tolist() == [patches] * len(manual)
    out = run("ask", image, QUESTION, "--model", model_dir, "--max-new-tokens", 2, "--show-routing").output
    assert "router sees:" in out and all(m in out for m in tiny.MODALITIES)


def test_batched_answers_equal_single_answers(model_dir, dataset):
    """Left padding in a batch must not change any answer."""
    a = vqa.Assistant(model_dir)
    examples = data.load_examples(dataset)[:5]
    questions = [ex.turns[0][0].replace("<image>", "").strip() + " " * (3 * k) + "image?" * k for k, ex in enumerate(examples)]
    batch = a.answer_batch(a.pixels(*[ex.image for ex in examples]), questions, max_new_tokens=6)
    single = [a.answer(a.pixels(ex.image), [(q, None)], max_new_tokens=6) for ex, q in zip(examples, questions)]
    assert batch == single


def test_chat_keeps_the_history(model_dir, dataset):
    image = first_image(dataset)
    a = vqa.Assistant(model_dir)
    first = oracle(a, image, [(QUESTION, None)], 6)
    second = oracle(a, image, [(QUESTION, first), ("Is this a ct image?", None)], 6)
    result = run("chat", image, "--model", model_dir, "--max-new-tokens", 6, input=f"{QUESTION}\n\nIs this a ct image?\n")
    assert result.exit_code == 0, result.output
    replies = [line.split("medmoe> ", 1)[1].strip() for line in result.stdout.split("\n") if "medmoe> " in line]
    assert replies == [first, second]


def test_chat_reports_a_too_long_turn_and_goes_on(model_dir, dataset):
    long = "word " * 400
    result = run("chat", first_image(dataset), "--model", model_dir, "--max-new-tokens", 2, input=f"{long}\n{QUESTION}\n")
    assert result.exit_code == 0
    assert result.stderr.count("question too long") == 1 and result.stdout.count("medmoe> ") == 1  # only the good one answered


def test_eval_writes_predictions_and_resumes(model_dir, dataset, tmp_path):
    out = tmp_path / "pred.jsonl"
    first = run("eval", "--data", dataset, "--model", model_dir, "--out", out, "--limit", 6, "--batch-size", 4, "--max-new-tokens", 4)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    examples = data.load_examples(dataset)[:6]
    assert [r["question_id"] for r in rows] == [ex.id for ex in examples]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    # an interrupted run: two answers written, the third cut off mid-line
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps(rows[2])[:20])
    again = run("eval", "--data", dataset, "--model", model_dir, "--out", out, "--limit", 6, "--batch-size", 4, "--max-new-tokens", 4,
                "--json")
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer_id"] for r in resumed[:2]] == [r["answer_id"] for r in rows[:2]]  # kept, not answered again
    assert [r["answer_id"] for r in resumed[2:]] != [r["answer_id"] for r in rows[2:]]
    assert [r["text"] for r in resumed] == [r["text"] for r in rows]
    scores = json.loads(again.stdout)
    assert scores["all"]["n"] == 6


def test_route_plot_and_router_accuracy(model_dir, dataset, tmp_path):
    plot = tmp_path / "route.png"
    result = run("route", "--data", dataset, "--model", model_dir, "--plot", plot)
    assert result.exit_code == 0, result.output
    with Image.open(plot) as img:
        img.verify()
    a = vqa.Assistant(model_dir)
    examples = data.load_examples(dataset)
    s = vqa.routing_summary(a, examples, vqa.route_many(a, examples, progress=False))
    hits = []
    for ex in examples:  # the router's modality for a record, by hand: mean softmax over the tokens from the image on, and layers
        ids = a.prompt([(ex.turns[0][0], None)])
        manual, inputs = manual_routing(a, ex.image, ids)
        start = ids.index(medmoe.IMAGE_TOKEN)
        probs = []
        for i in sorted(manual):
            probs.append(router_logits_by_hand(a.model, i, inputs[i])[start:].softmax(-1).mean(0))
        hits.append(tiny.MODALITIES[int(torch.stack(probs).mean(0).argmax())] == ex.modality)
    assert s["router_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert len(s["rows"]) == (1 + len(tiny.MODALITIES)) * len(a.model.llm.moe_layers())
    assert all(sum(row) == pytest.approx(1.0) for row in s["rows"])
    assert f"router modality accuracy: {s['router_accuracy']:.1%}" in result.output


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("bad")
    good = tmp / "good.png"
    Image.new("RGB", (40, 40), (90, 90, 90)).save(good)
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])
    text = tmp / "notes.png"
    text.write_text("this is not an image\n")
    foreign = tmp / "hf"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}))
    # configs that parse as JSON but have the wrong shape or types (issue 13)
    config = json.loads((model_dir / "config.json").read_text())
    broken = {"listconfig": [config], "stringnumber": {**config, "llm": {**config["llm"], "hidden_size": "48"}}}
    for name, bad in broken.items():
        shutil.copytree(model_dir, tmp / name)
        (tmp / name / "config.json").write_text(json.dumps(bad))
    return {"good": good, "missing": tmp / "nope.png", "corrupt": corrupt, "text": text, "foreign": foreign, "nomodel": tmp / "none",
            "listconfig": tmp / "listconfig", "stringnumber": tmp / "stringnumber"}


def command(name, image, model, question=QUESTION, tmp=None):
    """The command line of `name` about one image (eval and route get a one-record data file)."""
    if name == "ask":
        return ["ask", image, question, "--model", model], None
    if name == "chat":
        return ["chat", image, "--model", model], question + "\n"
    records = tmp / f"{name}.jsonl"
    records.write_text(json.dumps({"id": "q1", "image": str(image), "question": question, "answer": "ct", "answer_type": "OPEN"}) + "\n")
    if name == "eval":
        return ["eval", "--data", records, "--model", model, "--out", tmp / "p.jsonl"], None
    return ["route", "--data", records, "--model", model], None


CASES = {
    "missing image": ("missing", "model", QUESTION, "no such image file"),
    "corrupt image": ("corrupt", "model", QUESTION, "unreadable image"),
    "text file as image": ("text", "model", QUESTION, "not an image"),
    "missing model": ("good", "nomodel", QUESTION, "no config.json"),
    "foreign model": ("good", "foreign", QUESTION, "run `medmoe convert` first"),
    "empty question": ("good", "model", "   ", "empty question"),
    "too long question": ("good", "model", "why " * 400, "question too long"),
    "question not UTF-8": ("good", "model", "is it \udcff\udcfe?", "not valid UTF-8"),  # bytes as Python passes them on
    "config.json a list": ("good", "listconfig", QUESTION, "config.json: expected a JSON object, found a list"),
    "number as a string": ("good", "stringnumber", QUESTION, 'hidden_size is "48": expected an integer'),
}


# chat reads its questions from a terminal, not as command-line bytes: no undecodable question there
@pytest.mark.parametrize("case, name", [(c, n) for c in CASES for n in ("ask", "chat", "eval", "route")
                                        if (c, n) != ("question not UTF-8", "chat")])
def test_bad_input_is_one_line(name, case, bad_files, model_dir, tmp_path):
    image, model, question, message = CASES[case]
    model = model_dir if model == "model" else bad_files[model]
    args, stdin = command(name, bad_files[image], model, question, tmp_path)
    result = run(*args, input=stdin)
    if name == "chat" and case in ("empty question", "too long question"):
        # inside a chat a bad turn is reported and the chat goes on (nothing typed so far is lost)
        assert result.exit_code == 0 and (case == "empty question" or message in result.stderr)
        return
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"\w+:\s+\d+%\|", line)]  # tqdm bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("device, message", [("gpu", "unknown device"), ("cuda", "no usable CUDA GPU")])
def test_bad_device_is_one_line(model_dir, dataset, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("ask", first_image(dataset), QUESTION, "--model", model_dir, "--device", device)
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0 and message in result.stderr
