"""Training: trainable sets per stage, upcycling, exact resume, DDP equivalence, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tiny
import torch
from click.testing import CliRunner

import medmoe
from medmoe import cli, files, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(tmp, stage, src, out, **kw):
    base = dict(stage=stage, model=str(src), data=[str(tmp / "d" / "train.jsonl")], out=str(out), batch_size=4, lr=3e-3,
                quiet=True, router_steps=100)
    return train.TrainArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny model taken through stages 1, 2 and 3 (three epochs each)."""
    tmp = tmp_path_factory.mktemp("stages")
    tiny.make_model(tmp / "m0")
    tiny.make_dataset(tmp / "d")
    results = {}
    for stage, src in ((1, tmp / "m0"), (2, tmp / "s1"), (3, tmp / "s2")):
        results[stage] = train.train(args(tmp, stage, src, tmp / f"s{stage}", train_vision=stage == 1, epochs=3,
                                          lr=1e-3 if stage == 3 else 3e-3))
    return tmp, results


def jsonl(path, key=None):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return rows if key is None else [r[key] for r in rows if key in r]


def tensors(directory):
    return {k: v.clone() for k, v in files.read_safetensors(os.path.join(directory, "model.safetensors")).items()}


def changed(before, after):
    return {k for k in after if k not in before or not torch.equal(before[k], after[k])}


def test_each_stage_trains_exactly_its_set(tmp_path, stages):
    tmp, _ = stages
    s0, s1, s2, s3 = (tensors(tmp / n) for n in ("m0", "s1", "s2", "s3"))
    proj = {k for k in s0 if k.startswith("projector.")}
    vision = {k for k in s0 if k.startswith("vision.")}
    assert changed(s0, s1) == proj | vision  # stage 1 (--train-vision here, as the demo does)
    # stage 2 without --train-vision: the tower stays bit-identical, everything else moves
    assert changed(s1, s2) == set(s1) - vision
    # stage 3: only experts and meta expert move. Compare under stage-2 names (meta_expert = the dense FFN)
    routed = (".ffn.experts.", ".ffn.router.")
    dense_named = {k.replace(".ffn.meta_expert.", ".ffn."): v for k, v in s3.items() if not any(r in k for r in routed)}
    meta = {k for k in s2 if ".ffn." in k and k.replace(".ffn.", ".ffn.meta_expert.") in s3}
    assert meta and changed(s2, dense_named) == meta
    experts = [k for k in s3 if ".ffn.experts." in k]
    assert experts and all(not torch.equal(s3[k][0], s2[k.replace(".experts.", ".") + ".weight"]) for k in experts if k.endswith("_proj"))
    weight, bias, modalities = train.load_router(str(tmp / "s2" / "router.safetensors"), 4)
    for k in (k for k in s3 if k.endswith(".ffn.router.weight")):
        assert torch.equal(s3[k], weight) and torch.equal(s3[k.replace("weight", "bias")], bias)
    assert modalities == tiny.MODALITIES
    cfg = medmoe.load_config(str(tmp / "s3"))
    assert cfg.moe.modalities == tiny.MODALITIES and cfg.moe.top_k == 1 and cfg.moe.meta_expert


