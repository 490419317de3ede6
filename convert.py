"""Conversion from outside layouts into our checkpoints (config.json + model.safetensors).

Each source is read into (config, tensors named like our state dict) and written by one writer,
`write_converted`, tensor by tensor (cast or quantized on the way):
  Hugging Face decoders (Phi, StableLM, Qwen2, Llama/Mistral/Mixtral) with a CLIP/SigLIP tower,
  LLaVA, released Med-MoE / MoE-LLaVA checkpoints, our own checkpoints (to cast or quantize),
  GGUF files (llama.cpp's format, with the `gguf` extra), and for MedMoE (contrastive.py) a
  Hugging Face Swin and BERT.
Imports files, medmoe, data and contrastive; nothing imports it but the CLI, tests and benches.
"""

import json
import math
import os
import re
from dataclasses import dataclass, replace

import torch

import medmoe
from medmoe import contrastive, data, kernels
from medmoe.files import MedMoEError, atomic_write, read_json, read_safetensors, read_weights, release, write_bytes

# ----------------------------------------------------------------------------- Hugging Face, LLaVA, Med-MoE

MODEL_TYPES = {"phi": "phi", "stablelm": "stablelm", "stablelm_epoch": "stablelm", "qwen2": "qwen2",
               "llama": "llama", "mistral": "llama", "mixtral": "llama"}
HF_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu",
           "silu": "silu", "swish": "silu"}


# Keys whose values size tensors: a number written as a string (or a list where a number belongs)
# would fail deep inside a conversion, so it is refused where the file is read.
NUMBER_KEY = re.compile(r"^(num_\w+|\w+_(size|eps|heads|layers|theta|factor|dim)|max_position_embeddings)$")


def read_hf_config(directory):
    """A Hugging Face config.json (nested text/vision configs too), its numbers checked."""
    path = os.path.join(directory, "config.json")
    hf = read_json(path)

    def check(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                check(value, f"{prefix}{key}.")
            numbers = value if isinstance(value, list) else [value]  # e.g. Swin's heads per stage, an [h, w] size
            if NUMBER_KEY.match(key) and not all(v is None or type(v) in (int, float) for v in numbers):
                raise MedMoEError(f"{path}: {prefix}{key} is {json.dumps(value)[:40]}: expected a number (or a list of them)")

    check(hf)
    return hf


def hf_llm_config(hf, max_seq_len=None):
    """LLMConfig (and MoEConfig for Mixtral) from a Hugging Face decoder config.json dict."""
    mt = hf.get("model_type", "?")
    if mt not in MODEL_TYPES:
        raise MedMoEError(f"unknown architecture {mt!r} (supported: {', '.join(MODEL_TYPES)})")
    arch = MODEL_TYPES[mt]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise MedMoEError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    for flag in ("qk_layernorm", "use_parallel_residual"):
        if hf.get(flag):
            raise MedMoEError(f"{mt} with {flag}=true is not supported")
    eos = hf.get("eos_token_id")
    kw = dict(medmoe.ARCHS[arch])
    kw["act"] = HF_ACTS.get(hf.get("hidden_act", ""), kw["act"])
    if arch == "stablelm":
        kw["qkv_bias"] = hf.get("use_qkv_bias", False)
    if arch == "llama":
        kw.update(qkv_bias=hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False))
    llm = medmoe.LLMConfig(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0, max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rotary_pct=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rope_pct", 1.0))),
        norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", hf.get("norm_eps", 1e-5))),
        tie_embeddings=hf.get("tie_word_embeddings", False), bos_id=hf.get("bos_token_id"),
        eos_ids=eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        pad_id=hf.get("pad_token_id") or 0, **kw,
    )
    moe = None
    if mt == "mixtral":  # Mixtral semantics: every layer, top-k renormalised, bias-free router, no meta expert
        moe = medmoe.MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], layers="dense",
                        meta_expert=False, renormalize=True, router_bias=False)
    return llm, moe


