"""Benchmark: `medmoe serve` under load. 1, 4, 8 and 16 concurrent clients (the official openai
client, each in its own thread) send several requests each, every one with an image; every answer
must equal the solo answer for its image and question (no request lost or mixed up in a batch).
Prints p50/p95 latency, throughput and the mean batch size the server reports.

    medmoe demo && python bench/bench_serve.py     # the demo model and its held-out images
    python bench/bench_serve.py --tiny              # a tiny random model (a quick check of the harness)

The server runs as `medmoe serve` in its own process, so the clients do not share its interpreter."""

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path += [ROOT, os.path.join(ROOT, "tests")]
import openai  # noqa: E402
import tiny  # noqa: E402 -- the synthetic image set the tests use

from medmoe import data, vqa  # noqa: E402


def tiny_model(tmp):
    model = tiny.make_model(os.path.join(tmp, "model"), seed=3)
    return model, tiny.make_dataset(os.path.join(tmp, "data"), per_modality=4, seed=5, name="test.jsonl")


def questions(records, n):
    """(image path, its data: URL, question) for the first n records."""
    out = []
    for ex in data.load_examples(records)[:n]:
        with open(ex.image, "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        out.append((ex.image, url, ex.turns[0][0].replace("<image>", "").strip()))
    return out


def start_server(model):
    proc = subprocess.Popen([sys.executable, "-m", "medmoe.cli", "serve", "--model", model, "--port", "0", "--max-batch", "16"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        sys.exit(f"the server did not start: {line.strip()}")
    return proc, line.split(" at ")[1].split("/ ")[0]


def load(client, model, work, clients, per_client, max_tokens, solo):
    """Each client sends per_client requests in turn; (latencies, wall seconds, batch sizes)."""

    def one_client(c):
        out = []
        for r in range(per_client):
            image, url, q = work[(c * per_client + r) % len(work)]
            t = time.perf_counter()
            reply = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, messages=[
                {"role": "user", "content": [{"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": url}}]}])
            if reply.choices[0].message.content != solo[image, q]:
                sys.exit(f"mixed up: {image} / {q!r} got {reply.choices[0].message.content!r}, alone {solo[image, q]!r}")
            out.append((time.perf_counter() - t, reply.medmoe["batch_size"]))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(one_client, range(clients)) for x in xs]
    return [t for t, _ in results], time.perf_counter() - start, [b for _, b in results]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Checkpoint (default: the demo model).")
    p.add_argument("--data", help="Records with images (default: the demo's held-out questions).")
    p.add_argument("--tiny", action="store_true", help="A tiny random model and synthetic images instead.")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=4, help="Requests per client.")
    p.add_argument("--max-tokens", type=int, default=16)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.tiny:
            model, records = tiny_model(tmp)
        else:
            model = vqa.find_model(a.model)
            records = a.data or os.path.join(os.path.dirname(vqa.demo_dir()), "work", "data", "test.jsonl")
        counts = [int(c) for c in a.clients.split(",")]
        work = questions(records, max(counts) * a.requests)
        assistant = vqa.Assistant(model)
        solo = {(image, q): assistant.answer(assistant.pixels(image), [(q, None)], a.max_tokens) for image, _, q in work}
        proc, url = start_server(model)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            name = client.models.list().data[0].id
            load(client, name, work, 1, 2, a.max_tokens, solo)  # warm-up
            print(f"{name}, {len(work)} image questions, max_tokens {a.max_tokens}, {os.cpu_count()} CPUs")
            print("| clients | requests | p50 latency | p95 latency | requests/s | vs 1 client | mean batch |")
            print("|---|---|---|---|---|---|---|")
            base = None
            for c in counts:
                lat, wall, batches = load(client, name, work, c, a.requests, a.max_tokens, solo)
                rate = len(lat) / wall
                base = base or rate
                p95 = statistics.quantiles(lat, n=20)[-1] if len(lat) > 1 else lat[0]
                print(f"| {c} | {len(lat)} | {statistics.median(lat):.2f} s | {p95:.2f} s | {rate:.2f} | {rate / base:.1f}x | "
                      f"{statistics.mean(batches):.1f} |")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
