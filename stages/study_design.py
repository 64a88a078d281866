"""Studies: a grid of experiments defined in one file, run as named DVC experiments, read back from MLflow.

A study file (docs/studies/NAME.yaml) holds the params every run sets, the cells (each a few more params; one
the reference the others are compared with), the seeds and the metrics to report. Each (cell, seed) is a
trial: one `dvc exp run` named NAME-CELL-sSEED whose params also carry study.name and study.cell, which the
train stage turns into the MLflow tags `study` and `study.cell`. A trial is complete when MLflow holds a
finished, evaluated run with those tags and the trial's params; the study command runs only the trials that
are not.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deepseek.errors import UserError, first_line
from stages import tracking
from stages.params import load_yaml, parse_params, read_params

if TYPE_CHECKING:
    from mlflow.entities import Run as MlflowRun

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # safe in a git ref, a shell and an MLflow filter
Scalar = bool | int | float | str
MetricValues = dict[str, dict[str, list[float]]]  # cell -> metric -> the values of the cell's runs, in seed order
# The evaluate stage's headline metric: a run that has it was trained and evaluated. Not every reported metric
# need exist in every cell (a model without multi-token prediction has no acceptance rate).
EVALUATED = "val.bits_per_character"
STUDY_KEYS = ("title", "description", "params", "cells", "reference", "seeds", "metrics", "curves")


@dataclass(frozen=True)
class Trial:
    """One run of a study: a cell's params with one seed."""

    study: str
    cell: str
    seed: int
    # Dotted params.yaml keys: the study's, the cell's, the seed and the study tags. Not part of the trial's identity.
    params: dict[str, Scalar] = field(compare=False)

    @property
    def name(self) -> str:
        """The DVC experiment's name."""
        return f"{self.study}-{self.cell}-s{self.seed}"


@dataclass(frozen=True)
class Study:
    name: str  # the study file's stem
    title: str
    description: str
    params: dict[str, Scalar]  # set on every run
    cells: dict[str, dict[str, Scalar]]  # cell name -> the params that make it differ
    seeds: list[int]
    metrics: dict[str, str]  # MLflow metric (or numeric tag) -> the report's column heading
    curves: list[str] = field(default_factory=list)  # metric histories the report plots by step
    reference: str = ""  # the cell the others are compared with: the file's `reference`, else its first cell

    def trials(self) -> list[Trial]:
        """Every (cell, seed), cells in the file's order."""
        return [
            Trial(
                self.name,
                cell,
                seed,
                self.params | values | {"seed": seed, "study.name": self.name, "study.cell": cell},
            )
            for cell, values in self.cells.items()
            for seed in self.seeds
        ]

    def tags(self, cell: str) -> dict[str, str]:
        """The params that tag a cell's runs in MLflow (the train stage makes them the tags study, study.cell)."""
        return {"study.name": self.name, "study.cell": cell}

    def cell_settings(self, cell: str) -> str:
        """What sets a cell apart, for the report: its params as KEY=VALUE."""
        return ", ".join(f"{key}={param_text(value)}" for key, value in self.cells[cell].items()) or "(none)"


