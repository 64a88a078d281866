"""DVC stage `sample`: KV-cached generations for the prompts in params `sample`, as Markdown and JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import click

from deepseek.files import write_json, write_text
from stages import tracking
from stages.options import params_option, report_user_errors, run_as_program, trained_model_option
from stages.params import load_params


class _Drafted(TypedDict, total=False):
    draft_acceptance: float  # with speculative decoding: the share of the drafts accepted


class Sample(_Drafted):
    """One generation, as samples.json holds it."""

    prompt: str
    text: str


@click.command()
@params_option
@trained_model_option("--model-dir")
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
    # Imported here, not for `--help`: torch takes seconds to load.
    import torch

    from deepseek.generate import generate_text
    from deepseek.speculative import SpeculativeStats
    from stages.trained import load_trained

    params = load_params(params_path).sample
    model, tokenizer = load_trained(model_dir)
    generator = torch.Generator().manual_seed(params.seed)
    samples: list[Sample] = []
    for prompt in params.prompts:
        stats = SpeculativeStats()
        text = generate_text(
            model,
            tokenizer,
            prompt,
            params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            generator=generator,
            speculative=params.speculative,
            stats=stats,
        )
        samples.append({"prompt": prompt, "text": text})
        if params.speculative:
            samples[-1]["draft_acceptance"] = stats.acceptance
        click.echo(f"--- {prompt}\n{samples[-1]['text']}\n" + (f"({stats.summary()})\n" if params.speculative else ""))
    settings = {k: v for k, v in vars(params).items() if k != "prompts"}
    write_json(reports_dir / "samples.json", {"settings": settings, "samples": samples})
    write_text(reports_dir / "samples.md", _markdown(samples, settings))
    run = tracking.Run.resume(reports_dir / tracking.RUN_FILE)
    for name in ("samples.md", "samples.json"):
        run.log_artifact(reports_dir / name, "samples")
    run.log_artifact("dvc.lock")  # DVC updates it after each stage, so it holds this run's earlier stages


def _markdown(samples: list[Sample], settings: dict[str, Any]) -> str:
    lines = ["# Samples", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    for item in samples:
        lines += [f"## {item['prompt']}", "", "```text", item["text"], "```", ""]
        if "draft_acceptance" in item:
            lines += [f"Drafts accepted: {100 * item['draft_acceptance']:.1f}%", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_as_program(sample)
