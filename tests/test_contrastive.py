"""MedMoE (contrastive): expert branches, one-expert dispatch, the training loss, checkpoints, the
converter (against transformers), and the CLI: init -> train --stage contrastive (+ resume) -> classify, probe."""

import json
import shutil

import pytest
import tiny
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from medmoe import cli, kernels, train
from medmoe import contrastive as C

TOL = 1e-4
MODALITIES = tiny.MODALITIES


def small_model(seed=0):
    swin = C.SwinConfig(image_size=32, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=2)
    text = C.TextConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=32)
    torch.manual_seed(seed)
    return C.ContrastiveMedMoE(C.ContrastiveConfig(swin=swin, text=text, modalities=tuple(MODALITIES), regions=4)).eval()


def batch(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    pieces = torch.zeros(B, T, dtype=torch.bool)
    pieces[0, 3] = True
    return torch.randn(B, 3, 32, 32, generator=g), ids, mask, pieces


def test_expert_with_uniform_scale_attention_is_the_mean_of_upsampled_scales():
    torch.manual_seed(0)
    expert = C.Expert([4, 8], 6)
    torch.nn.init.zeros_(expert.scale_attn[2].weight)
    torch.nn.init.zeros_(expert.scale_attn[2].bias)  # every scale gets the same logit: weights 1/2
    fine, coarse = torch.randn(2, 4 * 4, 4), torch.randn(2, 1, 8)  # a 4x4 map and a 1x1 map
    got = expert([fine, coarse], [(4, 4), (1, 1)])
    # by hand: a 1x1 map upsamples to a constant; the fine scale is used as it is
    want = (F.relu(expert.proj[0](fine)) + F.relu(expert.proj[1](coarse)).expand(2, 16, 6)) / 2
    assert (got - want).abs().max().item() < 1e-6


class Counting(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, inputs):
        self.calls.append(len(inputs[0]))
        return inputs[0] * self.scale


def test_dispatch_runs_only_the_chosen_experts():
    experts = [Counting(s) for s in (1.0, 2.0, 3.0)]
    x = torch.randn(5, 4)
    chosen = torch.tensor([2, 0, 2, 2, 0])
    out = kernels.dispatch_samples(experts, chosen, [x])
    want = torch.stack([x[i] * (chosen[i] + 1) for i in range(5)])  # the oracle: each sample by its own expert
    assert torch.equal(out, want)
    assert [e.calls for e in experts] == [[2], [], [3]]  # expert 1 never ran; the others once each


def test_inference_routes_by_the_router_and_labels_override_it():
    model = small_model()
    pixels = batch()[0]
    with torch.no_grad():
        img = model.encode_image(pixels)
        assert torch.equal(img.expert, img.router_logits.argmax(-1))
        forced = model.encode_image(pixels, torch.tensor([3, -1, 0, 1]))
        # each image's local features are exactly its chosen expert's, run alone
        out = model.swin(pixels)
        for i, e in enumerate(forced.expert.tolist()):
            alone = model.experts[e]([h[i : i + 1] for h in out.hidden_states[:4]], out.sizes[:4])
            assert (forced.local[i] - alone[0]).abs().max().item() < 1e-5
    assert forced.expert.tolist()[::2] == [3, 0] and forced.expert[1] == img.expert[1]


def test_loss_is_gloria_plus_twice_the_router_cross_entropy():
    model = small_model()
    pixels, ids, mask, pieces = batch()
    labels = torch.tensor([0, 1, -1, 3])
    loss = model(pixels, ids, mask, pieces, labels)
    img = model.encode_image(pixels, labels)
    words, word_mask, sentence = model.text(ids, mask, pieces)
    gloria = C.gloria_loss(model.regions(img), img.embedding, words, word_mask, sentence)
    logits = img.router_logits.float()
    ce = -(logits.log_softmax(-1)[[0, 1, 3], [0, 1, 3]]).mean()  # the labelled images only
    assert abs(loss.item() - (gloria.item() + 2.0 * ce.item())) < 1e-5
    unlabelled = model(pixels, ids, mask, pieces, torch.full((4,), -1))
    assert unlabelled.item() == pytest.approx(C.gloria_loss(model.regions(model.encode_image(pixels)), model.encode_image(pixels).embedding,
                                                            words, word_mask, sentence).item(), abs=1e-5)
    loss.backward()
    used = {0, 1, 3} | {int(model.encode_image(pixels).expert[2])}
    for e, expert in enumerate(model.experts):
        has_grad = expert.proj[0].weight.grad is not None and expert.proj[0].weight.grad.abs().sum() > 0
        assert has_grad == (e in used)  # an expert no image chose gets no gradient (it never ran)
    assert model.router.fc1.weight.grad.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    model = small_model(seed=3)
    C.save_model(model, tmp_path / "m")
    again = C.load_model(tmp_path / "m")
    pixels, ids, mask, pieces = batch()
    with torch.no_grad():
        a, b = model.encode_image(pixels), again.encode_image(pixels)
        assert (a.embedding - b.embedding).abs().max() < 1e-6 and torch.equal(a.expert, b.expert)
        assert (model.text(ids, mask, pieces)[2] - again.text(ids, mask, pieces)[2]).abs().max() < 1e-6


def test_converter_reproduces_transformers(tmp_path):
    """Through `medmoe convert --swin --bert`: our checkpoint's Swin and BERT against the HF originals."""
    transformers = pytest.importorskip("transformers")
    from test_bert_parity import SMALL, VOCAB, write_vocab
    from test_swin_parity import save_swin

    ref_swin = save_swin(tmp_path / "swin")
    torch.manual_seed(1)
    ref_bert = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    ref_bert.save_pretrained(tmp_path / "bert")
    write_vocab(tmp_path / "bert")
    result = CliRunner().invoke(cli.main, ["convert", str(tmp_path / "out"), "--swin", str(tmp_path / "swin"), "--bert",
                                           str(tmp_path / "bert"), "--modalities", "ct,mri"])
    assert result.exit_code == 0, result.output
    ours = C.load_model(tmp_path / "out")
    pixels = torch.randn(2, 3, 128, 128)
    ids = torch.randint(5, len(VOCAB), (2, 9))
    with torch.no_grad():
        want, got = ref_swin(pixels, output_hidden_states=True), ours.swin(pixels)
        diffs = [(g - w).abs().max().item() for g, w in zip(got.hidden_states, want.hidden_states)]
        bert_want = ref_bert(ids, output_hidden_states=True).hidden_states
        diffs += [(g - w).abs().max().item() for g, w in zip(ours.text.hidden_states(ids), bert_want)]
    assert max(diffs) <= TOL, diffs
    assert ours.cfg.modalities == ("ct", "mri") and (tmp_path / "out" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------- the CLI, end to end


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output + result.stderr
    return result


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contrastive")
    train_file = tiny.make_dataset(tmp / "train", per_modality=6, seed=1)
    test_file = tiny.make_dataset(tmp / "test", per_modality=3, seed=2, name="test.jsonl")
    r = run("init", tmp / "m0", "--kind", "contrastive", "--preset", "tiny", "--data", train_file, "--modalities", ",".join(MODALITIES))
    assert r.exit_code == 0, r.output
    r = run("train", "--stage", "contrastive", "--model", tmp / "m0", "--data", train_file, "--out", tmp / "m1", "--epochs", 6,
            "--batch-size", 8, "--lr", "2e-3", "--train-text", "--save-every", 6)
    assert r.exit_code == 0, r.output
    return tmp, train_file, test_file


def test_train_writes_a_loadable_model_and_a_log(trained):
    tmp, _, _ = trained
    rows = read_log(tmp / "m1" / "train_log.jsonl")
    assert len([r for r in rows if "loss" in r]) == 18  # 24 images / 8 per step x 6 epochs
    assert (tmp / "m1" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = C.load_model(tmp / "m1")
    info = run("info", tmp / "m1").output
    per_image = sum(p.numel() for m in (model.swin, model.router, model.experts[0]) for p in m.parameters())
    assert "MedMoE (contrastive)" in info and f"per image   {per_image / 1e6:.2f}M run" in info


def test_resume_continues_the_same_trajectory(trained, tmp_path):
    """A run cut after its step-4 checkpoint and resumed logs the very losses of the uninterrupted run."""
    tmp, train_file, _ = trained
    args = dict(stage="contrastive", model=str(tmp / "m0"), data=[train_file], out=str(tmp_path / "r"), epochs=3, batch_size=8,
                lr=2e-3, train_text=True, save_every=2, max_steps=6, quiet=True)
    train.train(train.TrainArgs(**args))
    log = tmp_path / "r" / "train_log.jsonl"
    straight = [r["loss"] for r in read_log(log)]
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-0000006")
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step-0000004")
    train.train(train.TrainArgs(**args, resume=True))
    assert [r["loss"] for r in read_log(log)] == pytest.approx(straight, abs=1e-6)


def test_classify_prints_probabilities_and_the_expert(trained):
    tmp, _, test_file = trained
    image = str(tmp / "test" / "images" / "ct-2-0.png")
    r = run("classify", image, "--labels", "ct,mri", "--model", tmp / "m1")
    assert r.exit_code == 0, r.output
    line = r.output.strip()
    probs = [float(p.split()[-1].rstrip("%")) for p in line.split(": ", 1)[1].split("  (")[0].split(", ")]
    assert sum(probs) == pytest.approx(100, abs=0.2) and "expert)" in line
    model, tok = cli.contrastive_model(str(tmp / "m1"), "cpu")
    _, expert = C.embed_images(model, [image], progress=False)
    assert f"routed to the {MODALITIES[int(expert[0])]} expert" in line
    # the probabilities by hand: mean of the prompts' unit sentence embeddings per class, cosine x 10, softmax
    emb, _ = C.embed_images(model, [image], progress=False)
    classes = []
    for name in ("ct scan", "mri scan"):
        ids, mask, pieces = C.encode_captions(tok, [p.format(name) for p in C.PROMPTS])
        with torch.no_grad():
            classes.append(F.normalize(model.text(ids, mask, pieces)[2], dim=-1).mean(0))
    want = (10 * F.cosine_similarity(emb, torch.stack(classes))).softmax(-1)
    assert sorted(probs, reverse=True) == pytest.approx(sorted((100 * want).tolist(), reverse=True), abs=0.051)
    r = run("classify", "--data", test_file, "--model", tmp / "m1")
    assert "zero-shot modality accuracy" in r.output and "router modality accuracy" in r.output


def test_probe_learns_the_synthetic_modalities(trained):
    tmp, train_file, test_file = trained
    r = run("probe", "--train", train_file, "--test", test_file, "--model", tmp / "m1")
    assert r.exit_code == 0, r.output
    acc = float(r.output.split("linear probe (modality): ")[1].split("%")[0])
    assert acc >= 75  # four patterns a linear classifier on the embeddings tells apart (chance: 25%)


def test_probe_and_classify_read_class_folders(trained, tmp_path):
    """A folder of class subfolders is the same labelled set as the records it was made from."""
    tmp, train_file, test_file = trained
    for name, records in (("train", train_file), ("test", test_file)):
        paths, labels = C.labelled_images(records)
        for p, label in zip(paths, labels):
            (tmp_path / name / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, tmp_path / name / label)
    from_records = run("probe", "--train", train_file, "--test", test_file, "--model", tmp / "m1").output
    from_folders = run("probe", "--train", tmp_path / "train", "--test", tmp_path / "test", "--model", tmp / "m1").output
    line = lambda out: [x for x in out.splitlines() if x.startswith("linear probe")]
    assert line(from_folders) == line(from_records)
    r = run("classify", "--data", tmp_path / "test", "--model", tmp / "m1")
    assert r.exit_code == 0 and "of 12 images (ct, mri, pathology, xray)" in r.output


@pytest.mark.parametrize("args,message", [
    (["classify", "missing.png", "--model", "{m}"], "missing.png"),
    (["classify", "{img}", "--model", "{medmoe}"], "not a MedMoE contrastive checkpoint"),
    (["classify", "{img}"], "no model"),
    (["train", "--stage", "contrastive", "--model", "{medmoe}", "--data", "{data}", "--out", "{out}"], "not a MedMoE contrastive"),
    (["convert", "{out}", "--swin", "{m}"], "needs both --swin and --bert"),
])
def test_bad_input_is_one_line(trained, tmp_path, monkeypatch, args, message):
    tmp, train_file, _ = trained
    monkeypatch.delenv("MEDMOE_MODEL", raising=False)
    medmoe_dir = tiny.make_model(tmp_path / "vqa")
    fill = dict(m=tmp / "m1", img=tmp / "test" / "images" / "ct-2-0.png", medmoe=medmoe_dir, data=train_file, out=tmp_path / "o")
    r = run(*[a.format(**{k: str(v) for k, v in fill.items()}) for a in args])
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_torchrun_two_processes(trained, tmp_path):
    """Under torchrun (DDP), batches where some expert is chosen by no image still train (unused parameters)."""
    import os
    import subprocess
    import sys

    tmp, train_file, _ = trained
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", "-m", "medmoe.cli"]
    done = subprocess.run([*torchrun, "train", "--stage", "contrastive", "--model", str(tmp / "m0"), "--data", str(train_file), "--out",
                           str(tmp_path / "two"), "--max-steps", "3", "--batch-size", "3", "--lr", "1e-3", "--train-text"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [r["loss"] for r in read_log(tmp_path / "two" / "train_log.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < v < 100 for v in losses)
    C.load_model(tmp_path / "two")
