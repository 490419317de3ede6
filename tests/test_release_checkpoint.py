"""Converting released Med-MoE / MoE-LLaVA checkpoints (`medmoe convert --medmoe DIR`).

The released weights cannot be downloaded here, so each test writes a miniature release in the
published layout (key names from the authors' code: DeepSpeed `deepspeed_moe.gate.wg`,
`deepspeed_experts.{e}`, Med-MoE's `meta_moe`, `mm_projector.image_spatial_proj`, the CLIP tower
under `image_tower.image_tower.vision_model`, sharded safetensors) and checks our model against
an oracle: the transformers decoder whose MoE FFNs are replaced by a per-token re-implementation
of the released gating (top-1: the raw softmax probability; top-2: renormalised)."""

import copy
import json
import re

import pytest
import torch
from hf_models import VOCAB, save_llm, save_vision
from safetensors.torch import save_file

import medmoe
from medmoe import convert

E = 4


class ReleasedMoE(torch.nn.Module):
    """out(x) = sum over the top-k experts of gate * expert(x) (+ meta(x)), one token at a time."""

    def __init__(self, experts, meta, w, b, top_k):
        super().__init__()
        self.experts, self.meta, self.w, self.b, self.top_k = experts, meta, w, b, top_k

    def forward(self, x):
        out = torch.zeros_like(x)
        for idx in torch.cartesian_prod(*map(torch.arange, x.shape[:-1])):
            t = x[tuple(idx)]
            probs = torch.softmax(t.float() @ self.w.T + (self.b if self.b is not None else 0), -1)
            top = torch.topk(probs, self.top_k).indices
            gates = probs[top] / (probs[top].sum() if self.top_k > 1 else 1)
            y = sum(g * self.experts[e](t) for g, e in zip(gates, top.tolist()))
            out[tuple(idx)] = y + (self.meta(t) if self.meta is not None else 0)
        return out


