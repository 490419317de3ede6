"""torch.compile of the whole model: same numbers as eager, few graphs over varying lengths."""

import pytest
import torch
import torch._dynamo

import medmoe as M

LLM = dict(arch="phi", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4,
           rotary_pct=0.5, max_seq_len=300, **M.ARCHS["phi"])


def graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_moe_llm_two_graphs_over_lengths_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    llm = M.LLM(M.LLMConfig(**LLM), M.MoEConfig(num_experts=4, top_k=2, layers="dense"))
    compiled = torch.compile(llm, fullgraph=True)
    before = graphs()
    for T in (5, 9, 17, 33):
        x = torch.randn(2, T, 32, requires_grad=True)
        want = llm(x)
        got = compiled(x)
        assert torch.allclose(got, want, atol=1e-5)
        (g_want,) = torch.autograd.grad(want.square().sum(), x)
        (g_got,) = torch.autograd.grad(got.square().sum(), x)
        assert torch.allclose(g_got, g_want, atol=1e-4)
    assert graphs() - before <= 2


def test_compiled_decoding_matches_eager_with_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = M.MedMoE(M.Config(llm=M.LLMConfig(**LLM), moe=M.MoEConfig(num_experts=4, top_k=1))).eval()
    before = graphs()
    for prompts in ([[1, 2, 3]], [[4, 5, 6, 7, 8, 9, 10]]):
        eager = model.generate(prompts, max_new_tokens=12, stop_ids=[])
        assert model.generate(prompts, max_new_tokens=12, stop_ids=[], compile=True) == eager
    assert graphs() - before == 1


def attention_in_fp64(q, k, v, mask):
    B, H, _, D = q.shape
    q = q.double().view(B, k.shape[1], H // k.shape[1], D)
    att = (q @ k.double().transpose(-1, -2) * D**-0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ v.double()).view(B, H, 1, D)


@pytest.mark.parametrize("form", ["kernel", "matmuls"])
@pytest.mark.parametrize("heads, kv_heads, D", [(4, 4, 16), (6, 2, 64), (2, 2, 80)])
def test_one_row_attention_in_fp32_with_grouped_heads_and_padding(monkeypatch, form, heads, kv_heads, D):
    """A decoded row's attention (cpu_kernels.cpp's kernel, or two fp32 matmuls where it does not apply), eager and
    compiled, against the same in fp64: within fp32 rounding, and within the output's own rounding for a bf16 cache."""
    if form == "kernel" and not M.kernels.has_cpu_kernels():
        pytest.skip("cpu_kernels.cpp could not be built here")
    takes = M.kernels.attention_kernel_takes
    monkeypatch.setattr(M.kernels, "attention_kernel_takes", lambda q, k, mask: form == "kernel" and takes(q, k, mask))
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(M.one_row_attention, fullgraph=True)
    q, k, v = torch.randn(2, heads, 1, D), torch.randn(2, kv_heads, 40, D) * 3, torch.randn(2, kv_heads, 40, D)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)  # 40: the kernel's last block of 16 keys is partly past the end
    mask[0, ..., :7] = True  # a short row: most of the cache not yet written
    mask[1, ..., 3:30] = True  # a left-padded row
    for fn in (M.one_row_attention, compiled):
        for m in (mask, mask[:1]):  # the second: one mask for the whole batch
            assert (fn(q, k, v, m) - attention_in_fp64(q, k, v, m)).abs().max() < 1e-6
        q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
        got, want = fn(q16, k16, v16, mask), attention_in_fp64(q16, k16, v16, mask)
        assert got.dtype == torch.bfloat16 and ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def test_one_row_attention_kernel_opcheck():
    if not M.kernels.has_cpu_kernels():
        pytest.skip("cpu_kernels.cpp could not be built here")
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 20, 32), torch.randn(2, 2, 20, 32)
    torch.library.opcheck(M.kernels.one_row_attention, (q, k, v, torch.rand(2, 1, 1, 20) < 0.7))


def test_compiled_batched_decoding_with_grouped_heads_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = M.MedMoE(M.Config(llm=M.LLMConfig(**{**LLM, "num_heads": 4, "num_kv_heads": 2}))).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]  # left-padded together
    eager = model.generate(prompts, max_new_tokens=12, stop_ids=[])
    assert model.generate(prompts, max_new_tokens=12, stop_ids=[], compile=True) == eager
