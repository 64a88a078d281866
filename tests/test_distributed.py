"""Training across processes with torchrun (gloo, CPU): DDP and FSDP2 match one process with the same global batch,
and resume where they stopped."""

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline_utils import stage_workspace
from training_runs import TORCHRUN, assert_same_training, finish, kill_after, results

WORKER = Path(__file__).with_name("parallel_worker.py")
# The train stage under FSDP: slow enough per step that a kill lands between checkpoints.
FSDP_PARAMS = {
    "max_steps": 12,
    "micro_batch_size": 4,
    "grad_accum_steps": 2,
    "seq_len": 32,
    "log_interval": 3,
    "eval_interval": 6,
    "checkpoint_interval": 2,
    "keep_checkpoints": 2,
    "sample_interval": 12,
    "device": "cpu",
    "threads": 1,
    "parallel": "fsdp",
}


def logged(out: Path, column: str = "loss") -> list[float]:
    with open(out / "reports" / "train_log.csv", newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def torchrun(*args: str) -> None:
    result = subprocess.run([*TORCHRUN, "2", str(WORKER), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, parallel):
    single, two = tmp_path / "single", tmp_path / parallel
    subprocess.run([sys.executable, str(WORKER), str(single), "--accum", "4"], check=True, capture_output=True)
    torchrun(str(two), "--accum", "2", "--parallel", parallel)

    assert len(logged(two)) == 6
    assert max(abs(a - b) for a, b in zip(logged(two), logged(single), strict=True)) <= 1e-5
    for a, b in zip(logged(two, "grad_norm"), logged(single, "grad_norm"), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [rank["sharded"] for rank in ranks] == [parallel == "fsdp"] * 2
    one = torch.load(single / "rank0.pt", weights_only=True)
    assert torch.equal(ranks[0]["biases"], ranks[1]["biases"])  # the same balancing update everywhere
    assert ranks[0]["biases"].abs().sum() > 0
    torch.testing.assert_close(ranks[0]["biases"], one["biases"])
    torch.testing.assert_close(ranks[0]["head"], ranks[1]["head"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["head"], one["head"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_resume_of_two_processes_logs_what_an_uninterrupted_run_logs(tmp_path, parallel):
    """The logging window (steps 1 to 3) spans the checkpoint at step 2: its sums must come back for both ranks."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--accum", "2", "--log-interval", "3", "--parallel", parallel)
    torchrun(str(full), *common)
    torchrun(str(resumed), *common, "--resume", str(full / "checkpoints" / "step_00000002"))
    assert len(logged(full)) == 2
    assert logged(resumed) == logged(full)


@pytest.mark.slow
def test_fsdp_gradients_equal_ddp_gradients_under_bf16_autocast(tmp_path):
    """With gradient accumulation: a bf16 copy of a weight cached by autocast across micro-batches would take the
    later micro-batches' gradients away from FSDP's gathered weights."""
    for parallel in ("ddp", "fsdp"):
        torchrun(str(tmp_path / parallel), "--accum", "2", "--parallel", parallel, "--dtype", "bfloat16")
    assert logged(tmp_path / "fsdp") == pytest.approx(logged(tmp_path / "ddp"), rel=1e-5)
    grad_norms = [logged(tmp_path / parallel, "grad_norm") for parallel in ("ddp", "fsdp")]
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-3)


@pytest.mark.slow
def test_muon_under_fsdp_orthogonalises_whole_matrices_as_one_process_does(tmp_path):
    """FSDP2 shards every matrix by rows (the stacked experts by expert); Newton-Schulz of a shard alone would
    give another update, so the weights would drift from one process's."""
    single, two = tmp_path / "single", tmp_path / "fsdp"
    common = ("--optimizer", "muon")
    subprocess.run([sys.executable, str(WORKER), str(single), "--accum", "4", *common], check=True, capture_output=True)
    torchrun(str(two), "--accum", "2", "--parallel", "fsdp", *common)

    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = torch.load(single / "rank0.pt", weights_only=True)
    assert {rank["optimizer"] for rank in (*ranks, one)} == {"MuonWithAdamW"} and ranks[0]["sharded"]
    assert logged(two) == pytest.approx(logged(single), abs=1e-5)
    for name in ("head", "experts"):  # AdamW's part and Muon's
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_training_killed_with_kill_9_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """The train stage itself under torchrun: the checkpoint gathered from the shards, and resumed into them."""
    straight = stage_workspace(tmp_path / "straight", monkeypatch, **FSDP_PARAMS)
    finish(straight, processes=2)
    killed = stage_workspace(tmp_path / "killed", monkeypatch, **FSDP_PARAMS)
    assert kill_after(killed, 4, signal.SIGKILL, processes=2).returncode == -signal.SIGKILL
    output = finish(killed, processes=2)
    assert "resuming from" in output, output[-3000:]
    assert_same_training(killed, results(straight), logged_rows=4)
