"""The Med-MoE layer against hand-computed oracles and the invariants of upcycling."""

import math

import pytest
import torch

import medmoe as M

LLM = dict(arch="llama", vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=4, num_heads=2, num_kv_heads=2, **M.ARCHS["llama"])


def tiny_llm(**kw):
    return M.LLMConfig(**{**LLM, **kw})


def test_moe_forward_matches_per_token_oracle():
    """out(x) = sum over top-k of softmax-prob * expert(x) + meta(x), computed token by token."""
    torch.manual_seed(0)
    cfg = tiny_llm(arch="phi", **M.ARCHS["phi"])
    moe = M.MoE(cfg, M.MoEConfig(num_experts=3, top_k=2, dispatch="loop"))
    x = torch.randn(5, 8)
    out, _ = moe(x)
    ex, meta = moe.experts, moe.meta_expert
    gelu = M.ACTS["gelu_tanh"]
    for t in range(5):
        logits = moe.router.weight @ x[t] + moe.router.bias
        probs = [math.exp(v) for v in logits.tolist()]
        probs = [p / sum(probs) for p in probs]
        top = sorted(range(3), key=lambda e: -probs[e])[:2]
        want = meta.down_proj(gelu(meta.up_proj(x[t])))
        for e in top:
            h = gelu(ex.up_proj[e] @ x[t] + ex.up_bias[e])
            want = want + probs[e] * (ex.down_proj[e] @ h + ex.down_bias[e])
        assert torch.allclose(out[t], want, atol=1e-5)


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_upcycled_moe_is_one_plus_gate_times_dense(arch):
    """Right after upcycling every expert equals the dense FFN, so Med-MoE's sum gives (1 + g) * dense."""
    torch.manual_seed(0)
    cfg = tiny_llm(arch=arch, **M.ARCHS[arch])
    dense = M.FeedForward(8, 12, cfg.act, cfg.gated_mlp, cfg.mlp_bias)
    x = torch.randn(2, 6, 8)
    want = dense(x)
    moe = M.MoE(cfg, M.MoEConfig(num_experts=4, top_k=1), dense=dense)
    assert moe.meta_expert is dense
    g = moe.route(x.reshape(-1, 8))[1].view(2, 6, 1)
    assert torch.allclose(moe(x)[0], (1 + g) * want, atol=1e-5)
    renorm = M.MoE(cfg, M.MoEConfig(num_experts=4, top_k=2, meta_expert=False, renormalize=True), dense=dense)
    assert torch.allclose(renorm(x)[0], want, atol=1e-5)


def test_llm_upcycle_places_moe_layers_and_keeps_attention():
    torch.manual_seed(0)
    llm = M.LLM(tiny_llm())
    attn_before = llm.layers[0].attn.q_proj.weight.clone()
    llm.upcycle(M.MoEConfig(layers="sparse"))
    assert [isinstance(b.ffn, M.MoE) for b in llm.layers] == [True, False, True, False]
    assert torch.equal(llm.layers[0].attn.q_proj.weight, attn_before)


@pytest.mark.parametrize("mode,ids", [("sparse", [0, 2, 4, 6]), ("dense", list(range(8))), ("first_half", [0, 1, 2, 3]),
                                      ("second_half", [4, 5, 6, 7]), ([1, 5], [1, 5])])
def test_moe_placement(mode, ids):
    assert M.moe_layer_ids(M.MoEConfig(layers=mode), 8) == ids


def test_bad_placement_is_a_clear_error():
    with pytest.raises(M.MedMoEError, match="unknown MoE placement"):
        M.moe_layer_ids(M.MoEConfig(layers="every_third"), 8)
    with pytest.raises(M.MedMoEError, match="out of range"):
        M.moe_layer_ids(M.MoEConfig(layers=[9]), 8)


def test_aux_losses_hand_computed():
    E = 4
    # a uniform router: f_e = P_e = 1/E, so E * sum f P = 1; z-loss = (log E)^2
    uniform = torch.zeros(10, E)
    assert M.load_balancing_loss(uniform, 1).item() == pytest.approx(1.0)
    assert M.router_z_loss(uniform).item() == pytest.approx(math.log(E) ** 2)
    # a collapsed router: every token picks expert 0 with probability p -> E * 1 * p
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]]).expand(6, E)
    p = math.exp(2) / (math.exp(2) + 3)
    assert M.load_balancing_loss(logits, 1).item() == pytest.approx(E * p, rel=1e-6)


def test_aux_loss_enters_the_training_loss():
    torch.manual_seed(0)
    cfg = M.Config(llm=tiny_llm(), moe=M.MoEConfig(aux_loss_coef=0.5, z_loss_coef=0.25, dispatch="loop"))
    model = M.MedMoE(cfg)
    ids = [[1, 2, 3, 4, 5, 6]]
    logits, loss, routers = model(ids, labels=ids, router_logits=True)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[0][1:]))
    extra = sum(0.5 * M.load_balancing_loss(r, 1) + 0.25 * M.router_z_loss(r) for r in routers)
    assert len(routers) == len(model.llm.moe_layers())
    assert loss.item() == pytest.approx((ce + extra).item(), rel=1e-5)
    assert extra.item() > 0