def hf_vision_config(hf, preprocessor=None, feature_layer=-2):
    hf = hf.get("vision_config", hf)  # a full CLIPModel/SiglipModel config nests the vision part
    mt = hf.get("model_type", "")
    kind = "clip" if "clip" in mt else "siglip" if "siglip" in mt else None
    if kind is None:
        raise MedMoEError(f"unknown vision architecture {mt!r} (supported: clip, siglip)")
    L = hf["num_hidden_layers"]
    keep = feature_layer if feature_layer >= 0 else L + 1 + feature_layer  # HF hidden_states has L+1 entries
    if not 0 <= keep <= L:
        raise MedMoEError(f"feature layer {feature_layer} out of range for a {L}-layer vision tower")
    default = medmoe.VisionConfig() if kind == "clip" else medmoe.VisionConfig(mean=(0.5,) * 3, std=(0.5,) * 3)
    pre = preprocessor or {}
    return medmoe.VisionConfig(
        kind=kind, image_size=hf["image_size"], patch_size=hf["patch_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=keep, num_heads=hf["num_attention_heads"],
        norm_eps=hf.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
        act=HF_ACTS[hf.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh")],
        mean=tuple(pre.get("image_mean", default.mean)), std=tuple(pre.get("image_std", default.std)),
    )


# Source-key patterns -> our names, first match wins; None drops the tensor. A name ending in
# "[e]" is expert e of a stacked tensor (Experts stores all experts of a layer in one tensor).
VISION_KEYS = [
    (r"embeddings\.class_embedding", "class_embed"),
    (r"embeddings\.patch_embedding\.", "patch_embed."),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"embeddings\.position_ids", None),
    (r"pre_layrnorm\.", "pre_norm."),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"layers.\1.attn_norm."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"layers.\1.ffn_norm."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.o_proj."),
    (r"encoder\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.up_proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.down_proj."),
    (r"(post_layernorm|head)\.", None),  # features come from an inner layer: unused
]
EXPERT_PARAMS = r"(fc1|fc2|up_proj|gate_proj|down_proj|w1|w2|w3)\.(weight|bias)"
LLM_KEYS = [
    (r"embed_tokens\.", "embed."),
    (r"layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
    (r"layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"layers\.(\d+)\.self_attn\.(dense|o_proj)\.", r"layers.\1.attn.o_proj."),
    (r"layers\.(\d+)\.self_attn\.([qkv]_proj)\.", r"layers.\1.attn.\2."),
    (r"layers\.(\d+)\.self_attn\.rotary_emb\.", None),
    (r"layers\.(\d+)\.mlp\.(fc1|up_proj)\.", r"layers.\1.ffn.up_proj."),
    (r"layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.ffn.gate_proj."),
    (r"layers\.(\d+)\.mlp\.(fc2|down_proj)\.", r"layers.\1.ffn.down_proj."),
    # Med-MoE / MoE-LLaVA (DeepSpeed MoE layer): router `wg`, experts, the always-on meta expert
    (r"layers\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.", r"layers.\1.ffn.router."),
    (rf"layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.{EXPERT_PARAMS}", r"layers.\1.ffn.experts.\3.\4[\2]"),
    (r"layers\.(\d+)\.mlp\.meta_moe\.(fc1|up_proj)\.", r"layers.\1.ffn.meta_expert.up_proj."),
    (r"layers\.(\d+)\.mlp\.meta_moe\.gate_proj\.", r"layers.\1.ffn.meta_expert.gate_proj."),
    (r"layers\.(\d+)\.mlp\.meta_moe\.(fc2|down_proj)\.", r"layers.\1.ffn.meta_expert.down_proj."),
    # Mixtral
    (r"layers\.(\d+)\.block_sparse_moe\.gate\.", r"layers.\1.ffn.router."),
    (rf"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.{EXPERT_PARAMS}", r"layers.\1.ffn.experts.\3.\4[\2]"),
    (r"(final_layernorm|norm)\.", "norm."),
    (r"lm_head\.", "lm_head."),
]
PROJECTOR_KEYS = [(r"(?:linear_1|0)\.", "0."), (r"(?:linear_2|2)\.", "2."), (r"(weight|bias)$", r"\1")]
# Which part of the model a source key belongs to, and the prefix to strip.
COMPONENTS = [
    (r"(?:model\.)?(?:vision_tower|image_tower\.image_tower)\.(?:vision_model\.)?", "vision"),
    (r"vision_model\.", "vision"),
    (r"(?:model\.)?(?:multi_modal_projector|mm_projector(?:\.image_spatial_proj)?)\.", "projector"),
    (r"(?:text_model|text_projection|visual_projection|logit_scale|logit_bias)", None),  # CLIP/SigLIP text side
    (r"(?:language_model\.)?(?=lm_head\.)", "llm"),
    (r"(?:model\.language_model\.|language_model\.model\.|model\.)", "llm"),
    (r"(?=embeddings\.|encoder\.|pre_layrnorm|post_layernorm|head\.)", "vision"),  # bare CLIPVisionModel
]
# Per-expert names (Phi fc1/fc2, Llama up/gate/down, Mixtral w1=gate w3=up w2=down) -> Experts fields
EXPERT_FIELDS = {"fc1.weight": "up_proj", "fc1.bias": "up_bias", "up_proj.weight": "up_proj", "gate_proj.weight": "gate_proj",
                 "fc2.weight": "down_proj", "fc2.bias": "down_bias", "down_proj.weight": "down_proj",
                 "w1.weight": "gate_proj", "w3.weight": "up_proj", "w2.weight": "down_proj"}


def rename(key, rules):
    """(our name or None to drop, or False when no rule knows the key)."""
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return None if repl is None else m.expand(repl) + key[m.end():]
    return False


def split_component(key):
    """("vision" | "projector" | "llm" | None to drop | False unknown, rest of the key)."""
    for pattern, part in COMPONENTS:
        m = re.match(pattern, key)
        if m:
            return part, key[m.end():]
    return False, key


def convert_tensors(tensors, where, only=None):
    """Rename a source state dict to ours. Per-expert tensors are stacked into Experts fields
    only when written: the result holds a meta tensor of the stacked shape, and `stacks` its
    parts (a released MoE holds billions of expert weights: stacking them all up front would
    copy them all into memory). Returns (tensors, stacks)."""
    rules = {"vision": VISION_KEYS, "llm": LLM_KEYS, "projector": PROJECTOR_KEYS}
    out, experts = {}, {}
    for key, t in tensors.items():
        part, rest = split_component(key)
        if part is None:
            continue
        name = rename(rest, rules[part]) if part and (not only or part in only) else False
        if name is None:
            continue
        if name is False:
            raise MedMoEError(f"{where}: unexpected tensor {key!r} (not a supported layout)")
        e = re.match(r"(.*)\.experts\.(.+)\[(\d+)\]$", name)
        if e:
            field_name = EXPERT_FIELDS[e.group(2)]
            experts.setdefault(f"{part}.{e.group(1)}.experts.{field_name}", {})[int(e.group(3))] = t
        else:
            out[f"{part}.{name}"] = t
    stacks = {name: [per_expert[i] for i in sorted(per_expert)] for name, per_expert in experts.items()}
    for name, parts in stacks.items():
        out[name] = torch.empty(len(parts), *parts[0].shape, dtype=parts[0].dtype, device="meta")
    return out, stacks


def default_template(arch, *dirs):
    """The conversation template (data.TEMPLATES) a decoder was tuned with: read from its
    tokenizer_config.json chat template when it has one, else Med-MoE's for Phi/StableLM."""
    chats = [str(((read_json(os.path.join(d, "tokenizer_config.json"), required=False) if d else None) or {}).get("chat_template") or "")
             for d in dirs]
    return template_of(arch, *chats)


def template_of(arch, *chat_templates):
    """The template a (Jinja) chat template implies, by its markers; else the architecture's."""
    for chat in chat_templates:
        for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<|assistant|>", "zephyr")):
            if marker in chat:
                return name
    return {"phi": "phi", "stablelm": "stablelm", "qwen2": "chatml"}.get(arch, "llama3")


def find_tokenizer(*dirs):
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return os.path.join(d, "tokenizer.json")
    return None


@dataclass
class Sources:
    """Where a Med-MoE checkpoint comes from: exactly one of
    llm (+ vision): Hugging Face decoder and CLIP/SigLIP directories; the projector is freshly
      initialised (seeded), ready for stage 1. llm may be a GGUF file instead, and then vision
      may be left out for a text-only model;
    llava: a Hugging Face LlavaForConditionalGeneration directory;
    released: a released Med-MoE / MoE-LLaVA directory (stage 2 dense or stage 3 MoE); its saved
      CLIP tower is used unless vision is given;
    ours: one of our own checkpoints, to cast or quantize it."""

    vision: str | None = None
    llm: str | None = None
    llava: str | None = None
    released: str | None = None
    ours: str | None = None


@dataclass
class Choices:
    """What a conversion cannot read from its sources (each overridden where a source says)."""

    feature_layer: int = -2  # the vision hidden state fed to the projector
    template: str | None = None  # default: the decoder's (its chat template, else its architecture's)
    max_seq_len: int | None = None  # default: the decoder's
    seed: int = 0  # of freshly initialised layers (the projector)


def convert(out_dir, source: Sources, dtype=None, quant=None, choices: Choices | None = None):
    """Write a medmoe checkpoint directory from `source`. dtype casts the floating tensors; quant
    (a QuantConfig) quantizes (see medmoe.quantize). Returns the written model on the meta
    device (for `medmoe info`)."""
    s, choices = source, choices or Choices()
    if sum(x is not None for x in (s.llm, s.llava, s.released, s.ours)) != 1:
        raise MedMoEError("give exactly one of --llm (with --vision), --llava, --medmoe or --model")
    for d in (s.vision, s.llava, s.released, s.ours):
        if d is not None and not os.path.isdir(d):
            raise MedMoEError(f"{d}: not a directory")
    stacks, tokenizer = {}, None
    if s.ours is not None:
        cfg = medmoe.load_config(s.ours)
        if cfg.quant and quant:
            raise MedMoEError(f"{s.ours} is already quantized (int{cfg.quant.bits}): quantize from its float checkpoint")
        tensors, tokenizer = read_safetensors(os.path.join(s.ours, "model.safetensors")), find_tokenizer(s.ours)
    elif s.llm is not None and os.path.isfile(s.llm):
        cfg, tensors = gguf_checkpoint(out_dir, s, choices)
    elif s.llm is not None and not os.path.isdir(s.llm):
        raise MedMoEError(f"{s.llm}: no such directory or GGUF file")
    else:
        cfg, tensors, stacks = hf_checkpoint(s, choices)
        tokenizer = find_tokenizer(s.llm or s.llava or s.released, s.vision)
    medmoe.check_tensors(medmoe.empty_model(cfg), tensors, s.ours or s.llm or s.llava or s.released)
    fetch = lambda name: torch.stack(stacks[name]) if name in stacks else tensors[name]
    return write_converted(cfg, tensors, fetch, out_dir, tokenizer, dtype, quant)


def write_converted(cfg, tensors, fetch, out_dir, tokenizer_json=None, dtype=None, quant=None):
    """Write a checkpoint of cfg tensor by tensor: each is fetched, cast and, with quant, quantized
    just before it is written, so memory peaks at about one tensor (plus what the source maps)
    whatever the model's size. tensors gives each source tensor's dtype and shape (meta tensors
    will do); fetch(name) makes it. Returns the written model on the meta device."""
    model = medmoe.empty_model(replace(cfg, llm=replace(cfg.llm)))
    if quant is not None:
        medmoe.quantize(model, quant)
        dtype = dtype or torch.bfloat16  # the quantized kernels compute in bf16
    state, keep = model.state_dict(), medmoe.expected_tensors(model)
    names = [k for k in state if k in keep]
    source = lambda name: name if name in tensors else "llm.embed.weight"  # a quantized tied head
    specs, scales_of, pending = {}, {}, {}
    for i, name in enumerate(names):
        if quant is not None and not state[name].is_floating_point():  # to quantize: the data, then its scales
            scales_of[name] = names[i + 1]
            specs[name], specs[names[i + 1]] = state[name], state[names[i + 1]]
        elif name not in specs:  # (an already quantized source passes through)
            specs[name] = medmoe.cast(name, tensors[source(name)].to("meta"), dtype)

    data_of = {v: k for k, v in scales_of.items()}
    read = []  # source tensors already turned into output: their pages go back (files.release)

    def get(name):  # the file may ask for a weight's scales first: what is made but not asked for waits
        while read:  # by the next call, the writer has written what the last one returned (maybe the source itself)
            release(read.pop())
        if name in pending:
            return pending.pop(name)
        weight = data_of.get(name, name)
        t = fetch(source(weight))
        if t is tensors.get(source(weight)):  # the source's own tensor (a stacked one is a temporary copy)
            read.append(t)
        if weight not in scales_of:
            return medmoe.cast(name, t, dtype)
        bits = 8 if specs[weight].dtype == torch.int8 else 4  # (an int4 model's LM head is int8)
        made = dict(zip((weight, scales_of[weight]), kernels.quantize(t, bits, quant.group_size)))
        out = made.pop(name)
        pending.update(made)
        return out

    medmoe.save_checkpoint(model.cfg, specs, out_dir, tokenizer_json, get)
    for t in read:
        release(t)
    return model


def hf_checkpoint(source: Sources, choices: Choices):
    """(config, tensors, stacks) of a Hugging Face / LLaVA / released Med-MoE source (see convert)."""
    vision, llm, llava, released = source.vision, source.llm, source.llava, source.released
    feature_layer, max_seq_len = choices.feature_layer, choices.max_seq_len
    src = llm or llava or released
    hf = read_hf_config(src)
    tensors, stacks = convert_tensors(read_weights(src), src, only=None if (llava or released) else {"llm"})
    vis_hf = read_hf_config(vision) if vision else None
    if vision:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("vision.")}
        tensors.update(convert_tensors(read_weights(vision), vision, only={"vision"})[0])
    if llava:
        if hf.get("model_type") != "llava":
            raise MedMoEError(f"{llava}: model_type {hf.get('model_type')!r} is not llava")
        if hf.get("vision_feature_select_strategy", "default") != "default":
            raise MedMoEError("only vision_feature_select_strategy 'default' (class token dropped) is supported")
        llm_cfg, moe = hf_llm_config(hf["text_config"], max_seq_len)
        vis_hf, feature_layer = vis_hf or hf["vision_config"], hf.get("vision_feature_layer", feature_layer)
    elif released:
        # Med-MoE/MoE-LLaVA configs are the decoder's config plus mm_* keys and a `moe` block
        llm_cfg, _ = hf_llm_config({**hf, "model_type": re.sub(r"^(moe_)?llava_", "", hf.get("model_type", ""))}, max_seq_len)
        moe = medmoe_moe_config(hf, tensors)
        feature_layer = hf.get("mm_vision_select_layer", feature_layer)
        if vis_hf is None and "vision.pos_embed" in tensors:
            vis_hf = clip_config_from_tensors(tensors)
    else:
        llm_cfg, moe = hf_llm_config(hf, max_seq_len)
    if vis_hf is None:
        raise MedMoEError("a vision tower is needed: give --vision DIR (a Hugging Face CLIP or SigLIP directory)")
    llm_cfg.lm_head_bias = "llm.lm_head.bias" in tensors  # LLaVA-Phi drops Phi-2's lm_head bias
    pre = read_json(os.path.join(vision or src, "preprocessor_config.json"), required=False)
    template = choices.template or default_template(llm_cfg.arch, src, llm)
    cfg = medmoe.Config(llm=llm_cfg, vision=hf_vision_config(vis_hf, pre, feature_layer), moe=moe, template=template,
                        projector=hf.get("image_projector_type") or hf.get("mm_projector_type") or "mlp2x_gelu")
    return cfg, with_projector(cfg, tensors, choices.seed), stacks


def gguf_checkpoint(out_dir, source: Sources, choices: Choices):
    """(config, tensors) of a GGUF decoder (source.llm), with a CLIP/SigLIP tower and a fresh
    projector when source.vision is given; writes its tokenizer.json into out_dir."""
    vision = source.vision
    llm_cfg, tensors, tokenizer_json, gguf_template = gguf_llm(source.llm, choices.max_seq_len)
    vis = None
    if vision:
        tensors.update(convert_tensors(read_weights(vision), vision, only={"vision"})[0])
        pre = read_json(os.path.join(vision, "preprocessor_config.json"), required=False)
        vis = hf_vision_config(read_hf_config(vision), pre, choices.feature_layer)
    cfg = medmoe.Config(llm=llm_cfg, vision=vis, template=choices.template or gguf_template)
    if tokenizer_json is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda p: write_bytes(p, tokenizer_json.encode()))
    return cfg, with_projector(cfg, tensors, choices.seed)


def with_projector(cfg, tensors, seed):
    """Keep only the vision layers the features come from and drop a tied LM head; give a model
    that has no projector yet a fresh one (nn.Linear's default init, seeded, as LLaVA's stage 1)."""
    if cfg.vision:
        unused = lambda k: k.startswith("vision.layers.") and int(k.split(".")[2]) >= cfg.vision.num_layers
        tensors = {k: v for k, v in tensors.items() if not unused(k)}
    if cfg.llm.tie_embeddings:
        tensors.pop("llm.lm_head.weight", None)
    if cfg.vision and not any(k.startswith("projector.") for k in tensors):
        torch.manual_seed(seed)
        projector = medmoe.make_projector(cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size)
        tensors.update({f"projector.{k}": v for k, v in projector.state_dict().items()})
    return tensors


def medmoe_moe_config(hf, tensors):
    """MoEConfig of a released Med-MoE / MoE-LLaVA checkpoint, or None for a dense (stage 1/2) one.
    Med-MoE: router with bias + meta expert, top-1 unnormalised. MoE-LLaVA (DeepSpeed's gate):
    no router bias, no meta expert, top-2 renormalised. Both are read off the tensors present."""
    moe = hf.get("moe") or {}
    if not moe.get("moe_enable"):
        return None
    if moe.get("use_residual") or any(".coefficient." in k for k in tensors):
        raise MedMoEError("MoE-LLaVA checkpoints with use_residual=true are not supported")
    top_k = moe.get("top_k_experts", 1)
    num_experts = moe.get("num_experts", 4)  # MoE-LLaVA writes one count per MoE layer
    return medmoe.MoEConfig(
        num_experts=num_experts[0] if isinstance(num_experts, list) else num_experts, top_k=top_k,
        layers=moe.get("moe_layers_idx") or moe.get("moe_mode", "sparse"),
        meta_expert=any(".ffn.meta_expert." in k for k in tensors), renormalize=top_k > 1,
        router_bias=any(k.endswith(".ffn.router.bias") for k in tensors), aux_loss_coef=moe.get("router_aux_loss_coef", 0.0),
    )


def clip_config_from_tensors(tensors):
    """The CLIP tower saved inside a Med-MoE checkpoint comes without its config: read it off
    the shapes (heads = width / 64, as in every CLIP ViT)."""
    d = tensors["vision.patch_embed.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("vision.layers."))
    side = math.isqrt(tensors["vision.pos_embed"].shape[0] - 1)
    return dict(model_type="clip_vision_model", hidden_size=d[0], patch_size=d[-1], image_size=side * d[-1],
                num_hidden_layers=layers, num_attention_heads=d[0] // 64,
                intermediate_size=tensors["vision.layers.0.ffn.up_proj.weight"].shape[0])


# ----------------------------------------------------------------------------- MedMoE (contrastive.py): Hugging Face Swin and BERT


def side_of(value, name):
    """The side of a square size: HF allows an int or an [h, w] pair; Swin checkpoints are square."""
    if isinstance(value, int):
        return value
    if len(value) != 2 or value[0] != value[1]:
        raise MedMoEError(f"non-square {name} {list(value)} is not supported")
    return value[0]


def swin_config_from_hf(hf, preprocessor=None) -> contrastive.SwinConfig:
    """SwinConfig from a HF Swin config.json dict (+ its preprocessor_config.json dict)."""
    if hf.get("model_type") != "swin":
        raise MedMoEError(f"unknown backbone architecture {hf.get('model_type')!r} (supported: swin)")
    if hf.get("use_absolute_embeddings"):
        raise MedMoEError("Swin with use_absolute_embeddings=true is not supported")
    act = HF_ACTS.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise MedMoEError(f"unknown Swin activation {hf['hidden_act']!r}")
    default, pre = contrastive.SwinConfig(), preprocessor or {}
    size = pre.get("size", hf.get("image_size", default.image_size))
    if isinstance(size, dict):  # {"height": h, "width": w} or {"shortest_edge": s}
        size = [size["height"], size["width"]] if "height" in size else size["shortest_edge"]
    return contrastive.SwinConfig(
        image_size=side_of(size, "image size"), patch_size=side_of(hf.get("patch_size", default.patch_size), "patch size"),
        in_channels=hf.get("num_channels", default.in_channels), embed_dim=hf.get("embed_dim", default.embed_dim),
        depths=hf.get("depths", default.depths), num_heads=hf.get("num_heads", default.num_heads),
        window_size=hf.get("window_size", default.window_size), mlp_ratio=hf.get("mlp_ratio", default.mlp_ratio),
        qkv_bias=hf.get("qkv_bias", default.qkv_bias), act=act, norm_eps=hf.get("layer_norm_eps", default.norm_eps),
        mean=pre.get("image_mean", default.mean), std=pre.get("image_std", default.std),
    )


# HF key (after an optional "swin." prefix) -> ours, first match wins; None drops the tensor.
# Both layouts are read: the one checkpoints are saved in (hub files and save_pretrained,
# attention.self.query ...) and transformers 5's in-memory one (attention.q_proj ...).
BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
OURS = r"stages.\1.blocks.\2."
SWIN_KEYS = [
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.norm\.", "patch_embed.norm."),
    (BLOCK + r"layernorm_before\.", OURS + "attn_norm."),
    (BLOCK + r"layernorm_after\.", OURS + "ffn_norm."),
    (BLOCK + r"attention\.(?:self\.query|q_proj)\.", OURS + "attn.q_proj."),
    (BLOCK + r"attention\.(?:self\.key|k_proj)\.", OURS + "attn.k_proj."),
    (BLOCK + r"attention\.(?:self\.value|v_proj)\.", OURS + "attn.v_proj."),
    (BLOCK + r"attention\.(?:output\.dense|o_proj)\.", OURS + "attn.o_proj."),
    (BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table$", OURS + "position_bias.table"),
    (BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_index$", None),  # rebuilt, not loaded
    (BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.", OURS + "ffn.up_proj."),
    (BLOCK + r"(?:output\.dense|mlp\.fc2)\.", OURS + "ffn.down_proj."),
    (r"encoder\.layers\.(\d+)\.downsample\.", r"stages.\1.merge."),
    (r"layernorm\.", "norm."),
    (r"classifier\.", None),  # SwinForImageClassification's head: MedMoE uses the features
]


def convert_swin(tensors, where):
    """Rename a HF SwinModel / SwinForImageClassification state dict to Swin's names."""
    out = {}
    for key, t in tensors.items():
        name = rename(key.removeprefix("swin."), SWIN_KEYS)
        if name is False:
            raise MedMoEError(f"{where}: unexpected tensor {key!r} (not a Swin checkpoint layout)")
        if name is not None:
            out[name] = t
    return out


def load_hf_swin(directory, dtype=None, device="cpu") -> contrastive.Swin:
    """A HF Swin checkpoint directory (config.json, weights, optional preprocessor_config.json)
    as an eval-mode Swin. Tensors are memory-mapped when no cast is needed."""
    hf = read_hf_config(directory)
    preprocessor = read_json(os.path.join(directory, "preprocessor_config.json"), required=False)
    cfg = swin_config_from_hf(hf, preprocessor)
    tensors = convert_swin(read_weights(directory), directory)
    with torch.device("meta"):
        model = contrastive.Swin(cfg)
    return contrastive.load_tensors(model, medmoe.cast_tensors(tensors, dtype), directory).to(device).eval()


def text_config_from_hf(hf):
    """contrastive.TextConfig from a Hugging Face BERT config.json dict (Bio_ClinicalBERT's has no model_type)."""
    if hf.get("model_type", "bert") != "bert":
        raise MedMoEError(f"text encoder: model_type {hf['model_type']!r} is not bert")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise MedMoEError(f"text encoder: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTS:
        raise MedMoEError(f"text encoder: activation {act!r} is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise MedMoEError(f"text encoder: config.json lacks {', '.join(missing)}")
    return contrastive.TextConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=hf.get("layer_norm_eps", 1e-12), act=HF_ACTS[act],
    )


# BertModel keys, after a prefix: "bert." (BertForMaskedLM / BertForPreTraining, as Bio_ClinicalBERT is
# saved) or "text_model.model." (MedCLIP's checkpoint, which MedMoE's release loads its text weights from)
BERT_PREFIX = r"(?:bert\.|text_model\.model\.)?"
BERT_KEYS = [
    (r"embeddings\.word_embeddings\.", "tok_embed."),
    (r"embeddings\.position_embeddings\.", "pos_embed."),
    (r"embeddings\.token_type_embeddings\.", "type_embed."),
    (r"embeddings\.LayerNorm\.", "embed_norm."),
    (r"embeddings\.position_ids", None),
    (r"encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.attn.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.attn.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.attn.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn.o_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn.up_proj."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn.down_proj."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
    # unused: the pooler, MLM/NSP heads, and the rest of a MedCLIP checkpoint
    (r"pooler\.|cls\.|vision_model\.|text_model\.projection_head|logit_scale", None),
]


def convert_bert(tensors, where):
    """Rename a Hugging Face BERT state dict to contrastive.TextEncoder's names."""
    out = {}
    for key, t in tensors.items():
        rest = re.sub(f"^{BERT_PREFIX}", "", key)
        name = rename(rest, BERT_KEYS)
        if name is None:
            continue
        if name is False:
            raise MedMoEError(f"{where}: unexpected tensor {key!r} (not a BERT layout)")
        out[re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))] = t  # TF-era LayerNorm names
    return out


def load_hf_bert(directory):
    """contrastive.TextEncoder from a Hugging Face BERT directory (config.json + weights), frozen as the spec says."""
    cfg = text_config_from_hf(read_hf_config(directory))
    with torch.device("meta"):
        model = contrastive.TextEncoder(cfg)
    tensors = {k: v.float() for k, v in convert_bert(read_weights(directory), directory).items()}  # fp16 releases too
    contrastive.load_tensors(model, tensors, directory)
    return model.eval().requires_grad_(False)


def convert_contrastive(out, swin, bert, modalities=contrastive.ContrastiveConfig.modalities, seed=0):
    """A MedMoE checkpoint from a HF Swin (e.g. microsoft/swin-tiny-patch4-window7-224) and a HF BERT
    (e.g. emilyalsentzer/Bio_ClinicalBERT); the experts and the router start random (seeded)."""
    backbone, text = load_hf_swin(swin), load_hf_bert(bert)
    torch.manual_seed(seed)
    model = contrastive.ContrastiveMedMoE(contrastive.ContrastiveConfig(swin=backbone.cfg, text=text.cfg, modalities=tuple(modalities)))
    model.swin.load_state_dict(backbone.state_dict())
    model.text.load_state_dict(text.state_dict())
    os.makedirs(out, exist_ok=True)
    contrastive.load_wordpiece(bert, text.cfg.max_tokens).save(os.path.join(out, "tokenizer.json"))
    contrastive.save_model(model, out)
    return model



# ----------------------------------------------------------------------------- GGUF

# llama.cpp architecture -> ours. llama also covers Mistral and SmolLM2 (llama.cpp writes them as llama).
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "phi2": "phi", "stablelm": "stablelm"}
# GGUF tensor names -> ours (under "llm."), first match wins; None drops the tensor
GGUF_KEYS = [
    (r"token_embd\.", "embed."),
    (r"output_norm\.", "norm."),
    (r"output\.", "lm_head."),
    (r"blk\.(\d+)\.attn_norm\.", r"layers.\1.attn_norm."),
    (r"blk\.(\d+)\.ffn_norm\.", r"layers.\1.ffn_norm."),
    (r"blk\.(\d+)\.attn_([qkv])\.", r"layers.\1.attn.\2_proj."),
    (r"blk\.(\d+)\.attn_qkv\.", r"layers.\1.attn.qkv."),  # Phi-2 as first converted: split in gguf_tensors
    (r"blk\.(\d+)\.attn_output\.", r"layers.\1.attn.o_proj."),
    (r"blk\.(\d+)\.ffn_(up|gate|down)\.", r"layers.\1.ffn.\2_proj."),
    (r"blk\.(\d+)\.attn_rot_embd", None),  # rotary tables of old files: we rebuild them
]
# Storage types read (gguf.quants dequantizes them); the rest, e.g. the IQ codebook types, are refused.
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# tokenizer.ggml.pre -> the split regex of a byte-level BPE, as transformers builds it; the rest split like GPT-2
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {**dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], _LLAMA3),
               **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2), "tekken": _TEKKEN}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def gguf_llm(path, max_seq_len=None):
    """(LLMConfig, tensors named like our state dict under "llm.", tokenizer.json text or None
    when the file has no vocabulary, conversation template name) from a GGUF file. Quantized
    tensors are dequantized to fp32; F16/BF16 ones stay as stored."""
    gguf, reader, meta = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise MedMoEError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
    missing = [k for k in ("embedding_length", "block_count", "attention.head_count") if f"{arch}.{k}" not in meta]
    if missing:
        raise MedMoEError(f"{path}: GGUF metadata lacks {arch}.{missing[0]}")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise MedMoEError(f"{path}: rope scaling {scaling if scaling != 'none' else 'llama3'!r} is not supported")
    tensors = gguf_tensors(gguf, reader, meta, arch, path)
    for name in ("llm.embed.weight", "llm.layers.0.ffn.up_proj.weight"):  # the config reads sizes off these
        if name not in tensors:
            raise MedMoEError(f"{path}: missing tensor {name!r}")
    cfg = gguf_config(meta, arch, tensors, max_seq_len)
    with torch.device("meta"):
        medmoe.check_tensors(medmoe.MedMoE(medmoe.Config(llm=cfg)), tensors, path)
    return cfg, tensors, gguf_tokenizer(meta, path), template_name(meta, cfg)


def read_gguf(path):
    """(the gguf module, its reader, metadata as plain Python values); one-line errors."""
    try:
        import gguf
    except ImportError:
        raise MedMoEError("reading GGUF needs the gguf package: pip install 'medmoe[gguf]'") from None
    if not os.path.isfile(path):
        raise MedMoEError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MedMoEError(f"{path}: not a GGUF file")
    try:  # the reader maps the file and trusts its offsets: a cut file fails in numpy, not with a GGUF error
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except (ValueError, IndexError, KeyError, OverflowError, OSError) as e:
        raise MedMoEError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    return gguf, reader, meta


def gguf_tensors(gguf, reader, meta, arch, path):
    heads = meta[f"{arch}.attention.head_count"]
    kv_heads = meta.get(f"{arch}.attention.head_count_kv") or heads
    out = {}
    for t in reader.tensors:
        name = rename(t.name, GGUF_KEYS)
        if name is None:
            continue
        if name is False:
            raise MedMoEError(f"{path}: tensor {t.name!r} has no counterpart in our {GGUF_ARCHS[arch]} model")
        w = read_tensor(gguf, t, path)
        # llama.cpp's llama converter interleaves the two rotary halves of every Q and K head
        # (its RoPE rotates adjacent pairs, ours and Hugging Face's rotate halves): undo it
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = unpermute(w, heads if ".q_proj." in name else kv_heads)
        if ".attn.qkv." in name:  # fused rows [q; k; v]
            head_dim = w.shape[0] // (heads + 2 * kv_heads)
            for p, part in zip("qkv", w.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])):
                out["llm." + name.replace(".qkv.", f".{p}_proj.")] = part.contiguous()
            continue
        out["llm." + name] = w
    return out


