"""One optimizer step, and what it needs: the model as training calls it (sharded with FSDP2, wrapped in DDP,
compiled on request), its optimizer, learning-rate schedule and gradient scaler.

The Trainer (deepseek/trainer.py) decides when steps run and what happens between them; TrainStep is what a
step does: accumulate gradients over the micro-batches, clip them, and update the weights and the balancing
biases, unless the loss or a gradient is not finite on any rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypedDict, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_

from deepseek import distributed, fsdp
from deepseek.evaluation import autocast
from deepseek.model import DeepSeekLM, ModelOutput
from deepseek.optim import build_optimizer, lr_multiplier
from deepseek.train_config import TrainConfig
from deepseek.train_metrics import StepResult


class OptimizerState(TypedDict):
    optimizer: dict[str, Any]  # torch's state dicts, as torch types them
    scheduler: dict[str, Any]
    scaler: dict[str, Any]


class TrainStep:
    """The model, its optimizer, schedule and gradient scaler; calling it runs one optimizer step."""

    def __init__(self, model: DeepSeekLM, config: TrainConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.sharded = distributed.active() and config.parallel == "fsdp"
        self.step_model = self._wrap(model)  # before the optimizer: sharding replaces the parameters
        self.optimizer = build_optimizer(model, config, dtype)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(config))
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def _wrap(self, model: DeepSeekLM) -> torch.nn.Module:
        """What the training forward calls: the model sharded in place (FSDP2) or wrapped in DDP across processes,
        torch.compile on request."""
        step_model: torch.nn.Module = model
        if self.sharded:
            # On GPU the gathered weights compute in bf16 (fp16); on CPU autocast does as without sharding.
            fsdp.shard(model, self.dtype if self.device.type == "cuda" and self.dtype != torch.float32 else None)
        elif distributed.active():
            # broadcast_buffers=False: each rank's expert-load counts are its own until the balancing update.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            step_model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        if self.config.compile:
            step_model = cast(torch.nn.Module, torch.compile(step_model))
        return step_model

    def state_dict(self) -> OptimizerState:
        """Under FSDP a collective: every rank calls it."""
        optimizer = fsdp.optimizer_state(self.model, self.optimizer) if self.sharded else self.optimizer.state_dict()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: OptimizerState) -> None:
        if self.sharded:
            fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def __call__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimizer step over config.grad_accum_steps micro-batches."""
        c = self.config
        step_loss = torch.zeros((), device=self.device)
        step_mtp_losses = torch.zeros(self.model.config.mtp_depth, device=self.device)
        step_correct = torch.zeros((), dtype=torch.long, device=self.device)
        # One autocast context over the whole step: autocast keeps its bf16 copy of each weight until its outermost
        # context exits, so the weights are cast once per optimizer step, not once per micro-batch. Not under FSDP:
        # there each forward gathers its weights anew, and a copy cached from an earlier micro-batch's gathered
        # weights would send this micro-batch's gradients to those, where FSDP never reads them.
        with autocast(self.device, self.dtype, cache=not self.sharded):
            for micro_step in range(c.grad_accum_steps):
                inputs, targets = (t.to(self.device, non_blocking=True) for t in next(batches))
                with self._gradient_sync(micro_step == c.grad_accum_steps - 1):
                    out = self.step_model(inputs, targets)
                    loss = training_loss(out, c.mtp_loss_weight)
                    with torch.autocast(self.device.type, enabled=False):  # backward in the forward's dtypes
                        scaled = self.scaler.scale(loss / c.grad_accum_steps)
                        scaled.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                step_loss += cast(torch.Tensor, out.loss).detach()
                step_mtp_losses += cast(torch.Tensor, out.mtp_losses).detach()
                step_correct += (out.logits.detach().argmax(dim=-1) == targets).sum()
        return self._update(step_loss, step_mtp_losses, step_correct)

    def _update(self, step_loss: torch.Tensor, step_mtp_losses: torch.Tensor, correct: torch.Tensor) -> StepResult:
        """Clip the gradients, then update the weights and the balancing biases if every rank's loss and
        gradients are finite; the schedule moves on either way."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = fsdp.full_tensor(clip_grad_norm_(self.model.parameters(), self.config.grad_clip or float("inf")))
        lr = float(self.scheduler.get_last_lr()[0])
        # One host sync per optimizer step, the same decision on every rank: never train on NaN or inf.
        applied = distributed.all_ranks_agree(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
        loads = global_expert_loads(self.model)
        if applied:
            self.scaler.step(self.optimizer)
            self.model.update_expert_bias(loads)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped step still counts towards max_steps and the schedule
        return StepResult(step_loss, step_mtp_losses, correct, grad_norm, lr, loads, applied)

    def _gradient_sync(self, sync: bool) -> AbstractContextManager[Any]:
        """Across processes, gradients are averaged (DDP) or reduce-scattered (FSDP) once per step: with sync on
        the last micro-batch, and only then."""
        if self.sharded:
            fsdp.set_gradient_sync(self.model, sync)
        if sync or self.sharded or not distributed.active():
            return nullcontext()
        return cast(DistributedDataParallel, self.step_model).no_sync()


def training_loss(out: ModelOutput, mtp_loss_weight: float) -> torch.Tensor:
    """DeepSeek-V3 eq. 25: the main loss plus lambda / D times the sum of the D multi-token prediction losses."""
    loss, mtp_losses = cast(torch.Tensor, out.loss), cast(torch.Tensor, out.mtp_losses)
    return loss + mtp_loss_weight * mtp_losses.mean() if len(mtp_losses) else loss


def global_expert_loads(model: DeepSeekLM) -> torch.Tensor:
    """The tokens routed to each expert since the last balancing update, taken from the model and summed over
    every process, so that each rank applies the same bias update."""
    return distributed.sum_across_ranks(model.clear_expert_load())
