"""Where a trained model's expert imbalance comes from: the text it routes, or dropout.

The evaluate stage reports MaxVio_global (Wang et al. 2024) on the validation split, in eval mode. The balancing bias
is fitted during training, to the training text with dropout on. This script measures the same MaxVio of one trained
model on stretches of equal length, in both modes:

- the validation split;
- the first and the last stretch of the training split, each as long as the validation split.

Training text in training mode is what the bias was fitted to: what remains there is imbalance the bias has not
removed. Eval mode on the same text adds the effect of dropout; the validation split adds the effect of other text.
It counts with the evaluate stage's own function (deepseek.evaluation.evaluate), in float32.
"""

from __future__ import annotations

from pathlib import Path

import click

from benchmarks.common import (
    json_option,
    pick_device,
    print_header,
    print_table,
    run_header,
    threads_option,
    write_json,
)
from deepseek.balance import BalanceReport
from deepseek.checkpoint import load_model
from deepseek.evaluation import evaluate
from stages.tokenizer import load_tokens


def balance_row(text: str, dropout: bool, balance: BalanceReport, layer_names: list[str]) -> dict[str, object]:
    """A table row of the evaluation's balance report, a column per MoE layer named as in the evaluate stage's
    expert-load figure."""
    return {
        "text": text,
        "mode": "training (dropout on)" if dropout else "eval",
        "MaxVio global": balance["max_vio_global"],
        **{name: layer["max_vio"] for name, layer in zip(layer_names, balance["layers"], strict=True)},
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model-dir",
    default="model/final",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A trained model (the train stage's output).",
)
@click.option("--tokens-dir", default="data/tokens", show_default=True, type=click.Path(path_type=Path))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=1), help="params' train.seq_len.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@threads_option
@json_option
def main(
    model_dir: Path, tokens_dir: Path, seq_len: int, batch_size: int, threads: int | None, json_path: Path | None
) -> None:
    """MaxVio_global of a trained model on the validation split and on training text, with dropout off and on."""
    device = pick_device("cpu", threads)
    model = load_model(model_dir)
    val, train = load_tokens(tokens_dir, "val"), load_tokens(tokens_dir, "train")
    length = min(len(val), len(train))
    texts = {
        "validation split": val[:length],
        "training split, first stretch": train[:length],
        "training split, last stretch": train[-length:],
    }
    rows = []
    for text, tokens in texts.items():
        for dropout in (False, True):
            click.echo(f"{text}, dropout {'on' if dropout else 'off'}", err=True)
            balance = evaluate(model, tokens, seq_len, batch_size, dropout=dropout)["balance"]
            rows.append(balance_row(text, dropout, balance, model.config.moe_layer_names()))

    header = run_header("Expert balance by text and mode", device, "float32") | {
        "model": str(model_dir),
        "tokens per text": f"{length:,}",
        "dropout": str(model.config.dropout),
    }
    print_header(header)
    print_table(
        "MaxVio = (max load - mean load) / mean load, per MoE layer; global = the mean over layers",
        list(rows[0]),
        rows,
        notes="Training text with dropout on is what the balancing bias was fitted to.",
    )
    write_json(json_path, header, {"expert_balance": rows})


if __name__ == "__main__":
    main()
