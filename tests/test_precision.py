"""bf16 mixed precision on CPU: float32 master weights and optimizer state, one weight cast per optimizer step,
exact resume, and what train.dtype auto chooses."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepseek.checkpoint import checkpoint_path, find_resume_point
from deepseek.config import ModelConfig
from deepseek.cpu import fast_bf16, native_bf16_units
from deepseek.device import describe_precision, precision_reason, resolve_dtype
from deepseek.evaluation import autocast
from deepseek.model import DeepSeekLM
from deepseek.train_config import TrainConfig
from deepseek.trainer import Trainer, TrainOutputs

from conftest import randomized

CPU = torch.device("cpu")
RUN = {"params": "tiny"}  # the resume fingerprint of these trainings


def tiny_training(dtype: str, max_steps: int = 6, **overrides) -> TrainConfig:
    settings: dict[str, Any] = {
        "max_steps": max_steps,
        "micro_batch_size": 4,
        "grad_accum_steps": 2,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 2,
        "device": "cpu",
        "dtype": dtype,
        "log_interval": 2,
        "eval_interval": 1000,
        "sample_interval": 1000,
        "checkpoint_interval": 3,
        "eval_batches": 1,
    }
    return TrainConfig(**(settings | overrides))


def corpus() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)


def trained(dtype: str, tmp_path, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=256))
    outputs = TrainOutputs(tmp_path / "ck")
    trainer = Trainer(model, tiny_training(dtype, **overrides), 0, outputs, checkpoint_info={"fingerprint": RUN})
    tokens = corpus()
    trainer.fit(tokens, tokens)
    return trainer


def losses(trainer: Trainer) -> list[float]:
    return [row["loss"] for row in trainer.history.train]


def test_bf16_training_keeps_float32_master_weights_and_optimizer_state(tmp_path):
    bf16 = trained("bfloat16", tmp_path / "bf16")
    fp32 = trained("float32", tmp_path / "fp32")
    assert bf16.dtype == torch.bfloat16
    for name, param in bf16.model.named_parameters():
        assert param.dtype == torch.float32, name
    for state in bf16.train_step.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    for moe in bf16.model.moe_layers():
        assert moe.gate.expert_bias.dtype == torch.float32
    # bf16 really computed (the losses differ from fp32's) and trained about as well
    bf16_losses, fp32_losses = np.array(losses(bf16)), np.array(losses(fp32))
    assert not np.array_equal(bf16_losses, fp32_losses)
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=0.02)
    assert bf16_losses[-1] < bf16_losses[0]


def test_one_autocast_over_the_micro_batches_gives_the_gradients_of_one_per_micro_batch():
    """The trainer's autocast spans the whole step, so each weight is cast once; the gradients are exactly those
    of a cast per micro-batch."""
    config = ModelConfig.from_preset("tiny")
    per_micro_batch = randomized(DeepSeekLM(config)).train()
    per_step = randomized(DeepSeekLM(config)).train()
    per_step.load_state_dict(per_micro_batch.state_dict())
    ids = torch.randint(0, config.vocab_size, (8, 33))
    chunks = list(zip(ids[:, :-1].chunk(4), ids[:, 1:].chunk(4), strict=True))

    for inputs, targets in chunks:
        with autocast(CPU, torch.bfloat16):
            loss = per_micro_batch(inputs, targets).loss
        (loss / 4).backward()
    with autocast(CPU, torch.bfloat16):
        for inputs, targets in chunks:
            loss = per_step(inputs, targets).loss
            with torch.autocast("cpu", enabled=False):
                (loss / 4).backward()

    for (name, expected), actual in zip(per_micro_batch.named_parameters(), per_step.parameters(), strict=True):
        assert actual.grad is not None and expected.grad is not None, name
        assert actual.grad.dtype == torch.float32
        assert torch.equal(actual.grad, expected.grad), name


def test_a_bf16_checkpoint_resumes_bit_identically(tmp_path):
    straight = trained("bfloat16", tmp_path, checkpoint_interval=3)  # checkpoints at steps 3 and 6
    shutil.rmtree(checkpoint_path(straight.outputs.checkpoint_dir, 6))  # as if killed after step 3's checkpoint
    point = find_resume_point(straight.outputs.checkpoint_dir, RUN)
    assert point is not None and point.info["step"] == 3

    torch.manual_seed(123)  # as a fresh process: other weights and RNG state, all replaced by the checkpoint
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=256))
    outputs = TrainOutputs(tmp_path / "resumed" / "ck")
    resumed = Trainer(model, straight.config, 0, outputs)
    resumed.resume(point)
    tokens = corpus()
    resumed.fit(tokens, tokens)

    for (name, expected), actual in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(actual, expected), name
    for group, other in zip(
        straight.train_step.optimizer.state.values(), resumed.train_step.optimizer.state.values(), strict=True
    ):
        assert torch.equal(group["exp_avg"], other["exp_avg"]) and torch.equal(group["exp_avg_sq"], other["exp_avg_sq"])
    assert losses(resumed) == losses(straight)  # the logged curve too, the window across the resume included


def test_auto_precision_is_bf16_exactly_on_cpus_with_native_bf16(monkeypatch):
    monkeypatch.setattr("deepseek.device.fast_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr("deepseek.device.fast_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("float32", CPU) == torch.float32  # an explicit choice wins everywhere
    assert describe_precision(torch.float32) == "float32"
    assert describe_precision(torch.bfloat16).startswith("bfloat16 autocast over float32 weights")


def test_the_precision_reason_names_the_setting_or_the_cpu_units_auto_saw(monkeypatch):
    monkeypatch.setattr("deepseek.device.native_bf16_units", lambda: ["AMX-BF16", "AVX512-BF16"])
    assert (
        precision_reason("auto", CPU) == "train.dtype auto: this CPU multiplies bf16 natively (AMX-BF16, AVX512-BF16)"
    )
    monkeypatch.setattr("deepseek.device.native_bf16_units", lambda: [])
    assert precision_reason("auto", CPU).startswith("train.dtype auto: this CPU has no native bf16")
    assert precision_reason("bfloat16", CPU) == "train.dtype bfloat16"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="the CPU flags are read from Linux's /proc/cpuinfo")
def test_fast_bf16_follows_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert fast_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)
    units = {"AMX-BF16": "amx_bf16" in flags, "AVX512-BF16": "avx512_bf16" in flags}
    assert native_bf16_units() == [name for name, present in units.items() if present]
