"""data.py: records, images (every mode, DICOM, bad files), templates and label masking, batching."""

import io
import json
import os

import pytest
import torch
from PIL import Image

import medmoe
from medmoe import IGNORE, IMAGE_TOKEN, MedMoEError, data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [data.SYSTEM, "USER: ASSISTANT: Where is it? left lung How many? 2 system user assistant"] * 3
    return data.train_tokenizer(texts, 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def decode(tok, ids):
    out, text = [], []
    for t in ids + [None]:
        if t is None or t == IMAGE_TOKEN:
            out.append(tok.decode(text, skip_special_tokens=False))
            text = []
            if t is not None:
                out.append("<image>")
        else:
            text.append(t)
    return "".join(out)


TURNS = [("<image>\nWhere is it?", "left lung"), ("How many?", "2")]
S = data.SYSTEM
# the whole conversation and its supervised part, written out by hand from SPEC / each model's chat format
EXPECTED = {
    "phi": (f"{S} USER: <image>\nWhere is it? ASSISTANT: left lung<|endoftext|>USER: How many? ASSISTANT: 2<|endoftext|>",
            " left lung<|endoftext|> 2<|endoftext|>"),
    "stablelm": (f"{S} USER: <image>\nWhere is it? ASSISTANT: left lung<|endoftext|>USER: How many? ASSISTANT: 2<|endoftext|>",
                 " left lung<|endoftext|> 2<|endoftext|>"),
    "plain": ("<image>left lung\n2\n", "left lung\n2\n"),
    "chatml": (f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n<image>\nWhere is it?<|im_end|>\n<|im_start|>assistant\n"
               "left lung<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n",
               "left lung<|im_end|>2<|im_end|>"),
    "llama3": (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\n<image>\nWhere is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nleft lung<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>",
               "left lung<|eot_id|>2<|eot_id|>"),
    "zephyr": (f"<s><|system|>\n{S}</s>\n<|user|>\n<image>\nWhere is it?</s>\n<|assistant|>\nleft lung</s>\n<|user|>\nHow many?</s>\n"
               "<|assistant|>\n2</s>\n", "left lung</s>2</s>"),
}


@pytest.mark.parametrize("name", list(data.TEMPLATES))
def test_template_masks_all_but_the_answers(tok, name):
    full, supervised = EXPECTED[name]
    ids, labels = data.encode_conversation(tok, data.get_template(name), TURNS, patches=1)
    assert len(ids) == len(labels) and ids.count(IMAGE_TOKEN) == 1
    assert decode(tok, ids) == full
    assert decode(tok, [t for t, lab in zip(ids, labels) if lab != IGNORE]) == supervised
    assert all(lab in (t, IGNORE) for t, lab in zip(ids, labels))
    if name == "plain":  # stage 1 captions: no questions, so no prompts to compare
        return
    # a generation prompt is the conversation cut where the last answer would start
    prompt, _ = data.encode_conversation(tok, data.get_template(name), [TURNS[0], (TURNS[1][0], None)], patches=1)
    cut = len(prompt)
    assert ids[:cut] == prompt and labels[cut] != IGNORE and labels[cut - 1] == IGNORE


def test_stop_ids(tok):
    eot = tok.token_to_id("<|endoftext|>")
    assert data.stop_ids(tok, data.get_template("phi"), [eot]) == [eot]
    assert data.stop_ids(tok, data.get_template("chatml"), [eot]) == sorted([eot, tok.token_to_id("<|im_end|>")])


def test_unknown_template():
    with pytest.raises(MedMoEError, match="unknown conversation template 'vicuna'"):
        data.get_template("vicuna")


# ----------------------------------------------------------------------------- records


def test_load_examples_both_formats(tmp_path):
    (tmp_path / "img").mkdir()
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(json.dumps({"id": "a", "image": "img/x.png", "question": "Is it?", "answer": "yes", "answer_type": "CLOSED",
                               "modality": "ct", "organ": "chest"}) + "\n\n")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "b", "image": "x.png", "conversations": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A lung."},
        {"from": "human", "value": "Left?"}, {"from": "gpt", "value": "No."}], "answer_type": "close"}]))
    (a,) = data.load_examples(str(vqa))
    assert a.image == str(tmp_path / "img/x.png") and a.turns == [("<image>\nIs it?", "yes")]
    assert (a.answer_type, a.modality, a.organ) == ("CLOSED", "ct", "chest")
    (b,) = data.load_examples(str(llava), images=str(tmp_path / "img"))
    assert b.image == str(tmp_path / "img/x.png") and b.answer_type == "CLOSED"
    assert b.turns == [("<image>\nWhat is shown?", "A lung."), ("Left?", "No.")]


