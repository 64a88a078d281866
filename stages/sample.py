"""DVC stage `sample`: KV-cached generations for the prompts in params `sample`, as Markdown and JSON."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from deepseek.files import write_json, write_text
from deepseek.generate import generate_text
from stages import tracking
from stages.options import params_option, report_user_errors
from stages.params import load_params
from stages.trained import load_trained


@click.command()
@params_option
@click.option("--model-dir", default="model/final", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--reports-dir",
    default="reports",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Gets samples.md and samples.json.",
)
@report_user_errors
def sample(params_path: str, model_dir: Path, reports_dir: Path) -> None:
    """Generate a continuation of every prompt in params.yaml `sample.prompts`."""
    params = load_params(params_path).sample
    model, tokenizer = load_trained(model_dir)
    generator = torch.Generator().manual_seed(params.seed)
    samples = []
    for prompt in params.prompts:
        text = generate_text(
            model,
            tokenizer,
            prompt,
            params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            generator=generator,
        )
        samples.append({"prompt": prompt, "text": text})
        click.echo(f"--- {prompt}\n{samples[-1]['text']}\n")
    settings = {k: v for k, v in vars(params).items() if k != "prompts"}
    write_json(reports_dir / "samples.json", {"settings": settings, "samples": samples})
    write_text(reports_dir / "samples.md", _markdown(samples, settings))
    run = tracking.Run.resume(reports_dir / tracking.RUN_FILE)
    for name in ("samples.md", "samples.json"):
        run.log_artifact(reports_dir / name, "samples")
    run.log_artifact("dvc.lock")  # DVC updates it after each stage, so it holds this run's earlier stages


def _markdown(samples: list[dict], settings: dict) -> str:
    lines = ["# Samples", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    for item in samples:
        lines += [f"## {item['prompt']}", "", "```text", item["text"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sample()
