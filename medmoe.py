"""Med-MoE in one file: vision tower -> projector -> LLM whose FFNs are a routed mixture of
domain-specific experts plus an always-on meta expert (Jiang et al., EMNLP 2024 Findings).

Read top to bottom, it follows the data through the paper's Figure 2:
  pixels -> VisionTower (CLIP/SigLIP ViT, frozen) -> Projector (mlp2x_gelu) -> spliced in
  place of <image> -> LLM blocks (attention + FFN, where every MoE layer's FFN is
  router -> top-k of `experts` + `meta_expert`) -> logits -> loss / generate.
Then weight-only quantization, and loading and saving our own checkpoints (config.json +
model.safetensors); conversion from other layouts is convert.py's.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# medmoe is also the package of the files beside it (medmoe.data, medmoe.train, ...): they import
# each other through it, so a user's own data.py or train.py can never stand in for ours.
# (Installed, __init__.py makes the same folder a package and this file medmoe.medmoe.)
__path__ = [os.path.dirname(os.path.abspath(__file__))]

from medmoe import kernels
from medmoe.files import MedMoEError, atomic_write, from_json, read_json, read_safetensors, write_bytes, write_safetensors

IMAGE_TOKEN = -200  # placeholder id for <image> in a prompt (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE = -100  # label of positions that are not supervised (image features, prompts, padding)


# ----------------------------------------------------------------------------- configs


@dataclass
class VisionConfig:
    kind: str = "clip"  # "clip": class token + pre-layernorm; "siglip": patch tokens only
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 23  # layers kept = the feature layer (CLIP-L has 24; Med-MoE uses the 23rd)
    num_heads: int = 16
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        self.mean, self.std = tuple(self.mean), tuple(self.std)  # JSON gives lists

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LLMConfig:
    arch: str = "phi"  # phi | stablelm | qwen2 | llama (llama also covers mistral/mixtral/smollm)
    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # Phi-2 0.4, StableLM-2 0.25: rotary on the first part of each head
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    act: str = "gelu_tanh"
    gated_mlp: bool = False  # SwiGLU: down(act(gate(x)) * up(x))
    parallel_block: bool = False  # Phi: x + attn(ln(x)) + ffn(ln(x))
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: list = field(default_factory=list)
    pad_id: int = 0

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads


# What each supported `model_type` means for the decoder (the rest is read from its config).
ARCHS = {
    "phi": dict(norm="layernorm", act="gelu_tanh", gated_mlp=False, parallel_block=True,
                qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=True),
    "stablelm": dict(norm="layernorm", act="silu", gated_mlp=True),
    "qwen2": dict(norm="rmsnorm", act="silu", gated_mlp=True, qkv_bias=True),
    "llama": dict(norm="rmsnorm", act="silu", gated_mlp=True),
}


@dataclass
class MoEConfig:
    num_experts: int = 4
    top_k: int = 1  # released Med-MoE scripts: top-1 + meta expert (the paper's text says top-2)
    layers: str | list = "sparse"  # sparse | dense | first_half | second_half | [layer ids]
    meta_expert: bool = True
    renormalize: bool = False  # True: combine weights sum to 1 over the top-k (Mixtral)
    router_bias: bool = True
    aux_loss_coef: float = 0.0  # Med-MoE 0; MoE-LLaVA 0.01
    z_loss_coef: float = 0.0
    dispatch: str = "auto"  # kernels.moe_mlp implementation
    modalities: list | None = None  # expert i <- modality i, when the router is a modality classifier


@dataclass
class QuantConfig:
    """Weight-only quantization of every large matrix (kernels.py says how it is stored and run):
    attention, FFNs, experts, meta expert, projector and LM head; the router, norms and
    embeddings stay in floating point."""
    bits: int = 8  # 8: int8 with a scale per output channel; 4: int4 with a scale and zero per group
    group_size: int = 64  # int4: consecutive inputs sharing one scale (32, 64, 128 or 256)
    vision: bool = False  # also the vision tower's matrices
    # The LM head stays int8 under int4, as llama.cpp's Q4_K_M keeps it at 6 bits: its errors go
    # straight into the logits. Measured on SmolLM2 (VQA-RAD text): an int4 head costs 7.8%
    # perplexity, an int8 head 0.2% (tests/test_real_weights.py).
    lm_head_bits: int = 8
    int4_layout: int = kernels.INT4_LAYOUT  # the int4 layout written; load_config refuses another


@dataclass
class Config:
    llm: LLMConfig
    vision: VisionConfig | None = None
    projector: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    moe: MoEConfig | None = None
    template: str = "phi"  # conversation template (data.py)
    quant: QuantConfig | None = None

    def to_dict(self):
        return asdict(self)


# Shapes for models trained from scratch on a CPU (no pretrained tower or decoder offline): the
# demo, `medmoe init --preset` and the tests. vocab: the size their tokenizer is trained to.
PRESETS = {
    "tiny": dict(hidden=64, layers=4, heads=4, image=32, patch=8, vision_hidden=48, vision_layers=2, vocab=1000),
    "demo": dict(hidden=64, layers=4, heads=4, image=48, patch=8, vision_hidden=64, vision_layers=4, vocab=1000),  # `medmoe demo`
    "small": dict(hidden=192, layers=6, heads=6, image=64, patch=8, vision_hidden=128, vision_layers=4, vocab=3000),
}


def preset_config(name, template="phi"):
    """A Llama-style decoder and a CLIP-style tower at a preset's shapes; its vocab_size is the
    preset's until a tokenizer is trained."""
    if name not in PRESETS:
        raise MedMoEError(f"unknown preset {name!r} (choose {', '.join(PRESETS)})")
    p = PRESETS[name]
    llm = LLMConfig(arch="llama", vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["hidden"] * 2,
                    num_layers=p["layers"], num_heads=p["heads"], num_kv_heads=p["heads"], max_seq_len=512, **ARCHS["llama"])
    vision = VisionConfig(image_size=p["image"], patch_size=p["patch"], hidden_size=p["vision_hidden"],
                          intermediate_size=p["vision_hidden"] * 4, num_layers=p["vision_layers"], num_heads=4)
    return Config(llm=llm, vision=vision, template=template)


