"""The pipeline against a real `mlflow server` on PostgreSQL, as a team shares one: two pipelines run at once each
land complete in it, and a server that dies mid-training costs the tracking only, never the pipeline's outputs."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages import tracking

from mlflow_server import MlflowServer, mlflow_server
from pipeline_utils import STAGES, make_pipeline_repo, pipeline_env, run, set_params, stages_run
from postgres_server import PostgresServer, missing, postgres_server

PIPELINE_TIMEOUT = 600


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the module; each test's server gets a database of its own in it."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server() as started:
        yield started


@pytest.fixture
def server(tmp_path, postgres) -> Iterator[MlflowServer]:
    """`mlflow server` on a new PostgreSQL database, its artifacts served from tmp_path."""
    database = postgres.create_database(f"mlflow_{uuid.uuid4().hex[:12]}")
    with mlflow_server(tmp_path / "server", backend_uri=database) as started:
        yield started


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def start_pipeline(repo: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            ["dvc", "repro"],
            cwd=repo,
            env=pipeline_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def check_history(server: MlflowServer, run_id: str, rows: list[dict[str, str]], keys: list[str]) -> None:
    """The run's history of each key holds exactly the steps and values of the pipeline's own log, rows."""
    for key in keys:
        history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        stored = sorted((int(m["step"]), m["value"]) for m in history)
        written = sorted((int(row["step"]), float(row[key])) for row in rows)
        assert [step for step, _ in stored] == [step for step, _ in written], (run_id, key, stored, written)
        assert [value for _, value in stored] == pytest.approx([value for _, value in written], rel=1e-9), key


@pytest.mark.slow
def test_two_pipelines_at_once_log_everything_to_one_postgres_backed_server(tmp_path, server, monkeypatch):
    repos = [make_pipeline_repo(tmp_path / name) for name in ("alice", "bob")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # pipeline_env passes os.environ on

    logs = [tmp_path / f"{repo.name}.log" for repo in repos]
    processes = [start_pipeline(repo, log) for repo, log in zip(repos, logs, strict=True)]
    try:
        deadline = time.monotonic() + PIPELINE_TIMEOUT
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the pipelines did not finish in {PIPELINE_TIMEOUT} s:\n{logs[0].read_text()[-3000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    for process, log in zip(processes, logs, strict=True):
        output = log.read_text()
        assert process.returncode == 0, output[-5000:]
        assert stages_run(output) == set(STAGES), output[-5000:]
        # Neither run lost its tracking to the other: no warning that tracking stopped, no traceback.
        assert "MLflow tracking" not in output and "Traceback" not in output, output[-5000:]

    run_ids = [json.loads((repo / "reports" / "mlflow_run.json").read_text())["run_id"] for repo in repos]
    assert all(run_ids) and len(set(run_ids)) == 2, run_ids
    experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="deepseek-repro")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment  # proxied by the server
    found = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    assert sorted(r["info"]["run_id"] for r in found["runs"]) == sorted(run_ids)

    infos = []
    for repo, run_id in zip(repos, run_ids, strict=True):
        info_and_data = server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        info, data = info_and_data["info"], info_and_data["data"]
        infos.append(info)
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

        # Every logged step of every per-step metric, with the values the pipeline wrote to its own logs.
        train_log = read_log(repo / "reports" / "train_log.csv")
        val_log = read_log(repo / "reports" / "val_log.csv")
        assert [int(row["step"]) for row in train_log] == [2, 4, 6]  # log_interval 2, max_steps 6
        assert [int(row["step"]) for row in val_log] == [3, 6]  # eval_interval 3
        check_history(server, run_id, train_log, [key for key in train_log[0] if key != "step"])
        check_history(server, run_id, val_log, ["val_loss_sampled"])
        per_layer = [key for key in metrics if key.startswith("max_vio/layer_")]
        assert per_layer, sorted(metrics)
        for key in per_layer:
            history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            assert sorted(m["step"] for m in history) == [2, 4, 6], key

        def listed(path: str = "", run_id: str = run_id) -> dict[str, dict]:
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

        # The bytes come back over HTTP through the artifact proxy, equal to the DVC-tracked model.
        artifact_path = info["artifact_uri"].removeprefix("mlflow-artifacts:").lstrip("/")
        proxied = f"/api/2.0/mlflow-artifacts/artifacts/{artifact_path}"
        assert server.download(f"{proxied}/checkpoint/model.safetensors") == local_weights
        assert len(json.loads(server.download(f"{proxied}/samples/samples.json"))["samples"]) == 5

    # The two trainings really ran at once: each run (opened and closed by its train stage) began before the other's
    # ended.
    assert max(int(info["start_time"]) for info in infos) < min(int(info["end_time"]) for info in infos), infos

    # params.yaml mlflow: each run's final model is a version of one registered model, and the alias points at one
    # of them (whichever run set it last).
    versions = server.get("/api/2.0/mlflow/model-versions/search", filter="name='deepseek-repro'")["model_versions"]
    assert sorted(v["version"] for v in versions) == ["1", "2"], versions
    assert sorted(v["run_id"] for v in versions) == sorted(run_ids), versions
    assert all(v["status"] == "READY" for v in versions), versions
    candidate = server.get("/api/2.0/mlflow/registered-models/alias", name="deepseek-repro", alias="candidate")
    version_runs = {v["version"]: v["run_id"] for v in versions}
    assert version_runs[candidate["model_version"]["version"]] == candidate["model_version"]["run_id"] in run_ids

    # The race two trainings starting at once can meet, made certain: this one looks for the experiment before the
    # other has created it, and creates it after. It takes the other's experiment rather than losing its tracking.
    from mlflow import MlflowClient

    client = MlflowClient(server.url)
    looked_up, looks = client.get_experiment_by_name, []

    def too_early(name: str):
        looks.append(name)
        return None if len(looks) == 1 else looked_up(name)

    monkeypatch.setattr(client, "get_experiment_by_name", too_early)
    assert tracking.experiment_id(client) == experiment["experiment_id"]
    assert len(looks) == 2  # the first look missed it, and the create that followed was refused


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
    merged = process.stdout
    assert merged is not None
    lines: list[str] = []
    done_reading = threading.Event()

    def read() -> None:
        for line in merged:
            lines.append(line)
        done_reading.set()

    def stored_steps() -> int:
        """The last training step whose loss the server has stored: logged, as far as MLflow is concerned."""
        run_file = repo / "reports" / "mlflow_run.json"  # written as training starts
        if not run_file.exists():
            return 0
        run_id = json.loads(run_file.read_text())["run_id"]
        found = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")
        return max((int(m["step"]) for m in found.get("metrics", [])), default=0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + PIPELINE_TIMEOUT
        while stored_steps() < 3 and not done_reading.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        logged_before_kill = stored_steps()
        if not 3 <= logged_before_kill < max_steps:
            pytest.fail(
                f"the server held {logged_before_kill} steps, not 3 to {max_steps - 1}:\n" + "".join(lines)[-5000:]
            )
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
    stored = MlflowClient(server.backend_uri)  # PostgreSQL itself, with the server dead
    assert server.backend_uri.startswith("postgresql")
    assert stored.get_run(run_id).info.status == "RUNNING"
    # Metrics go asynchronously: what reached the server before it died is the first steps, without gaps, each step
    # whole (every per-step metric) and with the values the training wrote to its own log.
    steps = sorted(m.step for m in stored.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, len(steps) + 1)) and logged_before_kill <= len(steps) < max_steps, steps
    rows = {int(row["step"]): row for row in read_log(repo / "reports" / "train_log.csv")}
    keys = [key for key in rows[1] if key != "step"]
    keys += [key for key in stored.get_run(run_id).data.metrics if key.startswith("max_vio/layer_")]
    assert "accuracy" in keys and "max_vio/layer_1" in keys, keys
    for key in keys:
        history = sorted((m.step, m.value) for m in stored.get_metric_history(run_id, key))
        assert [step for step, _ in history] == steps, key
        if key in rows[1]:
            assert [value for _, value in history] == pytest.approx([float(rows[s][key]) for s in steps], rel=1e-9)
