"""The `medmoe` command: parses arguments, calls medmoe.py, prints. Bad input is one line on
stderr and exit status 1, never a traceback."""

import click
import torch

import medmoe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (medmoe.MedMoEError, OSError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=Group)
def main():
    """Med-MoE: lightweight medical mixture-of-experts vision-language models."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--vision", type=click.Path(), help="Hugging Face CLIP or SigLIP directory.")
@click.option("--llm", type=click.Path(), help="Hugging Face decoder directory (Phi, StableLM, Qwen2, Llama, Mistral, Mixtral).")
@click.option("--llava", type=click.Path(), help="Hugging Face LlavaForConditionalGeneration directory.")
@click.option("--medmoe", "medmoe_dir", type=click.Path(), help="Released Med-MoE / MoE-LLaVA directory.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="Cast weights (default: keep).")
@click.option("--feature-layer", type=int, default=-2, show_default=True, help="Vision hidden state fed to the projector.")
@click.option("--template", default=None, help="Conversation template (default: the decoder's).")
@click.option("--max-seq-len", type=int, default=None, help="Context length (default: the decoder's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a freshly initialised projector.")
def convert(out, vision, llm, llava, medmoe_dir, dtype, feature_layer, template, max_seq_len, seed):
    """Make a medmoe checkpoint directory OUT (config.json, model.safetensors, tokenizer.json)."""
    model = medmoe.convert(out, vision=vision, llm=llm, llava=llava, medmoe=medmoe_dir, dtype=DTYPES.get(dtype),
                           feature_layer=feature_layer, template=template, max_seq_len=max_seq_len, seed=seed)
    click.echo(f"wrote {out}")
    click.echo(medmoe.describe(model))


@main.command()
@click.argument("directory", type=click.Path())
def info(directory):
    """Architecture, total parameters and parameters activated per token."""
    cfg = medmoe.load_config(directory)
    with torch.device("meta"):
        model = medmoe.MedMoE(cfg)
    click.echo(medmoe.describe(model))


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", "data_files", required=True, multiple=True, type=click.Path(), help="Records whose text trains the tokenizer.")
@click.option("--images", type=click.Path(), help="Image folder (default: each data file's folder).")
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--template", default="phi", show_default=True, help="Conversation template.")
@click.option("--seed", type=int, default=0, show_default=True)
def init(out, data_files, images, preset, template, seed):
    """A Med-MoE trained from scratch starts here: random weights and a tokenizer fitted to DATA."""
    import train as trainer

    model = trainer.init_model(out, list(data_files), images, preset, template, seed)
    click.echo(f"wrote {out}")
    click.echo(medmoe.describe(model))


@main.command()
@click.option("--stage", type=click.IntRange(1, 3), required=True, help="1 align, 2 instruct (+ router), 3 MoE.")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Checkpoint to start from.")
@click.option("--data", "data_files", required=True, multiple=True, type=click.Path(), help="Training records, JSON/JSONL (repeatable).")
@click.option("--images", type=click.Path(), help="Image folder (default: each data file's folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (checkpoints, log, loss.png, final model).")
@click.option("--val-data", type=click.Path(), help="Validation records: loss every --eval-every steps and at the end.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (the schedule ends there).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, help="Default per stage: 1e-3, 2e-5, 2e-5 (the released scripts).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup", type=float, default=0.03, show_default=True, help="Warmup fraction of the steps.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip (0: off).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPUs that support it, else fp32.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute blocks in backward (less memory).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile each decoder block.")
@click.option("--template", help="Conversation template (default: plain for stage 1, else the model's).")
@click.option("--image-mode", type=click.Choice(["pad", "crop", "resize"]), help="Default: crop (stage 1), pad (stages 2-3).")
@click.option("--train-vision", is_flag=True, help="Also train the vision tower (models trained from scratch).")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: at the end).")
@click.option("--eval-every", type=int, default=0, show_default=True)
@click.option("--keep", type=int, default=2, show_default=True, help="Checkpoints to keep.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest exactly.")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard with FSDP2 instead of DDP.")
@click.option("--workers", type=int, default=0, show_default=True, help="Image-loading worker processes.")
@click.option("--moe-layers", default="sparse", show_default=True, help="sparse | dense | first_half | second_half | ids like 0,2,4.")
@click.option("--num-experts", type=int, default=4, show_default=True)
@click.option("--router-steps", type=int, default=300, show_default=True, help="Stage 2: router (modality classifier) fitting steps.")
@click.option("--top-k", type=int, default=1, show_default=True, help="Stage 3: experts per token (plus the meta expert).")
@click.option("--no-meta-expert", is_flag=True, help="Stage 3 ablation: no always-on meta expert.")
@click.option("--router", "router_file", type=click.Path(), help="Stage 3: router (default MODEL/router.safetensors; Med-MoE .pth too).")
@click.option("--learned-router", is_flag=True, help="Stage 3 ablation: train the router (use with --aux-loss-coef) instead.")
@click.option("--aux-loss-coef", type=float, default=0.0, show_default=True, help="Load-balancing loss weight (Med-MoE 0, MoE-LLaVA 0.01).")
def train(stage, model_dir, data_files, images, out, val_data, epochs, max_steps, batch_size, grad_accum, lr, weight_decay, warmup,
          clip, seed, precision, grad_checkpointing, compile_, template, image_mode, train_vision, save_every, eval_every, keep, resume,
          fsdp, workers, moe_layers, num_experts, router_steps, top_k, no_meta_expert, router_file, learned_router, aux_loss_coef):
    """Train one Med-MoE stage; the same command runs under `torchrun --nproc_per_node N`."""
    import train as trainer

    layers = [int(i) for i in moe_layers.split(",")] if moe_layers[:1].isdigit() else moe_layers
    args = trainer.TrainArgs(
        stage=stage, model=model_dir, data=list(data_files), out=out, images=images, val_data=val_data, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup=warmup,
        clip=clip, seed=seed, precision=precision, grad_checkpointing=grad_checkpointing, compile=compile_, template=template,
        image_mode=image_mode, train_vision=train_vision, save_every=save_every, eval_every=eval_every, keep=keep, resume=resume,
        fsdp=fsdp, workers=workers, moe_layers=layers, num_experts=num_experts, router_steps=router_steps, top_k=top_k,
        meta_expert=not no_meta_expert, router=router_file, learned_router=learned_router, aux_loss_coef=aux_loss_coef,
    )
    result = trainer.train(args, log=click.echo)
    if result.get("interrupted"):
        raise SystemExit(130)
    if not result["main"]:  # under torchrun, process 0 reports
        return
    losses = result.get("losses") or [float("nan")]
    click.echo(f"stage {stage}: {result['steps']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model in {out}")


if __name__ == "__main__":
    main()
