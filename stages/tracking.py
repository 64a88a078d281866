"""MLflow tracking: one run per pipeline execution, opened by the train stage and reused by the later stages.

Where runs go: MLFLOW_TRACKING_URI when set (a real `mlflow server`); otherwise a SQLite store and an
artifact folder at the repository root. DVC sets DVC_ROOT to the main repository even for `--temp` and
queued experiments, which run in copies elsewhere, so every run lands in the same store.

Tracking never stops training: if the server fails, a warning is printed once and logging stops.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from deepseek.errors import UserError, first_line
from deepseek.files import process_alive

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

EXPERIMENT = "deepseek-repro"
KNOWN_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
RUN_FILE = "mlflow_run.json"  # in the reports directory: the DVC output that hands the run id to evaluate and sample
T = TypeVar("T")
# System metrics: a sample every 10 s, a point (their mean) every 30 s. The sampling thread costs well under 1% of
# a training's time (benchmarks/system_metrics.py measures it).
SYSTEM_METRICS_INTERVAL_S = 10.0
SYSTEM_METRICS_SAMPLES = 3

# Fail fast when a tracking server is down rather than retrying for minutes in the training loop.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# Asynchronous metrics go out in batches, each at most a second old. Unset, MLflow's logging thread waits on its queue
# a second at a time, and every flush, and the process's exit, waits for that second to end; with a buffering time it
# waits on an event that a flush sets, and returns at once.
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
# The most one tracking call may take (plus a second per MB an upload sends), and the end of a stage may wait for
# metrics still being sent: six of MLflow's per-read timeouts, a minute by default.
REQUEST_DEADLINE_S = FLUSH_DEADLINE_S = 6 * float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])


def project_root() -> Path:
    """DVC_ROOT under DVC, else the enclosing git repository, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(top.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def artifact_root() -> str:
    return (project_root() / "mlartifacts").as_uri()


def _local_store() -> bool:
    """A SQLite store (ours, or one the user named) needs our artifact root and our lock; a server has its own."""
    return tracking_uri().startswith("sqlite:")


@contextmanager
def _store_lock() -> Iterator[None]:
    """Serialise creating the SQLite store and the experiment across parallel queued runs."""
    if not _local_store():
        yield
        return
    lock_path = project_root() / ".mlflow.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# What parallel runs sharing a store may briefly hit: SQLite's one writer at a time, and two runs creating the same
# row at once (a dataset, the experiment: MLflow checks, then inserts); the next attempt finds the row.
TRANSIENT = ("locked", "UNIQUE constraint failed", "duplicate key value", "already exists")


def _retry(call: Callable[[], T], attempts: int = 5) -> T:
    """call(), tried again after a TRANSIENT failure."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # MlflowException or sqlalchemy's errors, by backend
            if not any(marker in str(error) for marker in TRANSIENT) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def client() -> MlflowClient:
    import mlflow

    # A client opens its store at once, and the first to open a new SQLite store creates its tables: two parallel
    # queued runs doing that together collide ("table ... already exists").
    with _store_lock():
        return mlflow.MlflowClient(tracking_uri())


@contextmanager
def _fluent_tracking_uri() -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) reads one process-wide tracking URI, and set_tracking_uri
    also exports it to the environment; set it for the block only, so that it never leaks into later work."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri())
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None: back to the default
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def experiment_id(mlflow_client: MlflowClient) -> str:
    """The experiment's id, creating the experiment if no one has yet. Two trainings starting at once on a server
    (which our lock does not cover) may both find none; the second one's create is refused as already existing,
    and its retry finds the first one's."""

    def get_or_create() -> str:
        found = mlflow_client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        location = artifact_root() if _local_store() else None
        return mlflow_client.create_experiment(EXPERIMENT, artifact_location=location)

    with _store_lock():
        return _retry(get_or_create)


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path.cwd())
        return result.stdout.strip() if result.returncode == 0 else ""

    # dvc.lock changes during `dvc repro`; it does not make the code dirty.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!reports")
    return {"git_commit": git("rev-parse", "HEAD") or "unknown", "git_dirty": str(bool(dirty)).lower()}


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}; lists become JSON text."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def check_tracking_uri() -> None:
    """MLFLOW_TRACKING_URI, when set, must name a store MLflow knows: a typo (http//host) would otherwise track
    into an odd local folder, or nowhere, without a word."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    scheme, separator, _ = uri.partition("://")
    if not separator or scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise UserError(
            f"MLFLOW_TRACKING_URI={uri!r} is not a tracking URI MLflow knows: use http://HOST:PORT, sqlite:///FILE, "
            "postgresql://... or file:///DIR, or unset it to track into mlflow.db here"
        )


class Run:
    """An MLflow run that degrades to a no-op, with one warning, when tracking fails.

    Metrics are logged asynchronously (MLflow's async logging), so a slow server never holds up a training
    step; finish() and flush() wait for them, for at most FLUSH_DEADLINE_S. Every other call may take at most
    REQUEST_DEADLINE_S, however slowly a server answers, before tracking is turned off.
    """

    def __init__(self, mlflow_client: MlflowClient | None, run_id: str | None) -> None:
        self.client, self.run_id = mlflow_client, run_id
        self._system_metrics: SystemMetricsMonitor | None = None

    @classmethod
    def start(cls, params: dict[str, Any], tags: dict[str, str]) -> Run:
        run = cls(None, None)
        name = os.environ.get("DVC_EXP_NAME") or None

        def create() -> tuple[MlflowClient, str, str]:
            mlflow_client = client()
            exp_id = experiment_id(mlflow_client)
            created = _retry(lambda: mlflow_client.create_run(exp_id, run_name=name, tags=tags | _process_tags()))
            return mlflow_client, exp_id, created.info.run_id

        try:
            run.client, exp_id, run.run_id = _within(REQUEST_DEADLINE_S, create)
        except Exception as error:
            run._disable(error)
            return run
        run.log_params(params)
        run._do(lambda client, run_id: _close_abandoned_runs(client, exp_id, run_id))
        return run

    def claim(self) -> None:
        """Record this process as the one training in the run (a resumed training goes on in its run)."""
        self._do(lambda client, run_id: [client.set_tag(run_id, k, v) for k, v in _process_tags().items()])

    @classmethod
    def resume(cls, run_file: str | Path) -> Run:
        """The run the train stage opened, read from its DVC output."""
        path = Path(run_file)
        run_id = json.loads(path.read_text())["run_id"] if path.exists() else None
        if run_id is None:
            warnings.warn(f"{path} names no run: this stage's results are not tracked in MLflow", stacklevel=2)
        return cls.attach(run_id)

    @classmethod
    def attach(cls, run_id: str | None) -> Run:
        """An existing run, e.g. the one an interrupted training had opened."""
        run = cls(None, run_id)
        if run_id is None:
            return run
        try:
            run.client = client()
        except Exception as error:
            run._disable(error)
        return run

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _disable(self, error: Exception) -> None:
        warnings.warn(
            f"MLflow tracking at {tracking_uri()} failed ({type(error).__name__}: {first_line(error)}); "
            "training goes on without it",
            stacklevel=3,
        )
        self.client = None

    def _do(self, action: Callable[[MlflowClient, str], Any], deadline_s: float = REQUEST_DEADLINE_S) -> None:
        """action(client, run_id), retried while SQLite is locked and given up after deadline_s; the first other
        failure turns tracking off."""
        client, run_id = self.client, self.run_id
        if client is None or run_id is None:
            return
        try:
            _within(deadline_s, lambda: _retry(lambda: action(client, run_id)))
        except Exception as error:
            self._disable(error)

    def flush(self) -> None:
        """Wait for the metrics logged asynchronously, for at most FLUSH_DEADLINE_S."""
        import mlflow

        def flush(client: MlflowClient, run_id: str) -> None:
            # MLflow flushes the queue of the process-wide tracking URI's store, which is the client's store (one
            # per URI) only while that URI is the client's.
            with _fluent_tracking_uri():
                mlflow.flush_async_logging()

        self._do(flush, FLUSH_DEADLINE_S)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        batches = [items[i : i + 100] for i in range(0, len(items), 100)]  # MLflow takes at most 100 a call
        self._do(lambda client, run_id: [client.log_batch(run_id, params=batch) for batch in batches])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._do(lambda client, run_id: client.log_batch(run_id, metrics=items, synchronous=False))

    def log_dataset(self, stats: dict[str, Any], source: str) -> None:
        """The corpus as the run's dataset input, its facts (characters, lines, sha256, ...) as the profile.

        Facts of the data are not params or metrics of the run: logged as those, constant columns would crowd
        every comparison of runs (MLflow's parallel-coordinates plot would pick them).
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=str(stats.get("source", "corpus")),
            digest=str(stats.get("sha256", ""))[:12],
            source_type="local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(stats),
        )
        context = InputTag("mlflow.data.context", "training")

        def log(client: MlflowClient, run_id: str) -> None:
            with _store_lock():  # parallel runs of one corpus create its dataset row: one at a time
                client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])

        self._do(log)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
        # An upload may take longer than one call, but not longer than at 1 MB/s: a trickle still ends.
        deadline = REQUEST_DEADLINE_S + sum(f.stat().st_size for f in files) / 1e6
        if path.is_dir():
            self._do(lambda client, run_id: client.log_artifacts(run_id, str(path), artifact_path), deadline)
        elif files:
            self._do(lambda client, run_id: client.log_artifact(run_id, str(path), artifact_path), deadline)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._do(lambda client, run_id: client.log_text(run_id, text, artifact_file))

    def monitor_system(self, resumed: bool) -> None:
        """Log MLflow's system metrics (CPU, memory, disk, network; the GPU's where pynvml is installed) until
        finish(): a point every SYSTEM_METRICS_SAMPLES x SYSTEM_METRICS_INTERVAL_S seconds, averaged."""
        if not self.active:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its INFO lines (started, stopped, no GPU here) would only interleave with the training's progress bar.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        # The ignores here and in finish(): MLflow leaves SystemMetricsMonitor's methods unhinted.
        monitor = SystemMetricsMonitor(  # type: ignore[no-untyped-call]
            self.run_id,
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            samples_before_logging=SYSTEM_METRICS_SAMPLES,
            resume_logging=resumed,  # a resumed training's points go on after the interrupted one's
            tracking_uri=tracking_uri(),
        )
        monitor.start()  # type: ignore[no-untyped-call]
        self._system_metrics = monitor

    def finish(self, status: str = "FINISHED") -> None:
        if self._system_metrics is not None:
            self._system_metrics.finish()  # type: ignore[no-untyped-call]
            self._system_metrics = None
        self.flush()
        self._do(lambda client, run_id: client.set_terminated(run_id, status))

    def write_run_file(self, run_file: str | Path) -> None:
        from deepseek.files import write_json

        write_json(run_file, {"run_id": self.run_id, "experiment": EXPERIMENT})


