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


if __name__ == "__main__":
    main()
