"""The training engine: AdamW (or Muon, deepseek/muon.py) with warmup and cosine decay, gradient accumulation,
mixed precision, auxiliary-loss-free balancing after every optimizer step, periodic validation, samples and checkpoints.

    trainer = Trainer(model, TrainConfig(...), seed, TrainOutputs(checkpoint_dir, reports_dir))
    metrics = trainer.fit(train_tokens, val_tokens)

`Trainer.train_step` is one optimizer step; `Trainer._after_step` is the one place that decides when to log,
evaluate, sample and checkpoint; `state_dict`/`load_state_dict` hold everything but the weights that an
exact resume needs.
"""

from __future__ import annotations

import csv
import io
import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_
from tqdm.auto import tqdm

from deepseek import distributed, fsdp
from deepseek.balance import max_violation
from deepseek.batches import check_token_ids, training_batches
from deepseek.checkpoint import ResumePoint, checkpoint_path, save_checkpoint
from deepseek.config import TrainConfig
from deepseek.cpu import CoreShare, fast_bf16, keep_freed_memory, native_bf16_units
from deepseek.errors import UserError
from deepseek.evaluation import autocast, evaluate
from deepseek.files import write_text
from deepseek.generate import generate
from deepseek.model import DeepSeekLM, ModelOutput
from deepseek.muon import MuonWithAdamW


class MetricsSink(Protocol):
    """Anything that records metrics by step (the CSV logs here; MLflow in the pipeline)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainOutputs:
    checkpoint_dir: Path
    reports_dir: Path  # train_log.csv, val_log.csv: the loss curves DVC plots

    def __post_init__(self) -> None:
        self.checkpoint_dir, self.reports_dir = Path(self.checkpoint_dir), Path(self.reports_dir)


@dataclass
class Sampler:
    """Turns a prompt into text with the model, for the periodic samples during training."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int


@dataclass
class History:
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)

    def write(self, reports_dir: Path) -> None:
        for name, rows in (("train_log.csv", self.train), ("val_log.csv", self.val)):
            if rows:
                buffer = io.StringIO()
                writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
                write_text(reports_dir / name, buffer.getvalue())


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


