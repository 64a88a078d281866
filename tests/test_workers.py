"""The test workers' shared machine: a test alone waits for the running tests, keeps new ones out, and lets
tests in together otherwise; what is built once is built once, whoever asks at the same time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from workers import built_once, machine_turn

WAIT_S = 0.3  # long enough for a thread to take a free lock


class Turn(threading.Thread):
    """A test (a thread here: flock locks of separate opens exclude each other within a process too) that takes
    its turn on the machine, records when it got in, and stays until released."""

    def __init__(self, directory: Path, alone: bool) -> None:
        super().__init__(daemon=True)
        self.directory, self.alone = directory, alone
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        with machine_turn(self.directory, self.alone):
            self.entered.set()
            self.release.wait(10)


def started(turn: Turn) -> Turn:
    turn.start()
    time.sleep(WAIT_S)
    return turn


def test_tests_share_the_machine_and_one_alone_waits_for_them_and_keeps_new_ones_out(tmp_path):
    first, second = started(Turn(tmp_path, alone=False)), started(Turn(tmp_path, alone=False))
    assert first.entered.is_set() and second.entered.is_set()  # shared turns go in together
    alone = started(Turn(tmp_path, alone=True))
    assert not alone.entered.is_set()  # it waits for the room to empty
    late = started(Turn(tmp_path, alone=False))
    assert not late.entered.is_set()  # and no new test goes in meanwhile
    first.release.set()
    second.release.set()
    assert alone.entered.wait(5)
    time.sleep(WAIT_S)
    assert not late.entered.is_set()  # the test alone has the machine to itself
    alone.release.set()
    assert late.entered.wait(5)
    late.release.set()


def test_what_two_workers_ask_for_at_once_is_built_once_and_a_failed_build_is_redone(tmp_path):
    builds: list[Path] = []

    def build(directory: Path) -> None:
        time.sleep(WAIT_S)  # the other asks meanwhile
        (directory / "made").write_text("yes")
        builds.append(directory)

    got: list[Path] = []
    askers = [threading.Thread(target=lambda: got.append(built_once(tmp_path, "thing", build))) for _ in range(2)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(10)
    assert len(builds) == 1 and got == [tmp_path / "thing"] * 2
    assert (tmp_path / "thing" / "made").read_text() == "yes"

    def failing(directory: Path) -> None:
        (directory / "half").write_text("")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        built_once(tmp_path, "other", failing)
    assert built_once(tmp_path, "other", build) == tmp_path / "other"
    assert sorted(path.name for path in (tmp_path / "other").iterdir()) == ["made"]  # the half-built one is gone
