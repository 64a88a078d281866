"""A real `mlflow server` subprocess for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline_utils import free_port

SERVER_START_TIMEOUT = 120  # seconds; the server needs ~25 s to come up on two busy cores


class MlflowServer:
    """A `mlflow server` subprocess in its own process group (it forks uvicorn and a job runner)."""

    def __init__(self, store_dir: Path, port: int | None = None, backend_uri: str | None = None) -> None:
        """store_dir holds the served artifacts and the log; the runs go to backend_uri (a database URI, such as
        postgresql+psycopg2://USER@HOST:PORT/DB), by default a SQLite file in store_dir."""
        self.store_dir, self.port = store_dir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = backend_uri or f"sqlite:///{store_dir / 'mlflow.db'}"
        self.log_path = store_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> MlflowServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # --artifacts-destination: artifacts are proxied through the server (mlflow-artifacts:/ URIs), so clients
        # upload over HTTP and need no access to the server's disk.
        args = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.store_dir / "artifacts"),
        ]
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",  # the server phones nobody from a test
            # No job runner: its seven huey consumers (GenAI scoring, trace archival: nothing the pipeline uses) are
            # more Python processes on the busy cores, and they take seconds to stop.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args,
                cwd=self.store_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
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
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    # The REST API, with the standard library only.
    def get(self, endpoint: str, **query) -> dict:
        with urllib.request.urlopen(f"{self.url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.url}{endpoint}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def download(self, endpoint: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{endpoint}", timeout=30) as r:
            return r.read()


@contextmanager
def mlflow_server(store_dir: Path, backend_uri: str | None = None) -> Iterator[MlflowServer]:
    server = MlflowServer(store_dir, backend_uri=backend_uri)
    try:
        yield server.start()
    finally:
        server.stop()
