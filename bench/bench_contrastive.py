"""Benchmark: MedMoE (contrastive) on this machine. Training throughput (forward + backward of the
full loss: GLoRIA local + global + router cross-entropy), and inference with only the routed expert
run on each image against every expert run and mixed by the router's softmax (the authors' code).

    python bench/bench_contrastive.py            # tiny preset and the paper's Swin-T shape
    python bench/bench_contrastive.py --quick    # tiny preset only

Images per second are the median of --rounds timed repeats after a warm-up call, measured in
this one run (the ratio column compares paths measured side by side)."""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path += [os.path.join(HERE, "..")]

from medmoe import contrastive as C  # noqa: E402

SHAPES = {
    # our `tiny` preset (what bench/contrastive_shared.py trains) and the paper's: Swin-T at 224 px,
    # six experts of width 768, BERT-base (frozen in the paper: its backward is skipped here too)
    "tiny 64 px": (C.SwinConfig(image_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4),
                   C.TextConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=256, max_positions=64),
                   ("ct", "mri", "xray", "pathology"), 32, True),
    "Swin-T 224 px": (C.SwinConfig(), C.TextConfig(), C.ContrastiveConfig.modalities, 4, False),
}


def timed(fn, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def all_experts(model, pixels):
    """The authors' MoE: every expert on every image, mixed by the router's softmax."""
    out = model.swin(pixels)
    gates = model.router(out.pooled).softmax(-1)
    levels, sizes = out.hidden_states[: model.cfg.levels], out.sizes[: model.cfg.levels]
    return sum(gates[:, e, None, None] * expert(levels, sizes) for e, expert in enumerate(model.experts))


def measure(name, rounds):
    swin, text, modalities, batch, train_text = SHAPES[name]
    torch.manual_seed(0)
    model = C.ContrastiveMedMoE(C.ContrastiveConfig(swin=swin, text=text, modalities=modalities))
    model.text.requires_grad_(train_text)
    S = swin.image_size
    pixels = torch.randn(batch, 3, S, S)
    ids = torch.randint(4, text.vocab_size, (batch, text.max_tokens))
    mask, pieces = torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    labels = torch.arange(batch) % len(modalities)

    def step():
        model.zero_grad(set_to_none=True)
        model(pixels, ids, mask, pieces, labels).backward()

    train_s = timed(step, rounds)
    with torch.no_grad():
        one = timed(lambda: model.encode_image(pixels), rounds)
        every = timed(lambda: all_experts(model, pixels), rounds)
    return {"shape": name, "batch": batch, "train": batch / train_s, "one": batch / one, "all": batch / every}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, fp32\n")
    print("| shape | batch | train img/s (fwd+bwd) | inference img/s, routed expert only | every expert, mixed | saving |")
    print("|---|---|---|---|---|---|")
    for name in list(SHAPES)[: 1 if a.quick else None]:
        r = measure(name, a.rounds)
        row = [r["shape"], r["batch"], f"{r['train']:.1f}", f"{r['one']:.1f}", f"{r['all']:.1f}", f"{r['one'] / r['all']:.2f}x"]
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
