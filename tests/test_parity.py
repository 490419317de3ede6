"""Parity with the reference implementation (transformers): fp32 logits within 1e-4 and
identical greedy tokens, every architecture loaded through the converter."""

import pytest
import torch
from hf_models import FAMILIES, VOCAB, save_llava, save_llm, save_vision

import medmoe
from medmoe import convert

TOL = 1e-4


def convert_and_load(tmp_path, **sources):
    out = tmp_path / "converted"
    convert.convert(str(out), convert.Sources(**{k: str(v) for k, v in sources.items()}))
    return medmoe.load_model(str(out))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    save_vision("clip", d)
    return d


def prompts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (7 + 3 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_logits_and_greedy_tokens(tmp_path, clip_dir, family):
    ref = save_llm(family, tmp_path / family)
    ours = convert_and_load(tmp_path, vision=clip_dir, llm=tmp_path / family)
    ids = prompts(1)[0]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
    got, _ = ours([ids])
    assert (got - want).abs().max().item() <= TOL
    want_tokens = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, len(ids):]
    got_tokens = ours.generate([ids], max_new_tokens=24, stop_ids=[])[0]
    assert got_tokens == want_tokens.tolist()


@pytest.mark.parametrize("family", ["phi", "qwen2"])
def test_batched_left_padded_generation(tmp_path, clip_dir, family):
    """A padded batch decodes exactly as each prompt alone, and as transformers' padded batch."""
    ref = save_llm(family, tmp_path / family)
    ours = convert_and_load(tmp_path, vision=clip_dir, llm=tmp_path / family)
    batch = prompts(3)
    alone = [ours.generate([p], max_new_tokens=20, stop_ids=[])[0] for p in batch]
    assert ours.generate(batch, max_new_tokens=20, stop_ids=[]) == alone
    T = max(map(len, batch))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch])
    want = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
    assert want[:, T:].tolist() == alone


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_vision_tower_hidden_states(tmp_path, kind, feature_layer):
    ref = save_vision(kind, tmp_path / kind)
    save_llm("llama", tmp_path / "llm")
    out = tmp_path / "converted"
    source = convert.Sources(vision=str(tmp_path / kind), llm=str(tmp_path / "llm"))
    convert.convert(str(out), source, choices=convert.Choices(feature_layer=feature_layer))
    ours = medmoe.load_model(str(out))
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
        got = ours.vision(pixels)
    if kind == "clip":
        want = want[:, 1:]  # LLaVA drops the class token
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


def test_llava_with_image(tmp_path):
    image_token = VOCAB - 1
    ref = save_llava(tmp_path / "llava", image_token=image_token)
    ours = convert_and_load(tmp_path, llava=tmp_path / "llava")
    n_img = ours.cfg.vision.num_patches
    text_a, text_b = [5, 17, 42], [99, 3, 8, 120]
    pixels = torch.randn(1, 3, 28, 28)
    hf_ids = torch.tensor([text_a + [image_token] * n_img + text_b])
    with torch.no_grad():
        want = ref(input_ids=hf_ids, pixel_values=pixels).logits
    prompt = text_a + [medmoe.IMAGE_TOKEN] * n_img + text_b
    got, _ = ours([prompt], pixels)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    want_tokens = ref.generate(input_ids=hf_ids, pixel_values=pixels, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    assert ours.generate([prompt], pixels, max_new_tokens=20, stop_ids=[])[0] == want_tokens[0, hf_ids.shape[1]:].tolist()


def test_mixtral_moe_block_matches_transformers(tmp_path, clip_dir):
    """Our MoE layer with Mixtral semantics (top-2 renormalised, no meta expert, no router bias)
    against transformers' MixtralSparseMoeBlock holding the same (converted) weights."""
    ref = save_llm("mixtral", tmp_path / "mixtral")
    ours = convert_and_load(tmp_path, vision=clip_dir, llm=tmp_path / "mixtral")
    x = torch.randn(2, 9, 64)
    for i in range(3):
        with torch.no_grad():
            want = ref.model.layers[i].mlp(x)
            want = want[0] if isinstance(want, tuple) else want
            got, _ = ours.llm.layers[i].ffn(x)
        assert (got - want).abs().max().item() <= TOL


def test_full_clip_model_directory_as_vision_source(tmp_path):
    """openai/clip-vit-* directories hold a whole CLIPModel (text side too): only the vision part is taken."""
    transformers = pytest.importorskip("transformers")
    from hf_models import vision_config

    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision_config("clip").to_dict())).eval()
    clip.save_pretrained(tmp_path / "clip")
    save_llm("qwen2", tmp_path / "llm")
    ours = convert_and_load(tmp_path, vision=tmp_path / "clip", llm=tmp_path / "llm")
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert (ours.vision(pixels) - want).abs().max().item() <= TOL
