"""Mixture-of-experts dispatch: run each token through its k chosen experts and combine.

    out[t] = sum_j expert_weight[t, j] * expert_{expert_idx[t, j]}(x[t])

Experts live in stacked tensors (up_proj/gate_proj [E, F, H], down_proj [E, H, F]) and every path below
runs the same expert MLP (`_expert`); they differ only in how one linear layer reaches the
right expert's weights. A weight may also be weight-only quantized (int8 / int4, see the end of
this file): then it is a (data, scales) pair and every path reaches the quantized kernels. A
float weight stored narrower than x (weight-only bf16) is upcast where it is read.
  loop     for each expert, the tokens routed to it -> F.linear. Simple; the test oracle.
  grouped  sort the (token, slot) rows by expert, then one grouped GEMM per projection over
           contiguous row blocks. Best for prefill and training.
  gather   each row through its own expert's weights: under torch.compile an indexed
           batch-matmul (on CUDA a product and a sum, dot_rows) that inductor fuses (no sort,
           no host sync, no opaque op); eager, a small matmul per row on weight views. Decoding.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

DISPATCHES = ("loop", "grouped", "gather")


class ExpertWeights(NamedTuple):
    """One MoE layer's stacked expert tensors, named as medmoe.Experts names them (a weight may
    be a quantized (data, scales) pair; gate_proj and the biases may be None)."""

    up_proj: Tensor
    down_proj: Tensor
    gate_proj: Tensor | None
    up_bias: Tensor | None
    down_bias: Tensor | None

# `auto` uses gather for at most this many (token, slot) rows. Measured on a 2-core AVX512 CPU
# (H=512, F=1408, E=4, SwiGLU, forward, ms):
#   T*k                       1     2     4     8    16    32    64
#   compiled gather  fp32   0.19               1.7   2.9   5.3  10.3
#   compiled grouped fp32   0.60               5.6   5.6   7.1   7.5
#   compiled gather  bf16   0.15               1.2   2.1   3.9   7.1
#   compiled grouped bf16   0.51               1.8   2.5   2.9   3.3
#   eager gather     fp32         1.97  3.88  7.4  14.7  30.0
#   eager grouped    fp32         2.21  4.25  6.5   5.4   5.5
#   eager gather     bf16         0.69  1.97  3.1   8.2  11.2
#   eager grouped    bf16         1.16  2.03  2.1   3.1   2.4
# Compiled, inductor fuses the weight indexing into the matrix-vector products (nothing is
# copied, no host sync). Eager, gather runs one small matmul per row on weight views: it wins
# only while there are very few rows (one decoded token).
GATHER_MAX_ROWS = 16
EAGER_GATHER_MAX_ROWS = 2


def choose_dispatch(x: Tensor, rows: int, needs_grad: bool = False) -> str:
    """The `auto` dispatch for tokens x [T, H] routed to `rows` = T*k (token, slot) pairs.

    The crossovers above are the same for fp32 and bf16, so x's dtype does not enter (CUDA is
    unmeasured). Under torch.compile with dynamic shapes the test on `rows` becomes a guard:
    decoding and prefill each get their own graph."""
    if needs_grad:  # gather's backward materialises a weight gradient per row: a decode-only path
        return "grouped"
    limit = GATHER_MAX_ROWS if torch.compiler.is_compiling() else EAGER_GATHER_MAX_ROWS
    return "gather" if rows <= limit else "grouped"


def moe_mlp(x, expert_idx, expert_weight, up_proj, down_proj, *, gate_proj=None, up_bias=None, down_bias=None,
            act=F.gelu, dispatch="auto") -> Tensor:
    """x [T, H], expert_idx [T, k] int64 in [0, E), expert_weight [T, k] -> [T, H].

    Expert e is  act(x @ gate_proj[e].T) * (x @ up_proj[e].T)  (SwiGLU) when gate_proj is given, else
    act(x @ up_proj[e].T + up_bias[e]);  then  @ down_proj[e].T + down_bias[e]."""
    if dispatch == "auto":
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or getattr(up_proj, "requires_grad", False))
        dispatch = choose_dispatch(x, expert_idx.numel(), needs_grad)
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose one of {('auto',) + DISPATCHES}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and not isinstance(up_proj, tuple):
        # The custom op is invisible to autocast, so cast here as F.linear would: every path
        # then computes (and returns) the autocast dtype, like the dense layers around it.
        dt = torch.get_autocast_dtype(dev)
        x, up_proj, down_proj, gate_proj, up_bias, down_bias = (
            None if t is None else t.to(dt) for t in (x, up_proj, down_proj, gate_proj, up_bias, down_bias)
        )
    weights = ExpertWeights(up_proj, down_proj, gate_proj, up_bias, down_bias)
    return _DISPATCH[dispatch](x, expert_idx, expert_weight.to(x.dtype), weights, act)


def _expert(x, linear, weights, act):
    """The expert MLP on rows x; linear(x, w, b) applies each row's own expert's w and b."""
    up_proj, down_proj, gate_proj, up_bias, down_bias = weights  # an ExpertWeights
    h = linear(x, up_proj, up_bias)
    h = act(h) if gate_proj is None else act(linear(x, gate_proj, None)) * h
    return linear(h, down_proj, down_bias)


# ----------------------------------------------------------------------------- loop


def _moe_loop(x, idx, weight, weights, act):
    out = torch.zeros_like(x)
    for e in range(num_experts(weights[0])):
        tok, slot = torch.where(idx == e)
        y = _expert(x[tok], linear, ExpertWeights(*(pick(w, e) for w in weights)), act)
        out.index_add_(0, tok, y * weight[tok, slot, None])
    return out


# ----------------------------------------------------------------------------- gather


def _moe_gather(x, idx, weight, weights, act):
    T, k = idx.shape
    flat = idx.reshape(-1)  # row r = (token r // k, slot r % k)
    if not torch.compiler.is_compiling() and T > 0:
        return _moe_gather_eager(x, flat.tolist(), weight, weights, act)

    def linear(a, w, b):
        # one reduction per projection (dot_rows), the gather and any dequantisation in its loads
        if a.is_cuda:
            y = (qdot_rows(a, *(t[flat] for t in w)) if isinstance(w, tuple) else dot_rows(a, w[flat])).to(a.dtype)
        elif isinstance(w, tuple):  # quantized: no bmm over int weights; one opaque op per projection
            y = _expert_qmm(a, *w, flat)
        else:
            y = torch.bmm(w[flat].to(a.dtype), a.unsqueeze(-1)).squeeze(-1)  # [T*k, out, in] @ [T*k, in, 1]
        return y if b is None else y + b[flat]

    y = _expert(x.repeat_interleave(k, dim=0), linear, weights, act)
    return (y.unflatten(0, (T, k)) * weight.unsqueeze(-1)).sum(1)


def _moe_gather_eager(x, experts, weight, weights, act):
    """Eager, w[idx] would copy every row's weight matrices; w[e] for a Python int e is a free
    view. One host sync (the ids), then a few matrix-vector products: the decode fast path."""
    k = weight.shape[1]
    rows = []
    for r, e in enumerate(experts):
        t = r // k
        y = _expert(x[t : t + 1], linear, ExpertWeights(*(pick(w, e) for w in weights)), act)
        rows.append(y * weight[t, r % k])
    return torch.cat(rows).unflatten(0, (x.shape[0], k)).sum(1)


# ----------------------------------------------------------------------------- grouped


def _moe_grouped(x, idx, weight, weights, act):
    k = idx.shape[1]
    E = num_experts(weights[0])
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, token order kept within
    expert_of_row = flat[order]
    tok = order // k
    # offs[e] = end of expert e's block = number of rows with expert <= e; the same as
    # bincount(flat, minlength=E).cumsum(0), but bincount's length is data-dependent for the
    # compiler (max(E, max id + 1)) while this one is E. Only the opaque op reads the values.
    experts = torch.arange(E, device=flat.device)
    offs = torch.searchsorted(expert_of_row, experts, right=True, out_int32=True)

    def linear(a, w, b):
        y = _expert_qmm(a, *w, expert_of_row) if isinstance(w, tuple) else _grouped_mm(a, w.to(a.dtype), offs)
        return y if b is None else y + b[expert_of_row]

    y = _expert(x[tok], linear, weights, act)
    return torch.zeros_like(x).index_add(0, tok, y * weight.reshape(-1)[order, None])


_DISPATCH = {"loop": _moe_loop, "grouped": _moe_grouped, "gather": _moe_gather}


# ----------------------------------------------------------------------------- grouped GEMM op
# torch.nn.functional.grouped_mm is not enough on its own: on CPU its backward fails
# ("Invalid strides/sizes") and its compile-time meta kernel rejects fp32. So the grouped GEMM is
# a custom op with its own fake (shape-only) kernel and backward: torch.compile treats it as one
# opaque node with a symbolic row count, and the data-dependent offsets never reach the graph.


def _use_native(a, b):
    """Whether F.grouped_mm can serve a @ b (else: a Python loop of torch.mm over the groups)."""
    if a.is_cuda:  # its CUDA kernels: bf16 on Hopper and newer
        ok = a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    else:  # on CPU it is as fast as the loop or a little faster (no .tolist(), fewer calls)
        ok = a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16, torch.float16)
    # and it wants each matrix row- or column-major, with 16-byte aligned strides
    return ok and all(
        1 in t.stride()[-2:] and all(s == 1 or (s > 0 and s * t.element_size() % 16 == 0) for s in t.stride())
        for t in (a, b)
    )


@torch.library.custom_op("medmoe::grouped_mm", mutates_args=())
def _grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Rows x[offs[g-1]:offs[g]] @ w[g].T for each group g: x [M, K], w [G, N, K] -> [M, N].

    x's rows are sorted by group; offs [G] are int32 cumulative group ends, offs[-1] == M."""
    wt = w.transpose(-2, -1)  # a view: [G, K, N] column-major, as F.grouped_mm likes it
    if _use_native(x, wt):
        return F.grouped_mm(x, wt, offs=offs)
    ends = offs.tolist()  # one device->host copy, then plain slices
    return torch.cat([x[s:e] @ wt[g] for g, (s, e) in enumerate(zip([0] + ends, ends))])


