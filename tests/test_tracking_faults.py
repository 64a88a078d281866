"""Tracking never stops silently and never stalls training: a malformed tracking URI is refused before any work,
a server that trickles its answers costs a bounded wait and a warning, runs of trainings that died are closed as
KILLED by the next one, and a stage's last metrics are in the store before it exits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import mlflow
import pytest

from deepseek.checkpoint import list_checkpoints
from stages.tracking import EXPERIMENT, Run

from pipeline_utils import stage_workspace


def train(path, uri: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.train"],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env},
    )


@pytest.mark.parametrize("uri", ["http//127.0.0.1:5000", "foo://bar", "127.0.0.1:5000"])
def test_a_malformed_tracking_uri_is_refused_before_training(tmp_path, monkeypatch, uri):
    path = stage_workspace(tmp_path, monkeypatch, max_steps=2)
    result = train(path, uri)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: MLFLOW_TRACKING_URI={uri!r} is not a tracking URI MLflow knows: use http://HOST:PORT, "
        "sqlite:///FILE, postgresql://... or file:///DIR, or unset it to track into mlflow.db here"
    )
    assert not list_checkpoints(path / "model" / "checkpoints")


@pytest.fixture
def trickling_server() -> Iterator[str]:
    """An HTTP 'server' that answers every request one byte at a time, each within the read timeout, forever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def trickle(connection: socket.socket) -> None:
        with connection:
            while not stop.is_set():
                try:
                    connection.sendall(b"H")
                except OSError:
                    return
                time.sleep(0.3)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


@pytest.mark.slow
def test_a_server_that_trickles_bytes_costs_a_bounded_wait_and_a_warning(tmp_path, monkeypatch, trickling_server):
    """Each read gets a byte before MLflow's read timeout (1 s here), so only a deadline on the whole call ends it."""
    path = stage_workspace(tmp_path, monkeypatch, max_steps=4)
    result = train(path, trickling_server, timeout=240, MLFLOW_HTTP_REQUEST_TIMEOUT="1")
    assert result.returncode == 0, result.stderr
    assert "MLflow tracking at" in result.stderr and "TimeoutError: no answer within 6 s" in result.stderr
    assert "training goes on without it" in result.stderr
    assert len(list_checkpoints(path / "model" / "checkpoints")) > 0


def test_runs_of_trainings_that_died_are_closed_as_killed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    opened = subprocess.run(
        [sys.executable, "-c", "from stages.tracking import Run; print(Run.start({}, {}).run_id)"],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=True,
    )  # a training that opened its run, then died without closing it
    abandoned = opened.stdout.strip().splitlines()[-1]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(abandoned).info.status == "RUNNING"
    try:
        current = Run.start({"train": {"lr": 1e-3}}, {})
        assert current.run_id is not None
        assert client.get_run(abandoned).info.status == "KILLED"
        assert client.get_run(current.run_id).info.status == "RUNNING"  # a live one is left alone
        current.finish()
        assert client.get_run(current.run_id).info.status == "FINISHED"
        assert client.get_experiment_by_name(EXPERIMENT) is not None
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: the default; mlflow takes it though it says str | Path


def test_metrics_logged_asynchronously_are_in_the_project_store_once_flushed(tmp_path, monkeypatch):
    """Run.flush flushes the store of the project's tracking URI, not MLflow's process-wide one: at a stage's exit
    MLflow's worker threads take no more work, and metrics still queued then are lost."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # another process-wide URI ...
    mlflow.search_experiments()  # (its store made now: making it in the flush would give the queue time to empty)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # ... than the project's, which comes from its root
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    run = Run.start({}, {})
    try:
        assert run.run_id is not None
        run.log_metrics({"val.loss": 1.5}, step=3)
        run.flush()
        history = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.run_id, "val.loss")
        assert [(metric.value, metric.step) for metric in history] == [(1.5, 3)]
    finally:
        run.finish()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: the default; mlflow takes it though it says str | Path
