"""TrainConfig: how to train a model, from the optimisation and its schedule to when to log, evaluate, sample
and checkpoint.

A frozen dataclass that checks its values on construction, as ModelConfig does (errors.require): a bad value
raises ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from deepseek.errors import require

ParamValue = int | float | str | bool  # a field's value
# When to log, evaluate, sample and checkpoint, and how many non-finite steps in a row to bear: positive counts
# that never change the trained weights.
SCHEDULE = (
    "log_interval",
    "eval_interval",
    "eval_batches",
    "sample_interval",
    "checkpoint_interval",
    "keep_checkpoints",
    "max_nonfinite_steps",
)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the optimisation, its schedule, precision, and when to log, evaluate, sample and checkpoint."""

    max_steps: int = 600  # optimizer steps; each is micro_batch_size * grad_accum_steps sequences
    # adamw: AdamW for every weight | muon: Muon for the hidden matrices, AdamW for the rest (deepseek/muon.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    micro_batch_size: int = 16
    grad_accum_steps: int = 4
    seq_len: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-4  # the cosine decay ends here
    warmup_steps: int = 30
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = no clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 (or fp16) on CUDA; bf16 on CPUs with AMX or AVX512-BF16, fp32 on other CPUs
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8  # validation batches, spread over the split, for val_loss_sampled
    sample_interval: int = 200
    checkpoint_interval: int = 200
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # stop (with a checkpoint) after this many skipped non-finite steps in a row
    num_workers: int = 0
    # CPU threads: 0 = the cores other programs leave free, divided among the trainings running at once, rechecked
    # as training goes (deepseek.cpu.CoreShare); N = exactly N
    threads: int = 0
    compile: bool = False  # torch.compile the training forward
    # Under torchrun: ddp replicates the weights on every rank; fsdp shards weights, gradients and optimizer state
    # (FSDP2), for models larger than one device. One process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # lambda of DeepSeek-V3 eq. 25: loss = main + lambda * mean of the multi-token prediction losses (mtp_depth > 0)
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "micro_batch_size",
            "grad_accum_steps",
            "seq_len",
            *SCHEDULE,
        ):
            require(getattr(self, name) > 0, name, "must be positive")
        for name in (
            "lr",
            "min_lr",
            "weight_decay",
            "grad_clip",
            "warmup_steps",
            "num_workers",
            "mtp_loss_weight",
            "threads",
        ):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.min_lr <= self.lr, "min_lr", f"({self.min_lr}) must be <= lr ({self.lr})")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        require(self.optimizer in ("adamw", "muon"), "optimizer", "must be adamw or muon")
        require(self.parallel in ("ddp", "fsdp"), "parallel", "must be ddp or fsdp")
        require(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "dtype",
            "must be auto, float32, bfloat16 or float16",
        )

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.seq_len

    def optimisation(self) -> dict[str, ParamValue]:
        """The fields that change the trained weights, for resuming: not when to log, evaluate, sample or
        checkpoint, nor how many loader workers, threads or non-finite steps in a row to bear."""
        bookkeeping = {*SCHEDULE, "num_workers", "threads"}
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in bookkeeping}
