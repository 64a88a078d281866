"""Fault-tolerant training: kill -9 and resume, SIGTERM, damaged or malicious checkpoints, non-finite steps."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deepseek.checkpoint import find_resume_point, list_checkpoints

from pipeline_utils import ROOT, set_params, stage_workspace
from training_runs import assert_same_training, finish, kill_after, newest_step, results
from workers import built_once, run_directory

# Slow enough per step (a few tens of ms) that a kill lands between checkpoints.
RESUME_PARAMS = {
    "max_steps": 30,
    "micro_batch_size": 8,
    "grad_accum_steps": 4,
    "seq_len": 64,
    "log_interval": 3,
    "eval_interval": 10,
    "checkpoint_interval": 2,
    "keep_checkpoints": 2,
    "sample_interval": 30,
}


def train_uninterrupted(path: Path) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        stage_workspace(path, monkeypatch, **RESUME_PARAMS)
        finish(path)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The training the interrupted ones must end as: run once for the test run, by the first worker to need it."""
    return results(built_once(run_directory(tmp_path_factory), "resume-uninterrupted", train_uninterrupted))


@pytest.mark.slow
def test_kill_9_at_three_points_then_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, uninterrupted):
    path = stage_workspace(tmp_path, monkeypatch, **RESUME_PARAMS)
    for step in (4, 13, 22):  # not multiples of the logging interval: windows are resumed mid-way
        killed = kill_after(path, step)
        assert killed.returncode == -signal.SIGKILL
    output = finish(path)
    assert "resuming from" in output
    assert_same_training(path, uninterrupted)


