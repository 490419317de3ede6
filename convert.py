"""Conversion from outside layouts.

For now it holds one source, GGUF files (llama.cpp's format): `gguf_llm` reads one with the
`gguf` package into our LLM config, state-dict tensors, a Hugging Face tokenizer.json and the
conversation template. Later all conversion (Hugging Face, LLaVA, Med-MoE) moves here.
"""

import math
import os

import numpy as np
import torch

import data
import medmoe
from medmoe import MedMoEError

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
        name = medmoe.rename(t.name, GGUF_KEYS)
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
    return medmoe.template_of(cfg.arch, str(meta.get("tokenizer.chat_template", "")))


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
