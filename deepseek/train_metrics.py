"""What a training measures and keeps: the running sums of the logging window, throughput, the loss history,
and the results of a step and of a whole fit.

Rows of the history are flat {column: value} dicts, as the CSV logs and checkpoints hold them.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypedDict

import numpy as np
import torch

from deepseek import distributed
from deepseek.balance import max_violation
from deepseek.files import write_text

Row = dict[str, float]  # one step's values by column name; the step itself is an int


class MetricsSink(Protocol):
    """Anything that records metrics by step (MLflow in the pipeline)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class History:
    train: list[Row] = field(default_factory=list)
    val: list[Row] = field(default_factory=list)

    def write(self, train_log: Path | None, val_log: Path | None) -> None:
        """Each history as CSV where a path is given."""
        for path, rows in ((train_log, self.train), (val_log, self.val)):
            if path is not None and rows:
                buffer = io.StringIO()
                writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
                write_text(path, buffer.getvalue())


class ThroughputClock:
    """Training tokens per second, leaving out time spent evaluating, sampling and checkpointing."""

    def __init__(self) -> None:
        self.lap_start, self.paused_s, self.lap_tokens = time.perf_counter(), 0.0, 0
        self.total_tokens, self.total_s = 0, 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def add(self, tokens: int) -> None:
        self.lap_tokens += tokens

    def lap(self) -> float:
        """Tokens per second since the previous lap."""
        now = time.perf_counter()
        elapsed = now - self.lap_start - self.paused_s
        rate = self.lap_tokens / elapsed
        self.total_tokens += self.lap_tokens
        self.total_s += elapsed
        self.lap_start, self.paused_s, self.lap_tokens = now, 0.0, 0
        return rate

    @property
    def overall(self) -> float:
        return self.total_tokens / self.total_s


@dataclass
class StepResult:
    loss: torch.Tensor  # the main model's, summed over the step's micro-batches, on the device
    mtp_losses: torch.Tensor  # (mtp_depth,) each multi-token prediction depth's, summed likewise
    correct: torch.Tensor  # next-token predictions that were right, over the step's micro-batches
    grad_norm: torch.Tensor  # before clipping
    lr: float
    loads: torch.Tensor  # tokens routed to each expert, (num_moe_layers, num_experts), summed over ranks
    applied: bool  # False: the loss or a gradient was not finite on some rank, and nothing was updated


class WindowState(TypedDict):
    loss_sum: float
    mtp_loss_sum: list[float]
    correct: int
    scored: int


class LossWindow:
    """Running sums over the current logging window; they stay on the device, so steps never wait for the host."""

    def __init__(self, device: torch.device, mtp_depth: int) -> None:
        # float64: a sum of a few float32 losses is exact, so it is the same in any order (each rank's, then across
        # ranks; or across ranks at a checkpoint, then on after a resume).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.mtp_loss_sum = torch.zeros(mtp_depth, dtype=torch.float64, device=device)  # per prediction depth
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.scored = 0  # tokens

    def add(self, result: StepResult, tokens: int) -> None:
        self.loss_sum += result.loss
        self.mtp_loss_sum += result.mtp_losses
        self.correct += result.correct
        self.scored += tokens

    def state_dict(self) -> WindowState:
        """The sums over every rank (a collective: all ranks call it); scored counts one rank's tokens."""
        loss_sum = distributed.sum_across_ranks(self.loss_sum.clone())
        mtp_loss_sum = distributed.sum_across_ranks(self.mtp_loss_sum.clone())
        correct = distributed.sum_across_ranks(self.correct.clone())
        return {
            "loss_sum": loss_sum.item(),
            "mtp_loss_sum": mtp_loss_sum.tolist(),
            "correct": int(correct.item()),
            "scored": self.scored,
        }

    def load_state_dict(self, state: WindowState) -> None:
        """Rank 0 takes the sums of all ranks and the others start from zero, so that their sum is right."""
        share = 1 if distributed.is_main() else 0
        self.loss_sum.fill_(state["loss_sum"] * share)
        self.mtp_loss_sum.copy_(torch.tensor(state["mtp_loss_sum"], dtype=torch.float64) * share)
        self.correct.fill_(state["correct"] * share)
        self.scored = state["scored"]

    def summary(self, micro_batch_tokens: int, clock: ThroughputClock, result: StepResult) -> tuple[Row, list[float]]:
        """The window's mean loss and accuracy over the whole global batch (a collective), with this step's
        learning rate, gradient norm and mean expert imbalance; and each MoE layer's imbalance. Then the window
        starts over."""
        for total in (self.loss_sum, self.mtp_loss_sum, self.correct):
            distributed.sum_across_ranks(total)
        scored = self.scored * distributed.world_size()
        micro_batches = scored // micro_batch_tokens  # the sums add one mean loss per micro-batch
        row = {
            "loss": self.loss_sum.item() / micro_batches,
            **{f"mtp_loss_{k}": s / micro_batches for k, s in enumerate(self.mtp_loss_sum.tolist(), start=1)},
            "accuracy": self.correct.item() / scored,
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "tokens_per_s": clock.lap(),
        }
        layer_vio: list[float] = max_violation(result.loads).tolist()
        row["max_vio"] = float(np.mean(layer_vio)) if layer_vio else 0.0
        self.reset()
        return row, layer_vio

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.mtp_loss_sum.zero_()
        self.correct.zero_()
        self.scored = 0


@dataclass(frozen=True)
class FitMetrics:
    """What Trainer.fit returns: the last logging window's, the last sampled validation, and the totals."""

    train_loss: float
    train_accuracy: float
    val_loss_sampled: float | None  # None: no evaluation ran
    tokens_per_s: float
    steps: int
    skipped_steps: int
    tokens: int
