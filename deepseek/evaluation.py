"""Loss, perplexity, bits per character, accuracy and expert balance over a token split."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepseek.balance import BalanceReport, balance_report
from deepseek.batches import check_token_ids, evaluation_batches
from deepseek.model import DeepSeekLM, ModelOutput


class _CharacterMetrics(TypedDict, total=False):
    bits_per_character: float  # only when evaluate is given the split's characters


class EvalMetrics(_CharacterMetrics):
    """evaluate's metrics (its docstring says what each is)."""

    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    mtp_accuracy: list[float]
    mtp_acceptance: list[float]
    balance: BalanceReport


def autocast(device: torch.device, dtype: torch.dtype, cache: bool = True) -> AbstractContextManager[Any]:
    """Mixed precision where dtype asks for it; plain float32 otherwise. cache: keep each weight's low-precision
    copy until the context exits."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


@torch.no_grad()
def evaluate(
    model: DeepSeekLM,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    characters: int | None = None,
    max_batches: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    dropout: bool = False,
) -> EvalMetrics:
    """Metrics over the split (or its first max_batches batches).

    Bits per character divide the total negative log-likelihood by the characters the predicted tokens
    span (the split's characters, prorated to the tokens scored), so they compare across tokenizers.
    With multi-token prediction, mtp_accuracy[k - 1] is how often depth k's greedy guess of the token k places
    further on is right, and mtp_acceptance[k - 1] how often it is the main model's own greedy choice for that
    token: the rate at which a greedy speculative decoder accepts depth k's drafts on this text.
    dropout: score in training mode, with dropout on, as the balancing bias saw the text during training.
    """
    check_token_ids(tokens, model.config.vocab_size, "the evaluation tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.train(dropout)
    tally = _Tally.zeros(model, device)
    batches = evaluation_batches(tokens, seq_len, batch_size, max_batches)
    for inputs, targets in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            out = model(inputs, predict_ahead=model.config.mtp_depth > 0)
        tally.add(out, targets)
    model.train(was_training)
    return tally.metrics(characters, len(tokens))


@dataclass
class _Tally:
    """evaluate's running sums over the batches scored so far, on the model's device."""

    nll: torch.Tensor  # negative log-likelihood, in float64: a float32 sum over a long split would drift
    correct: torch.Tensor  # the main model's right greedy guesses
    mtp_correct: torch.Tensor  # (mtp_depth,) each depth's right greedy guesses
    mtp_agreed: torch.Tensor  # (mtp_depth,) each depth's guesses equal to the main model's own
    mtp_scored: torch.Tensor  # (mtp_depth,) the tokens each depth guessed
    expert_counts: torch.Tensor  # (num_moe_layers, num_routed_experts) tokens routed
    scored: int = 0  # the tokens the main model guessed

    @classmethod
    def zeros(cls, model: DeepSeekLM, device: torch.device) -> _Tally:
        depths = model.config.mtp_depth
        return cls(
            nll=torch.zeros((), dtype=torch.float64, device=device),
            correct=torch.zeros((), dtype=torch.long, device=device),
            mtp_correct=torch.zeros(depths, dtype=torch.long, device=device),
            mtp_agreed=torch.zeros(depths, dtype=torch.long, device=device),
            mtp_scored=torch.zeros(depths, dtype=torch.long, device=device),
            expert_counts=torch.zeros(len(model.moe_layers()), model.config.num_routed_experts, device=device),
        )

    def add(self, out: ModelOutput, targets: torch.Tensor) -> None:
        """Count one batch's forward against its targets."""
        self.nll += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        choices = out.logits.argmax(dim=-1)  # the main model's prediction of token i + 1 at index i
        self.correct += (choices == targets).sum()
        for k, depth_logits in enumerate(out.mtp_logits, start=1):  # depth k's of token i + k + 1
            drafts = depth_logits.argmax(dim=-1)
            self.mtp_correct[k - 1] += (drafts == targets[:, k:]).sum()
            self.mtp_agreed[k - 1] += (drafts == choices[:, k:]).sum()
            self.mtp_scored[k - 1] += targets[:, k:].numel()
        self.expert_counts += out.expert_counts
        self.scored += targets.numel()

    def metrics(self, characters: int | None, split_tokens: int) -> EvalMetrics:
        """The metrics of what was counted; characters: those of the whole split of split_tokens tokens."""
        loss = self.nll.item() / self.scored
        metrics: EvalMetrics = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "accuracy": self.correct.item() / self.scored,
            "tokens": self.scored,
            "mtp_accuracy": (self.mtp_correct / self.mtp_scored.clamp(min=1)).tolist(),
            "mtp_acceptance": (self.mtp_agreed / self.mtp_scored.clamp(min=1)).tolist(),
            "balance": balance_report(self.expert_counts.cpu()),
        }
        if characters:
            metrics["bits_per_character"] = (
                self.nll.item() / math.log(2) / (characters * self.scored / (split_tokens - 1))
            )
        return metrics
