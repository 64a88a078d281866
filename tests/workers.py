"""What tests on parallel pytest-xdist workers share: the machine, taken in turns (machine_turn), and what is built
once for the whole run (built_once). docs/ci.md, "How the tests run"."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... in a worker; None in a run without workers


@contextlib.contextmanager
def machine_turn(directory: Path, alone: bool) -> Iterator[None]:
    """A test's turn on the machine: shared with the other workers' tests, or, for a test marked `alone` (one that
    times something or counts the machine's busy cores), the whole machine.

    A readers-writer lock on two files in directory, which every worker of the run opens: `room`, held shared
    by each running test and exclusively by a test alone, and `turnstile`, which a test alone holds while it waits
    for the room to empty, so that no new test goes in meanwhile."""
    directory.mkdir(exist_ok=True)
    with open(directory / "turnstile", "a") as turnstile, open(directory / "room", "a") as room:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # the kernel drops both locks when the files close


def run_directory(tmp_path_factory: Any) -> Path:
    """The temporary directory of this test run that every pytest-xdist worker sees: the parent of each worker's
    own; without workers, the run's own."""
    base: Path = tmp_path_factory.getbasetemp()
    return base.parent if WORKER is not None else base


def built_once(shared: Path, name: str, build: Callable[[Path], None]) -> Path:
    """shared/name, filled by build(shared/name) the first time any worker asks for it; the others wait for it."""
    directory, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # what a worker whose build failed left
            directory.mkdir()
            build(directory)
            done.touch()
    return directory
