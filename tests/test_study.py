"""Studies: trials queued as named DVC experiments, complete when MLflow holds them, reported from MLflow."""

from __future__ import annotations

import re
import shlex
import statistics
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from deepseek.errors import UserError
from stages import study_design
from stages.cli import main
from stages.study import BEGIN, END
from stages.tracking import EXPERIMENT

from documented import study_commands
from pipeline_utils import ROOT, make_pipeline_repo, run

TINY_STUDY: dict[str, Any] = {
    "title": "Two learning rates",
    "description": "What a faster learning rate does in four steps.",
    "params": {"train.max_steps": 4, "mlflow.register_model": False},
    "cells": {"fast": {"train.lr": 3.0e-3}, "slow": {"train.lr": 1.0e-3}},
    "seeds": [1],
    "metrics": {"val.bits_per_character": "bits/char", "val.max_vio": "MaxVio"},
    "curves": ["loss"],
}


def write_study(directory: Path, name: str = "tiny", **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(TINY_STUDY | changes, sort_keys=False))
    return path


def study_runs(repo: Path, name: str) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], f"tags.study = '{name}'")


def table_rows(report: str) -> list[list[str]]:
    """The report's first table's body, one list of cells per row."""
    lines = [line for line in report.split("Against the reference cell")[0].splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def documented_study_commands(study: Path) -> tuple[list[str], list[str]]:
    """docs/studies/README.md's two commands (test_docs leaves them to this test), on study in place of theirs."""
    run_study, report = (
        [str(study) if arg.endswith(".yaml") else arg for arg in shlex.split(code)]
        for code in study_commands(ROOT / "docs" / "studies" / "README.md")
    )
    assert run_study[:3] == ["deepseek", "study", "run"] and str(study) in run_study, run_study
    assert report == ["deepseek", "study", "report", str(study)], report
    return run_study, report


@pytest.mark.slow
def test_a_study_runs_each_trial_once_and_reports_what_mlflow_holds(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo")
    study = write_study(tmp_path / "studies")
    run_study, report_study = documented_study_commands(study)

    first = run(run_study, repo)
    assert "2 trials, 0 complete in MLflow, 2 to run" in first.stdout
    runs = study_runs(repo, "tiny")
    assert sorted(r.data.tags["study.cell"] for r in runs) == ["fast", "slow"]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.params["seed"] == "1" and r.data.params["train.max_steps"] == "4"
        assert float(r.data.params["train.lr"]) == TINY_STUDY["cells"][r.data.tags["study.cell"]]["train.lr"]
        assert r.info.run_name == f"tiny-{r.data.tags['study.cell']}-s1"  # the DVC experiment's name

    run(report_study, repo)
    report = (tmp_path / "studies" / "tiny.md").read_text()
    by_cell = {r.data.tags["study.cell"]: r.data.metrics for r in runs}
    assert table_rows(report) == [
        [f"`{cell}`", f"train.lr={TINY_STUDY['cells'][cell]['train.lr']}", "1"]
        + [f"{by_cell[cell][metric]:.4g}" for metric in ("val.bits_per_character", "val.max_vio")]
        for cell in ("fast", "slow")
    ]
    assert "tags.study = 'tiny'" in report
    assert (tmp_path / "studies" / "tiny" / "metrics.png").stat().st_size > 0
    assert (tmp_path / "studies" / "tiny" / "loss.png").stat().st_size > 0

    again = run(["deepseek", "study", "run", str(study)], repo)
    assert "2 complete in MLflow, 0 to run" in again.stdout
    assert len(study_runs(repo, "tiny")) == 2

    # An interrupted study: one run gone from MLflow is queued again (its DVC experiment replaced), the other not.
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    slow = next(r for r in runs if r.data.tags["study.cell"] == "slow")
    client.delete_run(slow.info.run_id)
    resumed = run(["deepseek", "study", "run", str(study)], repo)
    assert "1 complete in MLflow, 1 to run\n  tiny-slow-s1\n" in resumed.stdout
    assert sorted(r.data.tags["study.cell"] for r in study_runs(repo, "tiny")) == ["fast", "slow"]
    assert run(["git", "branch", "--show-current"], repo).stdout.strip() == "master"  # HEAD not left detached


def test_the_report_keeps_what_was_written_around_its_table(tmp_path):
    from stages.study import _replace_block

    text = f"# Title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Conclusions\n\nhand-written\n"
    new = _replace_block(text, f"{BEGIN}\nnew table\n{END}", tmp_path / "x.md")
    assert new == f"# Title\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\n## Conclusions\n\nhand-written\n"
    with pytest.raises(UserError, match="marker lines"):
        _replace_block("# a report whose markers were deleted\n", "block", tmp_path / "x.md")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cells": {}}, "cells must be a non-empty mapping"),
        ({"cells": {"no": {}}}, "cell 'no' must be letters"),  # YAML would read it back as false
        ({"cells": {"a b": {}}}, "cell 'a b' must be letters"),
        ({"seeds": [1, 1]}, "seeds must be a non-empty list of different"),
        ({"params": {"seed": 3}}, "seed is set by the study command"),
        ({"params": {"train.max_steps": [1, 2]}}, "must be a number, a string or true/false"),
        ({"params": {"train.max_stepz": 4}}, "cell fast, seed 1: params train.max_stepz is not a known key"),
        ({"cells": {"fast": {"train.lr": -1.0}}}, "cell fast, seed 1: params train.lr"),
        ({"metrics": []}, "metrics must be a non-empty mapping"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_a_bad_study_file_is_refused_before_anything_runs(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the project's params.yaml
    with pytest.raises(UserError, match=re.escape(message)):
        study_design.load_study(write_study(tmp_path, **changes))


def test_trials_are_every_cell_with_every_seed_tagged_with_the_study(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    study = study_design.load_study(write_study(tmp_path, seeds=[1, 2]))
    trials = study.trials()
    assert [t.name for t in trials] == ["tiny-fast-s1", "tiny-fast-s2", "tiny-slow-s1", "tiny-slow-s2"]
    assert trials[1].params == {
        "train.max_steps": 4,
        "mlflow.register_model": False,
        "train.lr": 3.0e-3,
        "seed": 2,
        "study.name": "tiny",
        "study.cell": "fast",
    }


def test_a_trial_is_complete_only_with_its_params_and_every_metric(tmp_path, monkeypatch):
    """What MLflow holds decides: a run of other params (the study file changed since), or one that was not
    evaluated, does not count."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where the study commands look
    study = study_design.load_study(write_study(tmp_path))
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())

    def logged_run(cell: str, params: dict[str, str], metrics: dict[str, float]) -> str:
        created = client.create_run(experiment, tags={"study": "tiny", "study.cell": cell})
        for key, value in params.items():
            client.log_param(created.info.run_id, key, value)
        for key, number in metrics.items():
            client.log_metric(created.info.run_id, key, number)
        client.set_terminated(created.info.run_id)
        return created.info.run_id

    fast = {"seed": "1", "train.max_steps": "4", "mlflow.register_model": "False", "train.lr": "0.003"}
    both = {"val.bits_per_character": 2.5, "val.max_vio": 0.3}
    complete = logged_run("fast", fast, both)
    logged_run("fast", fast | {"train.max_steps": "8"}, both)  # newer, but of other params
    logged_run("slow", fast | {"train.lr": "0.001"}, {"loss": 3.0})  # trained, not evaluated

    found = study_design.complete_runs(study, study_design.runs_of(study))
    assert {trial.name: r.info.run_id for trial, r in found.items()} == {"tiny-fast-s1": complete}


def test_the_report_says_which_differences_the_seeds_establish(tmp_path, monkeypatch):
    """Synthetic runs: cell `near` differs from the reference by less than the seeds' spread (not established),
    `far` by many standard errors (established), `alone` has one run (nothing to judge by)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cells = {"base": {"train.lr": 3.0e-3}, "near": {"train.lr": 2.0e-3}, "far": {"train.lr": 1.0e-3}}
    cells["alone"] = {"train.lr": 5.0e-4}
    path = write_study(tmp_path / "studies", cells=cells, seeds=[1, 2, 3], reference="base", curves=[])
    study = study_design.load_study(path)
    bits = {"base": [2.50, 2.52, 2.48], "near": [2.51, 2.49, 2.53], "far": [2.30, 2.31, 2.29], "alone": [2.4]}
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    for trial in study.trials():
        if trial.seed > len(bits[trial.cell]):
            continue
        tags = {"study": "tiny", "study.cell": trial.cell, "env.torch": "2.13.0", "train.precision": "float32"}
        tags["train.precision_reason"] = "train.dtype auto: this CPU has no native bf16"
        created = client.create_run(experiment, tags=tags)
        run_id = created.info.run_id
        for key, value in trial.params.items():
            client.log_param(run_id, key, study_design.param_text(value))
        client.log_metric(run_id, "val.bits_per_character", bits[trial.cell][trial.seed - 1])
        client.log_metric(run_id, "val.max_vio", 0.3)
        client.set_terminated(run_id)

    result = CliRunner().invoke(main, ["study", "report", str(path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "studies" / "tiny.md").read_text()
    assert "Against the reference cell `base`" in report and "torch 2.13.0" in report
    assert "float32 (train.dtype auto: this CPU has no native bf16)" in report
    differences = report.split("Against the reference cell")[1]
    rows = {(row[0], row[1]): row[2:] for row in table_rows(differences)}
    near_error = (statistics.variance(bits["base"]) / 3 + statistics.variance(bits["near"]) / 3) ** 0.5
    assert rows[("`near`", "bits/char")] == ["+0.01", f"{near_error:.2g}", "no"]  # 0.01 < 2 x 0.016
    assert rows[("`far`", "bits/char")][0] == "-0.2" and rows[("`far`", "bits/char")][2] == "yes"
    assert rows[("`alone`", "bits/char")] == ["-0.1", "-", "no (one run)"]
    assert rows[("`near`", "MaxVio")] == ["+0", "0", "no"]  # identical values: no difference to establish
