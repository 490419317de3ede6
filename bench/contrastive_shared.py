"""MedMoE (contrastive) on ../shared/data: a tiny model trained from scratch on VQA-RAD and PathVQA
images with short texts built from their modality/organ labels and question-answer pairs, then
measured on images it never saw: zero-shot modality classification, the router's modality
accuracy, and a linear probe on the frozen image embeddings.

    python bench/contrastive_shared.py [--shared ../shared/data] [--epochs 30] [--seed 0]

Held-out images: VQA-RAD's test split reuses its training images (202 of 203), so a fifth of its
modality-labelled images (per modality, chosen by a hash of the file name) is held out of training
altogether, with every record about them; PathVQA's test images are disjoint from its training ones."""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path += [os.path.join(HERE, "..")]

from medmoe import contrastive, data, train  # noqa: E402

MODALITIES = ("ct", "mri", "xray", "pathology")


def held_out_split(shared, out):
    """Write out/train.jsonl and out/heldout.jsonl (absolute image paths); return their paths."""
    rad = [dict(r, image=os.path.join(shared, "vqa_rad", r["image"])) for split in ("train", "test")
           for r in data.read_records(os.path.join(shared, "vqa_rad", f"{split}.jsonl"))]
    labelled = {}
    for r in rad:
        if r.get("modality"):
            labelled.setdefault(r["modality"], set()).add(r["image"])
    rank = lambda p: hashlib.sha256(os.path.basename(p).encode()).hexdigest()
    held = {p for images in labelled.values() for i, p in enumerate(sorted(images, key=rank)) if i % 5 == 0}
    path_train, path_test = ([dict(r, image=os.path.join(shared, "pathvqa", r["image"]))
                              for r in data.read_records(os.path.join(shared, "pathvqa", f"{s}.jsonl"))] for s in ("train", "test"))
    files = {"train": [r for r in rad if r["image"] not in held] + path_train,
             "heldout": [r for r in rad if r["image"] in held] + path_test}
    os.makedirs(out, exist_ok=True)
    for name, records in files.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return os.path.join(out, "train.jsonl"), os.path.join(out, "heldout.jsonl")


def run(shared, out, epochs=30, seed=0, preset="small", log=print):
    t0 = time.time()
    train_file, held_file = held_out_split(shared, os.path.join(out, "data"))
    texts = [t for ts in data.captions(data.load_examples(train_file)).values() for t in ts]
    contrastive.init_model(os.path.join(out, "m0"), texts, MODALITIES, preset, seed)
    args = train.TrainArgs(stage="contrastive", model=os.path.join(out, "m0"), data=[train_file], out=os.path.join(out, "model"),
                           epochs=epochs, batch_size=32, lr=1e-3, clip=1.0, train_text=True, seed=seed, keep=1)
    summary = train.train(args, log=log)
    model = contrastive.load_model(args.out)
    tok = contrastive.load_wordpiece(args.out, model.cfg.text.max_tokens)
    train_paths, train_y = contrastive.labelled_images(train_file)
    test_paths, test_y = contrastive.labelled_images(held_file)
    train_x, _ = contrastive.embed_images(model, train_paths)
    test_x, experts = contrastive.embed_images(model, test_paths)
    probs = contrastive.zero_shot_scores(model, tok, test_x, list(MODALITIES))
    n = len(test_y)
    zero_shot = [MODALITIES[int(p.argmax())] for p in probs]
    routed = [model.cfg.modalities[int(e)] for e in experts]
    per = lambda guess: {m: f"{sum(g == y for g, y in zip(guess, test_y) if y == m)}/{test_y.count(m)}" for m in MODALITIES}
    return {
        "held-out images": n, "per modality": {m: test_y.count(m) for m in MODALITIES},
        "training images": len({ex.image for ex in data.load_examples(train_file)}), "epochs": epochs, "steps": summary["steps"],
        "zero-shot": sum(g == y for g, y in zip(zero_shot, test_y)) / n, "zero-shot per modality": per(zero_shot),
        "router": sum(g == y for g, y in zip(routed, test_y)) / n, "router per modality": per(routed),
        "linear probe": train.linear_probe(train_x, train_y, test_x, test_y),
        "seconds": round(time.time() - t0),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small", choices=["tiny", "small"])
    p.add_argument("--out", help="Working folder (default: a temporary one).")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(a.shared, a.out or tmp, a.epochs, a.seed, a.preset)
    print(f"\nMedMoE {a.preset}, from scratch: {r['training images']} training images, {r['epochs']} epochs ({r['steps']} steps), "
          f"{r['seconds']} s; {r['held-out images']} held-out images {r['per modality']}\n")
    print("| measure (held-out images) | accuracy | right per modality |\n|---|---|---|")
    for k in ("zero-shot", "router", "linear probe"):
        per = ", ".join(f"{m} {v}" for m, v in r.get(f"{k} per modality", {}).items())
        print(f"| {k} modality | {r[k]:.1%} | {per} |")


if __name__ == "__main__":
    main()
