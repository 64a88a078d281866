"""Data-parallel training with torchrun (gloo, CPU) matches one process with the same global batch."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def losses(out: Path) -> list[float]:
    with open(out / "reports" / "train_log.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, str(WORKER), str(single), "4"], check=True, capture_output=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            str(ddp),
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    assert len(losses(ddp)) == 6
    assert max(abs(a - b) for a, b in zip(losses(ddp), losses(single), strict=True)) <= 1e-5
    ranks = [torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(single / "rank0.pt", weights_only=True)
    assert torch.equal(ranks[0]["biases"], ranks[1]["biases"])  # the same balancing update everywhere
    assert ranks[0]["biases"].abs().sum() > 0
    torch.testing.assert_close(ranks[0]["biases"], one["biases"])
    torch.testing.assert_close(ranks[0]["head"], ranks[1]["head"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["head"], one["head"], rtol=1e-4, atol=1e-6)


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    result = subprocess.run([*command, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_resume_of_two_processes_logs_what_an_uninterrupted_run_logs(tmp_path):
    """The logging window (steps 1 to 3) spans the checkpoint at step 2: its sums must come back for both ranks."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(str(full), "2", "3")
    torchrun(str(resumed), "2", "3", str(full / "checkpoints" / "step_00000002"))
    assert len(losses(full)) == 2
    assert losses(resumed) == losses(full)
