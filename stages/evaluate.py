"""DVC stage `evaluate`: metrics of the trained model over the whole validation split, and the plots."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from deepseek.files import write_json, write_text
from stages import tracking
from stages.options import TRAIN_LOG, VAL_LOG, params_option, report_user_errors, run_as_program, trained_model_option
from stages.params import load_params
from stages.tokenizer import check_vocabulary, load_meta, load_tokens

if TYPE_CHECKING:
    from deepseek.evaluation import EvalMetrics


@click.command()
@params_option
@trained_model_option("--model-dir")
@click.option("--tokens-dir", default="data/tokens", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--reports-dir",
    default="reports",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Gets metrics.json, expert_load.csv and figures/; reads the train stage's loss logs.",
)
@report_user_errors
def evaluate(params_path: str, model_dir: Path, tokens_dir: Path, reports_dir: Path) -> None:
    """Loss, perplexity, bits per character, accuracy and expert balance on the validation split."""
    # Imported here, not for `--help`: torch and matplotlib take seconds to load.
    from deepseek.checkpoint import load_model
    from deepseek.evaluation import evaluate as evaluate_model
    from stages import figures

    params = load_params(params_path)
    model = load_model(model_dir)
    meta = load_meta(tokens_dir)
    check_vocabulary(meta["vocab_size"], model.config.vocab_size, f"the tokens in {tokens_dir}")
    val = evaluate_model(
        model,
        load_tokens(tokens_dir, "val"),
        params.train.seq_len,
        params.evaluate.batch_size,
        characters=meta["val_characters"],
        progress=True,
    )
    metrics = _headline(val)
    write_json(reports_dir / "metrics.json", metrics)
    fractions = np.array([layer["load_fractions"] for layer in val["balance"]["layers"]])
    _write_expert_load_csv(reports_dir / "expert_load.csv", fractions)
    figures.expert_load(fractions, model.config.moe_layer_names(), reports_dir / "figures" / "expert_load.png")
    figures.loss_curves(
        _read_csv(reports_dir / TRAIN_LOG),
        _read_csv(reports_dir / VAL_LOG),
        val["loss"],
        reports_dir / "figures" / "loss.png",
    )
    _log_to_mlflow(reports_dir, metrics, val)
    click.echo(_summary(val))


def _headline(val: EvalMetrics) -> dict[str, dict[str, float]]:
    """The DVC metrics file's content: the headline only, so that `dvc exp show` stays readable."""
    return {
        "val": {
            "bits_per_character": val["bits_per_character"],
            "loss": val["loss"],
            "perplexity": val["perplexity"],
            "accuracy": val["accuracy"],
        }
        | {"max_vio": val["balance"]["max_vio_global"]}
        | {f"mtp_accuracy_{k}": accuracy for k, accuracy in enumerate(val["mtp_accuracy"], start=1)}
        | {f"mtp_acceptance_{k}": rate for k, rate in enumerate(val["mtp_acceptance"], start=1)}
    }


def _log_to_mlflow(reports_dir: Path, metrics: dict[str, dict[str, float]], val: EvalMetrics) -> None:
    """The headline, the tokens scored and each layer's MaxVio, the figures and the expert loads, to the run."""
    run = tracking.Run.resume(reports_dir / tracking.RUN_FILE)
    run.log_metrics(
        tracking.flatten(metrics)
        | {"val.tokens": val["tokens"]}
        | {f"val.max_vio/layer_{i}": layer["max_vio"] for i, layer in enumerate(val["balance"]["layers"])}
    )
    run.log_artifact(reports_dir / "figures", "figures")
    run.log_artifact(reports_dir / "expert_load.csv")
    run.flush()  # the metrics went asynchronously


def _summary(val: EvalMetrics) -> str:
    """One line: the headline metrics, and each multi-token prediction depth's accuracy and acceptance."""
    return (
        f"val: loss {val['loss']:.4f} | perplexity {val['perplexity']:.2f} | "
        f"bits/char {val['bits_per_character']:.4f} | accuracy {val['accuracy']:.4f} | "
        f"MaxVio {val['balance']['max_vio_global']:.3f}"
        + "".join(
            f" | MTP depth {k}: accuracy {accuracy:.3f}, greedy acceptance {rate:.3f}"
            for k, (accuracy, rate) in enumerate(zip(val["mtp_accuracy"], val["mtp_acceptance"], strict=True), start=1)
        )
    )


def _write_expert_load_csv(path: Path, fractions: np.ndarray) -> None:
    """One row per (layer, expert), in the long format DVC's bar plots read."""
    lines = ["expert,layer,load_fraction"]
    lines += [
        f"L{layer}/E{expert},{layer},{share:.6f}"
        for layer, row in enumerate(fractions)
        for expert, share in enumerate(row)
    ]
    write_text(path, "\n".join(lines) + "\n")


def _read_csv(path: Path) -> list[dict[str, float]]:
    """The train stage's loss log, as numbers (csv gives strings, which matplotlib would plot as labels)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


if __name__ == "__main__":
    run_as_program(evaluate)