@pytest.mark.slow
def test_a_muon_training_killed_with_kill_9_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Muon's momentum buffers, beside AdamW's moments for the embedding, head and norms, come back exactly."""
    muon_params = {**RESUME_PARAMS, "optimizer": "muon"}
    straight = stage_workspace(tmp_path / "straight", monkeypatch, **muon_params)
    finish(straight)
    killed = stage_workspace(tmp_path / "killed", monkeypatch, **muon_params)
    assert kill_after(killed, 13).returncode == -signal.SIGKILL
    assert "resuming from" in finish(killed)
    assert_same_training(killed, results(straight))
    checkpoint = list_checkpoints(killed / "model" / "checkpoints")[-1]
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]
    assert [group["muon"] for group in state["param_groups"]] == [True, False, False]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, exit_code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C, SIGINT")]
)
def test_a_signal_saves_a_checkpoint_and_exits_with_its_code_then_resumes(
    tmp_path, monkeypatch, uninterrupted, sig, exit_code, name
):
    path = stage_workspace(tmp_path, monkeypatch, **RESUME_PARAMS)
    stopped = kill_after(path, 6, sig)
    assert stopped.stdout is not None
    output = stopped.stdout.read()
    assert stopped.returncode == exit_code, output
    assert f"Interrupted ({name}): stopped at step" in output
    assert "Traceback" not in output and "Error:" not in output  # a requested stop is no error
    stopped_at = int(output.split("stopped at step ")[1].split(",")[0])
    assert newest_step(path) == stopped_at
    finish(path)
    assert_same_training(path, uninterrupted)


def make_checkpoints(path: Path, monkeypatch) -> list[Path]:
    path = stage_workspace(path, monkeypatch, max_steps=4, checkpoint_interval=2, keep_checkpoints=3)
    finish(path)
    checkpoints = list_checkpoints(path / "model" / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000002", "step_00000004"]
    return checkpoints


def fingerprint_of(checkpoint: Path) -> dict[str, str]:
    return json.loads((checkpoint / "checkpoint.json").read_text())["fingerprint"]


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    older, latest = make_checkpoints(tmp_path, monkeypatch)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping checkpoint step_00000004: model.safetensors is truncated"):
        point = find_resume_point(latest.parent, fingerprint_of(latest))
    assert point is not None and point.path == older


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"optimizer": Payload(marker)}, f)


@pytest.mark.slow
def test_malicious_pickle_is_refused_everywhere_and_never_runs(tmp_path, monkeypatch):
    older, latest = make_checkpoints(tmp_path / "ws", monkeypatch)
    marker = tmp_path / "pwned"
    # Resume: the attacker even fixes the recorded hash; torch.load(weights_only=True) still refuses.
    plant_pickle(latest / "trainer_state.pt", marker)
    info = json.loads((latest / "checkpoint.json").read_text())
    info["sha256"]["trainer_state.pt"] = hashlib.sha256((latest / "trainer_state.pt").read_bytes()).hexdigest()
    (latest / "checkpoint.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="refusing to load .*trainer_state.pt"):
        point = find_resume_point(latest.parent, fingerprint_of(latest))
        assert point is not None and point.path == older
    # Every command that loads a model directory: the weights file is now a pickle.
    final = tmp_path / "ws" / "model" / "final"
    plant_pickle(final / "model.safetensors", marker)
    commands = [["evaluate"], ["sample"], ["generate", "hello"], ["export-hf", "--out", str(tmp_path / "hf")]]
    for args in commands:
        result = subprocess.run(
            [sys.executable, "-m", "stages.cli", *args],
            cwd=tmp_path / "ws",
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "is not a valid safetensors file" in result.stderr and "Traceback" not in result.stderr, args
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_non_finite_steps_are_skipped_and_too_many_stop_training(tmp_path):
    import numpy as np

    from deepseek.config import ModelConfig
    from deepseek.model import DeepSeekLM
    from deepseek.stopping import TrainingStopped
    from deepseek.train_config import TrainConfig
    from deepseek.trainer import Trainer, TrainOutputs

    tokens = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint16)
    params = TrainConfig(
        max_steps=6,
        micro_batch_size=2,
        grad_accum_steps=1,
        seq_len=16,
        log_interval=1,
        eval_interval=6,
        eval_batches=1,
        checkpoint_interval=100,
        max_nonfinite_steps=3,
    )
    model = DeepSeekLM(ModelConfig.from_preset("tiny"))
    calls = {"n": 0}

    def poison_step_two(module, inputs, output):  # the third forward (step 3) returns NaN logits
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    handle = model.head.register_forward_hook(poison_step_two)
    Trainer(model, params, 0, TrainOutputs(tmp_path / "ck", tmp_path / "rep" / "train_log.csv")).fit(tokens, tokens)
    handle.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(list((tmp_path / "rep").glob("train_log.csv"))) == 1

    broken = DeepSeekLM(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        broken.norm.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in broken.state_dict().items()}
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss") as stopped:
        Trainer(broken, params, 0, TrainOutputs(tmp_path / "ck2")).fit(tokens, tokens)
    assert stopped.value.exit_code == 1
    assert [c.name for c in list_checkpoints(tmp_path / "ck2")] == ["step_00000003"]
    for name, value in broken.state_dict().items():  # never trained on NaN: nothing moved
        if name != "norm.weight":
            assert torch.equal(value, before[name]), name


def test_a_run_stopped_for_non_finite_steps_never_ends_as_a_success(tmp_path):
    """Rerunning to resume continues the streak; a run whose last steps were skipped does not succeed either."""
    import numpy as np

    from deepseek.config import ModelConfig
    from deepseek.model import DeepSeekLM
    from deepseek.stopping import TrainingStopped
    from deepseek.train_config import TrainConfig
    from deepseek.trainer import Trainer, TrainOutputs

    tokens = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint16)
    params = TrainConfig(
        max_steps=4,
        micro_batch_size=2,
        grad_accum_steps=1,
        seq_len=16,
        log_interval=1,
        eval_interval=4,
        eval_batches=1,
        checkpoint_interval=100,
        max_nonfinite_steps=3,
    )
    fingerprint = {"params": "p", "data": "d", "code": "c"}

    def diverged() -> DeepSeekLM:
        model = DeepSeekLM(ModelConfig.from_preset("tiny"))
        with torch.no_grad():
            model.norm.weight.fill_(float("nan"))
        return model

    def trainer(config: TrainConfig) -> Trainer:
        outputs = TrainOutputs(tmp_path / "ck")
        return Trainer(diverged(), config, 0, outputs, checkpoint_info={"fingerprint": fingerprint})

    with pytest.raises(TrainingStopped, match="3 steps in a row"):
        trainer(params).fit(tokens, tokens)
    resumed = trainer(params)
    point = find_resume_point(tmp_path / "ck", fingerprint)
    assert point is not None
    resumed.resume(point)
    with pytest.raises(TrainingStopped, match=r"4 steps in a row had a non-finite .* the last") as stopped:
        resumed.fit(tokens, tokens)  # one step left: it is skipped too, and the streak did not restart at 0
    assert stopped.value.exit_code == 1
    assert "a lower train.lr or a higher train.grad_clip trains from the start" in str(stopped.value)

    patient = replace(params, max_nonfinite_steps=10)  # every step skipped, but fewer than the limit
    shutil.rmtree(tmp_path / "ck")
    with pytest.raises(TrainingStopped, match=r"4 steps in a row .* the last"):
        trainer(patient).fit(tokens, tokens)


@pytest.mark.slow
def test_resume_survives_bookkeeping_changes_and_sets_other_params_aside(tmp_path, monkeypatch):
    """Resume is keyed on what changes the weights: a new logging or checkpoint interval resumes; a new learning
    rate starts over, and the old checkpoints are moved aside, never deleted, with a message saying why."""
    path = stage_workspace(tmp_path, monkeypatch, **RESUME_PARAMS)
    kill_after(path, 4)
    set_params(path, train={"log_interval": 5, "eval_interval": 15, "checkpoint_interval": 3, "keep_checkpoints": 3})
    resumed = kill_after(path, 9)
    assert resumed.stdout is not None and "resuming from" in resumed.stdout.read()
    kept = {c.name for c in list_checkpoints(path / "model" / "checkpoints")}
    set_params(path, train={"lr": 1e-3})
    output = finish(path)
    assert "resuming from" not in output
    assert "were made with other params, so training starts over; they are kept in" in output
    (aside,) = (path / "model" / "checkpoints" / "superseded").iterdir()
    assert aside.name.startswith("params-") and {c.name for c in aside.iterdir()} == kept


@pytest.mark.slow
def test_rerunning_a_finished_training_trains_again_in_a_new_mlflow_run(tmp_path, monkeypatch):
    """dvc repro -f after a finished training: it trains again (the same result), in a run of its own."""
    path = stage_workspace(tmp_path, monkeypatch, max_steps=4, checkpoint_interval=2)
    finish(path)
    first_run = json.loads((path / "reports" / "mlflow_run.json").read_text())["run_id"]
    first = results(path)
    output = finish(path)
    assert "is a finished training of these params, data and code: training again" in output
    assert "resuming from" not in output
    assert json.loads((path / "reports" / "mlflow_run.json").read_text())["run_id"] != first_run
    assert_same_training(path, first, logged_rows=2)