def read_tensor(gguf, t, path):
    import numpy as np  # comes with the gguf extra

    kind = t.tensor_type.name
    if kind not in GGUF_TYPES:
        raise MedMoEError(f"{path}: tensor {t.name!r} is stored as {kind}, which is not supported "
                          f"(supported: {', '.join(GGUF_TYPES)})")
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    if kind == "F16":
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    if kind == "BF16":  # numpy has no bfloat16: reinterpret the raw bytes in torch
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)


def unpermute(w, n_head):
    """Inverse of llama.cpp's `permute`: its rows per head are (dim/2, 2) pairs; ours (2, dim/2) halves."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(meta, arch, tensors, max_seq_len=None):
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length") or hidden // heads
    ours = GGUF_ARCHS[arch]
    kw = dict(medmoe.ARCHS[ours])
    # which projections carry biases is read off the tensors (llama with attention_bias, StableLM with qkv bias)
    has = lambda name: f"llm.layers.0.{name}" in tensors
    kw.update(qkv_bias=has("attn.q_proj.bias"), o_bias=has("attn.o_proj.bias"), mlp_bias=has("ffn.up_proj.bias"),
              lm_head_bias="llm.lm_head.bias" in tensors)
    eps = key("attention.layer_norm_rms_epsilon") if kw["norm"] == "rmsnorm" else key("attention.layer_norm_epsilon")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
           if k in meta]
    cfg = medmoe.LLMConfig(
        arch=ours, vocab_size=tensors["llm.embed.weight"].shape[0], hidden_size=hidden,
        # the FFN width from the tensor: llama.cpp writes Phi-2's as 4 * hidden whatever the model has
        intermediate_size=tensors["llm.layers.0.ffn.up_proj.weight"].shape[0], num_layers=key("block_count"),
        num_heads=heads, num_kv_heads=key("attention.head_count_kv") or heads, head_dim=head_dim,
        max_seq_len=max_seq_len or key("context_length", 2048), rope_theta=float(key("rope.freq_base", 10000.0)),
        rotary_pct=rotary_fraction(key("rope.dimension_count", head_dim), head_dim), norm_eps=float(eps if eps is not None else 1e-5),
        tie_embeddings="llm.lm_head.weight" not in tensors, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_ids=list(dict.fromkeys(eos)), pad_id=meta.get("tokenizer.ggml.padding_token_id") or 0, **kw,
    )
    # chat generation must stop at the end-of-turn token the chat template writes, e.g. <|im_end|>
    stop = data.TEMPLATES[template_name(meta, cfg)].stop
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if stop in str(meta.get("tokenizer.chat_template", "")) and stop in tokens and tokens.index(stop) not in cfg.eos_ids:
        cfg.eos_ids.append(tokens.index(stop))
    return cfg


def rotary_fraction(dims, head_dim):
    """dims / head_dim, nudged up where float rounding would make int(head_dim * it) (what the
    model computes) come out one short, e.g. 15 / 22."""
    pct = dims / head_dim
    return pct if int(head_dim * pct) == dims else math.nextafter(pct, 2.0)


def template_name(meta, cfg):
    """The conversation template (data.TEMPLATES) the file's chat template implies."""
    return template_of(cfg.arch, str(meta.get("tokenizer.chat_template", "")))


