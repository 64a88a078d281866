"""`deepseek study run` and `deepseek study report`: a study's trials as queued DVC experiments, and its report
from what MLflow holds (stages/study_design.py defines studies and trials)."""

from __future__ import annotations

import statistics
import subprocess
import time
from datetime import datetime
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import click

from deepseek.errors import UserError
from deepseek.files import write_text
from stages.options import report_user_errors
from stages.study_design import (
    MetricValues,
    Study,
    Trial,
    complete_runs,
    curves,
    difference,
    load_study,
    metric_values,
    param_text,
    runs_of,
)

if TYPE_CHECKING:
    from mlflow.entities import Run as MlflowRun

BEGIN = "<!-- begin: written by `deepseek study report`; edits between these lines are replaced -->"
END = "<!-- end: written by `deepseek study report` -->"

study_file = click.argument("study_path", metavar="STUDY_FILE", type=click.Path(dir_okay=False, path_type=Path))


@click.group()
def study() -> None:
    """Studies: a grid of experiments in a file (docs/studies/*.yaml), run with DVC and compared from MLflow."""


@study.command()
@study_file
@click.option(
    "-j",
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Experiments at once (dvc exp run --run-all -j). Each CPU training takes its share of the cores.",
)
@click.option("--dry-run", is_flag=True, help="Show which trials would run, and run nothing.")
@report_user_errors
def run(study_path: Path, jobs: int, dry_run: bool) -> None:
    """Queue every trial (cell x seed) not yet complete in MLflow as a named DVC experiment, and run the queue.

    \b
    Rerunning after an interruption or a failure runs only what is missing. Run from the project root; the
    experiments start from the workspace, as `dvc exp run --queue` does. The queue runs any experiment queued
    before, too.
    """
    plan = load_study(study_path)
    done = complete_runs(plan, runs_of(plan))
    todo = [trial for trial in plan.trials() if trial not in done]
    click.echo(f"study {plan.name}: {len(plan.trials())} trials, {len(done)} complete in MLflow, {len(todo)} to run")
    for trial in todo:
        click.echo(f"  {trial.name}")
    if dry_run or not todo:
        return
    seconds = _run_queue(todo, jobs)
    now_done = complete_runs(plan, runs_of(plan))
    failed = [trial for trial in todo if trial not in now_done]
    tokens = sum(now_done[t].data.metrics.get("final.tokens", 0) for t in todo if t in now_done)
    click.echo(
        f"{len(todo) - len(failed)} trials in {seconds / 60:.1f} min with -j {jobs}: "
        f"{tokens / seconds:,.0f} training tokens/s in aggregate, startup and evaluation included"
    )
    if failed:
        raise UserError(
            f"{len(failed)} trial(s) did not complete: {', '.join(t.name for t in failed)}; `dvc queue logs NAME` "
            "shows why, and rerunning this command runs them again"
        )


def _run_queue(trials: list[Trial], jobs: int) -> float:
    """Queue the trials and run DVC's queue, jobs at a time; returns the seconds it took."""
    from dvc.exceptions import DvcException

    try:
        _queue(trials)
    except DvcException as error:  # not a DVC repository, no commit yet, ...
        raise UserError(f"dvc cannot queue experiments here: {error}; run from the project's root") from None
    started = time.monotonic()
    subprocess.run(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], check=False)
    return time.monotonic() - started


def _queue(trials: list[Trial]) -> None:
    """`dvc exp run --queue` each trial, unless DVC has it queued or running already."""
    from dvc.repo import Repo

    with Repo() as repo:
        queue = repo.experiments.celery_queue
        pending = {entry.name for entry in chain(queue.iter_queued(), queue.iter_active())}
        existing = {name for name, _ in repo.experiments.ls().get(repo.scm.get_rev(), [])}
    for trial in trials:
        if trial.name in pending:
            continue
        command = ["dvc", "exp", "run", "--queue", "--name", trial.name]
        command += [f"--set-param={key}={_dvc_value(value)}" for key, value in trial.params.items()]
        # An experiment of this name that MLflow does not hold complete is this command's earlier try: replace it.
        command += ["--force"] if trial.name in existing else []
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"dvc could not queue {trial.name}: {(result.stderr or result.stdout).strip()}")


