"""Benchmark: one decoded token's matrix-vector product, per weight format and kernel, against
what this machine's memory allows. This is where issue 11's decode-speed floors are decided.

    python bench/bench_kernels.py                  # 2 threads, StableLM-2's FFN shape
    python bench/bench_kernels.py --threads 1 --shape 2048x2048

One row x [1, K] times each of --matrices different [N, K] weights, so every call streams its
weight from memory as decoding does (one matrix, repeated, would sit in the CPU's cache). The
candidates are timed round-robin, --rounds rounds; the table shows the median. The ceiling is
summing a 2 GiB tensor, measured in the same run: "of the ceiling" is GB/s read / that.

The candidates are the kernels medmoe runs (kernels.linear / kernels.qlinear) plus two it does not:
the compiled one-row kernel's form on int8 weights (what inductor generates for int8 itself), and
fbgemm's int8 dynamic-quantized linear, which also quantizes the activations to 8 bits. The last
shows what an int8 kernel that streams at full bandwidth reaches. Its answers are another matter:
on real SmolLM2 weights it moved the next-token logits to cosine 0.98 of fp32's and changed 18
of 20 greedy answers (BENCHMARKS.md).
"""

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from medmoe import kernels


def candidates(N, K, M):
    g = torch.Generator().manual_seed(0)
    w32 = [torch.randn(N, K, generator=g) * 0.02 for _ in range(M)]
    x32 = torch.randn(1, K, generator=g)
    x16 = x32.bfloat16()
    w16 = [w.bfloat16() for w in w32]
    q8 = [kernels.quantize(w, 8) for w in w32]
    q4 = [kernels.quantize(w, 4, 64) for w in w32]
    one_row = torch.compile(kernels.linear, dynamic=False)  # the compiled decode step's kernel
    # the one-row kernel's form on int8 weights: what inductor writes for int8 from PyTorch code
    int8_row = torch.compile(lambda x, d, s: (x.unsqueeze(-2).float() * d.float()).sum(-1) * s.float(), dynamic=False)
    c = {  # name -> (bytes of one weight, the M calls)
        "fp32, F.linear (MKL)": (4, lambda: [F.linear(x32, w) for w in w32]),
        "bf16, F.linear (oneDNN)": (2, lambda: [F.linear(x16, w) for w in w16]),
        "bf16, compiled one-row kernel": (2, lambda: [one_row(x16, w) for w in w16]),
        "bf16w (fp32 x), compiled one-row kernel": (2, lambda: [one_row(x32, w) for w in w16]),
        "bf16w (fp32 x), eager, upcast in 1024-row blocks": (2, lambda: [kernels.linear(x32, w) for w in w16]),
        "int8, _weight_int8pack_mm": (1, lambda: [kernels.qlinear(x16, *q) for q in q8]),
        "int4 g64, _weight_int4pack_mm_for_cpu": (0.5, lambda: [kernels.qlinear(x16, *q) for q in q4]),
        "int8, compiled one-row kernel (not used)": (1, lambda: [int8_row(x32, *q) for q in q8]),
    }
    if "fbgemm" in torch.backends.quantized.supported_engines:
        with warnings.catch_warnings():  # quantized tensors are deprecated; measured for comparison only
            warnings.simplefilter("ignore")
            zero = torch.zeros(N, dtype=torch.long)
            packed = [torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
                w, (w.abs().amax(-1) / 127).double(), zero, 0, torch.qint8), None) for w in w32]
        c["int8 + int8 activations, fbgemm dynamic (not used)"] = (1, lambda: [torch.ops.quantized.linear_dynamic(x32, p) for p in packed])
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="5632x2048", help="N x K of each weight (default: StableLM-2's FFN up projection)")
    p.add_argument("--matrices", type=int, default=24, help="different weights per timed pass")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    N, K = map(int, args.shape.split("x"))
    cands = candidates(N, K, args.matrices)
    for _, fn in cands.values():
        fn()  # warm-up (and compilation)
    big = torch.ones(2**29)  # 2 GiB of fp32
    ceiling = lambda: big.sum()
    samples = {k: [] for k in [*cands, "ceiling"]}
    for _ in range(args.rounds):
        for k, (_, fn) in [*cands.items(), ("ceiling", (None, ceiling))]:
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    peak = big.numel() * 4 / statistics.median(samples.pop("ceiling")) / 1e9
    base = statistics.median(samples["bf16, F.linear (oneDNN)"])
    print(f"# bench_kernels: one row x {args.matrices} different {N}x{K} weights, {args.threads} threads, torch {torch.__version__}")
    print(f"\nmemory read ceiling (sum of a 2 GiB tensor): {peak:.1f} GB/s\n")
    print("| weights, kernel | per matrix | GB/s read | of the ceiling | speed vs bf16 F.linear |\n|---|---|---|---|---|")
    for k, (nbytes, _) in cands.items():
        t = statistics.median(samples[k])
        gbs = N * K * nbytes * args.matrices / t / 1e9
        print(f"| {k} | {t / args.matrices * 1e3:.3f} ms | {gbs:.1f} | {gbs / peak:.0%} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