def moe_layer_ids(moe, num_layers):
    """Which decoder layers get an MoE FFN (MoE-LLaVA's `moe_mode`)."""
    if isinstance(moe.layers, (list, tuple)):
        ids = list(moe.layers)
    else:
        modes = {
            "sparse": range(num_layers)[::2],  # every other layer: 16 of 32 (Phi-2), 12 of 24 (StableLM)
            "dense": range(num_layers),
            "first_half": range(num_layers // 2),
            "second_half": range(num_layers // 2, num_layers),
        }
        if moe.layers not in modes:
            raise MedMoEError(f"unknown MoE placement {moe.layers!r} (choose {', '.join(modes)} or a list of ids)")
        ids = list(modes[moe.layers])
    if any(not 0 <= i < num_layers for i in ids):
        raise MedMoEError(f"MoE layer ids {ids} out of range for {num_layers} layers")
    return ids


# ----------------------------------------------------------------------------- building blocks


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # CLIP's activation


ACTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF gelu_new / gelu_pytorch_tanh
    "quick_gelu": quick_gelu,
    "silu": F.silu,
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back before the scale, as the Llama/Qwen2 reference does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) through kernels.linear: fast one-row decode steps."""

    def forward(self, x):
        return kernels.linear(x, self.weight, self.bias)


def project(x, *linears):
    """x through several linears that read it (q, k and v; up and gate): one kernel call for all of
    them where they are quantized alike (QuantLinear, kernels.qlinears), one call each otherwise."""
    if all(isinstance(m, QuantLinear) for m in linears) and len({m.weight.dtype for m in linears}) == 1:
        return kernels.qlinears(x, [(m.weight, m.scales, m.bias) for m in linears])
    return [m(x) for m in linears]


def make_norm(kind, dim, eps):
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding on the first `dim` channels of a head."""

    def __init__(self, dim, theta):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.reset_buffers()

    def reset_buffers(self, device=None):
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions, dtype):
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, dim/2], in fp32 as the reference
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, dim]


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] channels (the rotate-half convention of GPT-NeoX/HF)."""
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def one_row_attention(q, k, v, mask):
    """SDPA for one decoded token q [B, H, 1, D] over the cache k, v [B, KVH, S, D], every product in fp32
    (24 StableLM layers against fp64: error 0.00049, bf16 matmuls 0.00219, SDPA 0.00076). On a CPU our
    kernel (kernels.one_row_attention) streams the cache once; where it does not apply, two fp32 matmuls.
    Both beat SDPA's CPU kernel, made for blocks of queries, and the kernel takes half the matmuls'
    time or less (BENCHMARKS.md)."""
    if kernels.attention_kernel_takes(q, k, mask):
        return kernels.one_row_attention(q, k, v, mask)
    B, H, _, D = q.shape
    kvh = k.shape[1]
    q = q.view(B, kvh, H // kvh, D).float()  # grouped-query heads share their key/value head
    att = (q @ k.transpose(-1, -2).float()) * D**-0.5  # [B, KVH, H/KVH, S]
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)  # mask [B, 1, 1, S]
    return (att @ v.float()).to(v.dtype).view(B, H, 1, D)


class KVCache(nn.Module):
    """Preallocated keys/values (gpt-fast style): decoding writes in place, shapes never change."""

    def __init__(self, batch, kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary and KV cache.
    Used by the vision tower (bidirectional, no rotary) and the LLM (causal)."""

    def __init__(self, dim, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, dim, bias=o_bias)
        self.kv_cache = None

    def forward(self, x, rope=None, mask=None, input_pos=None):
        B, T, _ = x.shape
        q, k, v = (y.view(B, T, -1, self.head_dim).transpose(1, 2) for y in project(x, self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(mask, str):  # "causal" / "full": no padding, let SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", enable_gqa=gqa)
        elif T == 1 and self.kv_cache is not None and q.device.type == "cpu":  # a decoded row, eager or compiled
            y = one_row_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """One dense FFN: down(act(up(x))) or, gated (SwiGLU), down(act(gate(x)) * up(x)).
    Names follow Llama; Phi/CLIP's fc1/fc2 are up_proj/down_proj."""

    def __init__(self, dim, hidden, act, gated, bias):
        super().__init__()
        self.act = ACTS[act]
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.gate_proj = Linear(dim, hidden, bias=bias) if gated else None
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        up, gate = project(x, self.up_proj, self.gate_proj)
        return self.down_proj(self.act(gate) * up)


# ----------------------------------------------------------------------------- vision tower


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.num_heads, d // cfg.num_heads, True, True)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ffn = FeedForward(d, cfg.intermediate_size, cfg.act, gated=False, bias=True)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x), mask="full")
        return x + self.ffn(self.ffn_norm(x))


class VisionTower(nn.Module):
    """ViT returning the patch features of its last kept layer. Only the layers up to the
    feature layer are kept: LLaVA reads hidden_states[-2], so CLIP-L's last layer and its
    post-layernorm would be dead weight."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        clip = cfg.kind == "clip"
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size, bias=not clip)
        self.class_embed = nn.Parameter(torch.zeros(d)) if clip else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches + clip, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if clip else None
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, pixels):
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_embed is not None:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.class_embed is not None else x  # CLIP: drop the class token


def make_projector(kind, vision_dim, dim):
    if kind == "linear":
        return Linear(vision_dim, dim)
    if kind == "mlp2x_gelu":  # Sequential indices 0/2 match the released `image_spatial_proj.{0,2}`
        return nn.Sequential(Linear(vision_dim, dim), nn.GELU(), Linear(dim, dim))
    raise MedMoEError(f"unknown projector {kind!r} (choose mlp2x_gelu or linear)")


# ----------------------------------------------------------------------------- mixture of experts


class Experts(nn.Module):
    """E feed-forward experts stored as stacked [E, out, in] tensors, so that dispatch is one
    grouped GEMM per projection (kernels.py) instead of a Python loop over modules."""

    def __init__(self, num_experts, dim, hidden, act, gated, bias, device=None):
        super().__init__()
        self.act = ACTS[act]

        def param(*shape, fan_in):  # nn.Linear's default init, uniform(+-1/sqrt(fan_in)), per expert
            bound = 1 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(num_experts, *shape, device=device).uniform_(-bound, bound))

        self.up_proj = param(hidden, dim, fan_in=dim)
        self.up_bias = param(hidden, fan_in=dim) if bias else None
        self.gate_proj = param(hidden, dim, fan_in=dim) if gated else None
        self.down_proj = param(dim, hidden, fan_in=hidden)
        self.down_bias = param(dim, fan_in=hidden) if bias else None

    @torch.no_grad()
    def copy_from(self, ffn: FeedForward):
        """Upcycling: every expert starts as a copy of the dense FFN (Med-MoE stage 3 `deepcopy`)."""
        sources = {"up_proj": ffn.up_proj.weight, "up_bias": ffn.up_proj.bias, "down_proj": ffn.down_proj.weight,
                   "down_bias": ffn.down_proj.bias, "gate_proj": ffn.gate_proj.weight if ffn.gate_proj is not None else None}
        for name, src in sources.items():
            if getattr(self, name) is not None:
                getattr(self, name).copy_(src.expand_as(getattr(self, name)))

    def quantize(self, q: "QuantConfig"):
        """Each stacked matrix becomes a (data, scales) pair of buffers, quantized per expert."""
        for name in ("up_proj", "gate_proj", "down_proj"):
            w = getattr(self, name)
            if w is not None:
                data, scales = kernels.quantize(w.detach(), q.bits, q.group_size)
                delattr(self, name)
                self.register_buffer(name, data)
                self.register_buffer(f"{name}_scales", scales)

    def weight(self, name):
        """A stacked weight as kernels.moe_mlp takes it: a tensor, or (data, scales) if quantized."""
        w = getattr(self, name)
        scales = getattr(self, f"{name}_scales", None)
        return w if scales is None or w is None else (w, scales)

    def forward(self, x, expert_idx, expert_weight, dispatch="auto"):
        return kernels.moe_mlp(
            x, expert_idx, expert_weight, self.weight("up_proj"), self.weight("down_proj"), gate_proj=self.weight("gate_proj"),
            up_bias=self.up_bias, down_bias=self.down_bias, act=self.act, dispatch=dispatch,
        )


class MoE(nn.Module):
    """Med-MoE's FFN: out = sum_{i in top-k} g_i * E_i(x) + E_meta(x)   (released moe/layer.py).

    The router is a linear modality classifier over each token's FFN input, in fp32; g_i are
    its softmax probabilities, *not* renormalised over the top-k (released code; renormalise
    for Mixtral). The meta expert is the dense stage-2 FFN, always on and added unweighted."""

    def __init__(self, cfg: LLMConfig, moe: MoEConfig, dense: FeedForward | None = None):
        super().__init__()
        self.moe = moe
        H, Fh = cfg.hidden_size, cfg.intermediate_size
        device = dense.up_proj.weight.device if dense is not None else None
        self.router = nn.Linear(H, moe.num_experts, bias=moe.router_bias, device=device)
        self.experts = Experts(moe.num_experts, H, Fh, cfg.act, cfg.gated_mlp, cfg.mlp_bias, device)
        self.meta_expert = None
        if moe.meta_expert:
            self.meta_expert = dense if dense is not None else FeedForward(H, Fh, cfg.act, cfg.gated_mlp, cfg.mlp_bias)
        if dense is not None:  # upcycling a stage-2 FFN: experts = copies, meta expert = the FFN itself
            self.experts.copy_from(dense)
        self.reset_buffers(device)

    def reset_buffers(self, device=None):
        self.register_buffer("tokens_per_expert", torch.zeros(self.moe.num_experts, dtype=torch.long, device=device), persistent=False)

    def route(self, x):
        """Router in fp32 even under bf16 autocast: small logit gaps decide the expert."""
        w, b = self.router.weight, self.router.bias
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), w.float(), None if b is None else b.float())
        probs = logits.softmax(-1)
        weight, idx = probs.topk(self.moe.top_k, dim=-1)
        if self.moe.renormalize:
            weight = weight / weight.sum(-1, keepdim=True)
        return logits, weight, idx

    def forward(self, x):
        """-> (output, router logits [tokens, E]): the logits go back up for the aux losses and
        the routing view, as transformers' output_router_logits returns them."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weight, idx = self.route(x)
        with torch.no_grad():
            # index_add_, not bincount: its output length is static, so no graph break under compile
            self.tokens_per_expert.index_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))
        out = self.experts(x, idx, weight.to(x.dtype), dispatch=self.moe.dispatch)
        if self.meta_expert is not None:
            out = out + self.meta_expert(x)
        return out.view(shape), logits


