"""Benchmark: the MoE layer per dispatch path, and whole-model greedy decoding, against a dense
FFN doing the same active FLOPs and against transformers holding the same (converted) weights.

    python bench/bench_moe.py            # full table (about 25 minutes on 2 CPU cores)
    python bench/bench_moe.py --quick    # fewer sizes, for a smoke run

Prints markdown tables (copy them into BENCHMARKS.md). Throughput = tokens per second; every
ratio is against a baseline measured in the same run on the same machine."""

import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path.append(os.path.join(os.path.dirname(__file__), ".."))
import medmoe
from medmoe import convert as converter

transformers = __import__("transformers")  # test extra: the reference we compare against
transformers.logging.set_verbosity_error()


def timeit(fn, min_time, max_reps=200):
    """Median seconds per call over repeated calls lasting about min_time."""
    times, start = [], time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 3) and len(times) < max_reps:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def race(fns, rounds, min_time, max_reps=200):
    """Seconds per call of each candidate, timed round-robin: on a noisy machine a slow spell hits
    every candidate alike instead of one row. Each candidate's figure is its median over rounds."""
    for fn in fns.values():
        fn(), fn()  # warm-up (and compilation)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timeit(fn, min_time, max_reps))
    return {name: statistics.median(s) for name, s in samples.items()}


def quiet(fn, *a, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **kw)


def hf_and_ours(hf_cfg, cls, tmp):
    """A random HF model saved to disk, converted by `medmoe convert`, loaded back."""
    torch.manual_seed(0)
    ref = getattr(transformers, cls)(hf_cfg).eval()
    quiet(ref.save_pretrained, f"{tmp}/hf")
    vis = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                                     num_attention_heads=2, image_size=28, patch_size=14))
    quiet(vis.save_pretrained, f"{tmp}/clip")
    converter.convert(f"{tmp}/ours", converter.Sources(vision=f"{tmp}/clip", llm=f"{tmp}/hf"))
    return ref, medmoe.load_model(f"{tmp}/ours")


class HFBlock(torch.nn.Module):
    """transformers' Mixtral block with a chosen experts implementation (eager/batched_mm/grouped_mm)."""

    def __init__(self, block, impl):
        super().__init__()
        self.block, self.impl = copy.deepcopy(block), impl
        self.block.experts.config = copy.copy(block.experts.config)

    def forward(self, x):
        self.block.experts.config._experts_implementation = self.impl
        return self.block(x)


def step(module, fn, x, grad):
    """One forward (no grad) or forward+backward of fn on x (an MoE layer returns (output, router logits))."""
    if grad is None:
        with torch.no_grad():
            fn(x)
    else:
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = fn(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)


def with_dispatch(moe, impl):
    moe = copy.deepcopy(moe)
    moe.moe = dataclasses.replace(moe.moe, dispatch=impl)
    return moe


def bench_layer(args, tmp):
    H, F, E, K = 512, 1408, 4, 2
    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=F, num_hidden_layers=1, num_attention_heads=8,
                                     num_key_value_heads=8, vocab_size=128, num_local_experts=E, num_experts_per_tok=K)
    ref, ours = hf_and_ours(cfg, "MixtralForCausalLM", tmp)
    hf_block, our_moe = ref.model.layers[0].mlp, ours.llm.layers[0].ffn
    # Med-MoE semantics on the same experts: top-1 + the always-on meta expert (also 2 FFNs a token)
    medmoe_top1 = medmoe.MoE(ours.cfg.llm, medmoe.MoEConfig(num_experts=E, top_k=1), dense=medmoe.FeedForward(H, F, "silu", True, False))
    medmoe_top1.experts.load_state_dict(our_moe.experts.state_dict())
    cands = {
        "dense FFN (2F, same active FLOPs)": medmoe.FeedForward(H, K * F, "silu", gated=True, bias=False),
        **{f"transformers Mixtral block ({impl})": HFBlock(hf_block, impl) for impl in ("eager", "batched_mm", "grouped_mm")},
        **{f"medmoe top-2 ({impl})": with_dispatch(our_moe, impl) for impl in ("loop", "grouped", "gather", "auto")},
        "medmoe top-1 + meta (auto)": medmoe_top1,
    }
    if not args.no_compile:
        cands["dense FFN, compiled"] = cands["dense FFN (2F, same active FLOPs)"]
        cands.update({f"medmoe top-2 ({impl}), compiled": with_dispatch(our_moe, impl) for impl in ("grouped", "gather", "auto")})
        cands["medmoe top-1 + meta (auto), compiled"] = medmoe_top1
    sizes = [1, 64, 2048] if args.quick else [1, 8, 64, 2048]
    rounds, min_time = (2, 0.1) if args.quick else (5, 0.15)
    torch._dynamo.config.recompile_limit = 64  # every compiled copy shares MoE.forward's code object
    rows = []
    for dtype in [torch.float32] if args.quick else [torch.float32, torch.bfloat16]:
        name = str(dtype).replace("torch.float32", "fp32").replace("torch.bfloat16", "bf16")
        fns = {}
        for label, module in cands.items():
            module = copy.deepcopy(module).to(dtype)
            if isinstance(module, medmoe.MoE):
                module.router.float()  # routers stay fp32, as loading keeps them
            fns[label] = (module, torch.compile(module) if label.endswith("compiled") else module)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            cells = {label: [] for label in fns}
            for T in sizes:
                x = torch.randn(1, T, H, dtype=dtype, requires_grad=backward)
                grad = torch.randn(1, T, H, dtype=dtype)
                runs = {}
                for label, (module, fn) in fns.items():
                    if ("batched_mm" in label or "(gather)" in label) and T > 64:
                        continue  # per-token weight copies (and their gradients): GBs at 2048 tokens; decode paths
                    runs[label] = functools.partial(step, module, fn, x, grad if backward else None)
                times = race(runs, rounds, min_time)
                for label in fns:
                    cells[label].append(T / times[label] if label in times else float("nan"))
                print(f"  {name} {mode} {T} tokens: done", file=sys.stderr, flush=True)
            rows += [(name, label, mode, c) for label, c in cells.items()]
    return sizes, rows