def param_text(value: Scalar) -> str:
    """A param's value as params.yaml writes it (false, not False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_study(path: str | Path) -> Study:
    """The study at path, its every trial's params checked as params.yaml's are; UserError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: give the path of a study file, e.g. docs/studies/balancing.yaml")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {first_line(error)}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping with params, cells, seeds and metrics")
    unknown = sorted(set(values) - set(STUDY_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(STUDY_KEYS)}")
    base = read_params()
    study = Study(
        name=_name(path.stem, f"{path}: the file name"),
        title=str(values.get("title") or path.stem),
        description=str(values.get("description") or "").strip(),
        params=_params(values.get("params") or {}, f"{path}: params"),
        cells=_cells(values.get("cells"), path),
        seeds=_seeds(values.get("seeds"), path),
        metrics=_mapping_of_strings(values.get("metrics"), f"{path}: metrics"),
        curves=_list_of_strings(values.get("curves") or [], f"{path}: curves"),
        reference=_reference(values.get("reference"), values.get("cells"), path),
    )
    for trial in study.trials():
        _check_params(trial, base, path)
    return study


def _reference(reference: Any, cells: Any, path: Path) -> str:
    """The reference cell: one of the cells (their check comes first), the first one by default."""
    names = list(cells) if isinstance(cells, dict) else []
    if reference is None:
        return names[0] if names else ""
    if reference not in names:
        raise UserError(f"{path}: reference {reference!r} is none of the cells ({', '.join(map(str, names))})")
    return str(reference)


@dataclass(frozen=True)
class Difference:
    """A cell's mean minus the reference cell's, over seeds, and its standard error."""

    value: float
    standard_error: float | None  # None where a cell has a single run: no spread to judge by

    @property
    def established(self) -> bool:
        """Whether the difference exceeds twice its standard error (about 95% for a normal error): less than
        that, the seeds' noise alone could make it."""
        return self.standard_error is not None and abs(self.value) > 2 * self.standard_error


def difference(reference: list[float], other: list[float]) -> Difference:
    """other's mean minus reference's, with Welch's standard error sqrt(s_r^2 / n_r + s_o^2 / n_o)."""
    value = statistics.fmean(other) - statistics.fmean(reference)
    if len(reference) < 2 or len(other) < 2:
        return Difference(value, None)
    variance = statistics.variance(reference) / len(reference) + statistics.variance(other) / len(other)
    return Difference(value, math.sqrt(variance))


def _name(name: Any, what: str) -> str:
    # A name YAML reads as something else (no, 1e3) would come back from params.yaml as a bool or a number.
    if not (isinstance(name, str) and NAME_PATTERN.match(name) and isinstance(load_yaml(name), str)):
        raise UserError(
            f"{what} {name!r} must be letters, digits, '-' and '_', starting with a letter or digit, "
            "and not read as a number or a boolean"
        )
    return name


def _params(values: Any, what: str) -> dict[str, Scalar]:
    if not isinstance(values, dict):
        raise UserError(f"{what} must be a mapping of params.yaml keys (train.lr) to values")
    for key, value in values.items():
        if key == "seed" or str(key).startswith("study."):
            raise UserError(f"{what}: {key} is set by the study command (the seeds list, the study and cell)")
        if not isinstance(key, str) or "." not in key:
            raise UserError(f"{what}: {key!r} must be a dotted params.yaml key, e.g. train.max_steps")
        if not isinstance(value, Scalar):
            raise UserError(f"{what}: {key} = {value!r} must be a number, a string or true/false")
    return dict(values)


def _cells(values: Any, path: Path) -> dict[str, dict[str, Scalar]]:
    if not isinstance(values, dict) or not values:
        raise UserError(f"{path}: cells must be a non-empty mapping of cell names to their params")
    return {
        _name(cell, f"{path}: cell"): _params(params or {}, f"{path}: cell {cell}") for cell, params in values.items()
    }


def _seeds(values: Any, path: Path) -> list[int]:
    ok = isinstance(values, list) and values and all(isinstance(s, int) and not isinstance(s, bool) for s in values)
    if not ok or len(set(values)) != len(values) or min(values) < 0:
        raise UserError(f"{path}: seeds must be a non-empty list of different non-negative integers, e.g. [1, 2]")
    return list(values)


def _mapping_of_strings(values: Any, what: str) -> dict[str, str]:
    if not isinstance(values, dict) or not values or not all(isinstance(k, str) for k in values):
        raise UserError(f"{what} must be a non-empty mapping of MLflow metric names to column headings")
    return {key: str(heading or key) for key, heading in values.items()}


def _list_of_strings(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UserError(f"{what} must be a list of MLflow metric names")
    return values


def _check_params(trial: Trial, base: dict[str, Any], path: Path) -> None:
    """The trial's params applied to params.yaml's values (base) must pass the pipeline's own checks, before
    anything runs."""
    values = copy.deepcopy(base)
    for key, value in trial.params.items():
        section, _, name = key.partition(".")
        if name:
            values.setdefault(section, {})
            values[section][name] = value
        else:
            values[section] = value
    try:
        parse_params(values)
    except UserError as error:
        raise UserError(f"{path}: cell {trial.cell}, seed {trial.seed}: {error}") from None


def runs_of(study: Study) -> list[MlflowRun]:
    """The study's finished runs in MLflow, newest first."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # no store yet: nothing ran, and looking must not create one
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        return []
    query = f"tags.study = '{study.name}' and attributes.status = 'FINISHED'"
    return list(client.search_runs([experiment.experiment_id], query, max_results=5000, order_by=["start_time DESC"]))


def complete_runs(study: Study, runs: list[MlflowRun]) -> dict[Trial, MlflowRun]:
    """Each trial's newest complete run among runs: its tags and params are the trial's, and it was evaluated."""
    found: dict[Trial, MlflowRun] = {}
    for trial in study.trials():
        complete = (run for run in runs if _is_run_of(run, trial) and EVALUATED in run.data.metrics)
        if (run := next(complete, None)) is not None:  # runs are newest first
            found[trial] = run
    return found


def _is_run_of(run: MlflowRun, trial: Trial) -> bool:
    if run.data.tags.get("study.cell") != trial.cell:
        return False
    logged = run.data.params
    return all(
        key.startswith("study.") or (key in logged and load_yaml(logged[key]) == value)
        for key, value in trial.params.items()
    )


def _value(run: MlflowRun, name: str) -> float | None:
    """A run's metric, or a numeric tag (a fact of the model, such as its cache size)."""
    if name in run.data.metrics:
        return run.data.metrics[name]
    try:
        return float(run.data.tags[name])
    except (KeyError, ValueError):
        return None


def metric_values(study: Study, runs: dict[Trial, MlflowRun]) -> MetricValues:
    """cell -> metric -> the values of the cell's complete runs, in seed order."""
    values: MetricValues = {cell: {m: [] for m in study.metrics} for cell in study.cells}
    for trial, run in runs.items():
        for metric in study.metrics:
            value = _value(run, metric)
            if value is not None and math.isfinite(value):
                values[trial.cell][metric].append(value)
    return values


def curves(study: Study, runs: dict[Trial, MlflowRun], metric: str) -> dict[str, list[list[tuple[int, float]]]]:
    """cell -> one (step, value) history of metric per complete run, read from MLflow."""
    client = tracking.client()
    histories: dict[str, list[list[tuple[int, float]]]] = {cell: [] for cell in study.cells}
    for trial, run in runs.items():
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if points:
            histories[trial.cell].append(points)
    return histories
