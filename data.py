"""Data: records, images, conversation templates, tokenisation and batching for Med-MoE.

    records (JSON/JSONL)  ->  Example: image + (question, answer) turns  ->  token ids with
    each <image> expanded into one position per visual feature (medmoe.IMAGE_TOKEN) and labels (medmoe.IGNORE on everything but the
    answers)  ->  length-grouped, padded batches for MedMoE.forward.
"""

import io
import json
import os
import random
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from medmoe import IGNORE, IMAGE_TOKEN
from medmoe.files import MedMoEError, read_json

# ----------------------------------------------------------------------------- records


@dataclass
class Example:
    """One training/evaluation record: an image and one or more (question, answer) turns.
    The first question carries the "<image>" placeholder."""

    id: str
    image: str | None
    turns: list  # [(question, answer or None), ...]
    answer_type: str | None = None  # OPEN | CLOSED
    modality: str | None = None  # ct | mri | xray | pathology ... (trains the router)
    organ: str | None = None
    extra: dict = field(default_factory=dict)


def read_records(path):
    """A JSON list or JSON-lines file -> list of dicts."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MedMoEError(f"{path}: no such data file")
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MedMoEError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return records
    return read_json(path, expect=list)


def load_examples(path, images=None):
    """LLaVA records ({"image", "conversations": [{"from": "human", "value"}, {"from": "gpt", ...}]})
    or plain VQA records ({"image", "question", "answer", ...}). Image paths are relative to
    `images`, else to the data file's folder."""
    root = images if images is not None else os.path.dirname(os.path.abspath(path))
    examples = []
    for n, r in enumerate(read_records(path)):
        where = f"{path}: record {n}"
        if not isinstance(r, dict):
            raise MedMoEError(f"{where}: not a JSON object")
        if "conversations" in r or "conversatons" in r:  # (sic): a key spelling the authors' scorer accepts
            values = [t.get("value", "") if isinstance(t, dict) else str(t) for t in r.get("conversations", r.get("conversatons"))]
            turns = [(values[i], values[i + 1] if i + 1 < len(values) else None) for i in range(0, len(values), 2)]
        elif "question" in r:
            turns = [(str(r["question"]), None if r.get("answer") is None else str(r["answer"]))]
        else:
            raise MedMoEError(f"{where}: needs 'conversations' or 'question'/'answer'")
        if not turns:
            raise MedMoEError(f"{where}: empty conversation")
        image = os.path.join(root, r["image"]) if r.get("image") else None
        q0 = turns[0][0]
        if image and "<image>" not in q0:  # VQA records, and LLaVA records that omit it: image first
            turns[0] = ("<image>\n" + q0, turns[0][1])
        elif image:  # LLaVA moves the placeholder to the front of the first question
            turns[0] = ("<image>\n" + q0.replace("<image>", "").strip(), turns[0][1])
        known = {"id", "image", "conversations", "conversatons", "question", "answer", "answer_type", "modality", "organ"}
        examples.append(Example(
            id=str(r.get("id", r.get("question_id", n))), image=image, turns=turns,
            answer_type={"OPEN": "OPEN", "CLOSE": "CLOSED", "CLOSED": "CLOSED"}.get(str(r.get("answer_type")).upper()),
            modality=r.get("modality"), organ=r.get("organ"), extra={k: v for k, v in r.items() if k not in known},
        ))
    return examples


# ----------------------------------------------------------------------------- images

Image.MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default, stated: beyond it a file is refused (decompression bomb)


def load_image(path):
    """Any image a user is likely to hold -> an RGB PIL image, or a MedMoEError naming the file.
    Handles 8/16-bit grayscale, palette, CMYK, alpha, EXIF orientation and (with the dicom
    extra) DICOM, recognised by its content: PACS exports often have no extension (IM000001).
    path may also be the image's bytes (`medmoe serve`: uploads are never written to disk)."""
    if not isinstance(path, bytes) and not os.path.isfile(path):
        raise MedMoEError(f"{path}: no such image file")
    if is_dicom(path):
        return load_dicom(path)
    name, source = ("image", io.BytesIO(path)) if isinstance(path, bytes) else (path, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img = ImageOps.exif_transpose(img)  # phone photos of films are often stored rotated
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MedMoEError(f"{name}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels; a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise MedMoEError(f"{name}: not an image (or an unsupported format)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise MedMoEError(f"{name}: unreadable image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise MedMoEError(f"{name}: empty image")
    return to_rgb(img)


def to_rgb(img):
    if img.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        # 16-bit (or float) grayscale: stretch the image's own range onto 0..255
        img = img.convert("F") if img.mode == "F" else img.convert("I")
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda v: (v - lo) * scale + 0.5).convert("L")  # + 0.5: round, not truncate
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):  # medical backgrounds are black: composite onto black
        img = img.convert("RGBA")
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img)
    return img.convert("RGB")


