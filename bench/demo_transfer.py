"""Does the demo model know real scans it has never seen? (issue 15)

After `medmoe demo` (built here once per seed, in a temporary folder, exactly as the command
builds it), ask "What modality is this image?" about every distinct modality-labelled image of
the VQA-RAD and PathVQA test files in ../shared/data, which the default demo never trains on, and
read the router: the modality whose expert gets the highest mean router probability over the
tokens from the image on (as `medmoe route` judges it).

    python bench/demo_transfer.py [--seeds 0,1,2] [--shared ../shared/data] [--model DIR]

--model measures an existing model instead of building demos. Floors (issue 15): at least 75%
answer accuracy and 75% router accuracy on every seed, while the demo's own held-out floors
(closed accuracy and router at least 90%, printed too) and its 5 minutes still hold."""

import argparse
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path += [os.path.join(HERE, "..")]

from medmoe import data, demo, vqa  # noqa: E402

QUESTION = "What modality is this image?"
SPOKEN = {"ct": ("ct", "ct scan"), "mri": ("mri", "mri scan", "mr"), "xray": ("x-ray", "xray", "x ray", "radiograph"),
          "pathology": ("pathology", "pathology slide", "histology")}


def test_images(shared):
    """One record per distinct modality-labelled test image (VQA-RAD and PathVQA)."""
    seen = {}
    for folder in ("vqa_rad", "pathvqa"):
        for r in data.read_records(os.path.join(shared, folder, "test.jsonl")):
            image = os.path.join(shared, folder, r["image"])
            if r.get("modality") in SPOKEN and image not in seen:
                seen[image] = data.Example(id=image, image=image, turns=[(QUESTION, None)], modality=r["modality"])
    return list(seen.values())


def is_right(answer, modality):
    return re.sub(r"[^a-z\- ]", "", answer.lower()).strip() in SPOKEN[modality]


def routed_modalities(assistant, examples, batch_size=32):
    """The modality whose expert gets the highest mean router probability, per example."""
    names = vqa.expert_names(assistant.model)
    return [names[int(r.probs.mean(0).argmax())] for r in vqa.route_many(assistant, examples, batch_size, progress=False)]


def own_by_file(built):
    """The demo's own router accuracy per held-out file: which file it misses."""
    records = data.read_records(os.path.join(built["data"]["out_dir"], "test.jsonl"))  # the records of built["test"], in order
    per = {}
    for r, routed in zip(records, routed_modalities(vqa.Assistant(built["model"]), built["test"])):
        right = per.setdefault(r["source"], [0, 0])
        right[0] += routed == r["modality"]
        right[1] += 1
    return ", ".join(f"{source} {right}/{n}" for source, (right, n) in per.items())


def measure(model_dir, examples, batch_size=32):
    """Answer and router accuracy, overall and per modality."""
    a = vqa.Assistant(model_dir)
    answers = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        answers += a.answer_batch(a.pixels(*[ex.image for ex in chunk]), [QUESTION] * len(chunk), max_new_tokens=8)
    routed = routed_modalities(a, examples, batch_size)
    per, confusion = {}, {}
    for ex, answer, expert in zip(examples, answers, routed):
        said = confusion.setdefault(ex.modality, {})
        said[answer] = said.get(answer, 0) + 1
        right = per.setdefault(ex.modality, [0, 0, 0])
        right[0] += is_right(answer, ex.modality)
        right[1] += expert == ex.modality
        right[2] += 1
    n = len(examples)
    return {"answer": sum(v[0] for v in per.values()) / n, "router": sum(v[1] for v in per.values()) / n, "per": per,
            "confusion": confusion}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared", "data"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", help="Measure this model instead of building the demo.")
    a = p.parse_args()
    examples = test_images(a.shared)
    counts = {m: sum(ex.modality == m for ex in examples) for m in SPOKEN}
    print(f"{len(examples)} distinct test images: {counts}\n")
    print("| seed | demo s | own held-out: closed, router | answer | router | ct | mri | x-ray | pathology |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in [None] if a.model else [int(s) for s in a.seeds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.time()
            built = None if a.model else demo.run(tmp, seed=seed, log=lambda *m: None)
            seconds = time.time() - start
            r = measure(a.model or built["model"], examples)
            files = own_by_file(built) if built else None
        own = f"{built['scores']['closed']['accuracy']:.1f}, {built['routing']['router_accuracy']:.1%}" if built else "-"
        cells = " | ".join(f"{v[0]}/{v[2]} answer, {v[1]}/{v[2]} router" for v in (r["per"][m] for m in SPOKEN))
        print(f"| {'-' if seed is None else seed} | {seconds:.0f} | {own} | {r['answer']:.1%} | {r['router']:.1%} | {cells} |",
              flush=True)
        if files:
            print(f"  own held-out, router right per file: {files}", file=sys.stderr)
        for m, said in r["confusion"].items():  # what it calls each modality's images
            print(f"  {m} images answered: " + ", ".join(f"{k!r} {v}" for k, v in sorted(said.items(), key=lambda kv: -kv[1])),
                  file=sys.stderr)


if __name__ == "__main__":
    main()
