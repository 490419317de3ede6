"""Swin backbone parity with transformers' SwinModel: every hidden state, the final tokens and
the pooled feature within 1e-4 in fp32, loaded from tiny random checkpoints through the converter."""

import json

import pytest
import torch

import medmoe
from medmoe import contrastive, convert, files

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# window 4 on a 128 px image with patch 4: stages of 32, 16, 8 and 4 tokens a side, so the first
# three shift their windows and the last is exactly one window (no shift: HF's clamp rule).
# A large layer_norm_eps checks where it applies: HF's patch embedding and merging norms ignore it.
TINY = dict(image_size=128, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4,
            layer_norm_eps=0.1)


def save_swin(path, cls="SwinModel", seed=0, **shape):
    """A random HF Swin saved as a user would download it. Every parameter is drawn afresh: HF
    initialises the relative position bias tables to zero, which would hide an indexing bug."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(transformers.SwinConfig(**{**TINY, **shape}, num_labels=5)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "layernorm" in name or name.endswith("norm.weight") else 0.0, 0.2)
    model.save_pretrained(path)
    return model


def assert_parity(ref, ours, pixels):
    """ref is used for one image size only: HF's set_shift_and_window_size edits the layers in place."""
    with torch.no_grad():
        want = (ref.swin if hasattr(ref, "swin") else ref)(pixels, output_hidden_states=True)
        got = ours(pixels)
    assert len(got.hidden_states) == len(want.hidden_states) == len(ours.cfg.depths) + 1
    for g, w, (h, wd) in zip(got.hidden_states, want.hidden_states, got.sizes):
        assert g.shape == w.shape == (pixels.shape[0], h * wd, w.shape[-1])
        assert (g - w).abs().max().item() <= TOL
    assert (got.last_hidden_state - want.last_hidden_state).abs().max().item() <= TOL
    assert (got.pooled - want.pooler_output).abs().max().item() <= TOL


@pytest.mark.parametrize("cls", ["SwinModel", "SwinForImageClassification"])
def test_swin_matches_hf(tmp_path, cls):
    ref = save_swin(tmp_path, cls)
    ours = convert.load_hf_swin(str(tmp_path))
    assert not ours.training
    assert [s.blocks[0].position_bias.table.abs().sum().item() > 0 for s in ours.stages] == [True] * 4
    assert_parity(ref, ours, torch.randn(3, 3, 128, 128))


def test_padding_paths_match_hf(tmp_path):
    """A 70 x 62 image: patches padded (70 and 62 are not multiples of 4), grids of 18 x 16 and
    9 x 8 padded to whole windows, an odd side into the patch merging, and a 5 x 4 last stage
    that fits the window along one side only (no shift, 5 rows padded to 8)."""
    ref = save_swin(tmp_path, image_size=70, depths=[2, 2, 2], num_heads=[1, 2, 2])
    ours = convert.load_hf_swin(str(tmp_path))
    assert_parity(ref, ours, torch.randn(2, 3, 70, 62))
    assert ours(torch.randn(1, 3, 70, 62)).sizes == [(18, 16), (9, 8), (5, 4), (5, 4)]


def test_stage_smaller_than_window_uses_the_same_offsets():
    """HF raises when a stage is smaller than the window; ours shrinks the window and looks the
    (smaller) offsets up in the same table: a 2 x 2 stage under window 4 computes exactly what a
    window-2 model computes with the central 3 x 3 offsets of the 7 x 7 table."""
    torch.manual_seed(0)
    small = dict(patch_size=4, embed_dim=8, depths=(2,), num_heads=(2,))
    big = contrastive.Swin(contrastive.SwinConfig(**small, window_size=4)).eval()
    for p in big.parameters():
        torch.nn.init.normal_(p, std=0.5)
    fit = contrastive.Swin(contrastive.SwinConfig(**small, window_size=2)).eval()
    state = big.state_dict()
    for k in [k for k in state if k.endswith("position_bias.table")]:
        state[k] = state[k].view(7, 7, 2)[2:5, 2:5].reshape(9, 2)
    fit.load_state_dict(state)
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(big(pixels).pooled, fit(pixels).pooled, atol=1e-6)


def test_config_from_hf_defaults_are_swin_tiny():
    hf = transformers.SwinConfig().to_dict()  # microsoft/swin-tiny-patch4-window7-224
    assert convert.swin_config_from_hf(hf) == contrastive.SwinConfig()
    pre = {"size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    cfg = convert.swin_config_from_hf(hf, pre)
    assert (cfg.image_size, cfg.mean, cfg.std) == (384, (0.5,) * 3, (0.5,) * 3)


def test_preprocessor_config_is_read(tmp_path):
    save_swin(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 112, "image_mean": [0.1, 0.2, 0.3]}))
    cfg = convert.load_hf_swin(str(tmp_path)).cfg
    assert (cfg.image_size, cfg.mean, cfg.std) == (112, (0.1, 0.2, 0.3), contrastive.SwinConfig().std)


def test_unknown_tensor_is_a_one_line_error():
    tensors = {"swin.embeddings.norm.weight": torch.ones(4), "swin.encoder.layers.0.blocks.0.attention.gate.weight": torch.ones(4)}
    with pytest.raises(medmoe.MedMoEError) as e:
        convert.convert_swin(tensors, "ckpt")
    assert str(e.value) == "ckpt: unexpected tensor 'swin.encoder.layers.0.blocks.0.attention.gate.weight' (not a Swin checkpoint layout)"


def test_missing_tensor_and_other_architectures_are_errors(tmp_path):
    save_swin(tmp_path)
    tensors = convert.convert_swin(files.read_weights(str(tmp_path)), "ckpt")
    tensors.pop("norm.weight")
    model = contrastive.Swin(convert.swin_config_from_hf(json.loads((tmp_path / "config.json").read_text())))
    with pytest.raises(medmoe.MedMoEError, match=r"missing tensor 'norm\.weight'"):
        contrastive.load_tensors(model, tensors, "ckpt")
    with pytest.raises(medmoe.MedMoEError, match="'swinv2'"):
        convert.swin_config_from_hf({"model_type": "swinv2"})