def gguf_tokenizer(meta, path):
    """tokenizer.json text built from the vocabulary in the metadata, as transformers builds it
    from a GGUF (byte-level BPE for "gpt2", SentencePiece-style BPE for "llama"); None if absent."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    if kind == "gpt2":
        # the file spells tokens as text; a byte-level vocabulary spells every byte as one printable character
        chars = bytes_to_unicode()
        alphabet = set(chars.values())
        spelled = lambda t: t if set(t) <= alphabet else "".join(chars[b] for b in t.encode("utf-8"))
        vocab = {spelled(t): i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                             if split else pre_tokenizers.ByteLevel(add_prefix_space=False))
        tok.decoder = decoders.ByteLevel()
        # a control token outside the byte alphabet is a llama.cpp mislabel: adding it would grow the vocabulary
        special_ok = lambda t: set(t) <= alphabet
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = Tokenizer(models.BPE(vocab, merges or merges_from_scores(vocab, dict(zip(tokens, scores))),
                                   fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        special_ok = lambda t: True
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    else:
        raise MedMoEError(f"{path}: GGUF tokenizer {kind!r} is not supported (supported: gpt2, llama)")
    # control tokens (<|im_end|>, <s>) and the bos/eos/unk/pad ones are matched whole and special;
    # user-defined ones (<think>) are matched whole too
    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for i, (t, ty) in enumerate(zip(tokens, types)) if (ty == CONTROL or i in named) and special_ok(t)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    first = [(tokens[bos], bos)] if add_bos and bos is not None else []
    last = [(tokens[eos], eos)] if meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None else []
    piece = lambda seq, type_id: " ".join([f"{t}:{type_id}" for t, _ in first] + [f"${seq}:{type_id}"] +
                                          [f"{t}:{type_id}" for t, _ in last])
    tok.post_processor = processors.TemplateProcessing(single=piece("A", 0), pair=f"{piece('A', 0)} {piece('B', 1)}",
                                                       special_tokens=list(dict.fromkeys(first + last)))
    return tok.to_str()


def merges_from_scores(vocab, scores):
    """A SentencePiece vocabulary lists no merges: every split of a piece into two known pieces
    is one, ranked by the merged piece's score (the order transformers' generate_merges gives)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves,
    the others are shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}
