"""`deepseek report --against REF`: this workspace's run against another, as Markdown a reviewer reads in a pull
request (docs/environment.md).

A run is what the pipeline leaves in git: params.yaml, reports/metrics.json (the DVC metrics),
reports/train_log.csv (the loss curve) and reports/mlflow_run.json, whose MLflow run holds the environment
(its env.* tags). REF is a git ref (read with `git show`) or an MLflow run id (read from the tracking store).
The report says which params differ, compares every metric as `dvc metrics diff` does with the regression
gate's verdict where .ci/tolerances.yaml has a tolerance, draws both loss curves in one figure, and lists the
environment's differences.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from deepseek.errors import UserError
from deepseek.files import DirectoryKind, replacing_dir
from stages.comparison import TOLERANCES, compare, render
from stages.options import report_user_errors
from stages.params import PARAMS_FILE, load_yaml

REPORT = "comparison.md"
FIGURE = "loss.png"
REPORT_DIR = DirectoryKind("deepseek report", frozenset({REPORT, FIGURE}), REPORT)
METRICS = "reports/metrics.json"
TRAIN_LOG = "reports/train_log.csv"
RUN_FILE = "reports/mlflow_run.json"
WORKSPACE = "workspace"
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Run:
    """One side of the comparison."""

    name: str
    params: dict[str, Any]  # flattened: {"train.lr": 0.003}
    metrics: dict[str, float]  # flattened metrics.json: {"val.bits_per_character": 2.1}
    losses: list[tuple[int, float]]  # (step, training loss)
    environment: dict[str, str]  # the MLflow run's env.* tags; {} where none is recorded


@click.command()
@click.option("--against", "ref", required=True, metavar="REF", help="A git ref (HEAD~1, main) or an MLflow run id.")
@click.option(
    "--out",
    default="reports/comparison",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Folder for {REPORT} and {FIGURE} (replaced only if an earlier report wrote it).",
)
@report_user_errors
def report(ref: str, out: Path) -> None:
    """Compare this workspace's run (params, metrics, loss curve, environment) with REF's, in Markdown."""
    theirs, ours = run_at(ref), workspace_run()
    tolerances = load_yaml(TOLERANCES.read_text()) if TOLERANCES.exists() else {}
    with replacing_dir(out, REPORT_DIR) as tmp:
        from stages import figures

        figures.compared_losses({theirs.name: theirs.losses, ours.name: ours.losses}, tmp / FIGURE)
        (tmp / REPORT).write_text(markdown(theirs, ours, tolerances))
    click.echo(f"wrote {out / REPORT} and {out / FIGURE}")


def markdown(theirs: Run, ours: Run, tolerances: dict[str, Any]) -> str:
    """The report: params that differ, every metric with its change and verdict, the figure, the environment."""
    sections = [
        f"# `{ours.name}` against `{theirs.name}`",
        "## Params that differ\n\n" + _differences(theirs.params, ours.params, theirs.name, ours.name, "param"),
        "## Metrics\n\n" + metrics_table(theirs, ours),
        "## Regression gate (.ci/tolerances.yaml)\n\n" + _verdicts(theirs, ours, tolerances),
        f"## Loss curves\n\n![training loss of both runs]({FIGURE})",
        "## Environment\n\n" + _environment(theirs, ours),
    ]
    return "\n\n".join(sections) + "\n"


def metrics_table(theirs: Run, ours: Run) -> str:
    """Every metric of either run, as `dvc metrics diff` shows them: both values and the change."""
    lines = [f"| metric | {theirs.name} | {ours.name} | change |", "| --- | ---: | ---: | ---: |"]
    for name in sorted(theirs.metrics.keys() | ours.metrics.keys()):
        old, new = theirs.metrics.get(name), ours.metrics.get(name)
        change = f"{new - old:+.4f}" if old is not None and new is not None else "-"
        lines.append(f"| {name} | {_number(old)} | {_number(new)} | {change} |")
    return "\n".join(lines)


def _verdicts(theirs: Run, ours: Run, tolerances: dict[str, Any]) -> str:
    """The gate's rule on the metrics it has a tolerance for, REF's value as the baseline."""
    rows = compare(_val_metrics(theirs), _val_metrics(ours), tolerances)
    if not rows:
        return "No metric of both runs has a tolerance."
    return render(rows, theirs.name, ours.name)


def _val_metrics(run: Run) -> dict[str, float]:
    """metrics.json's validation metrics under the gate's names (val.bits_per_character -> bits_per_character)."""
    return {name.removeprefix("val."): value for name, value in run.metrics.items() if name.startswith("val.")}


def _environment(theirs: Run, ours: Run) -> str:
    if not theirs.environment or not ours.environment:
        missing = " and ".join(run.name for run in (theirs, ours) if not run.environment)
        return f"Not recorded for {missing} (no MLflow run with env.* tags in this tracking store)."
    table = _differences(theirs.environment, ours.environment, theirs.name, ours.name, "tag")
    return table if "|" in table else "The same versions, lock file and machine."


def _differences(old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str, what: str) -> str:
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if not changed:
        return f"None: every {what} is the same."
    lines = [f"| {what} | {old_name} | {new_name} |", "| --- | --- | --- |"]
    lines += [f"| {key} | {_cell(old.get(key))} | {_cell(new.get(key))} |" for key in changed]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else f"`{value}`"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# --- reading a run ----------------------------------------------------------------------------------------------


def workspace_run() -> Run:
    """The run whose outputs are in this working tree."""
    return _run_from_files(WORKSPACE, lambda path: Path(path).read_text() if Path(path).is_file() else None)


def run_at(ref: str) -> Run:
    """REF's run: an MLflow run id the tracking store holds, else a git ref's committed outputs."""
    if MLFLOW_RUN_ID.fullmatch(ref) and (run := _mlflow_run(ref)) is not None:
        return run
    verified = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], capture_output=True)
    if verified.returncode != 0:
        raise UserError(f"{ref} is neither a git ref here nor an MLflow run id of this tracking store")
    return _run_from_files(ref, lambda path: _git_show(ref, path))


def _run_from_files(name: str, read: Any) -> Run:
    """A run from its params, metrics, loss log and MLflow run file, as read(path) gives them (None if absent)."""
    from stages.tracking import flatten

    texts = {path: read(path) for path in (PARAMS_FILE, METRICS, TRAIN_LOG, RUN_FILE)}
    for path in (PARAMS_FILE, METRICS):
        if texts[path] is None:
            raise UserError(f"{name} has no {path}: compare runs whose pipeline ran (dvc repro) and was committed")
    losses = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(io.StringIO(texts[TRAIN_LOG] or ""))]
    run_id = json.loads(texts[RUN_FILE]).get("run_id") if texts[RUN_FILE] else None
    return Run(
        name=name,
        params=flatten(load_yaml(texts[PARAMS_FILE]) or {}),
        metrics={key: float(value) for key, value in flatten(json.loads(texts[METRICS])).items()},
        losses=losses,
        environment=_environment_tags(run_id),
    )


def _git_show(ref: str, path: str) -> str | None:
    shown = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def _environment_tags(run_id: str | None) -> dict[str, str]:
    """The env.* tags of an MLflow run; {} where the store does not have it."""
    if run_id is None:
        return {}
    from mlflow.exceptions import MlflowException

    from stages.tracking import client

    try:
        tags = client().get_run(run_id).data.tags
    except MlflowException:
        return {}
    return {key: value for key, value in tags.items() if key.startswith("env.")}


def _mlflow_run(run_id: str) -> Run | None:
    """An MLflow run as a Run: its params, its val.* metrics, its training loss history; None if not in the store."""
    from mlflow.exceptions import MlflowException

    from stages.tracking import client

    mlflow_client = client()
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        return None
    history = mlflow_client.get_metric_history(run_id, "loss")
    return Run(
        name=run.info.run_name or run_id,
        params=dict(run.data.params),
        metrics={key: value for key, value in run.data.metrics.items() if _in_metrics_file(key)},
        losses=sorted((point.step, point.value) for point in history),
        environment={key: value for key, value in run.data.tags.items() if key.startswith("env.")},
    )


def _in_metrics_file(key: str) -> bool:
    """Whether an MLflow metric of the evaluate stage is one of metrics.json's (it also logs the token count and
    each layer's MaxVio)."""
    return key.startswith("val.") and "/" not in key and key != "val.tokens"