@_grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("medmoe::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(dy: Tensor, x: Tensor, offs: Tensor) -> Tensor:
    """Weight gradient of _grouped_mm: dy_g.T @ x_g per group: dy [M, N], x [M, K] -> [G, N, K]."""
    dyt = dy.t()
    if _use_native(dyt, x):
        return F.grouped_mm(dyt, x, offs=offs)
    ends = offs.tolist()
    return torch.stack([dyt[:, s:e] @ x[s:e] for s, e in zip([0] + ends, ends)])


@_grouped_mm_wgrad.register_fake
def _(dy, x, offs):
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dy = dy.contiguous()  # e.g. the stride-0 gradient of a .sum(), which F.grouped_mm rejects
    dx = _grouped_mm(dy, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_wgrad(dy, x, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- whole samples, hard top-1


def dispatch_samples(experts, chosen, inputs, *args):
    """Each sample through its one chosen expert module only: expert e runs once, on the samples
    that chose it (inputs: a list of [B, ...] tensors, sliced alike), and the results go back in
    sample order. Experts nobody chose cost nothing (MedMoE's image-level routing; the authors'
    code runs every expert on every image and mixes them by the router's softmax)."""
    out = None
    for e, expert in enumerate(experts):
        rows = (chosen == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        y = expert([x[rows] for x in inputs], *args)
        out = (y.new_zeros((len(chosen), *y.shape[1:])) if out is None else out).index_copy(0, rows, y)
    return out


# ----------------------------------------------------------------------------- weight-only quantization
# A quantized weight is a pair (data, scales); which kind it is follows from data's dtype:
#   int8  data int8  [..., N, K], scales [..., N]: w = data * scale, per output channel (symmetric)
#   int4  data uint8 [..., N, K/2], scales [..., N/16, K/g, 2, 16] = (scale, zero) per row and group
#         of g inputs: w = (q - 8) * scale + zero. Data and scales in tiles of 16 rows, the layout
#         cpu_kernels.cpp reads (_pack_int4).
# Scales are kept in bf16, the dtype the CPU kernels are fast in. Decoding (a few rows) runs our
# kernels (quant_rows) on a CPU, a fused dequantisation in a compiled CUDA step (qlinear). More rows
# (prefill, the vision tower) dequantise once per call and run the float GEMM. Measured on the
# 2-core AVX512/AMX CPU, 2 threads, one 5632x2048 matrix (ms; it stays in the 480 MiB L3: streamed
# from memory, int8 decode read 10-11 GB/s against bf16's 14, BENCHMARKS.md):
#   rows M                                           1      8      64
#   bf16 F.linear                                  0.97   1.03   1.66
#   _weight_int8pack_mm, bf16 x                    0.76   1.84   8.78     (fp32 x: 4.05 at M=1)
#   _weight_int4pack_mm_for_cpu g64, bf16 x        0.35   1.17   8.05     (fp32 x: 8.56 at M=1)
#   int8 dequantise + F.linear                     2.09   2.27   2.52
#   inductor-fused  F.linear(x, w.to(bf16)) * s    1.97                   (gpt-fast's int8 form)
# torchao's int8/int4 weight-only CPU layouts call these same aten kernels (or, for int8, the
# gpt-fast form above), so the optional dependency would buy nothing here. Measured with torchao
# 0.18 (one row, 16 different 5632x2048 matrices, AMD EPYC, 2026-12-07): Int8WeightOnlyConfig read
# 5.4 GB/s eager and 14.8 compiled against 17.3 / 18.0 here; the int4 CPU layout 15.9 / 14.1 against
# 17.3 (BENCHMARKS.md). fbgemm's dynamic int8 linear reads int8 weights 1.5-1.8x as
# fast as _weight_int8pack_mm (bench/bench_kernels.py) but rounds the activations to 8 bits per
# tensor: SmolLM2's next-token logits fell to cosine 0.98 of fp32's, so it is not used.
# Our own kernels (cpu_kernels.cpp) round x with a scale per 32 inputs instead, and multiply integers:
# PyTorch's int4 kernel is bound by its arithmetic (~35 G weights/s), and its int8 one reads at
# half of what memory gives. One row, 24 different matrices (bench/bench_kernels.py, 2 threads,
# AMD EPYC, 2026-12-07), in GB/s of weights read:
#                                    quant_rows  (AVX2 loop, portable)   PyTorch's kernel   sum of 2 GiB
#   int4 g64, 5632x2048, x to int8      29.8       (22.5, 11.7)              17.8               55.4
#   int8, 5632x2048, x to int16         45.7       (43.2, 28.9)              18.3               55.4
#   int8, 2048x5632                     44.1       (42.2, 29.8)              24.8               55.5
#   int4 g64 in 16-row tiles (now)      23.9       (22.6, 7.2)               17.4               31.5
# (the first row is the 4-row tiles of before; the tiles of 16 rows, cpu_kernels.cpp, read 88 GB/s
# from cache against their 52, and stream at the memory's speed: see the last row, on slower memory)
# (inductor's fused loop over int8 weights, which a compiled CPU step ran before: 28.7 and 12.5.)
# x is rounded to int8 for int4 weights: on SmolLM2 (groups of 32) perplexity 15.095 against 15.035
# dequantised (fp32 15.002), tests/test_real_weights.py. For int8 weights to int16, as fast and
# 250x closer: rounded to int8, SmolLM2's one-row logits along fp32's greedy path chose another
# token than fp32 in 23 of 300 steps, at int16 in 15, through PyTorch's kernel (bf16 x) in 14.
INT8_KERNEL_MAX_ROWS = 8  # quant_rows (or the packed kernel); beyond, dequantising was faster
INT4_KERNEL_MAX_ROWS = 128
INT4_GROUPS = (32, 64, 128, 256)
INT4_LAYOUT = 3  # stored in checkpoints (QuantConfig.int4_layout): 1 was PyTorch's _convert_weight_to_int4pack_for_cpu, 2 tiles of 4 rows
SCALE_DTYPE = torch.bfloat16
_ROW_CHUNK = 8192  # quantise this many output rows at a time (a multiple of the 16-row tiles)


def quantize(w: Tensor, bits: int, group: int = 64) -> tuple[Tensor, Tensor]:
    """Float weight [..., N, K] -> (data, scales) as described above. Rows are done in chunks so
    that the float32 working copy of even a 100k-row LM head stays small."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    *lead, N, K = w.shape
    if bits == 4 and (group not in INT4_GROUPS or K % group or K % 64 or N % 16):
        raise ValueError(f"int4 needs the input size ({K}) divisible by 64 and by the group size {group} (one of {INT4_GROUPS}), "
                         f"and the output size ({N}) by 16")
    flat = w.reshape(-1, N, K)
    parts = [_quantize_rows(flat[:, i : i + _ROW_CHUNK], bits, group) for i in range(0, N, _ROW_CHUNK)]
    data = torch.cat([p[0] for p in parts], 1).reshape(*lead, N, -1)
    scales = torch.cat([p[1] for p in parts], 1)
    return data, scales.reshape(*lead, *scales.shape[1:])


def _quantize_rows(w, bits, group):
    # scales are rounded to bf16 first and the integers fitted to the rounded ones, so each weight
    # stays within half a step of what it stands for. (Least-squares refits of scale and offset,
    # as llama.cpp's K-quants do, were tried: perplexity got worse, outliers clipped.)
    w = w.float()
    if bits == 8:
        scale = (w.abs().amax(-1).clamp(min=1e-12) / 127).to(SCALE_DTYPE)
        return (w / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8), scale
    E, N, K = w.shape
    g = w.reshape(E, N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(SCALE_DTYPE)  # asymmetric: each group's range onto 0..15
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)  # the kernel reads  w = (q - 8) * scale + zero
    q = ((g - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15).to(torch.uint8).reshape(E, N, K)
    scales = torch.stack([scale, zero], -1).reshape(E, N // 16, 16, K // group, 2).permute(0, 1, 3, 4, 2)
    return _pack_int4(q), scales.contiguous()  # [E, N/16, K/g, 2, 16]


def _pack_int4(q):
    """[..., N, K] values 0..15 -> [..., N/16, K/32, 4, 16, 4] bytes, viewed [..., N, K/2]: tiles of 16
    rows; in block b of 32 inputs, vector j holds 4 bytes of each row, byte t with input 32b+4j+t in
    its low nibble and 32b+16+4j+t in its high one (cpu_kernels.cpp reads a vector of 64 bytes, one
    lane of 4 bytes per row)."""
    *lead, N, K = q.shape
    q = q.to(torch.uint8).reshape(*lead, N // 16, 16, K // 32, 2, 4, 4)
    return (q[..., 0, :, :] | q[..., 1, :, :] << 4).transpose(-4, -2).transpose(-4, -3).reshape(*lead, N, K // 2)


def _unpack_int4(data, dtype=torch.uint8):
    """Packed [..., N, K/2] -> the values 0..15 as dtype [..., N, K]."""
    *lead, N, half = data.shape
    tiles = data.reshape(*lead, N // 16, half // 16, 4, 16, 4).transpose(-4, -2).transpose(-3, -2)  # [..., N/16, 16, K/32, 4, 4]
    if torch.compiler.is_compiling():  # pure expressions, which inductor fuses into the kernel that reads them
        return torch.stack([tiles & 15, tiles >> 4], -3).reshape(*lead, N, 2 * half).to(dtype)
    # Eager: the tiles' rows gathered as 4-byte words first (a gather of single bytes ran 4x slower)
    words = data.view(torch.int32).reshape(*lead, N // 16, half // 16, 4, 16).movedim(-1, -3)  # [..., N/16, 16, K/32, 4]
    tiles = words.contiguous().view(torch.uint8).unflatten(-1, (4, 4))  # [..., N/16, 16, K/32, 4, 4]
    out = data.new_empty((*lead, N // 16, 16, half // 16, 2, 4, 4), dtype=dtype)  # each nibble written once, in place
    out[..., 0, :, :].copy_(tiles & 15)  # a row's block: its 16 low nibbles' inputs, then the high ones'
    out[..., 1, :, :].copy_(tiles >> 4)
    return out.view(*lead, N, 2 * half)


def dequantize(data: Tensor, scales: Tensor, dtype=torch.float32) -> Tensor:
    """(data, scales) -> the float weight [..., N, K] it stands for."""
    if data.dtype == torch.int8:
        return data.to(dtype).mul_(scales.to(dtype)[..., None])
    w = _unpack_int4(data, dtype)
    *lead, N, K = w.shape
    s = row_scales(scales.to(dtype))  # [..., N, K/g, 2]
    scale, zero = s[..., :1], s[..., 1:] - 8 * s[..., :1]  # w = (q - 8) * scale + zero = q * scale + (zero - 8 scale)
    # in place: eager bf16 addcmul with broadcast scales was 3x slower than mul_ + add_ (5632x2048, 2 threads)
    return w.view(*lead, N, s.shape[-2], -1).mul_(scale).add_(zero).view(*lead, N, K)


def row_scales(scales: Tensor) -> Tensor:
    """int4 scales [..., N/16, K/g, 2, 16] -> [..., N, K/g, 2]: each row's (scale, zero) per group."""
    *lead, tiles, groups, _, rows = scales.shape
    return scales.movedim(-1, -3).reshape(*lead, tiles * rows, groups, 2)


def group_size(data, scales):
    return 2 * data.shape[-1] // scales.shape[-3]


def qlinear(x: Tensor, data: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ w.T (+ bias) for a quantized w (data, scales)."""
    return qlinears(x, [(data, scales, bias)])[0]


def qlinears(x: Tensor, weights: list[tuple[Tensor, Tensor, Tensor | None]]) -> list[Tensor]:
    """x [..., K] @ w.T (+ bias) for each quantized (w, scales, bias), all int8 or all int4. A few rows
    on CPU go through quant_rows, compiled or not, all the weights in one call (q, k and v read the
    same x: the StableLM-shape int4 step makes ~130 calls, not ~200; 24 layers' q, k and v took 7.2
    ms against 8.0 one call each, eager). There it beat inductor's fused loop too: with the fused loop
    for the one-row int8 products up to 4096 long, the StableLM-shape int8 model's step took 61-70 ms
    against 55-65, slower in 6 of 8 rounds alternating step by step (BENCHMARKS.md). Without a C++
    compiler int8 runs PyTorch's packed kernel, in bf16 where it is fast, whatever x's dtype.
    A compiled CUDA decode step runs qdot_rows (one fused kernel) for up to FUSED_MAX_ROWS rows;
    other cases dequantise. On an H200 (bench/bench_kernels.py --device cuda --shape 100352x2048
    --matrices 4) that read int8 weights at 31% of the memory's ceiling, against cuBLAS's 90% on
    bf16: on a GPU int8 and int4 save memory, not time. PyTorch's own CUDA kernels were measured too:
    _weight_int8pack_mm read at 5%; tinygemm's _weight_int4pack_mm at 36%, 1.59x bf16, the lead for
    int4 on CUDA, but it needs its own tiled layout (repacked at load) and one matrix per call (not
    the gathered experts), so it is not wired in yet."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, cpu, int8 = x2.shape[0], x.device.type == "cpu", weights[0][0].dtype == torch.int8
    kernel_max_rows = INT8_KERNEL_MAX_ROWS if int8 else INT4_KERNEL_MAX_ROWS
    if torch.compiler.is_compiling() and x.is_cuda and guard_or_false(rows <= FUSED_MAX_ROWS):
        ys = [qdot_rows(x2, data, scales).to(x.dtype) for data, scales, _ in weights]
    elif cpu and rows <= kernel_max_rows and x.shape[-1] % 64 == 0 and has_cpu_kernels():
        ys = quant_rows(x2, [data for data, _, _ in weights], [scales for _, scales, _ in weights])
    elif cpu and int8 and rows <= INT8_KERNEL_MAX_ROWS:  # where cpu_kernels.cpp could not be built
        ys = [torch._weight_int8pack_mm(x2.to(scales.dtype).contiguous(), data, scales).to(x.dtype) for data, scales, _ in weights]
    else:
        ys = [F.linear(x2, dequantize(data, scales, x.dtype)) for data, scales, _ in weights]
    ys = [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
    return [y if bias is None else y + bias for y, (_, _, bias) in zip(ys, weights)]


@functools.cache
def cpu_library():
    """cpu_kernels.cpp built for this CPU with the C++ compiler inductor uses too ($CXX or g++), once:
    the library is kept in $MEDMOE_CACHE (~/.cache/medmoe), named by a hash of the source and of what
    it was built for. None, with a warning, where it cannot be built: int4 then dequantises, int8
    runs PyTorch's kernel, and a decoded row's attention two fp32 matmuls."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cpp")
    cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"  # a missing one fails below, with the warning
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join([cxx, *flags, platform.machine(), platform.processor(), _cpu_flags()]).encode())
    cache = os.environ.get("MEDMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medmoe")
    path = os.path.join(cache, f"cpu_kernels-{key.hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            built = subprocess.run([cxx, *flags, source, "-o", tmp], capture_output=True, text=True)
            error = built.stderr[-2000:] if built.returncode else None
        except OSError as e:  # no compiler, or $CXX names no program
            error = str(e)
        if error is not None:
            warnings.warn(f"could not build cpu_kernels.cpp ({cxx}): int4 weights are dequantised for every product (slow), "
                          f"int8 runs PyTorch's kernel, attention PyTorch's matmuls\n{error}", stacklevel=2)
            return None
        os.replace(tmp, path)  # atomic: another process building the same file at once is harmless
    library = ctypes.CDLL(path)
    pointers = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]  # x, count, (data, scales, y)[count], N[count]
    library.int4_rows.argtypes = pointers + [ctypes.c_int] * 6
    library.int8_rows.argtypes = pointers + [ctypes.c_int] * 5
    library.one_row_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 7
    library.best = library.best_loop()  # looked up once: quant_rows runs ~130 times a decoded token
    return library


def _cpu_flags():
    """The CPU's feature flags (Linux): -march=native builds differ between CPUs sharing a cache."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


@torch.compiler.assume_constant_result
def has_cpu_kernels() -> bool:
    return cpu_library() is not None


def _quant_rows(x: Tensor, data: list[Tensor], scales: list[Tensor], loop: int = -1) -> list[Tensor]:
    """x [M, K] @ w.T -> [M, N] in x's dtype for each int8 or int4 w = (data[i], scales[i]) on a CPU, all of
    one kind: cpu_kernels.cpp, x rounded to int16 (int8 weights) or int8 (int4 weights), a scale per 32
    inputs, and multiplied in integers. Several weights (q, k and v) share one call: x is rounded once
    and one parallel loop runs over them all. loop: 0 portable, 1 AVX2, 2 AVX512-VNNI, up to the best
    this CPU has (the default, -1)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return [y.to(x.dtype) for y in _quant_rows(x.float(), data, scales, loop)]
    x, data, scales, count = x.contiguous(), [d.contiguous() for d in data], [s.contiguous() for s in scales], len(data)
    (M, K), N = x.shape, [d.shape[-2] for d in data]
    ys = [x.new_empty(M, n) for n in N]
    library, bf16, threads = cpu_library(), x.dtype == torch.bfloat16, torch.get_num_threads()
    loop = library.best if loop < 0 else loop
    # one array of pointers (data[], scales[], y[]): ~200 calls a token, and each ctypes object costs ~1 us
    pointers = (ctypes.c_void_p * (3 * count))(*[t.data_ptr() for t in (*data, *scales, *ys)])
    sizes = (ctypes.c_int * count)(*N)
    # the loops read every weight with x's K (and int4's one group size): a mismatch would read past its end
    if data[0].dtype == torch.int8:
        if any(d.shape[-1] != K for d in data):
            raise ValueError(f"quant_rows: weights {[tuple(d.shape) for d in data]} for x with {K} inputs")
        library.int8_rows(x.data_ptr(), count, pointers, sizes, M, K, bf16, threads, loop)
    else:
        groups = {group_size(d, s) for d, s in zip(data, scales)}
        if len(groups) > 1 or any(2 * d.shape[-1] != K for d in data):
            raise ValueError(f"quant_rows: int4 weights {[tuple(d.shape) for d in data]} (groups {groups}) for x with {K} inputs")
        library.int4_rows(x.data_ptr(), count, pointers, sizes, M, K, groups.pop(), bf16, threads, loop)
    return ys


# quant_rows, opaque to torch.compile (one node in the decode graph). Defined through
# torch.library.Library rather than custom_op: a call costs 7.6 us against custom_op's 17 (its
# wrappers), and a StableLM-shape int4 decode step makes ~130 of them.
_library = torch.library.Library("medmoe", "FRAGMENT")
_library.define("quant_rows(Tensor x, Tensor[] data, Tensor[] scales, int loop=-1) -> Tensor[]")
_library.impl("quant_rows", _quant_rows, "CPU")
quant_rows = torch.ops.medmoe.quant_rows.default


@torch.library.register_fake("medmoe::quant_rows")
def _(x, data, scales, loop=-1):
    return [x.new_empty(x.shape[0], d.shape[-2]) for d in data]


def attention_kernel_takes(q: Tensor, k: Tensor, mask: Tensor) -> bool:
    """Whether one_row_attention's kernel takes these: a CPU, q and the cache both fp32 or both bf16, a
    head size that is a multiple of 16 up to 128, and a boolean mask."""
    D = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype == k.dtype and q.dtype in (torch.float32, torch.bfloat16)
            and D % 16 == 0 and D <= 128 and mask.dtype == torch.bool and has_cpu_kernels())


def _one_row_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k / sqrt(D)) v for one decoded row q [B, H, 1, D] over the cache k, v [B, KVH, S, D]
    where mask [B or 1, 1, 1, S] (bool) is set, every product in fp32: cpu_kernels.cpp. Takes what
    attention_kernel_takes allows."""
    (B, H, _, D), (KVH, S) = q.shape, k.shape[1:3]
    q, k, v, mask = q.contiguous(), k.contiguous(), v.contiguous(), mask.expand(B, 1, 1, S).reshape(B, S).contiguous()
    out = torch.empty_like(q)
    cpu_library().one_row_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), B, H, KVH, S, D,
                                    q.dtype == torch.bfloat16, torch.get_num_threads())
    return out


_library.define("one_row_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor")
_library.impl("one_row_attention", _one_row_attention, "CPU")
one_row_attention = torch.ops.medmoe.one_row_attention.default


@torch.library.register_fake("medmoe::one_row_attention")
def _(q, k, v, mask):
    return q.new_empty(q.shape)


FUSED_MAX_ROWS = 16  # rows of x that a compiled CUDA decode step runs through dot_rows (dequantised in its loads)


# inductor's C++ sums a reduction longer than this in chunks through a CascadeSumHelper (a stack per
# output row, the running sum through memory): accurate, and slower inside a whole decode step
INDUCTOR_SUM_CHUNK = 4096


def dot_rows(x: Tensor, w: Tensor) -> Tensor:
    """x [R, K] times w [N, K], or row r times its own matrix w[r] when w is [R, N, K]: -> [R, N] fp32.
    Written as a product and a sum, so that inductor makes it one reduction kernel that reads each
    weight once and accumulates in fp32, with whatever made w (a dtype cast, a dequantisation,
    an expert gather w[idx]) fused into its loads: nothing the size of a weight is written.
    On a CPU a row longer than INDUCTOR_SUM_CHUNK is summed as equal pieces no longer than that, each
    its own loop, so inductor's C++ never takes its cascade helper: the StableLM-shape bf16 model (down
    projections 5632 long) decoded faster so in four round-robin runs of four (7.58 -> 8.10, 7.61 ->
    8.09, 5.83 -> 6.04, 6.64 -> 7.39 tok/s compiled, the same tokens), though on one matrix alone the
    single sum reads faster (bench/bench_kernels.py --shape 2048x5632: 24.9 against 11.8 GB/s; each
    piece streams half of every row). (K viewed as [pieces, K / pieces], each row's pieces adjacent in
    one loop, read 22.5 against 14.0 GB/s on that matrix but decoded slower: 4.96 against 5.82 tok/s,
    BENCHMARKS.md.) GPU reductions have no such helper, and no GPU was at hand to measure a split there."""
    K = x.shape[-1]
    pieces = -(-K // INDUCTOR_SUM_CHUNK)
    if pieces > 1 and x.device.type == "cpu":
        step = -(-K // pieces)
        parts = [dot_rows(x[..., i : i + step], w[..., i : i + step]) for i in range(0, K, step)]
        return sum(parts[1:], parts[0])
    return (x.unsqueeze(-2).float() * w.float()).sum(-1)


def qdot_rows(x: Tensor, data: Tensor, scales: Tensor) -> Tensor:
    """dot_rows through a quantized weight, data [N, K] or stacked [R, N, K] (int4: K/2 bytes a row),
    dequantised in the kernel's loads. int8's scale is one per output row, so it multiplies each row's sum instead of
    every weight (measured when a CPU step ran this: the StableLM-shape int8 model decoded 14.04 ->
    14.75 tok/s so, 9 rounds alternating, the same tokens; BENCHMARKS.md)."""
    if data.dtype == torch.int8:
        return dot_rows(x, data) * scales.float()
    return dot_rows(x, dequantize(data, scales))


NARROW_CHUNK = 1024  # rows of a narrower weight upcast at a time, for at most NARROW_CHUNKED_MAX_ROWS rows of x
NARROW_CHUNKED_MAX_ROWS = 16


def linear(x, w, b=None):
    """F.linear for a float weight or a quantized (data, scales) pair. A float weight may be stored
    narrower than x (weight-only bf16, medmoe.load_model's matrix_dtype): it is upcast as it is
    read, so every product is in x's dtype. One row on CPU under torch.compile (a decode step) is
    written as a row-wise dot product instead: inductor makes it one vectorised kernel that reads
    each weight once and accumulates in fp32. bf16w needs it: eager, upcasting each matrix in
    blocks, decoding was 3.4x slower at the StableLM shape. For plain bf16, on one matrix oneDNN's
    one-row product read 12 GB/s against this kernel's 23 one day, 17-20 against 12-16 another
    (bench/bench_kernels.py, 2 threads). On whole models, compiled, round-robin: bf16 SmolLM2
    decoded 45.7 tok/s with this kernel against 30.2 through oneDNN; the StableLM shape 4.23
    against 4.45. In fp32, MKL's one-row product read 10.7 / 15.6 GB/s against this kernel's
    20.6 / 25.4 (SmolLM2's 1536x576 and StableLM's 5632x2048, AMD EPYC, 2026-12-06), and fp32
    SmolLM2 decoded 39.4 tok/s against 18.3 (BENCHMARKS.md)."""
    if isinstance(w, tuple):
        return qlinear(x, *w, b)
    # guard_or_false: a row count known only at run time (one expert's tokens) takes the general path
    rows = x.shape[:-1].numel()
    one_row = guard_or_false(rows == 1)
    if x.device.type == "cpu" and one_row and torch.compiler.is_compiling():
        y = dot_rows(x, w)
        return (y if b is None else y + b.float()).to(x.dtype)
    if w.dtype != x.dtype and guard_or_false(rows <= NARROW_CHUNKED_MAX_ROWS):
        # a few rows through a narrower weight: upcast it a block of rows at a time. A whole
        # upcast writes twice the weight's bytes for a few rows of output (822 MB for StableLM's
        # LM head); 1024-row blocks were 2.8x faster per 5632x2048 matrix (2 threads)
        y = torch.cat([F.linear(x, w[i : i + NARROW_CHUNK].to(x.dtype)) for i in range(0, w.shape[0], NARROW_CHUNK)], -1)
        return y if b is None else y + b
    return F.linear(x, w.to(x.dtype), b)


def num_experts(w):
    return (w[0] if isinstance(w, tuple) else w).shape[0]


def pick(w, e):
    """Expert e's weight (a view) from a stacked float or quantized weight; None stays None."""
    if w is None:
        return None
    return tuple(t[e] for t in w) if isinstance(w, tuple) else w[e]


def _qlinear_expert(x, data, scales, e):
    """x through quantized expert e of the stacked (data, scales)."""
    w = data[e]
    w = w if w.data_ptr() % 64 == 0 else w.clone()  # the kernels want 64-byte alignment
    return qlinear(x, w, scales[e])


def _expert_qmm_impl(x: Tensor, data: Tensor, scales: Tensor, ids: Tensor) -> Tensor:
    """Row r of x through quantized expert ids[r]: x [R, K] -> [R, N], rows in any order. Opaque
    to torch.compile (one node, whatever the routing), so decoding stays one graph."""
    if x.shape[0] == 1:  # one decoded row, top-1: no grouping (~100 -> 30 us a call; int4 decoding 1.035x)
        return _qlinear_expert(x, data, scales, int(ids))
    out = x.new_empty(x.shape[0], data.shape[-2])
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().squeeze(1)
        out[rows] = _qlinear_expert(x[rows], data, scales, e)
    return out


_library.define("expert_qmm(Tensor x, Tensor data, Tensor scales, Tensor ids) -> Tensor")
_library.impl("expert_qmm", _expert_qmm_impl, "CompositeExplicitAutograd")  # as quant_rows: 36 calls a StableLM-shape step
_expert_qmm = torch.ops.medmoe.expert_qmm.default


@torch.library.register_fake("medmoe::expert_qmm")
def _(x, data, scales, ids):
    return x.new_empty(x.shape[0], data.shape[-2])