def test_router_stays_fp32_under_bf16_autocast_and_counts_tokens():
    torch.manual_seed(0)
    moe = M.MoE(tiny_llm(), M.MoEConfig(num_experts=4, top_k=2, dispatch="loop"))
    x = torch.randn(7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, router_logits = moe(x)
    assert router_logits.dtype == torch.float32
    assert moe.tokens_per_expert.sum().item() == 7 * 2
    idx = router_logits.topk(2, -1).indices
    assert moe.tokens_per_expert.tolist() == torch.bincount(idx.flatten(), minlength=4).tolist()


def paper_model(arch):
    """The paper's two Med-MoE shapes (CLIP ViT-L/14-336 + Phi-2 or StableLM-2-1.6B, 4 experts, sparse)."""
    if arch == "phi":
        llm = M.LLMConfig(arch="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_layers=32,
                          num_heads=32, num_kv_heads=32, rotary_pct=0.4, **M.ARCHS["phi"])
    else:
        llm = M.LLMConfig(arch="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_layers=24,
                          num_heads=32, num_kv_heads=32, rotary_pct=0.25, **{**M.ARCHS["stablelm"], "qkv_bias": True})
    with torch.device("meta"):
        return M.MedMoE(M.Config(llm=llm, vision=M.VisionConfig(), moe=M.MoEConfig()))


@pytest.mark.parametrize("arch,paper", [("phi", 3.6), ("stablelm", 2.0)])
def test_activated_parameters_agree_with_the_paper(arch, paper):
    p = M.count_params(paper_model(arch))
    # the paper truncates to one decimal: 3.62B -> 3.6B, 2.06B -> 2.0B
    assert math.floor(p["llm_active"] / 1e8) / 10 == paper
    assert p["llm"] > p["llm_active"]


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]])
    assert M.sample(logits).item() == 1
    # top_p this small keeps only the most likely token: sampling must then be greedy
    g = torch.Generator().manual_seed(0)
    assert all(M.sample(logits, temperature=1.0, top_p=0.05, generator=g).item() == 1 for _ in range(20))
    draws = lambda seed: [M.sample(logits, 1.0, generator=torch.Generator().manual_seed(seed)).item() for _ in range(1)]
    assert draws(3) == draws(3)
    counts = torch.bincount(torch.stack([M.sample(logits, 1.0, generator=g) for _ in range(2000)]).flatten(), minlength=4)
    want = logits.softmax(-1)[0] * 2000
    assert ((counts - want).abs() < 5 * want.sqrt() + 5).all()


def test_generation_stops_at_stop_tokens():
    torch.manual_seed(0)
    model = M.MedMoE(M.Config(llm=tiny_llm())).eval()
    prompts = [[1, 2, 3], [4, 5]]
    free = model.generate(prompts, max_new_tokens=8, stop_ids=[])
    stop = free[0][2]
    stopped = model.generate(prompts, max_new_tokens=8, stop_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert stopped[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])


def test_a_newer_stream_keeps_its_cache_and_the_older_one_stops_with_an_error():
    """The KV cache lives in the model: a second generate_stream replaces the first one's. Dropping the first
    (its cleanup) must not clear the second's, and resuming an older one must not decode from a newer one's keys."""
    torch.manual_seed(0)
    model = M.MedMoE(M.Config(llm=tiny_llm())).eval()
    alone = {p: model.generate([list(p)], max_new_tokens=6, stop_ids=[])[0] for p in [(1, 2, 3), (4, 5, 6)]}
    first = model.generate_stream([[1, 2, 3]], max_new_tokens=6, stop_ids=[])
    next(first)
    second = model.generate_stream([[4, 5, 6]], max_new_tokens=6, stop_ids=[])
    got = [int(next(second))]
    del first  # closed while suspended at a token: its cleanup runs now
    got.append(int(next(second)))
    assert got == alone[4, 5, 6][:2]
    third = model.generate_stream([[1, 2, 3]], max_new_tokens=6, stop_ids=[])
    got = [int(next(third))]
    with pytest.raises(M.MedMoEError, match="one stream at a time"):
        next(second)
    got += [int(t) for t in third]
    assert got == alone[1, 2, 3]


def test_prompt_errors_are_clear():
    torch.manual_seed(0)
    model = M.MedMoE(M.Config(llm=tiny_llm(max_seq_len=16))).eval()
    with pytest.raises(M.MedMoEError, match="outside the vocabulary"):
        model.generate([[1, 99]])
    with pytest.raises(M.MedMoEError, match="longer than the context length 16"):
        model.generate([list(range(20))])
    with pytest.raises(M.MedMoEError, match="no room to answer"):
        model.generate([list(range(16))])
    with pytest.raises(M.MedMoEError, match="more <image> placeholders"):
        model.generate([[1, M.IMAGE_TOKEN, 2]])
    # training truncates instead: the supervised text at the end of an over-long record is cut
    logits, _ = model([list(range(20))])
    assert logits.shape[1] == 16


def test_upcycled_model_saves_and_loads_identically(tmp_path):
    torch.manual_seed(0)
    vision = M.VisionConfig(image_size=28, patch_size=7, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    model = M.MedMoE(M.Config(llm=tiny_llm(arch="phi", **M.ARCHS["phi"]), vision=vision)).eval()
    model.upcycle(M.MoEConfig(num_experts=3, top_k=1))
    with torch.no_grad():
        for layer in model.llm.moe_layers():  # experts differ from each other after training
            layer.experts.up_proj.add_(torch.randn_like(layer.experts.up_proj))
    M.save_model(model, tmp_path / "ckpt")
    loaded = M.load_model(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg and loaded.cfg.moe.num_experts == 3
    ids, pixels = [[1, *[M.IMAGE_TOKEN] * vision.num_patches, 2, 3]], torch.randn(1, 3, 28, 28)
    assert torch.equal(loaded(ids, pixels)[0], model(ids, pixels)[0])
    assert loaded.generate(ids, pixels, max_new_tokens=5, stop_ids=[]) == model.generate(ids, pixels, max_new_tokens=5, stop_ids=[])
