"""The CUDA paths, on a GPU only (CI has none; run on one with `python -P -m pytest tests/test_cuda.py`):
the compiled decode step's fused quantized kernels and expert gather against the float
computation on the dequantized weights, and compiled decoding (CUDA graphs) against eager."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from test_quant import BF16_TOL, moe, quantized_experts, rel_err, routed, tiny_model
from torch._dynamo.utils import counters

import medmoe as M
from medmoe import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N", [192, 96])  # whole 64-row blocks (the fused unpack), and a tail
@pytest.mark.parametrize("rows", [1, 3, 40])  # the compiled fused kernel; 40: dequantize + GEMM
def test_compiled_qlinear_on_cuda_equals_float_linear(bits, N, rows):
    torch._dynamo.reset()
    data, scales = kernels.quantize(torch.randn(N, 128), bits, 32)
    bias, x = torch.randn(N).bfloat16(), torch.randn(2, rows, 128).bfloat16()
    want = F.linear(x.double(), kernels.dequantize(data, scales).double(), bias.double())
    qlinear = torch.compile(kernels.qlinear, dynamic=False, fullgraph=True)
    for fn in (kernels.qlinear, qlinear):
        got = fn(*(t.cuda() for t in (x, data, scales, bias)))
        assert got.dtype == torch.bfloat16 and rel_err(got.cpu(), want) < BF16_TOL


@pytest.mark.parametrize("impl", ["loop", "grouped", "gather"])
@pytest.mark.parametrize("bits", [8, 4, None])  # None: bf16 experts
def test_compiled_moe_on_cuda_equals_float_experts(impl, bits):
    torch._dynamo.reset()
    q, float_twin = quantized_experts(bits or 8, gated=True, bias=True)
    w = {k: v if v is None or isinstance(v, tuple) else v.bfloat16() for k, v in (q if bits else float_twin).items()}
    on_gpu = {k: None if v is None else tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda() for k, v in w.items()}
    compiled = torch.compile(lambda *a: moe(*a, on_gpu, impl), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for T, k in ((1, 1), (3, 2)):
            x, idx, weight = routed(T, k, seed=T)
            want = moe(x.double(), idx, weight.double(), {n: None if v is None else v.double() for n, v in float_twin.items()}, "loop")
            got = compiled(x.bfloat16().cuda(), idx.cuda(), weight.cuda())
            assert rel_err(got.cpu(), want) < BF16_TOL


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_compiled_cuda_decoding_matches_eager_with_one_graph(bits):
    torch._dynamo.reset()
    model = tiny_model()
    model = (M.quantize(model, M.QuantConfig(bits=bits, group_size=32)) if bits else model).cuda()
    before = counters["stats"]["unique_graphs"]
    for prompt in ([[5, 6, 7]], [[8, 9, 10, 11, 12, 13]]):
        eager = model.generate(prompt, max_new_tokens=10, stop_ids=[])
        assert model.generate(prompt, max_new_tokens=10, stop_ids=[], compile=True) == eager
    assert counters["stats"]["unique_graphs"] - before == 1