class Window:
    """Running sums over the current logging window; they stay on the device, so steps never wait for the host."""

    def __init__(self, device: torch.device, mtp_depth: int) -> None:
        # float64: a sum of a few float32 losses is exact, so it is the same in any order (each rank's, then across
        # ranks; or across ranks at a checkpoint, then on after a resume).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.mtp_loss_sum = torch.zeros(mtp_depth, dtype=torch.float64, device=device)  # per prediction depth
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.scored = 0  # tokens

    def state_dict(self) -> dict[str, Any]:
        """The sums over every rank (a collective: all ranks call it); scored counts one rank's tokens."""
        loss_sum = distributed.sum_across_ranks(self.loss_sum.clone())
        mtp_loss_sum = distributed.sum_across_ranks(self.mtp_loss_sum.clone())
        correct = distributed.sum_across_ranks(self.correct.clone())
        return {
            "loss_sum": loss_sum.item(),
            "mtp_loss_sum": mtp_loss_sum.tolist(),
            "correct": correct.item(),
            "scored": self.scored,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rank 0 takes the sums of all ranks and the others start from zero, so that their sum is right."""
        share = 1 if distributed.is_main() else 0
        self.loss_sum.fill_(state["loss_sum"] * share)
        self.mtp_loss_sum.copy_(torch.tensor(state["mtp_loss_sum"], dtype=torch.float64) * share)
        self.correct.fill_(state["correct"] * share)
        self.scored = state["scored"]

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.mtp_loss_sum.zero_()
        self.correct.zero_()
        self.scored = 0


@dataclass
class StepResult:
    loss: torch.Tensor  # the main model's, summed over the step's micro-batches, on the device
    mtp_losses: torch.Tensor  # (mtp_depth,) each multi-token prediction depth's, summed likewise
    correct: torch.Tensor  # next-token predictions that were right, over the step's micro-batches
    grad_norm: torch.Tensor  # before clipping
    lr: float
    loads: torch.Tensor  # tokens routed to each expert, (num_moe_layers, num_experts), summed over ranks
    applied: bool  # False: the loss or a gradient was not finite on some rank, and nothing was updated


class TrainingStopped(Exception):
    """Training ended early, after saving a checkpoint: on a signal, or after too many non-finite steps."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def by_signal(self) -> bool:
        """Stopped on request (Ctrl-C, SIGTERM), which is no error."""
        return self.exit_code in SIGNAL_EXIT_CODES.values()


SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C, SIGINT", signal.SIGTERM: "SIGTERM"}


class Trainer:
    """Trains a DeepSeekLM in place for config.max_steps optimizer steps; resumable from its checkpoints.

    Under torchrun each rank trains on its own slice of every global batch, with the weights replicated
    (train.parallel ddp: DistributedDataParallel averages the gradients) or sharded (fsdp: deepseek/fsdp.py).
    Expert loads are summed across ranks before the balancing update, and only rank 0 logs and writes files.
    """

    def __init__(
        self,
        model: DeepSeekLM,
        config: TrainConfig,
        seed: int,
        outputs: TrainOutputs,
        sampler: Sampler | None = None,
        sinks: Sequence[MetricsSink] = (),
        checkpoint_info: dict[str, Any] | None = None,
    ) -> None:
        self.config, self.seed, self.outputs, self.sampler, self.sinks = config, seed, outputs, sampler, sinks
        self.checkpoint_info = checkpoint_info or {}  # goes into every checkpoint
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            keep_freed_memory()
        # On CPU, train.threads 0 shares the cores with the other trainings running at once.
        self.core_share = CoreShare() if self.device.type == "cpu" and config.threads == 0 else None
        self.model = model.to(self.device).train()
        self.sharded = distributed.active() and config.parallel == "fsdp"
        self.step_model = self._wrap(self.model)  # before the optimizer: sharding replaces the parameters
        self.optimizer = build_optimizer(self.model, config, self.dtype)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(config))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.window = Window(self.device, model.config.mtp_depth)
        self.history = History()
        self.clock = ThroughputClock()
        self.step = 0  # optimizer steps done
        self.nonfinite_streak = 0  # steps skipped in a row, up to now
        self.skipped_steps = 0  # steps skipped in all
        self.main_rank = distributed.is_main()
        self._resumed_from: Path | None = None
        self._resume_rng: torch.Tensor | None = None
        self._say: Callable[[str], None] = print

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
            step_model = torch.compile(step_model)  # type: ignore[assignment]
        return step_model

    # --- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that training needs to go on exactly where it stopped. Under torchrun a
        collective: every rank calls it."""
        optimizer = fsdp.optimizer_state(self.model, self.optimizer) if self.sharded else self.optimizer.state_dict()
        return {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "window": self.window.state_dict(),
            # A stop for non-finite steps must not become a success by rerunning: the streak goes on.
            "nonfinite": {"streak": self.nonfinite_streak, "skipped": self.skipped_steps},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded:
            fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.window.load_state_dict(state["window"])
        self.nonfinite_streak, self.skipped_steps = state["nonfinite"]["streak"], state["nonfinite"]["skipped"]
        self._resume_rng = state["torch_rng"]  # restored once the data loader exists: making it draws from the RNG

    def resume(self, point: ResumePoint) -> None:
        """Continue from a checkpoint: its weights, trainer state, loss history and step."""
        if self.sharded:
            fsdp.load_weights(self.model, point.weights_file)
        else:
            point.load_weights(self.model)
        self.load_state_dict(point.trainer_state)
        self.history = History(**point.info["history"])
        self.step = point.info["step"]
        self._resumed_from = point.path

    # --- training ---------------------------------------------------------------------------------------------

    def fit(self, train_tokens: np.ndarray, val_tokens: np.ndarray) -> dict[str, Any]:
        """Train until config.max_steps; returns the final metrics. Raises TrainingStopped on a signal (after
        a checkpoint) or after config.max_nonfinite_steps non-finite steps in a row."""
        c = self.config
        for tokens, split in ((train_tokens, "training"), (val_tokens, "validation")):
            check_token_ids(tokens, self.model.config.vocab_size, f"the {split} tokens")
        batches = iter(
            training_batches(
                train_tokens,
                c.seq_len,
                c.micro_batch_size,
                c.grad_accum_steps,
                self.seed,
                first_step=self.step,
                last_step=c.max_steps,
                rank=distributed.rank(),
                world_size=distributed.world_size(),
                num_workers=c.num_workers,
                pin_memory=self.device.type == "cuda",
            )
        )
        if self._resume_rng is not None:
            torch.set_rng_state(self._resume_rng)
        self.outputs.reports_dir.mkdir(parents=True, exist_ok=True)
        progress = tqdm(
            range(self.step, c.max_steps),
            initial=self.step,
            total=c.max_steps,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.main_rank,
        )
        self._say = progress.write if self.main_rank else (lambda text: None)  # one rank speaks
        if self._resumed_from is not None:
            self._say(f"resuming from {self._resumed_from} at step {self.step}")
        self.clock = ThroughputClock()
        threads = torch.get_num_threads()
        try:
            with stop_requests() as stop, self.core_share or nullcontext():
                self._size_thread_pool()
                for _ in progress:
                    result = self.train_step(batches)
                    self.step += 1
                    self._account(result)
                    self._after_step(result, val_tokens, stop, progress)
        finally:
            torch.set_num_threads(threads)
        if self.main_rank:
            self.history.write(self.outputs.reports_dir)
        return self._final_metrics()

    def train_step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimizer step over config.grad_accum_steps micro-batches: accumulate gradients, clip them, and
        update the weights and the balancing biases, unless the loss or a gradient is not finite on any rank."""
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
                        self.scaler.scale(loss / c.grad_accum_steps).backward()
                step_loss += cast(torch.Tensor, out.loss).detach()
                step_mtp_losses += cast(torch.Tensor, out.mtp_losses).detach()
                step_correct += (out.logits.detach().argmax(dim=-1) == targets).sum()
        self.scaler.unscale_(self.optimizer)
        grad_norm = fsdp.full_tensor(clip_grad_norm_(self.model.parameters(), c.grad_clip or float("inf")))
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
        return StepResult(step_loss, step_mtp_losses, step_correct, grad_norm, lr, loads, applied)

    def _gradient_sync(self, sync: bool) -> AbstractContextManager[Any]:
        """Across processes, gradients are averaged (DDP) or reduce-scattered (FSDP) once per step: with sync on
        the last micro-batch, and only then."""
        if self.sharded:
            fsdp.set_gradient_sync(self.model, sync)
        if sync or self.sharded or not distributed.active():
            return nullcontext()
        return cast(DistributedDataParallel, self.step_model).no_sync()

    def _account(self, result: StepResult) -> None:
        self.clock.add(self.config.tokens_per_step)
        if result.applied:
            self.nonfinite_streak = 0
            self.window.loss_sum += result.loss
            self.window.mtp_loss_sum += result.mtp_losses
            self.window.correct += result.correct
            self.window.scored += self.config.tokens_per_step
        else:
            self.nonfinite_streak += 1
            self.skipped_steps += 1
            self._say(
                f"step {self.step:>6} | non-finite loss or gradient: step skipped ({self.nonfinite_streak} in a row)"
            )

    def _after_step(self, result: StepResult, val_tokens: np.ndarray, stop: dict, progress: tqdm) -> None:
        """The one place that decides what happens between steps: logging, evaluation, samples, checkpoints,
        and stopping."""
        c, done = self.config, self.step
        last = done == c.max_steps
        self._size_thread_pool()  # cheap: the load is read again only once its window has passed
        if (done % c.log_interval == 0 or last) and self.window.scored:
            self._log_window(result, progress)
        # Every forward through sharded weights is a collective, so under FSDP every rank evaluates and samples.
        forwards = self.main_rank or self.sharded
        with self.clock.paused():  # evaluation, samples and checkpoints do not count against throughput
            if forwards and (done % c.eval_interval == 0 or last):
                self._evaluate(val_tokens)
            if forwards and self.sampler is not None and (done % c.sample_interval == 0 or last):
                self._say(f"--- sample at step {done} ---\n{self._sample(self.sampler)}\n---")
            fsdp.reshard(self.model)
            if done % c.checkpoint_interval == 0 or last:
                self._checkpoint()
        if self.nonfinite_streak >= c.max_nonfinite_steps or (last and self.nonfinite_streak):
            path = self._checkpoint()
            raise TrainingStopped(
                f"{self.nonfinite_streak} steps in a row had a non-finite loss or gradient (up to step {done}"
                f"{', the last' if last else ''}): stopped, checkpoint {path}. Rerunning resumes there and stops "
                "again unless the steps recover; a lower train.lr or a higher train.grad_clip trains from the "
                "start instead",
                exit_code=1,
            )
        if "signal" in stop and not last:
            path = self._checkpoint()
            raise TrainingStopped(
                f"Interrupted ({SIGNAL_NAMES[stop['signal']]}): stopped at step {done}, "
                f"checkpoint {path}. Rerun the same command (or dvc repro) to resume",
                exit_code=SIGNAL_EXIT_CODES[stop["signal"]],
            )

    def _size_thread_pool(self) -> None:
        """train.threads N: N threads. 0 on CPU: the cores other programs leave free, divided among the trainings
        running now."""
        if self.config.threads:
            wanted, why = self.config.threads, "train.threads"
        elif self.core_share is not None:
            wanted, why = self.core_share.threads()
        else:
            return
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
            self._say(f"step {self.step:>6} | {wanted} CPU thread{'s' if wanted > 1 else ''} ({why})")

    def _log_window(self, result: StepResult, progress: tqdm) -> None:
        """The logging window's mean loss and accuracy (over the whole global batch), and this step's details."""
        window = self.window
        distributed.sum_across_ranks(window.loss_sum)
        distributed.sum_across_ranks(window.mtp_loss_sum)
        distributed.sum_across_ranks(window.correct)
        scored = window.scored * distributed.world_size()
        sequences = scored // (self.config.micro_batch_size * self.config.seq_len)
        metrics = {
            "loss": window.loss_sum.item() / sequences,
            **{f"mtp_loss_{k}": total / sequences for k, total in enumerate(window.mtp_loss_sum.tolist(), start=1)},
            "accuracy": window.correct.item() / scored,
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "tokens_per_s": self.clock.lap(),
        }
        layer_vio = max_violation(result.loads).tolist()
        metrics["max_vio"] = float(np.mean(layer_vio)) if layer_vio else 0.0
        self.history.train.append({"step": self.step, **metrics})
        self._log({**metrics, **{f"max_vio/layer_{i}": v for i, v in enumerate(layer_vio)}})
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
        loads = result.loads
        top = loads.sum(dim=0).topk(min(3, loads.shape[1])).indices.tolist() if len(loads) else []
        self._say(
            f"step {self.step:>6} | loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
            f"lr {result.lr:.2e} | {metrics['tokens_per_s']:>8,.0f} tok/s | "
            f"max_vio {metrics['max_vio']:.3f} | top experts {top}"
        )
        window.reset()

    def _evaluate(self, val_tokens: np.ndarray) -> None:
        c = self.config
        val = evaluate(
            self.model, val_tokens, c.seq_len, c.micro_batch_size, max_batches=c.eval_batches, dtype=self.dtype
        )
        # Not the evaluate stage's whole-split val.loss: a sample of the split, to follow training.
        self.history.val.append({"step": self.step, "val_loss_sampled": val["loss"]})
        self._log({"val_loss_sampled": val["loss"]})
        self._say(f"step {self.step:>6} | val loss {val['loss']:.4f} ({c.eval_batches} sampled batches)")
        self.history.write(self.outputs.reports_dir)

    def _sample(self, sampler: Sampler) -> str:
        prompt = torch.tensor([sampler.encode(sampler.prompt)], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(sampler.seed)
        tokens = generate(
            self.model,
            prompt,
            sampler.max_new_tokens,
            temperature=sampler.temperature,
            top_k=sampler.top_k,
            top_p=sampler.top_p,
            generator=generator,
        )
        return sampler.decode(tokens[0].tolist())

    def _checkpoint(self) -> Path:
        state = self.state_dict()  # on every rank: it sums the logging window across them
        model = self.full_model()
        if self.main_rank:
            info = {**self.checkpoint_info, "history": {"train": self.history.train, "val": self.history.val}}
            save_checkpoint(
                self.outputs.checkpoint_dir, self.step, model, state, info, keep=self.config.keep_checkpoints
            )
        return checkpoint_path(self.outputs.checkpoint_dir, self.step)

    def full_model(self) -> DeepSeekLM:
        """The trained model, whole on rank 0: under FSDP gathered into a plain copy (a collective)."""
        return fsdp.gathered(self.model) if self.sharded else self.model

    def _log(self, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, self.step)

    def _final_metrics(self) -> dict[str, Any]:
        final = self.history.train[-1]
        return {
            "train_loss": final["loss"],
            "train_accuracy": final["accuracy"],
            "val_loss_sampled": self.history.val[-1]["val_loss_sampled"] if self.history.val else None,
            "tokens_per_s": self.clock.overall if self.clock.total_s else final["tokens_per_s"],
            "steps": self.config.max_steps,
            "skipped_steps": self.skipped_steps,
            "tokens": self.config.max_steps * self.config.tokens_per_step * distributed.world_size(),
        }


# --- helpers ----------------------------------------------------------------------------------------------------


def training_loss(out: ModelOutput, mtp_loss_weight: float) -> torch.Tensor:
    """DeepSeek-V3 eq. 25: the main loss plus lambda / D times the sum of the D multi-token prediction losses."""
    loss, mtp_losses = cast(torch.Tensor, out.loss), cast(torch.Tensor, out.mtp_losses)
    return loss + mtp_loss_weight * mtp_losses.mean() if len(mtp_losses) else loss


def global_expert_loads(model: DeepSeekLM) -> torch.Tensor:
    """The tokens routed to each expert since the last balancing update, taken from the model and summed over
    every process, so that each rank applies the same bias update."""
    return distributed.sum_across_ranks(model.clear_expert_load())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available. Under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available; use auto or cpu")
    return torch.device("cuda", distributed.local_rank()) if name == "cuda" else torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 mixed precision on CUDA where supported (else fp16, with a GradScaler), and on CPUs that multiply
    bf16 natively (AMX or AVX512-BF16); fp32 on other CPUs."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if fast_bf16() else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def precision_reason(name: str, device: torch.device) -> str:
    """Why training runs in resolve_dtype(name, device), for the log and the tracking server."""
    if name != "auto":
        return f"train.dtype {name}"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return f"train.dtype auto: this GPU {'computes' if supported else 'has no'} bf16"
    units = native_bf16_units()
    if units:
        return f"train.dtype auto: this CPU multiplies bf16 natively ({', '.join(units)})"
    return "train.dtype auto: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16), which float32 outruns"


def describe_precision(dtype: torch.dtype) -> str:
    """How training computes, for the log and the tracking server."""
    if dtype == torch.float32:
        return "float32"
    return f"{str(dtype).removeprefix('torch.')} autocast over float32 weights and optimizer state"


def build_optimizer(model: DeepSeekLM, config: TrainConfig, dtype: torch.dtype) -> torch.optim.AdamW:
    """AdamW, or Muon for the hidden matrices with AdamW for the rest (train.optimizer). Matrices decay, while
    norms and the embedding do not (the model has no biases)."""
    embedding, head = model.embed.weight, model.head.weight
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is embedding]
    if config.optimizer == "muon":
        hidden = [p for p in model.parameters() if p.dim() >= 2 and p is not embedding and p is not head]
        decayed_head = [] if head is embedding else [head]
        groups = [
            {"params": hidden, "weight_decay": config.weight_decay, "muon": True},
            {"params": decayed_head, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        return MuonWithAdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), ns_dtype=ns_dtype)
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not embedding]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters, on CPU as on CUDA (on CPU 4.7x faster than the per-tensor loop
    # for the seed preset, where the optimizer step took half of a 1 x 128-token training step).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


def lr_multiplier(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (as a multiple of lr)."""
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


@contextmanager
def stop_requests() -> Iterator[dict]:
    """Turn Ctrl-C and SIGTERM into a request to stop at the end of the current step."""
    requested: dict = {}

    def handler(signum: int, frame: Any) -> None:
        requested["signal"] = signal.Signals(signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in SIGNAL_EXIT_CODES}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
