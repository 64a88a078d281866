"""The training loop: gradient accumulation, mixed precision, auxiliary-loss-free balancing after every optimizer
step, and periodic validation, samples and checkpoints.

    trainer = Trainer(model, TrainConfig(...), seed, TrainOutputs(checkpoint_dir))
    metrics = trainer.fit(train_tokens, val_tokens)

`Trainer.train_step` (deepseek/train_step.py) is one optimizer step; `Trainer._after_step` is the one place that
decides when to log, evaluate, sample and checkpoint; `state_dict`/`load_state_dict` hold everything but the
weights that an exact resume needs. The optimizer and schedule are deepseek/optim.py, device and precision
deepseek/device.py, what is measured deepseek/train_metrics.py, early stops deepseek/stopping.py. Importing this
module, or making a Trainer, changes no process-wide setting: the program that trains applies those
(deepseek.device.configure_host).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from deepseek import distributed, fsdp
from deepseek.batches import check_token_ids, training_batches
from deepseek.checkpoint import ResumePoint, checkpoint_path, save_checkpoint
from deepseek.cpu import CoreShare, size_thread_pool
from deepseek.device import resolve_device, resolve_dtype
from deepseek.evaluation import evaluate
from deepseek.files import JSONValue
from deepseek.generate import Sampler
from deepseek.model import DeepSeekLM
from deepseek.stopping import StopRequest, diverged, interrupted, stop_requests
from deepseek.train_config import TrainConfig
from deepseek.train_metrics import (
    FitMetrics,
    History,
    LossWindow,
    MetricsSink,
    StepResult,
    ThroughputClock,
    WindowState,
)
from deepseek.train_step import OptimizerState, TrainStep


@dataclass
class TrainOutputs:
    """Where a training writes: checkpoints, and the loss histories as CSV where paths are given."""

    checkpoint_dir: Path
    train_log: Path | None = None
    val_log: Path | None = None


class NonfiniteState(TypedDict):
    streak: int
    skipped: int


class TrainerState(OptimizerState):
    torch_rng: torch.Tensor
    window: WindowState
    nonfinite: NonfiniteState


class Trainer:
    """Trains a DeepSeekLM in place for config.max_steps optimizer steps; resumable from its checkpoints.

    Under torchrun each rank trains on its own slice of every global batch, with the weights replicated
    (train.parallel ddp: DistributedDataParallel averages the gradients) or sharded (fsdp: deepseek/fsdp.py).
    Expert loads are summed across ranks before the balancing update, and only rank 0 logs and writes files.
    On CPU with train.threads 0, a core_share (deepseek.cpu.CoreShare) sizes the thread pool as others train.
    """

    def __init__(
        self,
        model: DeepSeekLM,
        config: TrainConfig,
        seed: int,
        outputs: TrainOutputs,
        sampler: Sampler | None = None,
        sinks: Sequence[MetricsSink] = (),
        checkpoint_info: Mapping[str, JSONValue] | None = None,
        core_share: CoreShare | None = None,
    ) -> None:
        self.config, self.seed, self.outputs, self.sampler, self.sinks = config, seed, outputs, sampler, sinks
        self.checkpoint_info = checkpoint_info or {}  # goes into every checkpoint
        self.core_share = core_share
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = model.to(self.device).train()
        self.train_step = TrainStep(self.model, config, self.device, self.dtype)
        self.window = LossWindow(self.device, model.config.mtp_depth)
        self.history = History()
        self.clock = ThroughputClock()
        self.step = 0  # optimizer steps done
        self.nonfinite_streak = 0  # steps skipped in a row, up to now
        self.skipped_steps = 0  # steps skipped in all
        self.main_rank = distributed.is_main()
        self._resumed_from: Path | None = None
        self._resume_rng: torch.Tensor | None = None
        self._say: Callable[[str], None] = print

    @property
    def sharded(self) -> bool:
        """Training under FSDP2 (train.parallel fsdp, several processes)."""
        return self.train_step.sharded

    # --- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> TrainerState:
        """Everything but the weights that training needs to go on exactly where it stopped. Under torchrun a
        collective: every rank calls it."""
        return {
            **self.train_step.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "window": self.window.state_dict(),
            # A stop for non-finite steps must not become a success by rerunning: the streak goes on.
            "nonfinite": {"streak": self.nonfinite_streak, "skipped": self.skipped_steps},
        }

    def load_state_dict(self, state: TrainerState) -> None:
        self.train_step.load_state_dict(state)
        self.window.load_state_dict(state["window"])
        self.nonfinite_streak, self.skipped_steps = state["nonfinite"]["streak"], state["nonfinite"]["skipped"]
        self._resume_rng = state["torch_rng"]  # restored once the data loader exists: making it draws from the RNG

    def resume(self, point: ResumePoint) -> None:
        """Continue from a checkpoint: its weights, trainer state, loss history and step."""
        if self.sharded:
            fsdp.load_weights(self.model, point.weights_file)
        else:
            point.load_weights(self.model)
        self.load_state_dict(cast(TrainerState, point.trainer_state))
        self.history = History(**point.history)
        self.step = point.step
        self._resumed_from = point.path

    # --- training ---------------------------------------------------------------------------------------------

    def fit(self, train_tokens: np.ndarray, val_tokens: np.ndarray) -> FitMetrics:
        """Train until config.max_steps; returns the final metrics. Raises TrainingStopped on a signal (after
        a checkpoint) or after config.max_nonfinite_steps non-finite steps in a row."""
        for tokens, split in ((train_tokens, "training"), (val_tokens, "validation")):
            check_token_ids(tokens, self.model.config.vocab_size, f"the {split} tokens")
        batches = self._batches(train_tokens)
        if self._resume_rng is not None:
            torch.set_rng_state(self._resume_rng)
        progress = tqdm(
            range(self.step, self.config.max_steps),
            initial=self.step,
            total=self.config.max_steps,
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
        self._write_history()
        return self._final_metrics()

    def _batches(self, train_tokens: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches from the current step on (deepseek/batches.py)."""
        c = self.config
        loader = training_batches(
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
        return iter(loader)

    def _account(self, result: StepResult) -> None:
        self.clock.add(self.config.tokens_per_step)
        if result.applied:
            self.nonfinite_streak = 0
            self.window.add(result, self.config.tokens_per_step)
        else:
            self.nonfinite_streak += 1
            self.skipped_steps += 1
            self._say(
                f"step {self.step:>6} | non-finite loss or gradient: step skipped ({self.nonfinite_streak} in a row)"
            )

    def _after_step(self, result: StepResult, val_tokens: np.ndarray, stop: StopRequest, progress: tqdm) -> None:
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
                self._say(f"--- sample at step {done} ---\n{self.sampler.sample(self.model, self.device)}\n---")
            fsdp.reshard(self.model)
            if done % c.checkpoint_interval == 0 or last:
                self._checkpoint()
        if self.nonfinite_streak >= c.max_nonfinite_steps or (last and self.nonfinite_streak):
            raise diverged(self.nonfinite_streak, done, last, self._checkpoint())
        if stop.signal is not None and not last:
            raise interrupted(stop.signal, done, self._checkpoint())

    def _size_thread_pool(self) -> None:
        change = size_thread_pool(self.config.threads, self.core_share)
        if change:
            self._say(f"step {self.step:>6} | {change}")

    def _log_window(self, result: StepResult, progress: tqdm) -> None:
        """The logging window's means (over the whole global batch), and this step's details."""
        row, layer_vio = self.window.summary(self.config.micro_batch_size * self.config.seq_len, self.clock, result)
        self.history.train.append({"step": self.step, **row})
        self._log({**row, **{f"max_vio/layer_{i}": v for i, v in enumerate(layer_vio)}})
        progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        loads = result.loads
        top = loads.sum(dim=0).topk(min(3, loads.shape[1])).indices.tolist() if len(loads) else []
        self._say(
            f"step {self.step:>6} | loss {row['loss']:.4f} | acc {row['accuracy']:.3f} | "
            f"lr {result.lr:.2e} | {row['tokens_per_s']:>8,.0f} tok/s | "
            f"max_vio {row['max_vio']:.3f} | top experts {top}"
        )

    def _evaluate(self, val_tokens: np.ndarray) -> None:
        c = self.config
        val = evaluate(
            self.model, val_tokens, c.seq_len, c.micro_batch_size, max_batches=c.eval_batches, dtype=self.dtype
        )
        # Not the evaluate stage's whole-split val.loss: a sample of the split, to follow training.
        self.history.val.append({"step": self.step, "val_loss_sampled": val["loss"]})
        self._log({"val_loss_sampled": val["loss"]})
        self._say(f"step {self.step:>6} | val loss {val['loss']:.4f} ({c.eval_batches} sampled batches)")
        self._write_history()

    def _write_history(self) -> None:
        if self.main_rank:
            self.history.write(self.outputs.train_log, self.outputs.val_log)

    def _checkpoint(self) -> Path:
        state = self.state_dict()  # on every rank: it sums the logging window across them
        model = self.full_model()
        if self.main_rank:
            history: JSONValue = {"train": self.history.train, "val": self.history.val}
            info = {**self.checkpoint_info, "history": history}
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

    def _final_metrics(self) -> FitMetrics:
        final = self.history.train[-1]
        return FitMetrics(
            train_loss=final["loss"],
            train_accuracy=final["accuracy"],
            val_loss_sampled=self.history.val[-1]["val_loss_sampled"] if self.history.val else None,
            tokens_per_s=self.clock.overall if self.clock.total_s else final["tokens_per_s"],
            steps=self.config.max_steps,
            skipped_steps=self.skipped_steps,
            tokens=self.config.max_steps * self.config.tokens_per_step * distributed.world_size(),
        )
