"""The `medmoe` command: parses arguments, calls the library (README: Architecture), prints.
Bad input is one line on stderr and exit status 1, never a traceback."""

import json
import os
import signal
import sys

import click
import torch

import medmoe
from medmoe import contrastive, data
from medmoe import convert as converter
from medmoe.files import MedMoEError, read_json

# Every number a user types is checked where it enters: one line, never a traceback (issue 13)
POSITIVE, COUNT, SEED = click.IntRange(min=1), click.IntRange(min=0), click.IntRange(0, 2**63 - 1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODALITIES = ",".join(contrastive.ContrastiveConfig.modalities)  # MedMoE's experts (the authors' code)


def split_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


class Group(click.Group):
    def main(self, *args, **kwargs):
        if signal.getsignal(signal.SIGINT) is getattr(sys.modules.get("medmoe"), "abort", None):  # see __init__.py
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Click answers Ctrl-C with "Aborted!"
        return super().main(*args, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (MedMoEError, OSError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=Group)
def main():
    """Med-MoE: lightweight medical mixture-of-experts vision-language models."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--vision", type=click.Path(), help="Hugging Face CLIP or SigLIP directory.")
@click.option("--llm", type=click.Path(), help="Hugging Face decoder directory (Phi, StableLM, Qwen2, Llama, Mistral, Mixtral), or GGUF.")
@click.option("--llava", type=click.Path(), help="Hugging Face LlavaForConditionalGeneration directory.")
@click.option("--medmoe", "medmoe_dir", type=click.Path(), help="Released Med-MoE / MoE-LLaVA directory.")
@click.option("--model", "model_dir", type=click.Path(), help="One of our own checkpoints (to cast or quantize it).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="Cast floating weights (default: keep; bf16 when quantizing).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), help="Weight-only quantization of every large matrix.")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), default="64", show_default=True,
              help="int4: inputs sharing one scale and zero.")
@click.option("--quantize-vision", is_flag=True, help="Quantize the vision tower too.")
@click.option("--feature-layer", type=int, default=-2, show_default=True, help="Vision hidden state fed to the projector.")
@click.option("--template", default=None, help="Conversation template (default: the decoder's).")
@click.option("--max-seq-len", type=POSITIVE, default=None, help="Context length (default: the decoder's).")
@click.option("--swin", type=click.Path(), help="MedMoE: Hugging Face Swin directory (with --bert).")
@click.option("--bert", type=click.Path(), help="MedMoE: Hugging Face BERT directory, e.g. Bio_ClinicalBERT (with --swin).")
@click.option("--modalities", default=MODALITIES, show_default=True, help="MedMoE: one expert per modality.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of freshly initialised layers (projector; experts, router).")
def convert(out, vision, llm, llava, medmoe_dir, model_dir, dtype, quantize, group_size, quantize_vision, feature_layer, template,
            max_seq_len, swin, bert, modalities, seed):
    """Make a checkpoint directory OUT (config.json, model.safetensors, tokenizer.json): Med-MoE from
    --vision/--llm/--llava/--medmoe/--model, or MedMoE (contrastive) from --swin and --bert."""
    if swin or bert:
        if not (swin and bert):
            raise MedMoEError("a MedMoE checkpoint needs both --swin and --bert")
        model = converter.convert_contrastive(out, swin, bert, split_list(modalities), seed)
        click.echo(f"wrote {out}\n{describe_contrastive(model)}")
        return
    quant = quant_config(quantize, group_size, quantize_vision)
    source = converter.Sources(vision=vision, llm=llm, llava=llava, released=medmoe_dir, ours=model_dir)
    choices = converter.Choices(feature_layer=feature_layer, template=template, max_seq_len=max_seq_len, seed=seed)
    model = converter.convert(out, source, DTYPES.get(dtype), quant, choices)
    click.echo(f"wrote {out}")
    click.echo(describe(model, out))


def describe(model, directory=None):
    """What `medmoe info` prints about a Med-MoE model: architecture, parameter counts, how the
    weights are stored (and their size on disk, given the checkpoint directory) and how many bytes
    decoding reads."""
    c, v, moe = model.cfg.llm, model.cfg.vision, model.cfg.moe
    p = medmoe.count_params(model)
    B = lambda x: f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"
    block = "parallel attention+FFN" if c.parallel_block else "sequential attention, FFN"
    mlp = f"SwiGLU {c.intermediate_size}" if c.gated_mlp else f"{c.act} MLP {c.intermediate_size}"
    lines = [
        f"LLM         {c.arch}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} kv), "
        f"{block}, {c.norm}, {mlp}, rotary {c.rotary_pct:g} of head_dim {c.head_dim}, vocab {c.vocab_size}, "
        f"context {c.max_seq_len}{', tied embeddings' if c.tie_embeddings else ''}",
    ]
    if v:
        lines.append(f"vision      {v.kind}: {v.image_size}px / patch {v.patch_size} -> {v.num_patches} tokens x {v.hidden_size}, "
                     f"{v.num_layers} layers kept (features of the last)")
        lines.append(f"projector   {model.cfg.projector}")
    if moe:
        n_moe = len(model.llm.moe_layers())
        meta = " + meta expert" if moe.meta_expert else ""
        lines.append(f"MoE         {n_moe} of {c.num_layers} layers ({moe.layers}): {moe.num_experts} experts, top-{moe.top_k}{meta}, "
                     f"weights {'renormalised' if moe.renormalize else 'softmax probabilities'}, "
                     f"aux {moe.aux_loss_coef:g}, z {moe.z_loss_coef:g}")
    lines.append(f"parameters  total {B(p['total'])} = LLM {B(p['llm'])} + vision {B(p['vision'])} + projector {B(p['projector'])}")
    note = " (the meta expert runs for every token, so it counts as activated)" if moe and moe.meta_expert else ""
    lines.append(f"activated   {B(p['llm_active'])} per token in the LLM{note}; "
                 f"{B(p['llm_active'] + p['vision'] + p['projector'])} with vision tower and projector")
    q = model.cfg.quant
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.state_dict().values() if t.is_floating_point() and not t.is_meta})
    stored = "float"
    if q:
        head = max(q.bits, q.lm_head_bits)
        stored = f"int{q.bits}" + (f" (groups of {q.group_size}), LM head int{head}" if q.bits == 4 else " (per channel)")
    stored += f"{'' if not q or q.vision else ', vision tower float'}" + (f"; float tensors {'/'.join(dtypes)}" if dtypes else "")
    weights = os.path.join(directory or "", "model.safetensors")
    if directory and os.path.isfile(weights):
        stored += f"; {os.path.getsize(weights) / 2**30:.2f} GiB on disk"
    lines.append(f"weights     {stored}")
    lines.append(f"decoding    reads {medmoe.decode_bytes(model) / 2**30:.3f} GiB of weights per token (batch 1)")
    return "\n".join(lines)


def describe_contrastive(model):
    """What `medmoe info` prints: shapes, and parameters per part and per image."""
    cfg = model.cfg
    n = lambda m: sum(p.numel() for p in m.parameters())
    M = lambda x: f"{x / 1e6:.2f}M"
    swin, expert, router, text = n(model.swin), n(model.experts[0]), n(model.router), n(model.text)
    return "\n".join([
        f"MedMoE (contrastive): Swin {cfg.swin.image_size} px, patch {cfg.swin.patch_size}, embed {cfg.swin.embed_dim}, "
        f"depths {list(cfg.swin.depths)}, window {cfg.swin.window_size}; {len(cfg.modalities)} experts ({', '.join(cfg.modalities)}) "
        f"of width {cfg.text.hidden_size}; BERT {cfg.text.num_layers} layers x {cfg.text.hidden_size}",
        f"parameters  total {M(n(model))} = Swin {M(swin)} + experts {len(cfg.modalities)} x {M(expert)} + router {M(router)} "
        f"+ text {M(text)}",
        f"per image   {M(swin + expert + router)} run (Swin, router and the one chosen expert)",
    ])


def quant_config(name, group_size=64, vision=False):
    """"int8" / "int4" -> a QuantConfig; None -> None."""
    return medmoe.QuantConfig(bits=int(name[3:]), group_size=int(group_size), vision=vision) if name else None


@main.command()
@click.argument("directory", type=click.Path())
def info(directory):
    """Architecture, total parameters and parameters activated per token (or image)."""
    if read_json(os.path.join(directory, "config.json")).get("kind") == contrastive.KIND:
        with torch.device("meta"):
            click.echo(describe_contrastive(contrastive.ContrastiveMedMoE(contrastive.load_config(directory))))
        return
    click.echo(describe(medmoe.empty_model(medmoe.load_config(directory)), directory))


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", "data_files", required=True, multiple=True, type=click.Path(), help="Records whose text trains the tokenizer.")
@click.option("--images", type=click.Path(), help="Image folder (default: each data file's folder).")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--template", default="phi", show_default=True, help="Conversation template.")
@click.option("--kind", type=click.Choice(["med-moe", "contrastive"]), default="med-moe", show_default=True,
              help="med-moe: the VQA model; contrastive: MedMoE (Swin + modality experts + BERT).")
@click.option("--modalities", default=MODALITIES, show_default=True, help="contrastive: one expert per modality.")
@click.option("--seed", type=SEED, default=0, show_default=True)
def init(out, data_files, images, preset, template, kind, modalities, seed):
    """A model trained from scratch starts here: random weights and a tokenizer fitted to DATA."""
    from medmoe import train as trainer

    if kind == "contrastive":
        examples = [ex for path in data_files for ex in data.load_examples(path, images)]
        texts = [t for ts in data.captions(examples).values() for t in ts]
        model = contrastive.init_model(out, texts, split_list(modalities), preset, seed)
        click.echo(f"wrote {out}\n{describe_contrastive(model)}")
        return

    model = trainer.init_model(out, list(data_files), images, preset, template, seed)
    click.echo(f"wrote {out}")
    click.echo(describe(model))


def stage_number(ctx, param, value):
    return int(value) if value and value.isdigit() else value


def layer_list(ctx, param, value):
    """--moe-layers: a named placement, or layer ids like 0,2,4."""
    return [int(i) for i in split_list(value)] if value[:1].isdigit() else value


@main.command()
@click.option("--stage", type=click.Choice(["1", "2", "3", "contrastive"]), required=True, callback=stage_number,
              help="Med-MoE: 1 align, 2 instruct (+ router), 3 MoE; contrastive: MedMoE.")
@click.option("--model", required=True, type=click.Path(), help="Checkpoint to start from.")
@click.option("--data", required=True, multiple=True, type=click.Path(), callback=lambda c, p, v: list(v),
              help="Training records, JSON/JSONL (repeatable).")
@click.option("--images", type=click.Path(), help="Image folder (default: each data file's folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (checkpoints, log, loss.png, final model).")
@click.option("--val-data", type=click.Path(), help="Validation records: loss every --eval-every steps and at the end.")
@click.option("--epochs", type=POSITIVE, default=1, show_default=True)
@click.option("--max-steps", type=POSITIVE, help="Stop after this many optimizer steps (the schedule ends there).")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True, help="Per process.")
@click.option("--grad-accum", type=POSITIVE, default=1, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Default per stage: 1e-3, 2e-5, 2e-5 (the released scripts); contrastive 5e-5 (MedMoE).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--warmup", type=click.FloatRange(0, 1), default=0.03, show_default=True, help="Warmup fraction of the steps.")
@click.option("--clip", type=click.FloatRange(min=0), help="Gradient-norm clip, 0: off (default 1.0; contrastive 0.25, as MedMoE).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPUs that support it, else fp32.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute blocks in backward (less memory).")
@click.option("--compile", is_flag=True, help="torch.compile each decoder block.")
@click.option("--template", help="Conversation template (default: plain for stage 1, else the model's).")
@click.option("--image-mode", type=click.Choice(list(data.IMAGE_MODES)), help="Default: crop (stage 1), pad (stages 2-3).")
@click.option("--train-vision", is_flag=True, help="Also train the vision tower (models trained from scratch).")
@click.option("--train-text", is_flag=True, help="contrastive: also train the text encoder (models trained from scratch).")
@click.option("--save-every", type=COUNT, default=0, show_default=True, help="Checkpoint every N steps (0: at the end).")
@click.option("--eval-every", type=COUNT, default=0, show_default=True)
@click.option("--keep", type=POSITIVE, default=2, show_default=True, help="Checkpoints to keep.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest exactly.")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard with FSDP2 instead of DDP.")
@click.option("--workers", type=COUNT, default=0, show_default=True, help="Image-loading worker processes.")
@click.option("--moe-layers", default="sparse", show_default=True, callback=layer_list,
              help="sparse | dense | first_half | second_half | ids like 0,2,4.")
@click.option("--num-experts", type=POSITIVE, default=4, show_default=True)
@click.option("--router-steps", type=COUNT, default=300, show_default=True, help="Stage 2: router (modality classifier) fitting steps.")
@click.option("--top-k", type=POSITIVE, default=1, show_default=True, help="Stage 3: experts per token (plus the meta expert).")
@click.option("--meta-expert/--no-meta-expert", default=True, show_default=True,
              help="Stage 3: the always-on meta expert (--no-meta-expert: the ablation).")
@click.option("--router", type=click.Path(), help="Stage 3: router (default MODEL/router.safetensors; Med-MoE .pth too).")
@click.option("--learned-router", is_flag=True, help="Stage 3 ablation: train the router (use with --aux-loss-coef) instead.")
@click.option("--aux-loss-coef", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Load-balancing loss weight (Med-MoE 0, MoE-LLaVA 0.01).")
def train(**options):
    """Train one stage; the same command runs under `torchrun --nproc_per_node N`. Each option is
    the TrainArgs field of the same name."""
    from medmoe import train as trainer

    a = trainer.TrainArgs(**options)
    result = trainer.train(a, log=click.echo)
    if result.get("interrupted"):
        raise SystemExit(130)
    if not result["main"]:  # under torchrun, process 0 reports
        return
    losses = result.get("losses") or [float("nan")]
    click.echo(f"stage {a.stage}: {result['steps']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model in {a.out}")


# ----------------------------------------------------------------------------- using a model


def model_options(f):
    """Options shared by the commands that load a model to answer with it."""
    for opt in reversed([
        click.option("--model", "model_dir", type=click.Path(), help="Checkpoint directory (default: $MEDMOE_MODEL, else the demo model)."),
        click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--image-mode", type=click.Choice(list(data.IMAGE_MODES)), default="pad", show_default=True,
                     help="pad: as trained (stages 2-3); crop: as the authors' evaluation script."),
        click.option("--compile/--no-compile", "compile_", default=None, help="Compile the decode step (default: on GPUs and for bf16w)."),
        click.option("--dtype", type=click.Choice([*DTYPES, "bf16w", "int8", "int4"]),
                     help="Compute dtype; bf16w: bf16 weights with fp32 compute (fp32's answers from half its weight "
                          "bytes); int8/int4: quantize a float checkpoint on loading (default: bf16 on GPUs and for "
                          "quantized checkpoints, else fp32)."),
    ]):
        f = opt(f)
    return f


def assistant(model_dir, device, image_mode, compile_, dtype):
    from medmoe import vqa

    quant = quant_config(dtype) if dtype in ("int8", "int4") else None
    bf16w = dtype == "bf16w"
    return vqa.Assistant(vqa.find_model(model_dir), device=device, dtype=torch.float32 if bf16w else DTYPES.get(dtype), quant=quant,
                         image_mode=image_mode, compile=compile_, matrix_dtype=torch.bfloat16 if bf16w else None)


def echo_stream(pieces):
    """Print text pieces as they arrive; return the whole answer."""
    text = ""
    for piece in pieces:
        click.echo(piece, nl=False)
        text += piece
    click.echo()
    return text.strip()


@main.command()
@click.argument("image", type=click.Path())
@click.argument("question")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@click.option("--show-routing", is_flag=True, help="Which modality the router sees; experts chosen per MoE layer.")
@click.option("--max-new-tokens", type=POSITIVE, default=256, show_default=True)
def ask(image, question, model_dir, device, image_mode, compile_, dtype, as_json, show_routing, max_new_tokens):
    """Answer QUESTION about IMAGE (PNG, JPEG, TIFF, BMP; DICOM with the dicom extra)."""
    from medmoe import vqa

    a = assistant(model_dir, device, image_mode, compile_, dtype)
    pixels = a.pixels(image)
    if not as_json:
        answer_aloud(a, pixels, question, max_new_tokens, show_routing)
        return
    out = {"image": image, "question": question, "answer": a.answer(pixels, [(question, None)], max_new_tokens), "model": a.name}
    if show_routing:
        out["routing"] = vqa.routing_dict(a, vqa.route_answer(a, pixels, question, out["answer"]))
    click.echo(json.dumps(out))


def answer_aloud(a, pixels, question, max_new_tokens=256, show_routing=False):
    """Stream the answer; then, if asked, how the question and answer were routed."""
    from medmoe import vqa

    answer = echo_stream(a.stream(pixels, [(question, None)], max_new_tokens))
    if show_routing:
        click.echo(vqa.routing_table(a, vqa.route_answer(a, pixels, question, answer)))


@main.command()
@click.argument("image", type=click.Path())
@model_options
@click.option("--max-new-tokens", type=POSITIVE, default=256, show_default=True)
def chat(image, model_dir, device, image_mode, compile_, dtype, max_new_tokens):
    """A conversation about IMAGE; the history stays in the prompt. Ctrl-D or Ctrl-C quits."""
    a = assistant(model_dir, device, image_mode, compile_, dtype)
    pixels = a.pixels(image)
    click.echo(f"{a.name} on {image}: ask away (Ctrl-D to quit)")
    turns = []
    try:
        while True:
            question = input("you> ")
            if not question.strip():
                continue
            try:
                a.prompt(turns + [(question, None)])
            except MedMoEError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
                click.echo(f"error: {e}", err=True)
                continue
            click.echo("medmoe> ", nl=False)
            turns.append((question, echo_stream(a.stream(pixels, turns + [(question, None)], max_new_tokens))))
    except (EOFError, KeyboardInterrupt):
        click.echo()


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; any but this machine's needs an API key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="MEDMOE_API_KEY", help="Required on every API request as 'Authorization: Bearer KEY' "
                                                         "(default: $MEDMOE_API_KEY).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Requests decoded together.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True, help="Cap on a request's max_tokens.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=25.0, show_default=True, help="Cap on a request's size.")
@click.option("--max-image-pixels", type=click.IntRange(1, 89_478_485), default=40_000_000, show_default=True,
              help="Cap on an image's width x height, checked before decoding.")
@click.option("--log-requests", is_flag=True, help="Log questions, answers and image digests (patients' data: off by default).")
def serve(model_dir, device, image_mode, compile_, dtype, host, port, api_key, max_batch, max_tokens, max_body_mb, max_image_pixels,
          log_requests):
    """OpenAI-compatible API (/v1/chat/completions) and a browser page (/) for a model."""
    try:
        from medmoe import serve as server
    except ImportError as e:
        raise MedMoEError(f"medmoe serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None

    server.check_host(host, api_key)  # before minutes of loading a model
    a = assistant(model_dir, device, image_mode, compile_, dtype)
    limits = server.Limits(max_body=int(max_body_mb * 2**20), max_pixels=max_image_pixels, max_tokens=max_tokens, max_batch=max_batch)
    server.run(a, host, port, api_key, limits, log_requests, echo=click.echo)


@main.command("eval")
@click.option("--data", "data_file", required=True, type=click.Path(), help="Test records: LLaVA test JSON or VQA JSONL.")
@click.option("--images", type=click.Path(), help="Image folder (default: the data file's folder).")
@model_options
@click.option("--out", default="predictions.jsonl", show_default=True, type=click.Path(dir_okay=False),
              help="Predictions JSONL (the authors' format); an existing file is resumed.")
@click.option("--limit", type=POSITIVE, help="Only the first N records.")
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True)
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(data_file, images, model_dir, device, image_mode, compile_, dtype, out, limit, batch_size, max_new_tokens, as_json):
    """Greedy answers to a VQA test file, scored as the Med-MoE authors score them."""
    from medmoe import scorer, vqa

    examples = data.load_examples(data_file, images)[:limit]
    if not examples:
        raise MedMoEError(f"{data_file}: no records")
    a = assistant(model_dir, device, image_mode, compile_, dtype)
    scores = vqa.evaluate(a, examples, out, batch_size, max_new_tokens)
    click.echo(json.dumps(scores) if as_json else scorer.format_table(scores))
    click.echo(f"predictions: {out}", err=as_json)


@main.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--data", "data_file", type=click.Path(), help="Records with a 'modality' label: load per modality, router accuracy.")
@click.option("--images-dir", type=click.Path(), help="Image folder of --data (default: its folder).")
@model_options
@click.option("--question", help="Question asked with each image (default: each record's own; for IMAGES, a generic one).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the expert-load heatmap here (PNG).")
@click.option("--limit", type=POSITIVE, help="Only the first N records of --data.")
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True)
def route(images, data_file, images_dir, model_dir, device, image_mode, compile_, dtype, question, plot, limit, batch_size):
    """Expert load per MoE layer over IMAGES or --data: do the experts specialise?"""
    from medmoe import plots, vqa

    if not images and not data_file:
        raise MedMoEError("give IMAGE files or --data FILE")
    examples = vqa.routing_records(images, data_file, images_dir, limit, question)
    a = assistant(model_dir, device, image_mode, compile_, dtype)
    s = vqa.routing_summary(a, examples, vqa.route_many(a, examples, batch_size, question))
    width = max(len(label) for label in s["row_labels"])
    click.echo(" " * width + " " + " ".join(f"{n:>10}" for n in s["experts"]))
    for label, row in zip(s["row_labels"], s["rows"]):
        click.echo(f"{label:<{width}} " + " ".join(f"{v:>10.0%}" for v in row))
    if s["router_accuracy"] is not None:
        click.echo(f"router modality accuracy: {s['router_accuracy']:.1%} of {s['judged']} labelled records")
    if plot:
        plots.heatmap(plot, s["rows"], s["row_labels"], s["experts"], f"expert load ({a.name}, {len(examples)} records)")
        click.echo(f"wrote {plot}")


# ----------------------------------------------------------------------------- MedMoE (contrastive)


def contrastive_model(model_dir, device):
    from medmoe import vqa

    dev, _ = vqa.pick_device(device)
    path = model_dir or os.environ.get("MEDMOE_MODEL")
    if not path:
        raise MedMoEError("no model: pass --model DIR (a MedMoE checkpoint) or set MEDMOE_MODEL")
    model = contrastive.load_model(path, dtype=torch.float32, device=dev)
    return model, contrastive.load_wordpiece(path, model.cfg.text.max_tokens)


@main.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--labels", help="Comma-separated classes, e.g. \"ct,mri,x-ray,pathology\" (default: the model's modalities).")
@click.option("--data", "data_files", multiple=True, type=click.Path(),
              help="Labelled records (or a folder of class subfolders), repeatable: accuracy.")
@click.option("--images-dir", type=click.Path(), help="Image folder of --data (default: its folder).")
@click.option("--field", default="modality", show_default=True, help="The label field of --data records.")
@click.option("--model", "model_dir", type=click.Path(), help="MedMoE checkpoint (default: $MEDMOE_MODEL).")
@click.option("--device", help="cpu, cuda ... (default: cuda if available).")
@click.option("--image-mode", type=click.Choice(list(data.IMAGE_MODES)), default="pad", show_default=True)
def classify(images, labels, data_files, images_dir, field, model_dir, device, image_mode):
    """Zero-shot classification of IMAGES (prompt ensembles per class) with the expert each was routed to;
    with --data, accuracy over labelled images and the router's modality accuracy."""
    if not images and not data_files:
        raise MedMoEError("give IMAGE files or --data FILE")
    model, tok = contrastive_model(model_dir, device)
    names = split_list(labels) if labels else list(model.cfg.modalities)
    paths, truth = list(images), [None] * len(images)
    if data_files:
        more, more_truth = contrastive.labelled_images(data_files, images_dir, field)
        paths, truth = paths + more, truth + more_truth
        names = names if labels else sorted(set(more_truth))
    r = contrastive.classify(model, tok, paths, names, truth, image_mode, progress=bool(data_files))
    for path, ranked, expert in zip(images, r["ranked"], r["experts"]):
        click.echo(f"{path}: " + ", ".join(f"{n} {v:.1%}" for n, v in ranked) + f"  (routed to the {expert} expert)")
    if r["accuracy"] is not None:
        click.echo(f"zero-shot {field} accuracy: {r['accuracy']:.1%} of {r['labelled']} images ({', '.join(names)})")
    if field == "modality" and r["router_accuracy"] is not None:
        click.echo(f"router modality accuracy: {r['router_accuracy']:.1%} of {r['routed']} images")


@main.command()
@click.option("--train", "train_files", required=True, multiple=True, type=click.Path(),
              help="Labelled records or a folder of class subfolders (repeatable).")
@click.option("--test", "test_files", required=True, multiple=True, type=click.Path(), help="Held-out labelled records or folders.")
@click.option("--images-dir", type=click.Path(), help="Image folder of the records (default: each file's folder).")
@click.option("--field", default="modality", show_default=True, help="The label field of the records.")
@click.option("--model", "model_dir", type=click.Path(), help="MedMoE checkpoint (default: $MEDMOE_MODEL).")
@click.option("--device", help="cpu, cuda ... (default: cuda if available).")
@click.option("--image-mode", type=click.Choice(list(data.IMAGE_MODES)), default="pad", show_default=True)
def probe(train_files, test_files, images_dir, field, model_dir, device, image_mode):
    """Linear probe: a linear classifier on frozen global image embeddings, accuracy on held-out images."""
    from medmoe import train as trainer

    model, _ = contrastive_model(model_dir, device)
    train_paths, train_y = contrastive.labelled_images(train_files, images_dir, field)
    test_paths, test_y = contrastive.labelled_images(test_files, images_dir, field)
    train_x, _ = contrastive.embed_images(model, train_paths, image_mode)
    test_x, _ = contrastive.embed_images(model, test_paths, image_mode)
    acc = trainer.linear_probe(train_x, train_y, test_x, test_y)
    click.echo(f"linear probe ({field}): {acc:.1%} of {len(test_y)} held-out images ({len(train_y)} training images)")


@main.command()
@click.option("--source", type=click.Path(file_okay=False), help="A folder of VQA records with modality labels (e.g. ../shared/data) "
              "instead of the images packaged in pydicom, pydicom-data, nibabel and scikit-image.")
@click.option("--out", type=click.Path(file_okay=False), help="Where to build it (default: the demo home, where `ask` finds the model).")
@click.option("--seed", type=SEED, default=0, show_default=True)
def demo(source, out, seed):
    """Train a tiny Med-MoE from scratch on real medical images, offline, and ask it a question."""
    from medmoe import demo as demo_lib
    from medmoe import scorer, vqa

    out = out or os.path.dirname(vqa.demo_dir())
    r = demo_lib.run(out, source, seed, log=click.echo)
    if r.get("interrupted"):
        click.echo(f"the demo stopped in stage {r['interrupted']}: `medmoe demo` starts it over", err=True)
        raise SystemExit(130)
    click.echo(f"\nheld-out questions ({len(r['test'])}, images never used in training), scored as the Med-MoE authors do:")
    click.echo(scorer.format_table(r["scores"]))
    routing = r["routing"]
    click.echo(f"router: modality of {routing['router_accuracy']:.1%} of held-out questions' images right "
               f"(mean router probability over the tokens from the image on); expert load in {os.path.join(out, 'routing.png')}")
    ex = next(e for e in r["test"] if e.extra.get("question_type") == "MODALITY" and e.answer_type == "OPEN")
    question = ex.turns[0][0].replace("<image>", "").strip()
    click.echo(f"\n$ medmoe ask {ex.image} \"{question}\" --show-routing    (truth: {ex.turns[0][1]})")
    a = vqa.Assistant(r["model"])
    answer_aloud(a, a.pixels(ex.image), question, show_routing=True)
    click.echo(f"\ndone in {r['seconds']:.0f} s; model in {r['model']} (`medmoe ask IMAGE \"QUESTION\"` uses it)")


if __name__ == "__main__":
    main()
