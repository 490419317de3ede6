"""A tiny Med-MoE and a tiny labelled image set, built from scratch in a temporary folder
(no download, no shared data): four 'modalities' drawn as distinct synthetic patterns."""

import json
import os
import random

from PIL import Image, ImageDraw

import medmoe
from medmoe import data

MODALITIES = ["ct", "mri", "pathology", "xray"]


def draw(modality, rng, size=32):
    """A noisy image whose pattern tells its modality apart."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(img)
    c = rng.randint(10, size - 10)
    if modality == "ct":  # a bright disc
        d.ellipse([c - 8, c - 8, c + 8, c + 8], fill=(220, 220, 220))
    elif modality == "mri":  # a ring
        d.ellipse([c - 9, c - 9, c + 9, c + 9], outline=(180, 180, 180), width=3)
    elif modality == "xray":  # vertical bars
        for x in range(rng.randint(0, 3), size, 6):
            d.rectangle([x, 0, x + 2, size], fill=(200, 200, 200))
    else:  # pink blobs on white
        img.paste((240, 220, 230), [0, 0, size, size])
        for _ in range(6):
            x, y = rng.randint(0, size), rng.randint(0, size)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(150, 40, 120))
    for _ in range(20):
        img.putpixel((rng.randrange(size), rng.randrange(size)), tuple(rng.randrange(256) for _ in range(3)))
    return img


def make_dataset(folder, per_modality=6, seed=0, name="train.jsonl"):
    """images/ + a VQA JSONL (two questions per image: its modality, and a yes/no one)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for m in MODALITIES:
        for k in range(per_modality):
            image = f"images/{m}-{seed}-{k}.png"
            draw(m, rng).save(os.path.join(folder, image))
            other = rng.choice(MODALITIES)
            records.append({"id": f"{m}-{k}-a", "image": image, "question": "What modality is this image?", "answer": m,
                            "answer_type": "OPEN", "modality": m})
            records.append({"id": f"{m}-{k}-b", "image": image, "question": f"Is this a {other} image?",
                            "answer": "yes" if other == m else "no", "answer_type": "CLOSED", "modality": m})
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def make_model(folder, arch="llama", template="phi", seed=0, layers=4, vocab=400, max_seq_len=256):
    """A from-scratch tiny model directory (config.json, model.safetensors, tokenizer.json)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    texts = [data.SYSTEM, "USER: ASSISTANT:", "What modality is this image?", "yes no"] + [f"Is this a {m} image? {m}" for m in MODALITIES]
    tok = data.train_tokenizer(texts * 4, vocab, os.path.join(folder, "tokenizer.json"))
    flags = medmoe.ARCHS[arch]
    llm = medmoe.LLMConfig(arch=arch, vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=96, num_layers=layers,
                           num_heads=4, num_kv_heads=2, max_seq_len=max_seq_len, **flags,
                           eos_ids=[tok.token_to_id("<|endoftext|>")], pad_id=0)
    vision = medmoe.VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    cfg = medmoe.Config(llm=llm, vision=vision, template=template)
    torch.manual_seed(seed)
    model = medmoe.MedMoE(cfg)
    medmoe.save_model(model, folder)
    return folder