def load_balancing_loss(logits, top_k):
    """Switch-Transformer aux loss E * sum_e f_e * P_e (f: fraction of routed slots, P: mean prob)."""
    E = logits.shape[-1]
    probs = logits.softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, -1).indices, E).sum(1).float()
    return E * (chosen.mean(0) / top_k * probs.mean(0)).sum()


def router_z_loss(logits):
    return torch.logsumexp(logits, -1).pow(2).mean()  # ST-MoE: keeps router logits small


# ----------------------------------------------------------------------------- language model


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, moe: MoEConfig | None = None):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias, cfg.o_bias)
        self.ffn_norm = None if self.parallel else make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        if moe is not None:
            self.ffn = MoE(cfg, moe)
        else:
            self.ffn = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.act, cfg.gated_mlp, cfg.mlp_bias)

    def forward(self, x, rope, mask, input_pos=None):
        """-> (x, the router logits of an MoE layer, None for a dense one)."""
        h = self.attn_norm(x)
        if self.parallel:  # Phi-2: attention and FFN both read the same normed input
            y, router_logits = self.feed_forward(h)
            return x + self.attn(h, rope, mask, input_pos) + y, router_logits
        x = x + self.attn(h, rope, mask, input_pos)
        y, router_logits = self.feed_forward(self.ffn_norm(x))
        return x + y, router_logits

    def feed_forward(self, h):
        return self.ffn(h) if isinstance(self.ffn, MoE) else (self.ffn(h), None)


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig, moe: MoEConfig | None = None):
        super().__init__()
        self.cfg = cfg
        moe_ids = set(moe_layer_ids(moe, cfg.num_layers)) if moe else set()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(int(cfg.head_dim * cfg.rotary_pct), cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, moe if i in moe_ids else None) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.checkpointing = False  # training: recompute each block in backward instead of storing it

    @property
    def dtype(self):
        """The activations' dtype: the norms'. The large matrices may be stored narrower
        (weight-only bf16, int8 or int4; see load_model and quantize)."""
        return self.norm.weight.dtype

    def moe_layers(self):
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def upcycle(self, moe: MoEConfig):
        """Stage 3: turn the chosen dense FFNs into MoE layers (experts = copies, meta = the FFN)."""
        for i in moe_layer_ids(moe, self.cfg.num_layers):
            self.layers[i].ffn = MoE(self.cfg, moe, dense=self.layers[i].ffn)

    def setup_cache(self, batch, max_len, dtype, device):
        """Fresh caches for one stream, replacing any other stream's; returns the first, which names them."""
        c = self.cfg
        for b in self.layers:
            b.attn.kv_cache = KVCache(batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)
        return self.layers[0].attn.kv_cache

    def holds_cache(self, cache):
        return self.layers[0].attn.kv_cache is cache

    def clear_cache(self, cache):
        if self.holds_cache(cache):  # not a newer stream's
            for b in self.layers:
                b.attn.kv_cache = None

    def forward(self, embeds, positions=None, key_valid=None, input_pos=None, last_only=False, router_logits=False):
        """embeds [B, T, H]; positions [B, T] rotary positions; key_valid [B, S] marks real
        (non-padding) keys, S = T without a cache or the cache length; input_pos [T] = where
        these tokens sit in the cache. Returns logits [B, T, V] (or [B, V] if last_only), and
        with router_logits=True also every MoE layer's router logits [B * T, E], in layer order."""
        B, T, _ = embeds.shape
        if positions is None:
            positions = torch.arange(T, device=embeds.device).expand(B, T)
        x, routers = embeds.to(self.dtype), []  # a narrower embedding table's rows are upcast
        rope = self.rotary(positions, x.dtype)
        mask = attention_mask(key_valid, input_pos, T, embeds.device)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x, r = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, input_pos, use_reentrant=False)
            else:
                x, r = layer(x, rope, mask, input_pos)
            if r is not None:
                routers.append(r)
        logits = self.lm_head(self.norm(x[:, -1] if last_only else x))
        return (logits, routers) if router_logits else logits


