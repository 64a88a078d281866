"""Trainings running at once share the CPU's cores instead of each taking all of them, and leave the cores that
other programs keep busy."""

import functools
import itertools
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.cpu import CoreShare, CpuTimes, ForeignLoad
from deepseek.device import configure_host
from deepseek.model import DeepSeekLM
from deepseek.train_config import TrainConfig
from deepseek.trainer import Trainer, TrainOutputs

HOLD = """
import sys, time
from pathlib import Path
from deepseek.cpu import CoreShare, CpuTimes, ForeignLoad
with CoreShare(Path(sys.argv[1])):
    print("registered", flush=True)
    time.sleep(600)
"""


def other_training(directory) -> subprocess.Popen:
    """A process registered as a training in directory, until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "registered"
    return process


def load_of(cores_busy_elsewhere: list[float]) -> ForeignLoad:
    """A ForeignLoad whose readings, a second apart, show these cores busy with other work, one per call."""
    seconds, busy = itertools.count(), 0.0

    def read() -> CpuTimes:
        nonlocal busy
        at = next(seconds)
        busy += cores_busy_elsewhere[at - 1] if at else 0.0
        return CpuTimes(at=float(at), busy=busy, own=0.0)

    return ForeignLoad(read)


def test_each_training_takes_its_share_of_the_cores_until_the_others_end(tmp_path):
    with CoreShare(tmp_path, cores=4, load=load_of([0.0] * 4)) as share:
        assert (share.trainings(), share.threads()) == (1, (4, "1 training share 4 cores"))
        others = [other_training(tmp_path) for _ in range(2)]
        assert (share.trainings(), share.threads()[0]) == (3, 1)
        others[0].kill()  # however a training ends, the kernel drops its lock
        others[0].wait()
        assert (share.trainings(), share.threads()) == (2, (2, "2 trainings share 4 cores"))
        others[1].terminate()
        others[1].wait()
        assert share.threads()[0] == 4
    assert not (tmp_path / f"{os.getpid()}.lock").exists()  # it removed its own registration, nothing else


def test_registration_files_of_dead_trainings_are_cleaned_and_never_counted(tmp_path):
    other = other_training(tmp_path)
    other.kill()
    other.wait()
    [leftover] = tmp_path.glob("*.lock")  # killed, it could not remove its file
    with CoreShare(tmp_path, cores=2) as share:
        assert not leftover.exists() and share.trainings() == 1
        [own] = tmp_path.glob("*.lock")
    assert not own.exists()  # a training removes its own file when it ends


def test_cores_busy_with_other_programs_are_left_to_them_and_taken_back_when_free(tmp_path):
    # Other work: half a core (not counted), then one core and a half, then two, then none.
    with CoreShare(tmp_path, cores=4, load=load_of([0.4, 1.6, 2.0, 0.0])) as share:
        assert share.threads() == (4, "1 training share 4 cores")
        assert share.threads() == (2, "2 of 4 cores busy with other work")
        assert share.threads() == (2, "2 of 4 cores busy with other work")
        assert share.threads() == (4, "1 training share 4 cores")
    with CoreShare(tmp_path, cores=2, load=load_of([1.0, 1.0])) as share:
        assert share.threads() == (1, "1 of 2 cores busy with other work")
        other = other_training(tmp_path)  # another training holding one core: its share, nothing less
        assert share.threads() == (1, "2 trainings share 2 cores")
        other.kill()
        other.wait()


@pytest.mark.alone  # counts the busy cores
def test_foreign_load_sees_a_busy_process_and_not_this_one():
    load = ForeignLoad()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # this process's own work is not other programs' load
        pass
    assert load.busy_cores() == 0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.6)
        load.busy_cores()  # a reading while the spinner starts; from here on it runs the whole window
        time.sleep(1.0)
        assert load.busy_cores() == 1
    finally:
        spinner.kill()
        spinner.wait()


class ThreadsSeen:
    def __init__(self) -> None:
        self.threads: list[int] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.threads.append(torch.get_num_threads())


@pytest.mark.alone  # no other training registered
@pytest.mark.parametrize("threads", [1, 0])
def test_the_trainer_sizes_its_thread_pool_and_restores_it(tmp_path, monkeypatch, threads):
    before = torch.get_num_threads()
    quiet = functools.partial(CoreShare, load=load_of([0.0] * 10))  # no other program, whatever else runs now
    monkeypatch.setattr("deepseek.device.CoreShare", quiet)
    tokens = np.random.default_rng(0).integers(0, 65, 3000).astype(np.uint16)
    config = TrainConfig(
        max_steps=2,
        micro_batch_size=2,
        grad_accum_steps=1,
        seq_len=16,
        log_interval=1,
        eval_interval=2,
        eval_batches=1,
        sample_interval=100,
        checkpoint_interval=100,
        threads=threads,
    )
    seen = ThreadsSeen()
    trainer = Trainer(
        DeepSeekLM(ModelConfig.from_preset("tiny")),
        config,
        0,
        TrainOutputs(tmp_path / "c"),
        sinks=[seen],
        core_share=configure_host(torch.device("cpu"), threads),  # what the train stage does
    )
    trainer.fit(tokens, tokens)
    # threads 0 and no other training registered: this one has every core the process may use
    if threads:
        expected = threads
    else:
        assert trainer.core_share is not None  # threads 0 on CPU: the trainer shares the cores
        expected = trainer.core_share.cores
    assert seen.threads and set(seen.threads) == {expected}
    assert torch.get_num_threads() == before
