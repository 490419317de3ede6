"""torch.compile of the whole model: same numbers as eager, few graphs over varying lengths."""

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


def test_one_row_attention_equals_sdpa_with_grouped_heads_and_padding():
    """The compiled CPU decode step's attention (one query row) against SDPA itself, eager and compiled."""
    torch.manual_seed(0)
    compiled = torch.compile(M.one_row_attention, fullgraph=True)
    for heads, kv_heads in ((4, 4), (6, 2)):
        q, k, v = torch.randn(2, heads, 1, 16), torch.randn(2, kv_heads, 40, 16), torch.randn(2, kv_heads, 40, 16)
        mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
        mask[0, ..., :7] = True  # a short row: most of the cache not yet written
        mask[1, ..., 3:30] = True  # a left-padded row
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
        for fn in (M.one_row_attention, compiled):
            assert torch.allclose(fn(q, k, v, mask), want, atol=1e-5)
            # a bf16 cache: scores and probabilities rounded to bf16, as transformers' eager attention rounds them
            got = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
            assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=3e-2)


def test_compiled_batched_decoding_with_grouped_heads_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = M.MedMoE(M.Config(llm=M.LLMConfig(**{**LLM, "num_heads": 4, "num_kv_heads": 2}))).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]  # left-padded together
    eager = model.generate(prompts, max_new_tokens=12, stop_ids=[])
    assert model.generate(prompts, max_new_tokens=12, stop_ids=[], compile=True) == eager
