"""The pipeline against a real `mlflow server`: everything lands in the server, and a server that dies mid-training
costs the tracking only, never the pipeline's outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from mlflow_server import MlflowServer, mlflow_server
from pipeline_utils import STAGES, make_pipeline_repo, pipeline_env, run, set_params, stages_run

PIPELINE_TIMEOUT = 600


@pytest.fixture
def server(tmp_path) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path / "server") as started:
        yield started


@pytest.mark.slow
def test_pipeline_logs_params_metrics_and_artifacts_to_a_tracking_server(tmp_path, server, monkeypatch):
    repo = make_pipeline_repo(tmp_path / "repo")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # pipeline_utils.run passes os.environ on

    result = run(["dvc", "repro"], repo)
    assert stages_run(result.stdout) == set(STAGES)
    output = result.stdout + result.stderr
    assert "MLflow tracking" not in output, output

    run_id = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    assert run_id
    experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="deepseek-repro")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment  # proxied by the server
    found = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]

    info_and_data = server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    info, data = info_and_data["info"], info_and_data["data"]
    assert info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert float(params["train.lr"]) == 3e-3 and params["model.preset"] == "tiny"
    assert params["train.max_steps"] == "6"
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert 0 < metrics["val.bits_per_character"] < 8
    assert metrics["final.train_loss"] > 0
    tags = {t["key"]: t["value"] for t in data.get("tags", [])}
    assert int(tags["model.parameters.total"]) > int(tags["model.parameters.active"]) > 0
    assert tags["git_commit"] == run(["git", "rev-parse", "HEAD"], repo).stdout.strip()

    history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted(m["step"] for m in history) == [2, 4, 6]  # log_interval 2, max_steps 6
    assert all(m["value"] > 0 for m in history)
    val_history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="val_loss_sampled")[
        "metrics"
    ]
    assert sorted(m["step"] for m in val_history) == [3, 6]

    def listed(path: str = "") -> dict[str, dict]:
        files = server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"]: f for f in files}

    top = listed()
    for folder in ("checkpoint", "checkpoints", "samples", "tokenizer", "figures"):
        assert top.get(folder, {}).get("is_dir"), f"no {folder}/ among the run's artifacts: {sorted(top)}"
    assert {"params.yaml", "dvc.lock", "expert_load.csv"} <= set(top)
    checkpoint = listed("checkpoint")
    assert {"checkpoint/model.safetensors", "checkpoint/config.json"} <= set(checkpoint)
    local_weights = (repo / "model" / "final" / "model.safetensors").read_bytes()
    assert int(checkpoint["checkpoint/model.safetensors"]["file_size"]) == len(local_weights)
    assert {"samples/samples.json", "samples/samples.md"} <= set(listed("samples"))

    # params.yaml mlflow: the final model is registered, and the alias points at this run's version.
    version = server.get("/api/2.0/mlflow/registered-models/alias", name="deepseek-repro", alias="candidate")
    assert version["model_version"]["run_id"] == run_id

    # The bytes come back over HTTP through the artifact proxy, equal to the DVC-tracked model.
    artifact_path = info["artifact_uri"].removeprefix("mlflow-artifacts:").lstrip("/")
    downloaded = server.download(f"/api/2.0/mlflow-artifacts/artifacts/{artifact_path}/checkpoint/model.safetensors")
    assert downloaded == local_weights
    samples = json.loads(server.download(f"/api/2.0/mlflow-artifacts/artifacts/{artifact_path}/samples/samples.json"))
    assert len(samples["samples"]) == 5


STEP_LINE = re.compile(r"step\s+(\d+) \| loss")


@pytest.mark.slow
def test_pipeline_completes_when_the_tracking_server_dies_mid_training(tmp_path, server, monkeypatch):
    repo = make_pipeline_repo(tmp_path / "repo")
    max_steps = 60
    set_params(
        repo,
        train={
            "max_steps": max_steps,
            "log_interval": 1,
            "eval_interval": 10,
            "sample_interval": 60,
            "checkpoint_interval": 20,
        },
    )
    run(["git", "commit", "-qam", "longer training"], repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)

    # Progress goes through tqdm to stderr, step lines to stdout: read both, merged, as they come.
    process = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=pipeline_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    lines: list[str] = []
    at_step_3 = threading.Event()
    done_reading = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            found = STEP_LINE.search(line)
            if found and int(found.group(1)) >= 3:
                at_step_3.set()
        done_reading.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + PIPELINE_TIMEOUT
        while not at_step_3.wait(timeout=0.1) and not done_reading.is_set() and time.monotonic() < deadline:
            pass
        if not at_step_3.is_set():
            pytest.fail("training never reached step 3:\n" + "".join(lines)[-5000:])
        killed_after = len(lines)  # everything before this was printed while the server was up
        server.kill()
        try:
            returncode = process.wait(timeout=PIPELINE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"dvc repro did not finish within {PIPELINE_TIMEOUT} s after the server died:\n"
                + "".join(lines)[-5000:]
            )
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    output = "".join(lines)

    assert returncode == 0, output[-5000:]
    assert stages_run(output) == set(STAGES)
    after_kill = "".join(lines[killed_after:])
    # Training really was under way: steps went on after the kill, and the failure was reported, not raised.
    assert f"step {max_steps:>6} | loss" in after_kill, output[-5000:]
    assert re.search(
        rf"MLflow tracking at {re.escape(server.url)} failed \(.+\); training goes on without it", after_kill
    ), output[-5000:]
    assert "Traceback" not in output, output[-5000:]

    # Every DVC output is complete.
    from deepseek.checkpoint import load_model

    model = load_model(repo / "model" / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())["val"]
    assert 0 < metrics["bits_per_character"] < 8
    assert len(json.loads((repo / "reports" / "samples.json").read_text())["samples"]) == 5
    train_log = (repo / "reports" / "train_log.csv").read_text().splitlines()
    assert len(train_log) == 1 + max_steps  # the header and one row per step
    assert json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout + status.stderr

    # The server's store holds what came before the kill: the run, never finished, with a partial loss history.
    from mlflow import MlflowClient

    run_id = json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    stored = MlflowClient(server.backend_uri)
    assert stored.get_run(run_id).info.status == "RUNNING"
    # Metrics go asynchronously: what reached the server before it died is the first steps, without gaps.
    steps = sorted(m.step for m in stored.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < max_steps, steps