def write_release(path, family, clip, ref, meta=True, router_bias=True, top_k=1):
    """A miniature Med-MoE (or, without meta expert and router bias, MoE-LLaVA) stage-3 release."""
    torch.manual_seed(1)
    L = ref.config.num_hidden_layers
    moe_ids = list(range(L))[::2]
    state, oracle = {}, {}
    for k, v in ref.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(.*)", k)
        if k == "lm_head.bias":
            continue  # LLaVA-Phi's lm_head has no bias
        if m and int(m[1]) in moe_ids:
            if meta:
                state[f"model.layers.{m[1]}.mlp.meta_moe.{m[2]}"] = v
            continue
        state[k] = v
    for i in moe_ids:
        dense = ref.model.layers[i].mlp
        experts = [copy.deepcopy(dense) for _ in range(E)]
        for e, ex in enumerate(experts):
            for name, p in ex.named_parameters():
                p.data = torch.randn_like(p) * 0.2
                state[f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = p.data
        w = torch.randn(E, ref.config.hidden_size)
        b = torch.randn(E) if router_bias else None
        state[f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight"] = w
        if router_bias:
            state[f"model.layers.{i}.mlp.deepspeed_moe.gate.wg.bias"] = b
        oracle[i] = ReleasedMoE(torch.nn.ModuleList(experts), dense if meta else None, w, b, top_k)
    for k, v in clip.state_dict().items():
        state[f"model.image_tower.image_tower.vision_model.{k}"] = v
    H, Dv = ref.config.hidden_size, clip.config.hidden_size
    proj = {"0.weight": torch.randn(H, Dv), "0.bias": torch.randn(H), "2.weight": torch.randn(H, H), "2.bias": torch.randn(H)}
    proj = {k: v * 0.1 for k, v in proj.items()}
    state.update({f"model.mm_projector.image_spatial_proj.{k}": v for k, v in proj.items()})
    # two shards + index, as the release ships them
    path.mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, path / name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    cfg = ref.config.to_dict()
    cfg.update(model_type=f"moe_llava_{family}", architectures=[f"MoELLaVA{family.title()}ForCausalLM"],
               mm_image_tower="openai/clip-vit-large-patch14-336", image_projector_type="mlp2x_gelu", mm_hidden_size=Dv,
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
               moe=dict(moe_enable=True, moe_mode="sparse", moe_layers_idx=moe_ids, ep_size=1, num_experts=[E] * len(moe_ids),
                        top_k_experts=top_k, capacity_factor=1.5, eval_capacity_factor=4, min_capacity=0, use_residual=False,
                        router_aux_loss_coef=0.0, train_modules=["fc1", "fc2", "wg"]))
    (path / "config.json").write_text(json.dumps(cfg))
    return oracle, proj


@pytest.mark.parametrize("family,meta,router_bias,top_k", [
    ("phi", True, True, 1),  # Med-MoE Phi-2: top-1 + meta expert, router with bias
    ("stablelm", True, True, 1),  # Med-MoE StableLM
    ("phi", False, False, 2),  # MoE-LLaVA: DeepSpeed gate without bias, top-2 renormalised, no meta expert
])
def test_released_checkpoint_matches_oracle(tmp_path, family, meta, router_bias, top_k):
    clip = save_vision("clip", tmp_path / "clip", width=128, heads=2)  # CLIP heads are 64 wide
    ref = save_llm(family, tmp_path / "base")
    oracle, proj = write_release(tmp_path / "release", family, clip, ref, meta, router_bias, top_k)
    convert.convert(str(tmp_path / "out"), convert.Sources(released=str(tmp_path / "release")))
    ours = medmoe.load_model(str(tmp_path / "out"))
    moe = ours.cfg.moe
    assert (moe.top_k, moe.meta_expert, moe.router_bias, moe.renormalize) == (top_k, meta, router_bias, top_k > 1)
    assert [i for i, b in enumerate(ours.llm.layers) if isinstance(b.ffn, medmoe.MoE)] == sorted(oracle)
    assert not ours.cfg.llm.lm_head_bias
    # the oracle: transformers' decoder, released gating, no lm_head bias, the CLIP tower's features
    for i, layer in oracle.items():
        ref.model.layers[i].mlp = layer
    if getattr(ref.lm_head, "bias", None) is not None:
        ref.lm_head.bias.data.zero_()
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        feats = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        visual = torch.nn.functional.gelu(feats @ proj["0.weight"].T + proj["0.bias"]) @ proj["2.weight"].T + proj["2.bias"]
        text = ref.model.embed_tokens(torch.tensor([[5, 9, 33], [7, 1, 2]]))
        embeds = torch.cat([text[:1], visual, text[1:]], dim=1)
        want = ref(inputs_embeds=embeds).logits
    got, _ = ours([[5, 9, 33, *[medmoe.IMAGE_TOKEN] * ours.cfg.vision.num_patches, 7, 1, 2]], pixels)
    assert (got - want).abs().max().item() <= 1e-4


def test_dense_stage2_release_and_use_residual_is_refused(tmp_path):
    clip = save_vision("clip", tmp_path / "clip", width=128, heads=2)  # CLIP heads are 64 wide
    ref = save_llm("phi", tmp_path / "base")
    write_release(tmp_path / "release", "phi", clip, ref)
    cfg = json.loads((tmp_path / "release" / "config.json").read_text())
    cfg["moe"]["use_residual"] = True
    (tmp_path / "release" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(medmoe.MedMoEError, match="use_residual"):
        convert.convert(str(tmp_path / "out"), convert.Sources(released=str(tmp_path / "release")))
    # a stage-2 (dense LLaVA-Phi) release: same layout without the MoE block
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.bias"}
    state.update({f"model.image_tower.image_tower.vision_model.{k}": v for k, v in clip.state_dict().items()})
    shapes = {"0.weight": (64, 128), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)}
    state.update({f"model.mm_projector.image_spatial_proj.{k}": torch.zeros(s) for k, s in shapes.items()})
    save_file(state, stage2 / "model.safetensors")
    (stage2 / "config.json").write_text(json.dumps({**ref.config.to_dict(), "model_type": "llava_phi", "mm_vision_select_layer": -2}))
    convert.convert(str(tmp_path / "out2"), convert.Sources(released=str(stage2)))
    ours = medmoe.load_model(str(tmp_path / "out2"))
    assert ours.cfg.moe is None
    ids = [[3, 4, 5, 6]]
    ref.lm_head.bias.data.zero_()
    assert (ours(ids)[0] - ref(torch.tensor(ids)).logits).abs().max().item() <= 1e-4
    assert ours.cfg.llm.vocab_size == VOCAB