def print_layer_table(sizes, rows):
    print("\n### MoE layer throughput (tokens/s; H=512, F=1408, 4 experts, top-2 unless noted)\n")
    print("| dtype | implementation | pass | " + " | ".join(f"{T} tok" for T in sizes) + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for dtype, label, mode, cells in rows:
        print(f"| {dtype} | {label} | {mode} | " + " | ".join("—" if c != c else f"{c:,.0f}" for c in cells) + " |")
    print("\n### Ratios (ours / baseline, same dtype and pass)\n")
    print("| dtype | ours | pass | baseline | " + " | ".join(f"{T} tok" for T in sizes) + " |")
    print("|---|---|---|---|" + "---|" * len(sizes))
    table = {(d, lab, m): c for d, lab, m, c in rows}
    for (d, lab, m), cells in table.items():
        if not lab.startswith("medmoe"):
            continue
        for base in ("dense FFN (2F, same active FLOPs)", "transformers Mixtral block (grouped_mm)", "transformers Mixtral block (eager)"):
            b = table.get((d, base, m))
            if b:
                ratios = ("—" if x != x or y != y else f"{x / y:.2f}x" for x, y in zip(cells, b))
                print(f"| {d} | {lab} | {m} | {base} | " + " | ".join(ratios) + " |")


def bench_decode(args, tmp):
    """Whole-model greedy decoding, batch 1, same converted weights, tokens/s of new tokens."""
    common = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, vocab_size=8192,
                  max_position_embeddings=512)
    models = {
        "Mixtral-style MoE (4 experts, top-2)": (
            "MixtralForCausalLM", transformers.MixtralConfig(**common, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2)),
        "Phi-style dense": ("PhiForCausalLM", transformers.PhiConfig(**common, partial_rotary_factor=0.5)),
    }
    prompt_len, new = 32, 16 if args.quick else 64
    rows = []
    for label, (cls, cfg) in models.items():
        cfg.eos_token_id = None
        os.makedirs(f"{tmp}/{cls}", exist_ok=True)
        ref, ours = hf_and_ours(cfg, cls, f"{tmp}/{cls}")
        ids = torch.randint(0, 8000, (1, prompt_len))
        with torch.no_grad():
            hf_tokens = ref.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new)[0, prompt_len:].tolist()
        our_tokens = ours.generate(ids.tolist(), max_new_tokens=new, stop_ids=[])[0]
        compiled_tokens = ours.generate(ids.tolist(), max_new_tokens=new, stop_ids=[], compile=True)[0]
        t = race({
            "hf": lambda: ref.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new),
            "eager": lambda: ours.generate(ids.tolist(), max_new_tokens=new, stop_ids=[]),
            "compiled": lambda: ours.generate(ids.tolist(), max_new_tokens=new, stop_ids=[], compile=True),
        }, rounds=2 if args.quick else 5, min_time=0.5, max_reps=3)
        t_hf, t_ours, t_comp = t["hf"], t["eager"], t["compiled"]
        same = hf_tokens == our_tokens == compiled_tokens
        rows.append((label, new / t_hf, new / t_ours, new / t_comp, same))
    print(f"\n### Whole-model greedy decode (batch 1, prompt {prompt_len}, {new} new tokens, fp32)\n")
    print("| model | transformers generate tok/s | medmoe eager tok/s | medmoe compiled decode tok/s "
          "| eager speed-up | compiled speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for label, a, b, c, same in rows:
        print(f"| {label} | {a:.1f} | {b:.1f} | {c:.1f} | {b / a:.2f}x | {c / a:.2f}x | {'yes' if same else 'NO'} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--only", choices=["layer", "decode"])
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "layer"):
            print_layer_table(*bench_layer(args, tmp))
        if args.only in (None, "decode"):
            bench_decode(args, tmp)


if __name__ == "__main__":
    main()
