"""Training and evaluation batches from a flat array of token ids.

Training windows are random, but window i is a pure function of (seed, i). A run, a resumed run and
a data-parallel run all see the same windows in the same order, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepseek.errors import UserError

Pair = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets): targets are the inputs shifted by one token


class RandomWindows(Dataset[Pair]):
    """Item i: (inputs, targets), a random window of seq_len + 1 tokens shifted by one."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        if len(tokens) < seq_len + 2:
            raise UserError(
                f"{len(tokens)} tokens are too few for training windows of {seq_len} tokens: lower "
                "train.seq_len, or use a larger corpus"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def __len__(self) -> int:
        return 2**62  # indices are addresses, not a finite epoch

    def __getitem__(self, index: int) -> Pair:
        start = np.random.default_rng((self.seed, index)).integers(0, len(self.tokens) - self.seq_len - 1)
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class StepSampler:
    """Sample indices for optimizer steps [first_step, last_step) of one rank.

    Step s draws the global indices [s*G, (s+1)*G) with G = per_rank * world_size; rank r takes the r-th
    slice of per_rank. One process with world_size times the accumulation sees the same sequences.
    """

    def __init__(self, first_step: int, last_step: int, per_rank: int, rank: int = 0, world_size: int = 1) -> None:
        self.first_step, self.last_step = first_step, last_step
        self.per_rank, self.rank, self.world_size = per_rank, rank, world_size

    def __iter__(self) -> Iterator[int]:
        global_batch = self.per_rank * self.world_size
        for step in range(self.first_step, self.last_step):
            start = step * global_batch + self.rank * self.per_rank
            yield from range(start, start + self.per_rank)

    def __len__(self) -> int:
        return (self.last_step - self.first_step) * self.per_rank


def check_token_ids(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    """Refuse ids the model has no embedding for, before a forward would fail deep in the embedding."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise UserError(
            f"{what} hold token id {int(tokens.max())}, but the model's vocabulary has {vocab_size} ids: "
            "use the tokens of the tokenizer the model was made for"
        )


def training_batches(
    tokens: np.ndarray,
    seq_len: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    seed: int,
    first_step: int,
    last_step: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[Pair]:
    """Micro-batches for steps [first_step, last_step), grad_accum_steps of them per step."""
    sampler = StepSampler(first_step, last_step, micro_batch_size * grad_accum_steps, rank, world_size)
    return DataLoader(
        RandomWindows(tokens, seq_len, seed),
        batch_size=micro_batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def evaluation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[Pair]:
    """Consecutive non-overlapping windows: every token after the first is predicted exactly once.

    The last window may be shorter; it is yielded alone so that batches stay rectangular. With max_batches,
    that many batches spread evenly over the split: a sample of all of it, not of its first pages.
    """
    starts = list(range(0, len(tokens) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(tokens)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    if len(full) < len(starts):
        batches.append([starts[-1]])
    if max_batches is not None and max_batches < len(batches):
        batches = [batches[i] for i in np.linspace(0, len(batches) - 1, max_batches).round().astype(int)]
    for batch in batches:
        end = min(batch[0] + seq_len + 1, len(tokens)) - batch[0]
        windows = torch.from_numpy(np.stack([tokens[s : s + end].astype(np.int64) for s in batch]))
        yield windows[:, :-1], windows[:, 1:]
