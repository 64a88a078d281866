"""The environment of a run: recorded in MLflow (versions, the lock's hash, the machine, pip freeze, system
metrics, the registered model's pinned requirements) and beside every model and checkpoint, whose loading says
in one line when torch or transformers differ."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlflow
import pytest
import torch

from deepseek.checkpoint import ENVIRONMENT, list_checkpoints
from deepseek.cpu import cpu_model
from deepseek.versions import difference, versions
from stages.environment import LOCK_FILE
from stages.tracking import SYSTEM_METRICS_INTERVAL_S, SYSTEM_METRICS_SAMPLES

from pipeline_utils import ROOT, stage_workspace
from training_runs import finish

OLD_TORCH = "2.0.1"


def test_a_difference_in_torch_or_transformers_is_one_line_and_others_are_not_worth_one():
    here = versions()
    assert difference(here, "model/final") is None
    assert difference(here | {"numpy": "1.0.0", "mlflow": "2.0.0"}, "model/final") is None  # they compute nothing
    message = difference(here | {"torch": OLD_TORCH}, "model/final")
    assert message == (
        f"model/final was made with torch {OLD_TORCH} (here {here['torch']}): its numbers may differ here in the "
        "last digits"
    )
    both = difference({"torch": OLD_TORCH, "transformers": "4.0.0"}, "x")
    assert both is not None and both.count("(here") == 2


def test_system_metrics_log_a_point_at_least_every_minute():
    assert SYSTEM_METRICS_INTERVAL_S * SYSTEM_METRICS_SAMPLES <= 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny training with checkpoints at steps 2 and 4, the project's lock file beside it, and system metrics
    sampled often enough (MLflow's own setting) to show within its seconds."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        path = stage_workspace(tmp_path_factory.mktemp("env"), monkeypatch, max_steps=4, checkpoint_interval=2)
        shutil.copy(ROOT / LOCK_FILE, path / LOCK_FILE)
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
        monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
        finish(path)
    return path


@pytest.mark.slow
def test_the_run_records_its_environment_and_system_metrics(trained, tmp_path):
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = json.loads((trained / "reports" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    tags = run.data.tags
    for name in ("torch", "transformers", "dvc", "mlflow"):
        assert tags[f"env.{name}"] == metadata.version(name)
    assert tags["env.python"] == ".".join(map(str, sys.version_info[:3]))
    assert tags["env.lock_sha256"] == hashlib.sha256((ROOT / LOCK_FILE).read_bytes()).hexdigest()
    assert tags["env.cpu"] == cpu_model() and tags["env.cpu_flags"]
    freeze = Path(client.download_artifacts(run_id, "environment/pip-freeze.txt", str(tmp_path))).read_text()
    assert f"mlflow=={metadata.version('mlflow')}" in freeze.splitlines()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= point.value <= 100 for point in history)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    # The registered model is served with this run's versions.
    mlflow.set_tracking_uri(uri)
    model_uri = f"runs:/{run_id}/model"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text().splitlines()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"transformers=={metadata.version('transformers')}" in requirements


def run_quietly(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_a_model_of_another_torch_loads_with_a_one_line_warning(trained):
    record = trained / "model" / "final" / ENVIRONMENT
    assert json.loads(record.read_text()) == versions()
    command = [sys.executable, "-m", "stages.cli", "generate", "ROMEO:", "--max-new-tokens", "4", "--temperature", "0"]
    quiet = run_quietly(command, trained)
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr
    recorded = json.loads(record.read_text())
    record.write_text(json.dumps(recorded | {"torch": OLD_TORCH}))
    try:
        warned = run_quietly(command, trained)
    finally:
        record.write_text(json.dumps(recorded))
    assert warned.returncode == 0 and warned.stdout == quiet.stdout  # a warning, not a refusal
    (line,) = [line for line in warned.stderr.splitlines() if "was made with" in line]
    assert line == (
        f"Warning: model/final was made with torch {OLD_TORCH} (here {torch.__version__}): its numbers may differ "
        "here in the last digits"
    )


@pytest.mark.slow
def test_a_checkpoint_of_another_torch_resumes_with_a_one_line_warning(trained, monkeypatch):
    monkeypatch.chdir(trained)
    older, latest = list_checkpoints(trained / "model" / "checkpoints")
    shutil.rmtree(latest)  # the training stopped after step 2
    info = json.loads((older / "checkpoint.json").read_text())
    assert info["environment"] == versions()
    info["environment"]["torch"] = OLD_TORCH
    (older / "checkpoint.json").write_text(json.dumps(info))
    output = finish(trained)
    assert "resuming from" in output
    assert f"{older.name} was made with torch {OLD_TORCH} (here {torch.__version__})" in output