def test_losses_fall_and_router_report(stages):
    tmp, results = stages
    for stage in (1, 2, 3):
        losses = results[stage]["losses"]
        assert len(losses) == results[stage]["steps"] == 36
        assert sum(losses[-12:]) < sum(losses[:12])  # each epoch sees the same records: compare epochs
    report = results[2]["router"]
    assert report["modalities"] == tiny.MODALITIES and report["held_out_records"] >= 1 and 0 <= report["record_acc"] <= 1
    log = jsonl(tmp / "s2" / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 37)) and all(r["tokens_per_s"] > 0 for r in log)
    with open(tmp / "s2" / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert medmoe.load_model(str(tmp / "s3")).cfg.moe is not None  # the final model loads from OUT


def test_upcycled_moe_relates_to_the_dense_ffn(stages):
    """Right after upcycling: Med-MoE's sum gives (1 + g) x the dense FFN (g: the chosen gate);
    meta expert off with renormalised top-k gives the dense FFN itself."""
    tmp, _ = stages
    dense = medmoe.load_model(str(tmp / "s2"))
    x = torch.randn(2, 7, dense.cfg.llm.hidden_size)
    layer_id = medmoe.moe_layer_ids(medmoe.MoEConfig(), dense.cfg.llm.num_layers)[0]
    with torch.no_grad():
        expected = dense.llm.layers[layer_id].ffn(x)
    for moe, relation in ((medmoe.MoEConfig(top_k=1), "1+g"), (medmoe.MoEConfig(top_k=2, meta_expert=False, renormalize=True), "dense")):
        model = medmoe.load_model(str(tmp / "s2"))
        model.upcycle(moe)
        layer = model.llm.layers[layer_id].ffn
        with torch.no_grad():
            out, _ = layer(x)
            g = layer.route(x.reshape(-1, x.shape[-1]))[1].sum(-1).view(2, 7, 1)
        if relation == "1+g":
            torch.testing.assert_close(out, (1 + g) * expected, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path, stages):
    """An uninterrupted run against one restarted from its step-4 checkpoint: same losses after."""
    tmp, _ = stages
    full = train.train(args(tmp, 2, tmp / "s1", tmp_path / "full", epochs=2, save_every=4, keep=10))
    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000004", resumed_out / "checkpoints" / "step-0000004")
    (resumed_out / "checkpoints" / "latest").write_text("step-0000004")
    resumed = train.train(args(tmp, 2, tmp / "s1", resumed_out, epochs=2, save_every=4, keep=10, resume=True))
    assert resumed["losses"] == full["losses"][4:]  # bit-identical on CPU fp32
    assert changed(tensors(tmp_path / "full"), tensors(resumed_out)) == set()


def test_sigterm_saves_and_resume_matches(tmp_path, stages):
    tmp, _ = stages
    common = ["--stage", "2", "--model", str(tmp / "s1"), "--data", str(tmp / "d" / "train.jsonl"), "--batch-size", "1",
              "--epochs", "6", "--lr", "1e-3", "--router-steps", "10"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "medmoe.cli", "train", *common, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted (SIGTERM)" in stdout and "Traceback" not in stderr
    stopped_at = len(log.read_text().splitlines())
    assert 3 <= stopped_at < 288
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped_at:07d}"
    done = subprocess.run([sys.executable, "-m", "medmoe.cli", "train", *common, "--out", str(out), "--resume"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reference = train.train(args(tmp, 2, tmp / "s1", tmp_path / "ref", batch_size=1, epochs=6, lr=1e-3, router_steps=10))
    resumed = jsonl(log, "loss")
    assert resumed == reference["losses"]


@pytest.mark.parametrize("shard", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, stages, shard):
    """torchrun with 2 processes x batch 2 against 1 process x batch 4: the same global batches."""
    tmp, _ = stages
    common = ["train", "--stage", "2", "--model", str(tmp / "s1"), "--data", str(tmp / "d" / "train.jsonl"), "--max-steps", "5",
              "--lr", "1e-3", "--router-steps", "20"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    port = str(29517 + len(shard))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m", "medmoe.cli",
                          *common, *shard, "--batch-size", "2", "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train.train(args(tmp, 2, tmp / "s1", tmp_path / "one", batch_size=4, max_steps=5, lr=1e-3, router_steps=20))
    losses = jsonl(tmp_path / "two" / "train_log.jsonl", "loss")
    assert losses == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_bad_images_are_skipped_and_counted(tmp_path, stages):
    tmp, _ = stages
    records = jsonl(tmp / "d" / "train.jsonl")[:8]
    shutil.copytree(tmp / "d" / "images", tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "images" / "notes.png").write_text("not an image")
    records += [{**records[0], "image": "images/broken.png"}, {**records[1], "image": "images/notes.png"},
                {**records[1], "image": "images/notes.png", "id": "again"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(cli.main, ["train", "--stage", "1", "--model", str(tmp / "m0"), "--data", str(tmp_path / "t.jsonl"),
                                           "--out", str(tmp_path / "o"), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning: skipped" in line]  # (after a progress bar's \r)
    assert len(warnings) == 2 and "broken.png" in warnings[0] + warnings[1] and "notes.png" in warnings[0] + warnings[1]
    assert "skipped 2 unreadable image file(s)" in result.output


def test_nan_loss_stops_clearly(tmp_path, stages):
    tmp, _ = stages
    result = CliRunner().invoke(cli.main, ["train", "--stage", "2", "--model", str(tmp / "s1"), "--data", str(tmp / "d" / "train.jsonl"),
                                           "--out", str(tmp_path / "o"), "--lr", "1e12", "--clip", "0", "--save-every", "1",
                                           "--warmup", "0"])
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if "error:" in line]
    message = line[line.index("error:"):]  # (the progress bar may share its line)
    assert message.startswith("error: stage 2: ") and "stopped" in message and "checkpoints/step-" in message
    assert "Traceback" not in result.output


@pytest.mark.parametrize("argv, message", [
    (["--stage", "3"], "no router file"),
    (["--stage", "2", "--data", "missing.jsonl"], "no such data file"),
])
def test_bad_input_is_one_line(tmp_path, stages, argv, message):
    tmp, _ = stages
    base = {"--model": str(tmp / "s1"), "--data": str(tmp / "d" / "train.jsonl"), "--out": str(tmp_path / "o")}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    result = CliRunner().invoke(cli.main, ["train", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output


def test_stage3_ablations(tmp_path, stages):
    tmp, _ = stages
    out = train.train(args(tmp, 3, tmp / "s2", tmp_path / "a", learned_router=True, meta_expert=False, top_k=2, aux_loss_coef=0.01,
                           max_steps=2))
    cfg = medmoe.load_config(out["out"])
    assert (cfg.moe.meta_expert, cfg.moe.top_k, cfg.moe.renormalize, cfg.moe.aux_loss_coef) == (False, 2, True, 0.01)
    before, after = tensors(tmp / "s2"), tensors(tmp_path / "a")
    assert any(".ffn.router." in k for k in changed(before, after))  # the learned router trains


SHARED = os.path.join(ROOT, "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "vqa_rad")), reason="../shared/data is absent")
def test_three_stages_on_real_vqa_data(tmp_path):
    """Real VQA-RAD and PathVQA training records (a labelled subset), a from-scratch tiny model:
    the loss falls in every stage and the stage-2 router reports held-out modality accuracy."""
    records = []
    for name in ("vqa_rad", "pathvqa"):
        rows = [r for r in jsonl(os.path.join(SHARED, name, "train.jsonl")) if r.get("modality")][:80]
        records += [{**r, "image": os.path.join(SHARED, name, r["image"])} for r in rows]
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in records))
    train.init_model(str(tmp_path / "m0"), [str(subset)], preset="tiny")
    results = {}
    for stage, src in ((1, "m0"), (2, "s1"), (3, "s2")):
        a = train.TrainArgs(stage=stage, model=str(tmp_path / src), data=[str(subset)], out=str(tmp_path / f"s{stage}"), batch_size=8,
                            epochs=3, lr=2e-3, train_vision=stage == 1, quiet=True, router_steps=200)
        results[stage] = train.train(a)
        losses, per_epoch = results[stage]["losses"], results[stage]["steps"] // 3
        assert sum(losses[-per_epoch:]) < sum(losses[:per_epoch]), stage
    report = results[2]["router"]
    assert set(report["modalities"]) == {"ct", "mri", "xray", "pathology"} and report["held_out_records"] > 0


def test_grad_checkpointing_changes_nothing_but_memory(tmp_path, stages):
    tmp, _ = stages
    plain = train.train(args(tmp, 2, tmp / "s1", tmp_path / "a", max_steps=3))
    ckpt = train.train(args(tmp, 2, tmp / "s1", tmp_path / "b", max_steps=3, grad_checkpointing=True))
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ----------------------------------------------------------------------------- the checkpoint lifecycle under kills


class Killed(BaseException):
    """A kill -9 at a file operation: nothing of the trainer's runs after it (BaseException: no
    `except Exception` in the trainer can catch it)."""


def file_operations(monkeypatch, kill_at=None):
    """Count the trainer's file operations (renames, links, deletions, writes of trainer state);
    with kill_at, die at that one: before it happens, or for a deletion halfway through it."""
    count = [0]

    def hooked(name, real):
        def op(*a, **kw):
            count[0] += 1
            if count[0] == kill_at:
                if name == "rmtree" and os.path.isdir(a[0]):  # a directory half deleted
                    for entry in sorted(os.listdir(a[0]))[:1]:
                        os.remove(os.path.join(a[0], entry))
                raise Killed(f"{name} {a[:1]}")
            return real(*a, **kw)
        return op

    for module, name in ((os, "rename"), (os, "replace"), (os, "link"), (os, "remove"), (shutil, "rmtree"), (torch, "save")):
        monkeypatch.setattr(module, name, hooked(name, getattr(module, name)))
    return count


def test_a_kill_at_any_file_operation_then_resume_gives_the_same_model(tmp_path, stages, monkeypatch):
    """Issue 13: kill the trainer at each of its file operations in turn (saving, moving
    `latest`, rotating old checkpoints, publishing the final model); `--resume` then always ends
    with the uninterrupted run's weights and router, and nothing half-written is left behind."""
    tmp, _ = stages
    run = lambda out, resume=False: train.train(args(tmp, 2, tmp / "s1", out, max_steps=4, save_every=2, keep=1, router_steps=10,
                                                     resume=resume))
    with monkeypatch.context() as m:
        ops = file_operations(m)
        run(tmp_path / "whole")
    want, want_router = tensors(tmp_path / "whole"), tensors_of(tmp_path / "whole" / "router.safetensors")
    assert ops[0] >= 10
    for k in range(1, ops[0] + 1):
        out = tmp_path / f"kill{k}"
        with monkeypatch.context() as m, pytest.raises(Killed):
            file_operations(m, kill_at=k)
            run(out)
        summary = run(out, resume=True)
        assert summary.get("complete") or summary["steps"] == 4, k
        assert changed(want, tensors(out)) == set(), k
        assert changed(want_router, tensors_of(out / "router.safetensors")) == set(), k
        left = [n for n in os.listdir(out / "checkpoints") + os.listdir(out) if ".tmp" in n or ".trash" in n]
        assert left == [], (k, left)
        assert run(out, resume=True).get("complete"), k  # and once finished, it says so
        shutil.rmtree(out)


def tensors_of(path):
    return {k: v.clone() for k, v in files.read_safetensors(str(path)).items()}
