"""How a training stops early: on Ctrl-C or SIGTERM at the end of the current step, or after too many
non-finite steps in a row; either way after a checkpoint, with the exit code a shell expects."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C, SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingStopped(Exception):
    """Training ended early, after saving a checkpoint: on a signal, or after too many non-finite steps."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def by_signal(self) -> bool:
        """Stopped on request (Ctrl-C, SIGTERM), which is no error."""
        return self.exit_code in SIGNAL_EXIT_CODES.values()


@dataclass
class StopRequest:
    """The signal received while a step ran, if any."""

    signal: signal.Signals | None = None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Turn Ctrl-C and SIGTERM into a request to stop at the end of the current step."""
    request = StopRequest()

    def handler(signum: int, frame: FrameType | None) -> None:
        request.signal = signal.Signals(signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in SIGNAL_EXIT_CODES}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interrupted(received: signal.Signals, step: int, checkpoint: Path) -> TrainingStopped:
    return TrainingStopped(
        f"Interrupted ({SIGNAL_NAMES[received]}): stopped at step {step}, "
        f"checkpoint {checkpoint}. Rerun the same command (or dvc repro) to resume",
        exit_code=SIGNAL_EXIT_CODES[received],
    )


def diverged(streak: int, step: int, last: bool, checkpoint: Path) -> TrainingStopped:
    return TrainingStopped(
        f"{streak} steps in a row had a non-finite loss or gradient (up to step {step}"
        f"{', the last' if last else ''}): stopped, checkpoint {checkpoint}. Rerunning resumes there and stops "
        "again unless the steps recover; a lower train.lr or a higher train.grad_clip trains from the "
        "start instead",
        exit_code=1,
    )
