import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM

from pipeline_utils import make_pipeline_repo, run
from reader_project import ReaderProject
from workers import WORKER, built_once, machine_turn, run_directory

# --- parallel workers (pytest-xdist, `-n` in pyproject.toml) -----------------------------------------------------
if WORKER is not None:
    # Each worker, and every program its tests start, runs one thread: OpenMP threads that wait on a core another
    # worker holds crawl (docs/benchmarks.md). Trainings size their own pools (the tiny params say 1).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Tests that share a module's expensive fixture, or go on from each other's state, run on one worker, in order:
# their modules by the unit of work they form. The others go one by one to whichever worker is free.
SAME_WORKER = {
    "test_tracking.py": "tracked_repo",  # conftest.tracked_repo, built once
    "test_dvc_remote.py": "tracked_repo",
    "test_pipeline.py": "test_pipeline.py",  # each test goes on from the repository the one before left
    "test_environment.py": "test_environment.py",  # one training for the module
    "test_tracking_server.py": "test_tracking_server.py",  # one PostgreSQL for the module
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`--numprocesses=auto`: one worker more than the cores, since the end-to-end tests spend part of their time
    waiting (on servers, on DVC's queue, on their programs' start-up): on two cores, 3 workers kept both cores 97%
    busy over a whole run."""
    return len(os.sched_getaffinity(0)) + 1


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's load scheduling, but SAME_WORKER's modules as units (its loadgroup marks need pytest < 9)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SAME_WORKER.get(Path(nodeid.split("::")[0]).name, nodeid)

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, so that no worker starts a long one when the others have finished; SAME_WORKER's modules
    among them, in their own order."""
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or item.path.name in SAME_WORKER))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Each test, its fixtures' setup and teardown included, runs in its turn (machine_turn)."""
    if WORKER is None:
        return (yield)
    turns = Path(tempfile.gettempdir()) / f"pytest-turns-{os.environ['PYTEST_XDIST_TESTRUNUID']}"
    with machine_turn(turns, alone=item.get_closest_marker("alone") is not None):
        return (yield)


def randomized(model: DeepSeekLM, seed: int = 0) -> DeepSeekLM:
    """Perturb what initialisation leaves constant (norm weights, balancing biases) so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=gen))
        for moe in model.moe_layers():
            moe.gate.expert_bias.copy_(torch.empty_like(moe.gate.expert_bias).uniform_(-0.05, 0.05, generator=gen))
    return model


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _tracking_uri_kept_to_its_test() -> Iterator[None]:
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ, where every later test's subprocesses
    would inherit it (their runs then land in another test's store): each test's setting ends with the test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session", autouse=True)
def _no_queue_workers_left(tmp_path_factory) -> Iterator[None]:
    """After the tests, stop the DVC queue workers that the tests' repositories started and that are still there
    (a worker can hang in its shutdown), so that none outlives the test run."""
    yield
    base = tmp_path_factory.getbasetemp().resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            is_worker = b"queue-worker" in (proc / "cmdline").read_bytes()
            cwd = (proc / "cwd").resolve()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if is_worker and cwd.is_relative_to(base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def wait_for_queue(repo: Path, timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"queued experiments still running after {timeout_s} s:\n{status}")


@pytest.fixture(scope="session")
def reader_project(tmp_path_factory) -> ReaderProject:
    """The tiny project run once and committed, built for the test run by the first worker to need it."""
    return ReaderProject(
        built_once(run_directory(tmp_path_factory), "reader-project", lambda path: ReaderProject(path).build())
    )


@pytest.fixture(scope="session")
def tracked_repo(tmp_path_factory) -> Path:
    """A tiny project as a team member has it: dvc repro committed, then two queued experiments run at once, as the
    README shows them (lr-3e-5, its learning rates written with exponents; and a model field set with -S from the
    committed params); a DVC remote; the workspace back on the baseline's outputs. Shared by the tracking tests and
    the DVC-remote test, which pushes it. (An experiment run in the workspace logs from where `dvc repro` does.)"""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("tracked"))
    # The team's DVC remote, committed before the runs, as docs/team.md advises: `dvc exp push` sends an
    # experiment's outputs to the remote its own commit names.
    run(["dvc", "remote", "add", "-d", "team", str(tmp_path_factory.mktemp("dvc-remote"))], repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline results"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "lr-3e-5", "-S", "train.lr=3e-5", "-S", "train.min_lr=3e-6"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "layers-3", "-S", "model.num_layers=3"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    status = wait_for_queue(repo)
    assert status.count("Success") == 2, status
    run(["dvc", "queue", "stop"], repo, check=False)
    run(["git", "checkout", "-q", "--", "."], repo)  # back to the baseline's outputs
    run(["dvc", "checkout", "-q"], repo)
    return repo
