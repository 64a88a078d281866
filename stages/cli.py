"""The `deepseek` command: the pipeline stages, plus generation and export from a trained model."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from deepseek.checkpoint import TOKENIZER, load_model
from deepseek.errors import UserError
from deepseek.generate import generate_text
from stages.evaluate import evaluate
from stages.options import model_option, report_user_errors
from stages.prepare import prepare
from stages.sample import sample
from stages.tokenize import tokenize
from stages.tokenizer import load_tokenizer
from stages.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train, evaluate and sample DeepSeek-V2/V3-style models (MLA + DeepSeekMoE).

    The stage commands are what `dvc repro` runs; they read params.yaml.
    """


for stage in (prepare, tokenize, train, evaluate, sample):
    main.add_command(stage)


@main.command()
@click.argument("prompt")
@model_option
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.8,
    show_default=True,
    type=click.FloatRange(min=0),
    help="0 picks the most likely token every step (greedy).",
)
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=0), help="0 = no top-k cut.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=1337, show_default=True, type=int)
@report_user_errors
def generate(
    prompt: str, model_dir: Path, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    """Continue PROMPT with a trained model, using the latent KV cache."""
    if not prompt:
        raise UserError("the prompt is empty: give some text to continue")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER)
    click.echo(
        generate_text(
            model,
            tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=torch.Generator().manual_seed(seed),
        )
    )


@main.command("export-hf")
@model_option
@click.option(
    "--out",
    "out_dir",
    default=Path("model/hf"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write. An earlier export there is replaced; anything else is refused (see --force).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT even if it holds files of something else. Never the model read, a checkpoint, or another "
    "output of this project.",
)
@report_user_errors
def export_hf(model_dir: Path, out_dir: Path, force: bool) -> None:
    """Write a transformers DeepseekV3 directory (config, safetensors, tokenizer).

    Load it with transformers.AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT).
    """
    from deepseek.hf import export_hf as export

    model = load_model(model_dir)
    load_tokenizer(model_dir / TOKENIZER)  # fail early and clearly if the tokenizer is missing
    export(model, out_dir, tokenizer_dir=model_dir / TOKENIZER, inputs=[model_dir], force=force)
    click.echo(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
