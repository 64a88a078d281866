"""The pipeline against a real `mlflow server`: everything lands in the server, and a server that dies mid-training
costs the tracking only, never the pipeline's outputs."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline_utils import STAGES, make_pipeline_repo, pipeline_env, run, set_params, stages_run

SERVER_START_TIMEOUT = 120  # seconds; the server needs ~25 s to come up on two busy cores
PIPELINE_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A `mlflow server` subprocess in its own process group (it forks uvicorn and a job runner)."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir, self.port = store_dir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{store_dir / 'mlflow.db'}"
        self.log_path = store_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> MlflowServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # --artifacts-destination: artifacts are proxied through the server (mlflow-artifacts:/ URIs), so clients
        # upload over HTTP and need no access to the server's disk.
        args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.store_dir / "artifacts")]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}  # the server phones nobody from a test
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, cwd=self.store_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"mlflow server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:  # refused, reset, timed out: not up yet
                pass
            time.sleep(0.25)
        self.stop()
        raise AssertionError(f"mlflow server did not answer {self.url}/health within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean shutdown, as in a crash."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left of it (uvicorn, the job runner)."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    # The REST API, with the standard library only.
    def get(self, endpoint: str, **query) -> dict:
        with urllib.request.urlopen(f"{self.url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{endpoint}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def download(self, endpoint: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{endpoint}", timeout=30) as r:
            return r.read()


@contextmanager
def mlflow_server(store_dir: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(store_dir)
    try:
        yield server.start()
    finally:
        server.stop()


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
    assert metrics["final.train_loss"] > 0 and "model.parameters.total" in metrics
    tags = {t["key"]: t["value"] for t in data.get("tags", [])}
    assert tags["git_commit"] == run(["git", "rev-parse", "HEAD"], repo).stdout.strip()

    history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted(m["step"] for m in history) == [2, 4, 6]  # log_interval 2, max_steps 6
    assert all(m["value"] > 0 for m in history)
    val_history = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="val_loss")["metrics"]
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
    set_params(repo, train={"max_steps": max_steps, "log_interval": 1, "eval_interval": 10, "sample_interval": 60,
                            "checkpoint_interval": 20})
    run(["git", "commit", "-qam", "longer training"], repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)

    # Progress goes through tqdm to stderr, step lines to stdout: read both, merged, as they come.
    process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                               start_new_session=True)
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
            pytest.fail(f"dvc repro did not finish within {PIPELINE_TIMEOUT} s after the server died:\n"
                        + "".join(lines)[-5000:])
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
    assert re.search(rf"MLflow tracking at {re.escape(server.url)} failed \(.+\); training goes on without it",
                     after_kill), output[-5000:]
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
    steps = [m.step for m in stored.get_metric_history(run_id, "loss")]
    assert 3 <= len(steps) < max_steps and max(steps) < max_steps, steps