def _dvc_value(value: bool | int | float | str) -> str:
    """A value as `dvc exp run -S` reads it (Hydra's override grammar)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


@study.command()
@study_file
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where NAME.md and the NAME/ figures go [default: the study file's directory].",
)
@report_user_errors
def report(study_path: Path, out_dir: Path | None) -> None:
    """Write the study's table (mean and spread over seeds) and figures from the runs MLflow holds.

    \b
    Only the part of OUT_DIR/NAME.md between its two marker lines is replaced, so text written around it
    (conclusions) stays; the figures go to OUT_DIR/NAME/.
    """
    plan = load_study(study_path)
    out_dir = out_dir or study_path.parent
    runs = complete_runs(plan, runs_of(plan))
    if not runs:
        raise UserError(f"MLflow holds no complete run of study {plan.name}: run `deepseek study run {study_path}`")
    values = metric_values(plan, runs)
    unlogged = [metric for metric in plan.metrics if not any(values[cell][metric] for cell in plan.cells)]
    if unlogged:
        raise UserError(f"no run of study {plan.name} has {', '.join(unlogged)}: correct the metrics of {study_path}")
    from stages import figures  # matplotlib: imported for the drawing, not for `--help`

    figure_dir = out_dir / plan.name
    pictures = [figures.study_metrics(plan.cells, plan.metrics, values, figure_dir / "metrics.png")]
    for metric in plan.curves:
        histories = curves(plan, runs, metric)
        if not any(histories.values()):
            raise UserError(f"no run of study {plan.name} logged {metric!r} by step: correct its curves")
        pictures.append(figures.study_curves(metric, histories, figure_dir / f"{metric}.png"))
    block = _report_block(plan, study_path, runs, values, [p.relative_to(out_dir) for p in pictures])
    path = out_dir / f"{plan.name}.md"
    write_text(path, _replace_block(path.read_text() if path.exists() else _new_report(plan), block, path))
    click.echo(f"wrote {path} and {len(pictures)} figure(s) in {figure_dir}: {len(runs)} runs")


def _report_block(
    plan: Study, study_path: Path, runs: dict[Trial, MlflowRun], values: MetricValues, pictures: list[Path]
) -> str:
    """The generated part of the report: where the numbers come from, the table, the figures."""
    lines = [
        BEGIN,
        "",
        _provenance(plan, runs),
        "",
        f"Run it: `deepseek study run {study_path} -j 2`, then `deepseek study report {study_path}`. "
        f"In the MLflow UI (experiment `deepseek-repro`), type `tags.study = '{plan.name}'` in the search box.",
        "",
        *_table(plan, runs, values),
        "",
        "Each value is the mean ± the standard deviation over the cell's runs (one per seed).",
        "",
        *_differences(plan, values),
        "",
        *(f"![{picture.stem}]({picture.as_posix()})" for picture in pictures),
        "",
        END,
    ]
    return "\n".join(lines)


def _provenance(plan: Study, runs: dict[Trial, MlflowRun]) -> str:
    """How many runs, when, on what machine, from which commit, with which params."""
    started = sorted(datetime.fromtimestamp(run.info.start_time / 1000) for run in runs.values())
    machines = sorted({run.data.tags.get("machine", "unknown machine") for run in runs.values()})
    commits = {run.data.tags.get("git_commit", "unknown")[:7] for run in runs.values()}  # the experiments' baseline
    torches = sorted({run.data.tags.get("env.torch", "not recorded") for run in runs.values()})
    precisions = sorted({_precision(run) for run in runs.values()})
    settings = ", ".join(f"`{key}={param_text(value)}`" for key, value in plan.params.items())
    return (
        f"{len(runs)} of {len(plan.trials())} runs ({len(plan.cells)} cells, seeds {', '.join(map(str, plan.seeds))}), "
        f"{started[0]:%Y-%m-%d %H:%M} to {started[-1]:%Y-%m-%d %H:%M}, on {'; '.join(machines)}, "
        f"torch {'; '.join(torches)}, {'; '.join(precisions)}, git commit {', '.join(sorted(commits))}. "
        f"Every run sets {settings or 'nothing beyond params.yaml'}."
    )


def _precision(run: MlflowRun) -> str:
    """How the run computed, and why: the reason names the CPU's native bf16 units, which its model name may not."""
    tags = run.data.tags
    precision = tags.get("train.precision", "precision not recorded")
    return f"{precision} ({tags['train.precision_reason']})" if "train.precision_reason" in tags else precision


def _table(plan: Study, runs: dict[Trial, MlflowRun], values: MetricValues) -> list[str]:
    """A Markdown row per cell: its settings, its number of runs, and each metric's mean ± sd over them."""
    header = ["cell", "settings", "runs", *plan.metrics.values()]
    rows = [
        [f"`{cell}`", plan.cell_settings(cell), str(sum(trial.cell == cell for trial in runs))]
        + [_spread(values[cell][metric]) for metric in plan.metrics]
        for cell in plan.cells
    ]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---", "---", "---:"] + ["---:"] * len(plan.metrics)) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _differences(plan: Study, values: MetricValues) -> list[str]:
    """A row per other cell and metric: its difference from the reference cell, the difference's standard error
    over the seeds, and whether it exceeds twice that: what the seeds can show, for the conclusions to keep to."""
    reference = values[plan.reference]
    rows = []
    for cell in plan.cells:
        for metric, heading in plan.metrics.items():
            if cell == plan.reference or not reference[metric] or not values[cell][metric]:
                continue
            found = difference(reference[metric], values[cell][metric])
            error = "-" if found.standard_error is None else f"{found.standard_error:.2g}"
            verdict = "yes" if found.established else "no" if found.standard_error is not None else "no (one run)"
            rows.append(f"| `{cell}` | {heading} | {found.value:+.4g} | {error} | {verdict} |")
    if not rows:
        return []
    return [
        f"Against the reference cell `{plan.reference}`: each cell's mean minus the reference's, the standard error",
        "of that difference over the seeds (Welch's), and whether the difference exceeds twice it. Where it does",
        "not, the seeds' own spread could have made it: the study does not establish it.",
        "",
        "| cell | metric | difference | standard error | beyond 2 standard errors |",
        "| --- | --- | ---: | ---: | --- |",
        *rows,
    ]


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def _new_report(plan: Study) -> str:
    return f"# {plan.title}\n\n{plan.description}\n\n{BEGIN}\n{END}\n"


def _replace_block(text: str, block: str, path: Path) -> str:
    """text with its generated block replaced; a report whose markers were removed is not overwritten."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise UserError(f"{path} lacks the report's two marker lines (or repeats them): restore them, or move it away")
    return text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