def _process_tags() -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def _close_abandoned_runs(mlflow_client: MlflowClient, exp_id: str, current: str) -> None:
    """Runs still RUNNING whose training process on this host is gone (killed, or abandoned) become KILLED."""
    running = mlflow_client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=200)
    for other in running:
        tags = other.data.tags
        ours = tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit()
        if other.info.run_id != current and ours and not process_alive(int(tags["pid"])):
            mlflow_client.set_terminated(other.info.run_id, "KILLED")


def _within(deadline_s: float, call: Callable[[], T]) -> T:
    """call(), or TimeoutError once deadline_s have passed: a server that trickles its answer resets a read
    timeout with every byte, so only a deadline on the whole call bounds it. The call runs on in a daemon
    thread, and tracking is turned off."""
    values: list[T] = []  # the call's value, once it has returned
    errors: list[BaseException] = []  # or what it raised

    def run() -> None:
        try:
            values.append(call())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {deadline_s:.0f} s")
    if errors:
        raise errors[0]
    return values[0]


def log_model(run: Run, model_dir: Path, register_as: str | None, alias: str) -> str | None:
    """Log model_dir as an MLflow pyfunc model in the run; optionally register it and point alias at it.

    Returns the model URI, or None when tracking is off or fails.
    """
    if not run.active:
        return None
    import mlflow

    from deepseek import checkpoint
    from stages.environment import serving_requirements

    try:
        with _fluent_tracking_uri(), mlflow.start_run(run_id=run.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"model": str(model_dir)},
                code_paths=[str(Path(checkpoint.__file__).parent)],  # the model library, which loads the weights
                pip_requirements=serving_requirements(),  # the versions it was trained and evaluated with
            )
        if register_as:
            with _fluent_tracking_uri():
                version = _retry(lambda: mlflow.register_model(info.model_uri, register_as))
            run._do(lambda client, _: client.set_registered_model_alias(register_as, alias, version.version))
        model_uri: str = info.model_uri  # typed here: mlflow loads mlflow.pyfunc lazily, so its results read as Any
        return model_uri
    except Exception as error:
        run._disable(error)
        return None