def is_dicom(path):
    """DICOM Part 10: 128 bytes of preamble, then "DICM" (a .dcm name without it is tried too)."""
    if isinstance(path, bytes):
        return path[128:132] == b"DICM"
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM" or str(path).lower().endswith(".dcm")


def load_dicom(path):
    """A DICOM slice (a file name or its bytes) -> RGB: stored values x RescaleSlope +
    RescaleIntercept, then the file's own window (centre/width; else the full value range),
    MONOCHROME1 inverted. Multi-frame: the middle frame."""
    name = "image" if isinstance(path, bytes) else path
    try:
        import pydicom
    except ImportError:
        raise MedMoEError(f"{name}: a DICOM file; reading it needs the dicom extra: pip install 'medmoe[dicom]'") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(path) if isinstance(path, bytes) else path)
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 -- pydicom raises many types for bad or unsupported files
        raise MedMoEError(f"{name}: unreadable DICOM ({type(e).__name__}: {e})") from None
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if samples == 3:  # colour (pydicom converts YBR to RGB by default)
        return Image.fromarray(pixels.astype("uint8") if pixels.dtype.itemsize == 1 else (pixels >> 8).astype("uint8"), "RGB")
    x = torch.from_numpy(pixels.astype("float32"))
    x = x * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
        centre, width = first(centre), max(first(width), 1.0)
        # DICOM PS3.3 C.11.2.1.2 linear VOI function
        y = ((x - (centre - 0.5)) / (width - 1) + 0.5) if width > 1 else (x >= centre).float()
    else:
        lo, hi = x.min(), x.max()
        y = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    y = (y.clamp(0, 1) * 255).round().to(torch.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # 0 is white in these files
        y = 255 - y
    return Image.frombytes("L", (y.shape[1], y.shape[0]), y.numpy().tobytes()).convert("RGB")


IMAGE_MODES = ("pad", "crop", "resize")


def pad_to_square(img, fill=0):
    """The image centred on a square of colour `fill` (LLaVA's expand2square): nothing stretched."""
    side = max(img.size)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return out


def preprocess(img, vision, mode="pad"):
    """RGB PIL image -> normalised [3, S, S] tensor for the vision tower (config `vision`).
    pad: centre on a square of the mean colour first (Med-MoE stages 2-3, `expand2square`);
    crop: shortest side to S, centre crop (CLIP's processor; stage 1 and the authors' eval);
    resize: straight to S x S (SigLIP's processor)."""
    S = vision.image_size
    if mode == "pad":
        img = pad_to_square(img, tuple(int(m * 255) for m in vision.mean))
    if mode == "resize":
        img = img.resize((S, S), Image.BICUBIC)
    elif mode in ("pad", "crop"):
        scale = S / min(img.size)
        w, h = max(S, round(img.width * scale)), max(S, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - S) // 2, (h - S) // 2
        img = img.crop((left, top, left + S, top + S))
    else:
        raise MedMoEError(f"unknown image mode {mode!r} (choose {', '.join(IMAGE_MODES)})")
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(S, S, 3).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(vision.mean).view(3, 1, 1), torch.tensor(vision.std).view(3, 1, 1)
    return (x - mean) / std


def load_pixels(path, vision, mode="pad"):
    return preprocess(load_image(path), vision, mode)


# ----------------------------------------------------------------------------- conversation templates

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Template:
    """A conversation is  begin + (user % q + answer % a + after) per turn.  Only `answer`
    parts are supervised; a prompt for generation ends with the last `user` part, so the
    model's reply starts where the training answers start. `stop` ends an answer."""

    begin: str
    user: str  # contains {q}; ends with the assistant's role marker
    answer: str  # contains {a}; ends with the stop string
    after: str = ""
    stop: str = ""
    use_question: bool = True  # plain (stage 1) keeps only the <image>


TEMPLATES = {
    # LLaVA SeparatorStyle.TWO, seps " " and "<|endoftext|>" (Med-MoE conv_phi / conv_stablelm)
    "phi": Template(begin=SYSTEM + " ", user="USER: {q} ASSISTANT:", answer=" {a}<|endoftext|>", stop="<|endoftext|>"),
    "stablelm": Template(begin=SYSTEM + " ", user="USER: {q} ASSISTANT:", answer=" {a}<|endoftext|>", stop="<|endoftext|>"),
    # stage 1 alignment: the image, then its caption
    "plain": Template(begin="", user="{q}", answer="{a}\n", stop="\n", use_question=False),
    # Qwen2 and SmolLM2 chat models
    "chatml": Template(begin=f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", user="<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                       answer="{a}<|im_end|>", after="\n", stop="<|im_end|>"),
    # Llama 3 instruct
    "llama3": Template(begin=f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>",
                       user="<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                       answer="{a}<|eot_id|>", stop="<|eot_id|>"),
    # TinyLlama chat (Zephyr format)
    "zephyr": Template(begin=f"<s><|system|>\n{SYSTEM}</s>\n", user="<|user|>\n{q}</s>\n<|assistant|>\n", answer="{a}</s>", after="\n",
                       stop="</s>"),
}


def get_template(name):
    if name not in TEMPLATES:
        raise MedMoEError(f"unknown conversation template {name!r} (choose {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


# ----------------------------------------------------------------------------- tokenisation


def load_tokenizer(directory):
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise MedMoEError(f"{directory}: no tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on bad files
        raise MedMoEError(f"{path}: unreadable tokenizer ({e})") from None


def encode_text(tok, text, patches):
    """Token ids of text with every "<image>" expanded into `patches` IMAGE_TOKEN ids, one per
    visual feature the projector will write there (as LLaVA's processor expands it): the
    sequence the LLM sees is laid out here, once, so every length downstream is len(ids). Each
    piece between placeholders is tokenised on its own (as LLaVA's tokenizer_image_token does)."""
    ids = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            ids += [IMAGE_TOKEN] * patches
        if piece:
            ids += tok.encode(piece, add_special_tokens=False).ids
    return ids


def encode_conversation(tok, template, turns, patches):
    """turns [(q, a)] -> (ids, labels): labels copy the ids of each answer part and are IGNORE
    elsewhere. A final turn whose answer is None gives a generation prompt. Each <image> becomes
    `patches` positions (the vision config's num_patches)."""
    ids, labels = [], []

    def add(text, supervised):
        piece = encode_text(tok, text, patches)
        ids.extend(piece)
        labels.extend(t if supervised and t != IMAGE_TOKEN else IGNORE for t in piece)

    add(template.begin, False)
    for q, a in turns:
        if not template.use_question:
            q = "<image>" if "<image>" in q else ""
        add(template.user.format(q=q), False)
        if a is None:
            break
        add(template.answer.format(a=a), True)
        add(template.after, False)
    return ids, labels


def stop_ids(tok, template, eos_ids=()):
    """Token ids that end an answer: the template's stop token and the model's eos tokens."""
    ids = set(eos_ids)
    if template.stop:
        piece = tok.encode(template.stop, add_special_tokens=False).ids
        if len(piece) == 1:
            ids.add(piece[0])
    return sorted(ids)


def train_tokenizer(texts, vocab_size, path):
    """A small byte-level BPE tokenizer trained offline on `texts` (for models trained from
    scratch: the demo, tests), with the special tokens every template needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return tok


# ----------------------------------------------------------------------------- dataset and batches


class Skipped:
    """A record whose image could not be read: passed through the loader to be counted."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason


class VQADataset(torch.utils.data.Dataset):
    """Examples tokenised once up front (lengths drive the batching); images read lazily."""

    def __init__(self, examples, tok, template, vision, image_mode="pad", max_len=None):
        self.examples, self.vision, self.image_mode = examples, vision, image_mode
        template = get_template(template) if isinstance(template, str) else template
        # a text-only model keeps one placeholder per <image>, which MedMoE.splice refuses by name
        patches = vision.num_patches if vision else 1
        self.encoded = [encode_conversation(tok, template, ex.turns, patches) for ex in examples]
        self.lengths = [min(len(ids), max_len or len(ids)) for ids, _ in self.encoded]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex, (ids, labels) = self.examples[i], self.encoded[i]
        pixels = None
        if ex.image is not None:
            try:
                pixels = load_pixels(ex.image, self.vision, self.image_mode)
            except MedMoEError as e:
                return Skipped(ex.image, str(e))
        return {"index": i, "ids": ids, "labels": labels, "pixels": pixels}


@dataclass
class Batch:
    index: list
    input_ids: list
    labels: list
    pixels: torch.Tensor | None
    skipped: list


def collate(items):
    """Keep id lists unpadded (MedMoE.splice pads after inserting the image features)."""
    ok = [x for x in items if not isinstance(x, Skipped)]
    pix = [x["pixels"] for x in ok if x["pixels"] is not None]
    return Batch(index=[x["index"] for x in ok], input_ids=[x["ids"] for x in ok], labels=[x["labels"] for x in ok],
                 pixels=torch.stack(pix) if pix else None, skipped=[x for x in items if isinstance(x, Skipped)])


def count_targets(labels, limit):
    """Supervised next-token targets in a batch whose sequences are cut to `limit` tokens (as
    MedMoE.splice cuts them): what the loss averages. Position 0 is never a target."""
    return sum(lab != IGNORE for labs in labels for lab in labs[1:limit])


def length_grouped_batches(lengths, batch_size, seed, epoch, group=64):
    """One epoch of batches (lists of indices) in a repeatable order: shuffle, then within each
    window of `group` batches sort by length so a batch pads little, then shuffle the batches
    (LLaVA's group_by_length idea). Depends only on (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- image-caption pairs (MedMoE, contrastive)

# How a caption names a modality label (the VQA records' `modality` field).
MODALITY_WORDS = {"ct": "ct scan", "mri": "mri scan", "xray": "x-ray", "pathology": "pathology slide", "ultrasound": "ultrasound",
                  "fundus": "fundus photograph"}


def captions(examples):
    """Image path -> its short texts: a record's `caption` if it has one, else one built from its
    modality/organ labels and its question-answer pair ("ct scan of the head. is there a bleed? no")."""
    out = {}
    for ex in examples:
        if ex.image is None:
            continue
        if "caption" in ex.extra:
            text = ex.extra["caption"]
        else:
            what = MODALITY_WORDS.get(ex.modality, ex.modality or "image") + (f" of the {ex.organ}" if ex.organ else "")
            q, a = ex.turns[0]
            text = f"{what}. {q.replace('<image>', '').strip()} {a or ''}".strip()
        out.setdefault(ex.image, []).append(text)
    return out


@dataclass
class CaptionBatch:
    index: list
    pixels: torch.Tensor
    ids: torch.Tensor  # [B, T] word pieces
    mask: torch.Tensor  # [B, T] True on real tokens
    pieces: torch.Tensor  # [B, T] True on '##' continuation pieces
    modality: torch.Tensor  # [B] label index, -1 when unlabelled
    skipped: list


class CaptionDataset(torch.utils.data.Dataset):
    """One item per distinct image (so a batch never holds the same image twice: no false
    negatives in the contrastive loss), with one of its captions, a different one each epoch."""

    def __init__(self, examples, encode, vision, modalities, image_mode="pad", seed=0):
        self.texts = captions(examples)
        self.images = sorted(self.texts)
        label = {}
        for ex in examples:
            if ex.image is not None and ex.modality:
                label[ex.image] = ex.modality
        self.modality = [modalities.index(label[p]) if label.get(p) in modalities else -1 for p in self.images]
        self.encode, self.vision, self.image_mode, self.seed, self.epoch = encode, vision, image_mode, seed, 0
        self.lengths = [1] * len(self.images)  # nothing to group by length

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        path, texts = self.images[i], self.texts[self.images[i]]
        try:
            pixels = load_pixels(path, self.vision, self.image_mode)
        except MedMoEError as e:
            return Skipped(path, str(e))
        pick = random.Random(f"{self.seed}:{self.epoch}:{i}").randrange(len(texts))  # repeatable: resume sees the same captions
        return {"index": i, "pixels": pixels, "text": texts[pick], "modality": self.modality[i]}

    def collate(self, items):
        ok = [x for x in items if not isinstance(x, Skipped)]
        ids, mask, pieces = self.encode([x["text"] for x in ok])
        return CaptionBatch(index=[x["index"] for x in ok], pixels=torch.stack([x["pixels"] for x in ok]) if ok else None,
                            ids=ids, mask=mask, pieces=pieces, modality=torch.tensor([x["modality"] for x in ok], dtype=torch.long),
                            skipped=[x for x in items if isinstance(x, Skipped)])
