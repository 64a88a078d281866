"""DVC stage `train`: DeepSeekLM on the tokenized corpus, with params `seed`, `model` and `train`.

It opens the pipeline's MLflow run; evaluate and sample log into the same run through reports/mlflow_run.json.
The work is in stages/training.py, imported when the command runs: torch takes seconds to load.
"""

from __future__ import annotations

from pathlib import Path

import click

from stages.options import params_option, report_user_errors, run_as_program


@click.command()
@params_option
@click.option(
    "--data-stats",
    default="data/prepared/stats.json",
    show_default=True,
    type=click.Path(path_type=Path),
    help="The prepare stage's stats, recorded with the run as its MLflow dataset.",
)
@click.option("--tokens-dir", default="data/tokens", show_default=True, type=click.Path(path_type=Path))
@click.option("--tokenizer-dir", default="data/tokenizer", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--model-dir",
    default="model",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Gets final/ (weights, config, tokenizer) and checkpoints/.",
)
@click.option(
    "--reports-dir",
    default="reports",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Gets train_summary.json, the loss logs train_log.csv, val_log.csv, and mlflow_run.json.",
)
@report_user_errors
def train(
    params_path: str, data_stats: Path, tokens_dir: Path, tokenizer_dir: Path, model_dir: Path, reports_dir: Path
) -> None:
    """Train the model described by params.yaml `model` with the settings of `train`.

    \b
    Checkpoints go to MODEL_DIR/checkpoints every train.checkpoint_interval steps (the newest
    train.keep_checkpoints are kept). After a crash, a kill or an interrupt, rerunning resumes from the
    newest intact checkpoint made with the same params, data and code, and ends with the same metrics.
    Data-parallel on N processes: torchrun --nproc_per_node N -m stages.train (gloo on CPU, NCCL on GPU),
    with the weights replicated (train.parallel ddp) or sharded (fsdp).
    Exit codes: 0 done; 1 error (including train.max_nonfinite_steps non-finite steps in a row);
    130 stopped by Ctrl-C and 143 by SIGTERM, both after saving a checkpoint.
    """
    from stages.training import run_training

    run_training(params_path, data_stats, tokens_dir, tokenizer_dir, model_dir, reports_dir)


if __name__ == "__main__":
    run_as_program(train)
