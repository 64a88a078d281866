"""`python -m stages.train` (or torchrun of it) as a subprocess in a stage_workspace: kill it at a checkpoint,
finish it, and compare what two trainings left."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from deepseek.checkpoint import list_checkpoints

from pipeline_utils import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def train_process(path: Path, processes: int = 1) -> subprocess.Popen:
    """The train stage in path; processes > 1: under torchrun. Its own process group, so that a kill takes every
    rank and torchrun with it."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow.db'}",
    }
    launcher = [*TORCHRUN, str(processes)] if processes > 1 else [sys.executable]
    return subprocess.Popen(
        [*launcher, "-m", "stages.train"],
        cwd=path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def newest_step(path: Path) -> int:
    checkpoints = list_checkpoints(path / "model" / "checkpoints")
    return int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0


def kill_after(path: Path, step: int, sig: int = signal.SIGKILL, processes: int = 1) -> subprocess.Popen:
    """Start training and send sig to all of it once the checkpoint of `step` (or a later one) exists."""
    process = train_process(path, processes)
    assert process.stdout is not None  # a pipe: train_process merges stderr into it
    deadline = time.monotonic() + 120
    while newest_step(path) < step:
        assert process.poll() is None, f"training ended before step {step}:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "training did not reach the step in time"
        time.sleep(0.01)
    os.killpg(process.pid, sig)
    process.wait(timeout=120)
    return process


def finish(path: Path, processes: int = 1) -> str:
    process = train_process(path, processes)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def results(path: Path) -> tuple[dict, dict[str, torch.Tensor], list[dict]]:
    metrics = json.loads((path / "reports" / "train_summary.json").read_text())
    metrics.pop("tokens_per_s")
    with open(path / "reports" / "train_log.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in csv.DictReader(f)]
    return metrics, load_file(path / "model" / "final" / "model.safetensors"), rows


def assert_same_training(path: Path, reference, logged_rows: int = 10) -> None:
    metrics, weights, rows = results(path)
    ref_metrics, ref_weights, ref_rows = reference
    assert metrics == ref_metrics
    assert rows == ref_rows and len(rows) == logged_rows  # every logged value but the throughput
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
