"""Benchmark: one decoded token's matrix-vector product, per weight format and kernel, against
what this machine's memory allows. This is where issue 11's decode-speed floors are decided.

    python bench/bench_kernels.py                  # 2 threads, StableLM-2's FFN shape
    python bench/bench_kernels.py --threads 1 --shape 2048x2048

One row x [1, K] times each of --matrices different [N, K] weights, so every call streams its
weight from memory as decoding does (one matrix, repeated, would sit in the CPU's cache). The
candidates are timed round-robin, --rounds rounds; the table shows the median. The ceiling is
summing a 2 GiB tensor, measured in the same run: "of the ceiling" is GB/s read / that.

The candidates are the kernels medmoe runs (kernels.linear / kernels.qlinear, eager and in a
compiled decode step; int8 and int4 through our cpu_kernels.cpp, each of its loops) plus
some it does not: PyTorch's own int4 kernel on the same weights, the one-row kernel as one sum
over a row longer than 4096 (inductor's cascade helper, which kernels.dot_rows avoids by summing
pieces), inductor's fused loop over int8 weights (what a CUDA step runs), the two packed kernels
on fp32 activations (why qlinear runs them in bf16), and fbgemm's int8 dynamic-quantized linear,
which rounds the activations to 8 bits with one scale for the whole row (cpu_kernels.cpp rounds
them to 16 bits for int8 weights, with one scale per 32 inputs). On real SmolLM2 weights fbgemm's
moved the next-token logits to cosine 0.98 of fp32's and changed 18 of 20 greedy answers
(BENCHMARKS.md).

--device cuda times the CUDA forms instead: cuBLAS on bf16 weights, the compiled decode step's
fused kernels (kernels.dot_rows over a dequantisation, what medmoe runs), eager dequantise + GEMM,
and PyTorch's own CUDA weight-only kernels (_weight_int8pack_mm; tinygemm's _weight_int4pack_mm
after repacking to its tiled layout), each checked against the dequantised weights first.
"""

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from medmoe import kernels


def torch_int4_layout(data, scales):
    """Our int4 (data, scales) in the layout torch._weight_int4pack_mm_for_cpu reads: the same weights."""
    q = kernels._unpack_int4(data).int()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), kernels.row_scales(scales).transpose(0, 1).contiguous()


def candidates(N, K, M):
    g = torch.Generator().manual_seed(0)
    w32 = [torch.randn(N, K, generator=g) * 0.02 for _ in range(M)]
    x32 = torch.randn(1, K, generator=g)
    x16 = x32.bfloat16()
    w16 = [w.bfloat16() for w in w32]
    q8 = [kernels.quantize(w, 8) for w in w32]
    q4 = [kernels.quantize(w, 4, 64) for w in w32]
    torch_q4 = [torch_int4_layout(d, s) for d, s in q4]  # PyTorch's int4 kernel, for comparison
    q8_32, q4_32 = ([(d, s.float()) for d, s in qs] for qs in (q8, torch_q4))
    one_row = torch.compile(kernels.linear, dynamic=False)  # the compiled decode step's kernel
    fused_row = torch.compile(lambda x, d, s: kernels.qdot_rows(x, d, s).to(x.dtype), dynamic=False)  # CUDA's form
    one_sum = torch.compile(lambda x, w: (x.unsqueeze(-2).float() * w.float()).sum(-1), dynamic=False)  # no pieces
    def loop(x, q, i):  # quant_rows' loop i (0 portable, 1 AVX2) on one weight
        return kernels.quant_rows(x, [q[0]], [q[1]], i)

    c = {  # name -> (bytes of one weight, the M calls)
        "fp32, F.linear (MKL)": (4, lambda: [F.linear(x32, w) for w in w32]),
        "bf16, F.linear (oneDNN)": (2, lambda: [F.linear(x16, w) for w in w16]),
        "bf16, compiled one-row kernel": (2, lambda: [one_row(x16, w) for w in w16]),
        "bf16w (fp32 x), compiled one-row kernel": (2, lambda: [one_row(x32, w) for w in w16]),
        "bf16, compiled one-row kernel as one sum (not used)": (2, lambda: [one_sum(x16, w) for w in w16]),
        "bf16w (fp32 x), eager, upcast in 1024-row blocks": (2, lambda: [kernels.linear(x32, w) for w in w16]),
        "int8, quant_rows (cpu_kernels.cpp, x rounded to int16)": (1, lambda: [kernels.qlinear(x16, *q) for q in q8]),
        "int8, quant_rows' AVX2 loop (CPUs without AVX512-VNNI)": (1, lambda: [loop(x16, q, 1) for q in q8]),
        "int8, quant_rows' portable loop (CPUs without AVX2)": (1, lambda: [loop(x16, q, 0) for q in q8]),
        "int8, _weight_int8pack_mm (without a C++ compiler)": (1, lambda: [torch._weight_int8pack_mm(x16, *q) for q in q8]),
        "int4 g64, quant_rows (cpu_kernels.cpp, x rounded to int8)": (0.5, lambda: [kernels.qlinear(x16, *q) for q in q4]),
        "int4 g64, quant_rows' AVX2 loop (CPUs without AVX512-VNNI)": (0.5, lambda: [loop(x16, q, 1) for q in q4]),
        "int4 g64, quant_rows' portable loop (CPUs without AVX2)": (0.5, lambda: [loop(x16, q, 0) for q in q4]),
        "int4 g64, _weight_int4pack_mm_for_cpu (not used)": (
            0.5, lambda: [torch._weight_int4pack_mm_for_cpu(x16, d, 64, s) for d, s in torch_q4]),
        "int8 (fp32 x), compiled fused loop (qdot_rows; CUDA's form, not used on a CPU)": (1, lambda: [fused_row(x32, *q) for q in q8]),
        # the same two kernels with fp32 activations (and scales): why qlinear computes in bf16
        "int8, _weight_int8pack_mm, fp32 x (not used)": (1, lambda: [torch._weight_int8pack_mm(x32, d, s) for d, s in q8_32]),
        "int4 g64, _weight_int4pack_mm_for_cpu, fp32 x (not used)": (
            0.5, lambda: [torch._weight_int4pack_mm_for_cpu(x32, d, 64, s) for d, s in q4_32]),
    }
    if "fbgemm" in torch.backends.quantized.supported_engines:
        with warnings.catch_warnings():  # quantized tensors are deprecated; measured for comparison only
            warnings.simplefilter("ignore")
            zero = torch.zeros(N, dtype=torch.long)
            packed = [torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
                w, (w.abs().amax(-1) / 127).double(), zero, 0, torch.qint8), None) for w in w32]
        c["int8 + int8 activations, fbgemm dynamic (not used)"] = (1, lambda: [torch.ops.quantized.linear_dynamic(x32, p) for p in packed])
    return c


