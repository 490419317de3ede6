"""`medmoe convert` and `medmoe info` from the command line, and every bad input they meet:
one clear line on stderr, a non-zero exit, never a traceback."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from hf_models import save_llm, save_vision
from safetensors.torch import load_file, save_file

import medmoe
from medmoe import convert
from medmoe.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def assert_clean_error(result, *needles):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    save_vision("clip", d / "clip")
    save_llm("phi", d / "phi")
    return d


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "m"
    result = run("convert", out, "--vision", sources / "clip", "--llm", sources / "phi")
    assert result.exit_code == 0, result.output
    return out


def test_convert_writes_a_loadable_checkpoint(converted):
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors"]
    model = medmoe.load_model(str(converted))
    assert model.cfg.llm.arch == "phi" and model.cfg.vision.kind == "clip"
    assert model.cfg.vision.num_layers == 2  # a 3-layer tower, features from hidden_states[-2]


def test_info_prints_architecture_and_parameter_counts(converted):
    result = run("info", converted)
    assert result.exit_code == 0, result.output
    model = medmoe.load_model(str(converted))
    total = sum(p.numel() for p in model.parameters())
    assert "phi: 3 layers, hidden 64" in result.output
    assert f"total {total / 1e6:.2f}M" in result.output


def test_load_casts_and_keeps_router_fp32(tmp_path, sources):
    save_llm("mixtral", tmp_path / "mixtral")
    convert.convert(str(tmp_path / "m"), convert.Sources(vision=str(sources / "clip"), llm=str(tmp_path / "mixtral")))
    model = medmoe.load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert model.llm.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert model.llm.layers[0].ffn.router.weight.dtype == torch.float32
    logits, _ = model([[1, 2, 3]])
    assert torch.isfinite(logits).all()


def test_sharded_safetensors_source(tmp_path, sources):
    """A decoder saved in several shards with an index converts to the same weights."""
    ref = save_llm("phi", tmp_path / "phi")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    convert.convert(str(tmp_path / "a"), convert.Sources(vision=str(sources / "clip"), llm=str(tmp_path / "phi")))
    convert.convert(str(tmp_path / "b"), convert.Sources(vision=str(sources / "clip"), llm=str(tmp_path / "sharded")))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_architecture(tmp_path, sources):
    shutil.copytree(sources / "phi", tmp_path / "gpt")
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    result = run("convert", tmp_path / "out", "--vision", sources / "clip", "--llm", tmp_path / "gpt")
    assert_clean_error(result, "unknown architecture 'gpt2'", "phi, stablelm", "qwen2, llama")


def test_missing_weights_file(tmp_path, sources):
    shutil.copytree(sources / "phi", tmp_path / "phi")
    (tmp_path / "phi" / "model.safetensors").unlink()
    result = run("convert", tmp_path / "out", "--vision", sources / "clip", "--llm", tmp_path / "phi")
    assert_clean_error(result, "no model.safetensors")


def test_truncated_weights_file(tmp_path, converted):
    shutil.copytree(converted, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    result = run("info", tmp_path / "m")  # info reads only the config: it still works
    assert result.exit_code == 0
    with pytest.raises(medmoe.MedMoEError, match="truncated"):
        medmoe.load_model(str(tmp_path / "m"))


def test_truncated_source_weights(tmp_path, sources):
    shutil.copytree(sources / "phi", tmp_path / "phi")
    path = tmp_path / "phi" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    result = run("convert", tmp_path / "out", "--vision", sources / "clip", "--llm", tmp_path / "phi")
    assert_clean_error(result, "model.safetensors", "truncated")


def edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_wrong_shape_and_missing_tensor(tmp_path, sources):
    shutil.copytree(sources / "phi", tmp_path / "phi")
    path = tmp_path / "phi" / "model.safetensors"
    edit_tensors(path, lambda t: t.update({"model.layers.1.mlp.fc1.weight": torch.zeros(3, 3)}))
    result = run("convert", tmp_path / "out", "--vision", sources / "clip", "--llm", tmp_path / "phi")
    assert_clean_error(result, "llm.layers.1.ffn.up_proj.weight", "(3, 3)", "expected (128, 64)")
    edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.fc1.weight"))
    result = run("convert", tmp_path / "out", "--vision", sources / "clip", "--llm", tmp_path / "phi")
    assert_clean_error(result, "missing tensor 'llm.layers.1.ffn.up_proj.weight'")


def test_bad_checkpoint_directories(tmp_path, sources, converted):
    assert_clean_error(run("info", tmp_path / "nowhere"), "no config.json")
    assert_clean_error(run("info", sources / "phi"), "not a medmoe config", "medmoe convert")
    shutil.copytree(converted, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["llm"]["arch"] = "bloom"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("info", tmp_path / "m"), "unknown architecture 'bloom'", "supported: phi")
    (tmp_path / "m" / "config.json").write_text("{not json")
    assert_clean_error(run("info", tmp_path / "m"), "invalid JSON")


def test_convert_argument_errors(tmp_path, sources):
    assert_clean_error(run("convert", tmp_path / "o", "--llm", sources / "phi"), "--vision")
    assert_clean_error(run("convert", tmp_path / "o"), "exactly one of")
    assert_clean_error(run("convert", tmp_path / "o", "--vision", tmp_path / "nope", "--llm", sources / "phi"), "not a directory")


def test_a_byte_span_that_disagrees_with_dtype_and_shape_never_loads(tmp_path, converted):
    """A header whose tensor claims more (or fewer) bytes than dtype x shape, or spans that overlap,
    is refused in one line instead of loading garbage weights (issue 13)."""
    shutil.copytree(converted, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["shape"] and v["shape"][0] > 1)
    header[name]["shape"][0] -= 1  # the span now holds more bytes than its shape
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(medmoe.MedMoEError, match="corrupt"):
        medmoe.load_model(str(tmp_path / "m"))
    assert_clean_error(run("ask", "--model", tmp_path / "m", "x.png", "q"), "model.safetensors")
