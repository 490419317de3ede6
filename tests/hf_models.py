"""Tiny random Hugging Face models, built offline, saved to disk as a user would download them.
transformers is the test-only reference implementation (the parity oracle)."""

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 256
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2)


def llm_config(family):
    T = transformers
    if family == "phi":  # Phi-2 shape in miniature: parallel block, partial rotary 0.4, biases
        return T.PhiConfig(**SMALL, partial_rotary_factor=0.4, hidden_act="gelu_new")
    if family == "stablelm":  # StableLM-2: qkv bias, LayerNorm, partial rotary 0.25, SwiGLU
        return T.StableLmConfig(**SMALL, num_key_value_heads=2, use_qkv_bias=True, partial_rotary_factor=0.25)
    if family == "qwen2":  # GQA, qkv bias, RMSNorm, tied embeddings
        return T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
    if family == "llama":  # TinyLlama-style GQA, untied
        return T.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "smollm2":  # SmolLM2 is a Llama with tied embeddings and full multi-head attention
        return T.LlamaConfig(**SMALL, tie_word_embeddings=True)
    if family == "mixtral":
        return T.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(family)


LLM_CLASSES = {"phi": "PhiForCausalLM", "stablelm": "StableLmForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "llama": "LlamaForCausalLM", "smollm2": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
FAMILIES = list(LLM_CLASSES)


def save_llm(family, path, seed=0):
    torch.manual_seed(seed)
    cfg = llm_config(family)
    cfg.eos_token_id = None  # random models must not stop early: compare a fixed number of tokens
    model = getattr(transformers, LLM_CLASSES[family])(cfg).eval()
    model.save_pretrained(path)
    return model


def vision_config(kind, layers=3, width=48, heads=4):
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                  image_size=28, patch_size=7, initializer_range=0.2)
    if kind == "clip":
        return transformers.CLIPVisionConfig(**common)
    return transformers.SiglipVisionConfig(**common)


def save_vision(kind, path, seed=0, **shape):
    torch.manual_seed(seed)
    cls = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
    model = cls(vision_config(kind, **shape)).eval()
    model.save_pretrained(path)
    return model


def save_llava(path, seed=0, image_token=VOCAB - 1):
    torch.manual_seed(seed)
    text = llm_config("llama")
    text.eos_token_id = None
    cfg = transformers.LlavaConfig(vision_config=vision_config("clip"), text_config=text,
                                   image_token_index=image_token, vision_feature_layer=-2)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return model