def test_bad_records(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"image": "x.png", "question": "q", "answer": "a"}\n{oops\n')
    with pytest.raises(MedMoEError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_examples(str(p))
    p.write_text('{"image": "x.png"}\n')
    with pytest.raises(MedMoEError, match="needs 'conversations' or 'question'"):
        data.load_examples(str(p))
    with pytest.raises(MedMoEError, match="no such data file"):
        data.load_examples(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- images


def roundtrip(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def load_bytes(tmp_path, raw, name="x.png"):
    path = tmp_path / name
    path.write_bytes(raw)
    return data.load_image(str(path))


def test_image_modes_become_rgb(tmp_path):
    gray = Image.new("L", (2, 1))
    gray.putdata([0, 200])
    assert list(load_bytes(tmp_path, roundtrip(gray)).get_flattened_data()) == [(0, 0, 0), (200, 200, 200)]
    # 16-bit grayscale: the image's range stretched onto 0..255
    g16 = Image.new("I;16", (3, 1))
    g16.putdata([1000, 3000, 5000])
    assert list(load_bytes(tmp_path, roundtrip(g16)).get_flattened_data()) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    pal = Image.new("P", (1, 1))
    pal.putpalette([10, 20, 30] * 256)
    assert list(load_bytes(tmp_path, roundtrip(pal)).get_flattened_data()) == [(10, 20, 30)]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    red = load_bytes(tmp_path, roundtrip(cmyk, "JPEG", quality=100), "x.jpg").getpixel((0, 0))
    assert red[0] > 240 and red[1] < 15
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0)])  # transparent goes to black
    assert list(load_bytes(tmp_path, roundtrip(rgba)).get_flattened_data()) == [(255, 0, 0), (0, 0, 0)]


def test_exif_rotation(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = load_bytes(tmp_path, roundtrip(img, "JPEG", exif=exif.tobytes()), "x.jpg")
    assert out.size == (10, 20)


@pytest.mark.parametrize("raw, message", [
    (b"", "not an image"),
    (b"patient notes, not a picture\n", "not an image"),
    (roundtrip(Image.new("RGB", (64, 64), (9, 9, 9)))[:60], "unreadable image"),
])
def test_bad_image_files(tmp_path, raw, message):
    with pytest.raises(MedMoEError, match=message) as e:
        load_bytes(tmp_path, raw)
    assert str(tmp_path / "x.png") in str(e.value)


def test_decompression_bomb_and_missing(tmp_path, monkeypatch):
    raw = roundtrip(Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(MedMoEError, match="too large"):
        load_bytes(tmp_path, raw)
    with pytest.raises(MedMoEError, match="no such image file"):
        data.load_image(str(tmp_path / "nope.png"))


def test_preprocess_pad_crop_resize():
    v = medmoe.VisionConfig(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    wide = Image.new("RGB", (64, 16), (255, 255, 255))  # pads 24 rows above and below; 8x smaller
    pad = data.preprocess(wide, v, "pad")
    assert pad.shape == (3, 8, 8)
    fill = (int(0.5 * 255) / 255 - 0.5) / 0.25  # the mean colour as Pillow stores it
    assert torch.allclose(pad[:, 0], torch.full((3, 8), fill), atol=1e-6)  # top and bottom rows: the mean colour
    assert torch.allclose(pad[:, 7], torch.full((3, 8), fill), atol=1e-6)
    assert (pad[:, 3:5] > 1.8).all()  # middle rows: the white image, (1 - 0.5) / 0.25 = 2 before bicubic blur
    assert torch.allclose(data.preprocess(wide, v, "crop"), torch.full((3, 8, 8), 2.0))
    assert data.preprocess(wide, v, "resize").shape == (3, 8, 8)
    with pytest.raises(MedMoEError, match="unknown image mode"):
        data.preprocess(wide, v, "stretch")


def test_dicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = data.load_image(path)
    assert img.mode == "RGB" and img.size == (ds.Columns, ds.Rows)
    # hand-computed: the file has no window, so the rescaled range maps onto 0..255
    hu = ds.pixel_array.astype("float64") * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = hu.min(), hu.max()
    r, c = 64, 40
    assert abs(img.getpixel((c, r))[0] - round((hu[r, c] - lo) / (hi - lo) * 255)) <= 1
    # with a window: DICOM's linear VOI function; MONOCHROME1 inverts
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(tmp_path / "w.dcm")
    windowed = data.load_image(str(tmp_path / "w.dcm"))
    y = min(max((hu[r, c] - 39.5) / 399 + 0.5, 0), 1) * 255
    assert abs(windowed.getpixel((c, r))[0] - round(y)) <= 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert data.load_image(str(tmp_path / "m1.dcm")).getpixel((c, r))[0] == 255 - windowed.getpixel((c, r))[0]
    (tmp_path / "bad.dcm").write_bytes(b"DICM but not really")
    with pytest.raises(MedMoEError, match="unreadable DICOM"):
        data.load_image(str(tmp_path / "bad.dcm"))


# ----------------------------------------------------------------------------- batches


def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(250)]
    a = data.length_grouped_batches(lengths, 8, seed=1, epoch=0, group=4)
    assert a == data.length_grouped_batches(lengths, 8, seed=1, epoch=0, group=4)  # repeatable
    assert a != data.length_grouped_batches(lengths, 8, seed=1, epoch=1, group=4)  # a new order each epoch
    assert sorted(i for b in a for i in b) == list(range(250))  # every record exactly once
    assert all(len(b) <= 8 for b in a)
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in a)  # sorted within a batch: little padding


def test_count_targets_matches_splice(tok):
    """count_targets (the trainer's loss normaliser) against what MedMoE.splice supervises."""
    torch.manual_seed(0)
    llm = medmoe.LLMConfig(arch="llama", vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=2, max_seq_len=60, **medmoe.ARCHS["llama"])
    vision = medmoe.VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    model = medmoe.MedMoE(medmoe.Config(llm=llm, vision=vision))
    t = data.get_template("chatml")
    P = vision.num_patches
    batch = [data.encode_conversation(tok, t, TURNS, P), data.encode_conversation(tok, t, [("<image>\nWhere is it?", "left lung")], P)]
    ids, labels = [b[0] for b in batch], [b[1] for b in batch]
    for limit in (60, 45):  # 45 truncates the first conversation inside its answers
        model.cfg.llm.max_seq_len = limit
        _, _, lab = model.splice(ids, torch.zeros(2, 3, 16, 16), labels)
        assert data.count_targets(labels, limit) == int((lab[:, 1:] != IGNORE).sum())


def test_dataset_skips_bad_images(tmp_path, tok):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    examples = [data.Example(id=n, image=str(tmp_path / n), turns=[("<image>\nq", "a")]) for n in ("good.png", "bad.png")]
    ds = data.VQADataset(examples, tok, "phi", medmoe.VisionConfig(image_size=8, patch_size=4), "pad")
    batch = data.collate([ds[0], ds[1]])
    assert batch.index == [0] and batch.pixels.shape == (1, 3, 8, 8)
    assert len(batch.skipped) == 1 and batch.skipped[0].path == str(tmp_path / "bad.png")
    assert os.path.basename(batch.skipped[0].path) in batch.skipped[0].reason
