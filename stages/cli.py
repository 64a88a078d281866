"""The `deepseek` command: the pipeline stages, plus generation and export from a trained model, and a report
comparing two runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deepseek.errors import UserError
from stages.check import check
from stages.data import utf8_text
from stages.download import download
from stages.evaluate import evaluate
from stages.options import FiniteFloatRange, model_option, report_user_errors, run_as_program
from stages.prepare import prepare
from stages.report import report
from stages.sample import sample
from stages.study import study
from stages.tokenization import tokenize
from stages.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train, evaluate and sample DeepSeek-V2/V3-style models (MLA + DeepSeekMoE).

    The stage commands are what `dvc repro` runs; they read params.yaml.
    """


for command in (check, download, prepare, tokenize, train, evaluate, sample, study, report):
    main.add_command(command)


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "--prompt-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the prompt from this UTF-8 file instead (PROMPT '-' reads it from standard input).",
)
@model_option
@click.option(
    "--max-new-tokens",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="At most the model's context (its max_seq_len).",
)
@click.option(
    "--temperature",
    default=0.8,
    show_default=True,
    type=FiniteFloatRange(min=0),
    help="0 picks the most likely token every step (greedy).",
)
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=0), help="0 = no top-k cut.")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloatRange(0, 1, min_open=True))
@click.option("--seed", default=1337, show_default=True, type=int)
@click.option(
    "--speculative",
    is_flag=True,
    help="Draft tokens with the model's multi-token prediction modules and verify them in one step: the same "
    "greedy output and sampling distribution in fewer model steps (needs model.mtp_depth >= 1). The drafts' "
    "acceptance goes to stderr.",
)
@report_user_errors
def generate(
    prompt: str | None,
    prompt_file: Path | None,
    model_dir: Path,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    speculative: bool,
) -> None:
    """Continue PROMPT with a trained model, printing the text as it is generated (with the latent KV cache).

    PROMPT '-' reads the prompt from standard input; --prompt-file from a file.
    """
    # Imported here: the command's time goes to loading the model, and `--help` loads no torch.
    import torch

    from deepseek.generate import stream_text
    from deepseek.speculative import SpeculativeStats
    from stages.trained import load_trained

    text = _read_prompt(prompt, prompt_file)
    model, tokenizer = load_trained(model_dir)
    if max_new_tokens > model.config.max_seq_len:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} is more than the model's context of "
            f"{model.config.max_seq_len} tokens: ask for at most {model.config.max_seq_len}"
        )
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "speculative": speculative}
    stats = SpeculativeStats()
    for piece in stream_text(
        model, tokenizer, text, max_new_tokens, generator=torch.Generator().manual_seed(seed), stats=stats, **sampling
    ):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if speculative:
        click.echo(stats.summary(), err=True)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from the argument, standard input (-) or a file, as valid UTF-8 text that is not empty."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give a PROMPT (or - to read standard input) or --prompt-file, one of them")
    if prompt_file is not None:
        try:
            raw, source = prompt_file.read_bytes(), str(prompt_file)
        except OSError as error:
            raise UserError(f"cannot read {prompt_file}: {error.strerror}") from None
    elif prompt == "-":
        raw, source = sys.stdin.buffer.read(), "standard input"
    else:  # the shell's bytes; those that are not UTF-8 arrive as surrogates, which give them back
        raw, source = str(prompt).encode("utf-8", "surrogateescape"), "the prompt"
    text = utf8_text(raw, source)
    if not text:
        raise UserError("the prompt is empty: give some text to continue")
    return text


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
@click.option(
    "--with-mtp",
    is_flag=True,
    help="Also write the multi-token prediction modules, as layers after the main ones (DeepSeek-V3's layout), "
    "for transformers' MTP layers and serving engines. DeepseekV3ForCausalLM lists their keys as UNEXPECTED.",
)
@report_user_errors
def export_hf(model_dir: Path, out_dir: Path, force: bool, with_mtp: bool) -> None:
    """Write a transformers DeepseekV3 directory (config, safetensors, tokenizer).

    Load it with transformers.AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT).
    """
    from deepseek.checkpoint import TOKENIZER
    from deepseek.hf import export_hf as export
    from stages.trained import load_trained

    model, _ = load_trained(model_dir)  # fails early and clearly if the tokenizer is missing or does not fit
    export(model, out_dir, tokenizer_dir=model_dir / TOKENIZER, inputs=[model_dir], force=force, mtp=with_mtp)
    click.echo(f"wrote {out_dir}")


def program() -> None:
    """The `deepseek` command (pyproject.toml's entry point)."""
    run_as_program(main)


if __name__ == "__main__":
    program()
