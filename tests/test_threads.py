"""Trainings running at once share the CPU's cores instead of each taking all of them."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepseek.config import ModelConfig, TrainConfig
from deepseek.cpu import CoreShare
from deepseek.model import DeepSeekLM
from deepseek.trainer import Trainer, TrainOutputs

HOLD = """
import sys, time
from pathlib import Path
from deepseek.cpu import CoreShare
with CoreShare(Path(sys.argv[1])):
    print("registered", flush=True)
    time.sleep(600)
"""


def other_training(directory) -> subprocess.Popen:
    """A process registered as a training in directory, until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "registered"
    return process


def test_each_training_takes_its_share_of_the_cores_until_the_others_end(tmp_path):
    with CoreShare(tmp_path, cores=4) as share:
        assert (share.trainings(), share.threads()) == (1, 4)
        others = [other_training(tmp_path) for _ in range(2)]
        assert (share.trainings(), share.threads()) == (3, 1)
        others[0].kill()  # however a training ends, the kernel drops its lock
        others[0].wait()
        assert (share.trainings(), share.threads()) == (2, 2)
        others[1].terminate()
        others[1].wait()
        assert share.threads() == 4
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


class ThreadsSeen:
    def __init__(self) -> None:
        self.threads: list[int] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.threads.append(torch.get_num_threads())


@pytest.mark.parametrize("threads", [1, 0])
def test_the_trainer_sizes_its_thread_pool_and_restores_it(tmp_path, threads):
    before = torch.get_num_threads()
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
        TrainOutputs(tmp_path / "c", tmp_path / "r"),
        sinks=[seen],
    )
    trainer.fit(tokens, tokens)
    # threads 0 and no other training registered: this one has every core the process may use
    expected = threads or trainer.core_share.cores
    assert seen.threads and set(seen.threads) == {expected}
    assert torch.get_num_threads() == before