def cuda_candidates(N, K, M):
    dev = "cuda"
    g = torch.Generator(dev).manual_seed(0)
    w16 = [torch.randn(N, K, generator=g, device=dev).bfloat16() * 0.02 for _ in range(M)]
    x16 = torch.randn(1, K, generator=g, device=dev).bfloat16()
    q8 = [kernels.quantize(w.cpu(), 8) for w in w16]
    q4 = [kernels.quantize(w.cpu(), 4, 64) for w in w16]
    q8, q4 = ([tuple(t.to(dev) for t in q) for q in qs] for qs in (q8, q4))
    fused = torch.compile(kernels.qlinear, dynamic=False)  # the decode step's form
    row = torch.compile(lambda x, w: kernels.dot_rows(x, w).to(x.dtype), dynamic=False)

    def tinygemm(data, scales):  # repacked from our CPU layout into tinygemm's tiled one
        q = kernels._unpack_int4(data)
        return torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8), scales

    try:
        t4 = [tinygemm(*q) for q in q4]
    except RuntimeError as e:  # a GPU older than tinygemm's (sm80)
        print(f"tinygemm: {str(e).splitlines()[0]}")
        t4 = []
    c = {
        "bf16, F.linear (cuBLAS)": (2, lambda: [F.linear(x16, w) for w in w16]),
        "bf16, compiled dot_rows": (2, lambda: [row(x16, w) for w in w16]),
        "int8, compiled dot_rows over the dequantisation (used)": (1, lambda: [fused(x16, *q) for q in q8]),
        "int4 g64, compiled dot_rows over the dequantisation (used)": (0.5, lambda: [fused(x16, *q) for q in q4]),
        "int8, eager dequantise + cuBLAS (used eager)": (1, lambda: [kernels.qlinear(x16, *q) for q in q8]),
        "int4 g64, eager dequantise + cuBLAS (used eager)": (0.5, lambda: [kernels.qlinear(x16, *q) for q in q4]),
        "int8, _weight_int8pack_mm (not used)": (1, lambda: [torch._weight_int8pack_mm(x16, *q) for q in q8]),
    }
    if t4:
        c["int4 g64, tinygemm _weight_int4pack_mm (not used)"] = (0.5, lambda: [torch._weight_int4pack_mm(x16, d, 64, s) for d, s in t4])
    for name, (_, fn) in list(c.items()):  # each against the float product on its weights
        try:
            got = fn()[0].float()
        except RuntimeError as e:
            print(f"{name}: {str(e).splitlines()[0]}")
            del c[name]
            continue
        w = w16[0].float() if name.startswith("bf16") else kernels.dequantize(*(q8 if name.startswith("int8") else q4)[0])
        want = F.linear(x16.float(), w)
        err = ((got - want).norm() / want.norm()).item()
        print(f"{name}: relative error {err:.1e} against the dequantised weights")
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="5632x2048", help="N x K of each weight (default: StableLM-2's FFN up projection)")
    p.add_argument("--matrices", type=int, default=24, help="different weights per timed pass")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    N, K = map(int, args.shape.split("x"))
    cuda = args.device == "cuda"
    cands = cuda_candidates(N, K, args.matrices) if cuda else candidates(N, K, args.matrices)
    sync = torch.cuda.synchronize if cuda else lambda: None
    for _, fn in cands.values():
        fn()  # warm-up (and compilation)
    big = torch.ones(2**29, device=args.device)  # 2 GiB of fp32
    ceiling = lambda: big.sum()
    samples = {k: [] for k in [*cands, "ceiling"]}
    for _ in range(args.rounds):
        for k, (_, fn) in [*cands.items(), ("ceiling", (None, ceiling))]:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[k].append(time.perf_counter() - t0)
    peak = big.numel() * 4 / statistics.median(samples.pop("ceiling")) / 1e9
    base = statistics.median(samples[next(k for k in cands if k.startswith("bf16, F.linear"))])
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(f"# bench_kernels: one row x {args.matrices} different {N}x{K} weights, {where}, torch {torch.__version__}")
    print(f"\nmemory read ceiling (sum of a 2 GiB tensor): {peak:.1f} GB/s\n")
    print("| weights, kernel | per matrix | GB/s read | of the ceiling | speed vs bf16 F.linear |\n|---|---|---|---|---|")
    for k, (nbytes, _) in cands.items():
        t = statistics.median(samples[k])
        gbs = N * K * nbytes * args.matrices / t / 1e9
        print(f"| {k} | {t / args.matrices * 1e3:.3f} ms | {gbs:.1f} | {gbs / peak:.0%} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