def attention_mask(key_valid, input_pos, T, device):
    """Causal + padding mask [B, 1, T, S]; "causal" when there is neither padding nor cache."""
    if key_valid is None and input_pos is None:
        return "causal"
    q_pos = input_pos if input_pos is not None else torch.arange(T, device=device)
    S = key_valid.shape[1] if key_valid is not None else T
    k_pos = torch.arange(S, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if key_valid is not None:
        # a padding query would see no key at all and SDPA would return NaN, which then leaks
        # through 0 * NaN; letting every query see itself keeps padded rows finite
        mask = (mask & key_valid[:, None, :]) | (k_pos[None, :] == q_pos[:, None])
    return mask[:, None] if mask.dim() == 3 else mask


# ----------------------------------------------------------------------------- the vision-language model


class MedMoE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision) if cfg.vision else None
        self.projector = make_projector(cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size) if cfg.vision else None
        self.llm = LLM(cfg.llm, cfg.moe)

    def blocks(self):
        """The repeated blocks: what the trainer compiles (and shards) one by one."""
        return self.llm.layers

    def upcycle(self, moe: MoEConfig):
        """Stage 3: the dense model becomes a Med-MoE (see LLM.upcycle); the config records it."""
        self.cfg.moe = moe
        self.llm.upcycle(moe)

    def encode_images(self, pixels):
        """[N, 3, S, S] -> [N, patches, H]: the visual tokens that replace <image>."""
        return self.projector(self.vision(pixels))

    def splice(self, input_ids, pixels=None, labels=None, pad_left=False):
        """Embed the id lists and write each image's projected features over its IMAGE_TOKEN
        positions (a prompt holds num_patches of them per <image>: data.encode_text lays them
        out), images in order of appearance; truncate to the context length and pad.
        Returns embeds [B, T, H], valid [B, T] (False on padding) and labels [B, T] or None."""
        emb = self.llm.embed
        if pixels is not None and self.vision is None:
            raise MedMoEError("this model has no vision tower, but images were given")
        ids, valid, out_labels, images = self.pad(input_ids, labels, pad_left)
        is_image = ids == IMAGE_TOKEN
        outside = ((ids < 0) & ~is_image) | (ids >= emb.num_embeddings)
        if outside.any():
            b = int(outside.any(-1).nonzero()[0])
            raise MedMoEError(f"prompt {b} has token ids outside the vocabulary (0..{emb.num_embeddings - 1})")
        dtype = self.llm.dtype
        feats = self.encode_images(pixels).to(dtype) if pixels is not None else emb.weight.new_zeros(0, dtype=dtype)
        if sum(images) > len(feats):
            raise MedMoEError(f"the prompts hold more <image> placeholders ({sum(images)}) than images given ({len(feats)})")
        if sum(images) < len(feats):
            raise MedMoEError(f"more images given ({len(feats)}) than <image> placeholders in the prompts ({sum(images)})")
        embeds = emb(ids.masked_fill(is_image, 0)).to(dtype)
        if sum(images):
            # The k-th image position of a row is feature k % P of the row's image k // P: every
            # image fills P positions, and only a row's last one can be cut short by truncation.
            P, k = feats.shape[1], is_image.cumsum(1) - 1
            first = torch.tensor([0, *images[:-1]], device=ids.device).cumsum(0)[:, None]  # each row's first image
            embeds[is_image] = feats[(first + k // P)[is_image], (k % P)[is_image]]
            out_labels = out_labels.masked_fill(is_image, IGNORE)
        return embeds, valid, (out_labels if labels is not None else None)

    def pad(self, input_ids, labels, pad_left):
        """Id lists -> padded ids [B, T], valid [B, T], labels [B, T] (IGNORE on padding) and each
        row's image count. Training truncates to the context length, as the released code does;
        generation cannot drop the end of a prompt (the question is there), so it refuses."""
        limit, device = self.cfg.llm.max_seq_len, self.llm.embed.weight.device
        P = self.cfg.vision.num_patches if self.vision is not None else 1
        images = []
        for b, seq in enumerate(input_ids):
            n = sum(t == IMAGE_TOKEN for t in seq)
            if n % P:
                raise MedMoEError(f"prompt {b} has {n} image positions, not a multiple of the {P} each image fills (data.encode_text)")
            if pad_left and len(seq) > limit:
                raise MedMoEError(f"prompt {b} is {len(seq)} tokens with its image(s), longer than the context length {limit}")
            images.append(n // P)
        T = min(max(len(seq) for seq in input_ids), limit)
        ids = torch.zeros(len(input_ids), T, dtype=torch.long, device=device)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        out_labels = torch.full_like(ids, IGNORE)
        for b, seq in enumerate(input_ids):
            n = min(len(seq), limit)
            sl = slice(T - n, T) if pad_left else slice(0, n)
            ids[b, sl], valid[b, sl] = torch.as_tensor(seq[:n], dtype=torch.long), True
            if labels is not None:
                out_labels[b, sl] = torch.as_tensor(labels[b][:n], dtype=torch.long)
        return ids, valid, out_labels, images

    def forward(self, input_ids, pixels=None, labels=None, num_tokens=None, router_logits=False):
        """Training/scoring forward: right-padded batch -> (logits, loss or None), and the MoE
        layers' router logits as a third item with router_logits=True."""
        embeds, valid, labels = self.splice(input_ids, pixels, labels)
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        logits, routers = self.llm(embeds, positions, None if valid.all() else valid, router_logits=True)
        loss = self.loss(logits, labels, routers, num_tokens) if labels is not None else None
        return (logits, loss, routers) if router_logits else (logits, loss)

    def loss(self, logits, labels, router_logits=(), num_tokens=None):
        """Next-token cross-entropy plus the MoE aux terms (both weighted 0 in Med-MoE). The
        cross-entropy is summed and divided by num_tokens (default: this batch's supervised
        tokens); a trainer passes the count over all micro-batches and processes of a step, so
        every answer token weighs the same however the step is split."""
        targets = labels[:, 1:].flatten()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE, reduction="sum")
        ce = ce / (num_tokens if num_tokens is not None else (targets != IGNORE).sum().clamp(min=1))
        moe = self.cfg.moe
        for r in router_logits:
            if moe.aux_loss_coef:
                ce = ce + moe.aux_loss_coef * load_balancing_loss(r, moe.top_k)
            if moe.z_loss_coef:
                ce = ce + moe.z_loss_coef * router_z_loss(r)
        return ce

    @torch.inference_mode()
    def generate_stream(self, input_ids, pixels=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                        stop_ids=None, generator=None, compile=False, vocab_size=None):
        """Yield the next token of every prompt [B] per step (left-padded batch, KV cache).
        Rows that finished keep yielding their stop token; stops when all have finished.
        compile=True compiles the one-token decode step (gpt-fast style): its shapes are
        fixed, because the cache length is rounded up to a multiple of 256. Ids from vocab_size
        on are never chosen: checkpoints pad their embeddings beyond what the tokenizer knows
        (released Phi-2: 51,200 rows for about 50,300 tokens)."""
        embeds, valid, _ = self.splice(input_ids, pixels, pad_left=True)
        B, T, _ = embeds.shape
        stop = torch.tensor(sorted(stop_ids if stop_ids is not None else self.cfg.llm.eos_ids) or [-1], device=embeds.device)
        if self.cfg.llm.max_seq_len <= T:
            raise MedMoEError(f"the prompt fills the whole context ({self.cfg.llm.max_seq_len} tokens): no room to answer")
        total = min(T + max_new_tokens, self.cfg.llm.max_seq_len)
        cache_len = min(-(-total // 256) * 256, self.cfg.llm.max_seq_len) if compile else total
        options = DECODE_COMPILE_OPTIONS | ({"triton.cudagraphs": True} if embeds.is_cuda else {})
        decode = torch.compile(self.decode_step, dynamic=False, options=options) if compile else self.decode_step
        cache = self.llm.setup_cache(B, cache_len, embeds.dtype, embeds.device)  # one stream's at a time
        try:
            key_valid = torch.zeros(B, cache_len, dtype=torch.bool, device=embeds.device)
            key_valid[:, :T] = valid
            positions = (valid.cumsum(-1) - 1).clamp(min=0)
            input_pos = torch.arange(T, device=embeds.device)
            logits = self.llm(embeds, positions, key_valid, input_pos, last_only=True)
            done = torch.zeros(B, dtype=torch.bool, device=embeds.device)
            for step in range(total - T):
                tok = sample(logits[:, :vocab_size], temperature, top_p, generator)
                tok = torch.where(done, stop[0], tok)
                done |= torch.isin(tok, stop)
                yield tok
                if done.all() or step == total - T - 1:
                    break
                if not self.llm.holds_cache(cache):  # decoding on would read another stream's keys
                    raise MedMoEError("this model began another generate_stream: it decodes one stream at a time")
                input_pos = input_pos[-1:] + 1
                positions = positions[:, -1:] + 1
                key_valid[:, input_pos] = True
                logits = decode(tok, positions, key_valid, input_pos)
        finally:
            self.llm.clear_cache(cache)

    def decode_step(self, tok, positions, key_valid, input_pos):
        """One new token per row through the cached LLM -> next-token logits [B, V]."""
        return self.llm(self.llm.embed(tok[:, None]), positions, key_valid, input_pos, last_only=True)

    def generate(self, input_ids, pixels=None, **kw):
        """Greedy (temperature 0) or sampled continuations, one id list per prompt, stop tokens removed."""
        stop = set(kw.get("stop_ids") if kw.get("stop_ids") is not None else self.cfg.llm.eos_ids)
        out = [[] for _ in input_ids]
        finished = [False] * len(input_ids)
        for tok in self.generate_stream(input_ids, pixels, **kw):
            for b, t in enumerate(tok.tolist()):
                if not finished[b]:
                    finished[b] = t in stop
                    if not finished[b]:
                        out[b].append(t)
        return out


# Inductor inlines a cheap pointwise producer into every reduction that reads it: the RMSNorm in
# front of a one-row kernels.linear would be recomputed for each of the weight's rows (49152 times
# for SmolLM2's LM head). Threshold 1 stores the normed row once (measured 1.07x on a decode step).
# On CUDA the step is also replayed as one CUDA graph: a batch-1 step is hundreds of small kernels,
# and launching them one by one from Python would take longer than running them.
# Inductor also checks every input's sizes and strides in Python before each step (~900 checks, 0.4 ms
# of a StableLM-shape step): the step's shapes are fixed by construction (dynamic=False, a cache of
# fixed length), so they are not checked.
DECODE_COMPILE_OPTIONS = {"realize_acc_reads_threshold": 1, "size_asserts": False}


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Greedy at temperature 0; otherwise nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0:  # max's indices: the first largest as argmax's, but 88 us for 100k bf16 logits, not 361
        return logits.max(-1).indices
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep tokens until the mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- weight-only quantization


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is int8 or int4 (kernels.py): `weight` holds the integers
    and `scales` how to read them back, so a checkpoint stores exactly what the kernel reads."""

    def __init__(self, data, scales, bias=None):
        super().__init__()
        self.register_buffer("weight", data)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return kernels.qlinear(x, self.weight, self.scales, self.bias)


def quantize(model: MedMoE, q: QuantConfig):
    """Quantize a float model in place (on the meta device too: that builds a quantized
    checkpoint's structure before its tensors are loaded). Every nn.Linear but the routers, and
    every stacked expert weight; the vision tower only if q.vision. A tied LM head becomes its own
    quantized matrix: the embedding stays float, and decoding reads one row of it per token."""
    if model.cfg.quant is not None:
        raise MedMoEError(f"the model is already quantized (int{model.cfg.quant.bits}): quantize from its float checkpoint")
    if q.bits not in (4, 8) or (q.bits == 4 and q.group_size not in kernels.INT4_GROUPS):
        raise MedMoEError(f"quantization: bits 8, or 4 with a group size in {kernels.INT4_GROUPS} (got {q.bits}, {q.group_size})")
    frozen_float = set() if q.vision or model.vision is None else set(model.vision.modules())
    for name, m in list(model.named_modules()):
        if m in frozen_float:
            continue
        try:
            if isinstance(m, Experts):
                m.quantize(q)
            for child_name, child in list(m.named_children()):
                if isinstance(child, nn.Linear) and not (isinstance(m, MoE) and child_name == "router"):
                    bias = None if child.bias is None else child.bias.detach()
                    bits = max(q.bits, q.lm_head_bits) if child is model.llm.lm_head else q.bits
                    setattr(m, child_name, QuantLinear(*kernels.quantize(child.weight.detach(), bits, q.group_size), bias))
        except ValueError as e:
            raise MedMoEError(f"cannot quantize {name or 'the model'}: {e}") from None
    model.cfg.quant = q
    model.cfg.llm.tie_embeddings = False
    return model


def decode_bytes(model: MedMoE):
    """Weight bytes read to decode one token (batch 1): the LLM's tensors, but one row of the
    embedding table and top_k of the E experts. Over the memory bandwidth, this is the fastest
    decoding the hardware allows."""
    total = 0
    for name, t in model.llm.state_dict(keep_vars=True).items():
        n = t.numel() * t.element_size()
        if name == "embed.weight":
            n = t.shape[1] * t.element_size()
        elif ".experts." in name:
            moe = model.cfg.moe
            n = n * moe.top_k // moe.num_experts
        total += n
    return total


def count_params(model: MedMoE):
    """Total and per-token activated parameters. A token runs top_k of the E experts in an MoE
    layer *plus* the meta expert, so the meta expert counts as activated; top-1 + meta thus
    activates what top-2 does (the paper's 3.6B Phi-2 / 2.0B StableLM count the LLM so)."""
    n = lambda m: count_weights(m) if m is not None else 0
    llm_active = n(model.llm)
    for layer in model.llm.moe_layers():
        llm_active -= n(layer.experts) // layer.moe.num_experts * (layer.moe.num_experts - layer.moe.top_k)
    return {"vision": n(model.vision), "projector": n(model.projector), "llm": n(model.llm),
            "llm_active": llm_active, "total": n(model)}


def count_weights(m: nn.Module):
    """Parameters, a quantized matrix counted as the weights it stands for: its integers (two int4
    weights a byte) and bias are buffers, beside their scales."""
    quantized = sum(t.numel() * (2 if t.dtype == torch.uint8 else 1) for mod in m.modules()
                    for name, t in mod.named_buffers(recurse=False)
                    if (isinstance(mod, QuantLinear) and name != "scales") or hasattr(mod, f"{name}_scales"))
    return sum(p.numel() for p in m.parameters()) + quantized


# ----------------------------------------------------------------------------- weights: read, save, load

def expected_tensors(model):
    """name -> shape of what a checkpoint must hold (a tied lm_head is stored once)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if isinstance(model, MedMoE) and model.cfg.llm.tie_embeddings:
        shapes.pop("llm.lm_head.weight")
    return shapes


def check_tensors(model, tensors, where):
    expected = expected_tensors(model)
    state = model.state_dict()
    for name, shape in expected.items():
        if name not in tensors:
            raise MedMoEError(f"{where}: missing tensor {name!r} (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise MedMoEError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if tensors[name].is_floating_point() != state[name].is_floating_point():  # quantized data are integers
            raise MedMoEError(f"{where}: tensor {name!r} is {tensors[name].dtype}, expected {state[name].dtype}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise MedMoEError(f"{where}: unexpected tensor {extra[0]!r}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))


def load_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise MedMoEError(f"{directory}: no config.json (not a medmoe checkpoint directory)")
    d = read_json(path)
    if d.get("kind") == "medmoe-contrastive":
        raise MedMoEError(f"{directory}: a MedMoE contrastive (Swin) checkpoint: `medmoe classify` and `medmoe probe` use it")
    if "llm" not in d:
        hint = " (a Hugging Face or Med-MoE checkpoint: run `medmoe convert` first)" if "model_type" in d or "architectures" in d else ""
        raise MedMoEError(f"{path}: not a medmoe config{hint}")
    quant = d.get("quant")
    if isinstance(quant, dict) and quant.get("bits") == 4 and quant.get("int4_layout", 1) != kernels.INT4_LAYOUT:
        raise MedMoEError(f"{directory}: int4 weights in an older layout: re-run `medmoe convert --quantize int4` from the float weights")
    cfg = from_json(Config, d, path)
    if cfg.llm.arch not in ARCHS:
        raise MedMoEError(f"{path}: unknown architecture {cfg.llm.arch!r} (supported: {', '.join(ARCHS)})")
    return cfg


def cast(name, t, dtype):
    """Cast a floating tensor to dtype, except routers (they stay fp32, see MoE.route) and
    quantization scales (bf16, what the kernels read)."""
    keep = dtype is None or not t.is_floating_point() or ".router." in name or name.endswith("scales")
    return t if keep else t.to(dtype)


def cast_tensors(tensors, dtype):
    return {k: cast(k, v, dtype) for k, v in tensors.items()}


def reset_buffers(model, device=None):
    """Non-persistent buffers (rotary tables, expert counters) are rebuilt, not loaded."""
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers(device)


def empty_model(cfg):
    """The model of a config on the meta device (no memory), quantized if the config says so."""
    with torch.device("meta"):
        model = MedMoE(replace(cfg, quant=None))
        return quantize(model, cfg.quant) if cfg.quant else model


def matrix_names(model: MedMoE):
    """The tensors a narrower matrix_dtype stores (load_model): every Linear's weight but the
    routers', the stacked experts' and the embedding table, the vision tower's included."""
    names = {"llm.embed.weight"}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith(".router"):
            names.add(f"{name}.weight")
        elif isinstance(m, Experts):
            names.update(f"{name}.{p}" for p in ("up_proj", "gate_proj", "down_proj") if getattr(m, p) is not None)
    return names


def load_model(directory, dtype=None, device="cpu", quant=None, matrix_dtype=None):
    """Load a medmoe checkpoint directory. Tensors are memory-mapped when no cast is needed.
    quant: quantize a float checkpoint on the fly (a QuantConfig).
    matrix_dtype: weight-only bf16. The large matrices (matrix_names) are stored in it, the rest
    in dtype, so every activation and every product stays in dtype: each matrix is upcast as it
    is read (kernels.linear). Half of fp32's weight bytes, fp32's answers: on real SmolLM2 weights,
    bf16 matrices under fp32 activations give 18 of 20 greedy answers identical to fp32's, a
    model all in bf16 gives 12 (tests/test_real_weights.py). Prefill pays for it on CPUs whose
    bf16 GEMM is fast (AMX), and an eager decode step for the upcast copies: compile decoding."""
    cfg = load_config(directory)
    if matrix_dtype is not None and (cfg.quant or quant):
        name = str(matrix_dtype).removeprefix("torch.")
        raise MedMoEError(f"{directory}: {name} weights (bf16w) need a float checkpoint, not a quantized one")
    model = empty_model(cfg)
    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        raise MedMoEError(f"{directory}: missing weights file model.safetensors")
    tensors = read_safetensors(path)
    check_tensors(model, tensors, path)
    # quantized kernels need 64-byte aligned weights: copy the odd one a file left unaligned
    tensors = {k: v.clone() if not v.is_floating_point() and v.data_ptr() % 64 else v for k, v in tensors.items()}
    narrow = matrix_names(model) if matrix_dtype is not None else set()
    tensors = {k: cast(k, v, matrix_dtype if k in narrow else dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=not cfg.llm.tie_embeddings, assign=True)
    if cfg.llm.tie_embeddings:
        model.llm.lm_head.weight = model.llm.embed.weight
    reset_buffers(model)
    if quant is not None:
        quantize(model, quant)
    return model.to(device).eval()


def save_checkpoint(cfg, tensors, directory, tokenizer_json=None, get=None):
    """config.json + model.safetensors (+ tokenizer.json), each file replaced atomically
    (tensors and get as in write_safetensors)."""
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "model.safetensors"), lambda p: write_safetensors(p, tensors, get))
    config = json.dumps(cfg.to_dict(), indent=2).encode()
    atomic_write(os.path.join(directory, "config.json"), lambda p: write_bytes(p, config))
    if tokenizer_json and os.path.abspath(tokenizer_json) != os.path.abspath(os.path.join(directory, "tokenizer.json")):
        with open(tokenizer_json, "rb") as f:
            data = f.read()
        atomic_write(os.path.join(directory, "tokenizer.json"), lambda p: write_bytes(p, data))


def save_model(model, directory, tokenizer_json=None):
    keep = expected_tensors(model)
    save_checkpoint(model.cfg, {k: v for k, v in model.state_dict().items() if k in keep}, directory, tokenizer_json)


