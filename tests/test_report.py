"""`deepseek report --against REF`: the params that differ, every metric from both metrics files with the gate's
verdict, both loss curves in one figure, and the environments' differences; REF a git ref or an MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml

from pipeline_utils import ROOT, run

OLD = {"bits_per_character": 2.1, "loss": 3.3, "max_vio": 0.2}
NEW = {"bits_per_character": 2.15, "loss": 3.35, "max_vio": 0.1}  # 0.05 worse in bits/char: over the +0.02


def write_run(repo: Path, lr: float, metrics: dict[str, float], losses: list[float], run_id: str | None) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["lr"] = lr
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reports = repo / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps({"val": metrics}))
    rows = "".join(f"{10 * (i + 1)},{loss}\n" for i, loss in enumerate(losses))
    (reports / "train_log.csv").write_text("step,loss\n" + rows)
    if run_id is not None:
        (reports / "mlflow_run.json").write_text(json.dumps({"run_id": run_id}))


def report(repo: Path, ref: str, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    command = [sys.executable, "-m", "stages.cli", "report", "--against", ref, *extra]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)


def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "tolerances.yaml", repo / ".ci" / "tolerances.yaml")
    run(["git", "init", "-q"], repo)
    write_run(repo, 0.003, OLD, [6.0, 4.0, 3.5], None)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first"], repo)
    write_run(repo, 0.001, NEW, [6.0, 4.5, 3.6], None)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "a params change"], repo)
    return repo


def test_a_params_change_against_the_previous_commit(tmp_path):
    repo = git_repo(tmp_path)
    result = report(repo, "HEAD~1")
    assert result.returncode == 0, result.stderr
    out = repo / "reports" / "comparison"
    text = (out / "comparison.md").read_text()
    assert text.startswith("# `workspace` against `HEAD~1`")
    params = text.split("## Params that differ")[1].split("##")[0]
    assert params.strip().splitlines()[2:] == ["| train.lr | `0.003` | `0.001` |"]  # that one, and only it
    for name, old in OLD.items():  # both runs' numbers, as the metrics files hold them
        new = NEW[name]
        assert f"| val.{name} | {old:.4f} | {new:.4f} | {new - old:+.4f} |" in text
    assert "| bits_per_character | 2.1000 | 2.1500 | <= 2.1200 (+0.02) | FAIL |" in text
    assert "| max_vio | 0.2000 | 0.1000 | <= 0.3500 (+0.15) | PASS |" in text
    assert "![training loss of both runs](loss.png)" in text
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert "Not recorded for HEAD~1 and workspace" in text
    # Run again: it replaces its own report; a folder of other files it refuses, in one line.
    assert report(repo, "HEAD~1").returncode == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = report(repo, "HEAD~1", "--out", str(tmp_path / "mine"))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_an_unknown_ref_is_one_line(tmp_path):
    result = report(git_repo(tmp_path), "no-such-branch")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: no-such-branch is neither a git ref here nor an MLflow run id of this tracking store"
    )


def test_against_an_mlflow_run_with_another_environment(tmp_path):
    repo = git_repo(tmp_path)
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.create_experiment("deepseek-repro")

    def logged_run(name: str, torch_version: str, metrics: dict[str, float], losses: list[float]) -> str:
        run_id = client.create_run(experiment, run_name=name, tags={"env.torch": torch_version}).info.run_id
        client.log_param(run_id, "train.lr", "0.003")
        for key, value in metrics.items():
            client.log_metric(run_id, f"val.{key}", value)
        client.log_metric(run_id, "val.max_vio/layer_1", 0.5)  # per layer: not in metrics.json
        for step, loss in enumerate(losses, start=1):
            client.log_metric(run_id, "loss", loss, step=10 * step)
        return run_id

    theirs = logged_run("yesterday", "2.12.0", OLD, [6.0, 4.0])
    ours = logged_run("today", "2.13.0", NEW, [6.0, 4.5])
    write_run(repo, 0.001, NEW, [6.0, 4.5, 3.6], ours)
    result = report(repo, theirs)
    assert result.returncode == 0, result.stderr
    text = (repo / "reports" / "comparison" / "comparison.md").read_text()
    assert text.startswith("# `workspace` against `yesterday`")
    assert "| env.torch | `2.12.0` | `2.13.0` |" in text
    assert "| val.bits_per_character | 2.1000 | 2.1500 | +0.0500 |" in text
    assert "layer_1" not in text
