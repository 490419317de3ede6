"""Benchmark: training throughput of the `small` preset on this machine, dense stage 2 against
MoE stage 3 (top-1 + meta expert, 4 experts on every other layer), eager against compiled.

    python bench/bench_train.py            # about 5 minutes on 2 CPU cores
    python bench/bench_train.py --quick

Throughput = input tokens (image features + text) per second over the steps after the first
`--skip` (compilation and warm-up excluded), from each run's train_log.jsonl. Runs alternate
(dense eager, dense compiled, MoE eager, MoE compiled) for several rounds; the median is shown."""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path += [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]
import tiny  # noqa: E402 -- the synthetic image set the tests use

from medmoe import train  # noqa: E402


def throughput(log, skip):
    with open(log) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    a, b = rows[skip - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    steps, rounds = (15, 1) if a.quick else (a.steps, a.rounds)
    skip = min(a.skip, steps - 2)
    with tempfile.TemporaryDirectory() as tmp:
        records = tiny.make_dataset(tmp, per_modality=40)
        train.init_model(f"{tmp}/m0", [records], preset="small")
        common = dict(data=[records], batch_size=8, lr=1e-3, quiet=True, router_steps=50)
        train.train(train.TrainArgs(stage=2, model=f"{tmp}/m0", out=f"{tmp}/s2", max_steps=5, **common))  # fits the router
        runs = {
            "dense stage 2, eager": dict(stage=2, model=f"{tmp}/m0"),
            "dense stage 2, compiled": dict(stage=2, model=f"{tmp}/m0", compile=True),
            "MoE stage 3, eager": dict(stage=3, model=f"{tmp}/s2"),
            "MoE stage 3, compiled": dict(stage=3, model=f"{tmp}/s2", compile=True),
        }
        results = {name: [] for name in runs}
        for r in range(rounds):
            for name, kw in runs.items():
                out = f"{tmp}/run-{r}-{len(results[name])}-{name.split(',')[0].replace(' ', '')}-{kw.get('compile', False)}"
                train.train(train.TrainArgs(out=out, max_steps=steps, **kw, **common))
                results[name].append(throughput(f"{out}/train_log.jsonl", skip))
                print(f"  {name}: {results[name][-1]:,.0f} tok/s", file=sys.stderr, flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"\n### Training throughput, `small` preset (batch 8, {steps} steps, first {skip} excluded; median of {rounds})\n")
    print("| run | tokens/s | vs dense eager |")
    print("|---|---|---|")
    base = statistics.median(results["dense stage 2, eager"])
    for name, values in results.items():
        m = statistics.median(values)
        print(f"| {name} | {m:,.0f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
