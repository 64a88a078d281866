"""Loss, perplexity, bits per character, accuracy and expert balance over a token split."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepseek.balance import balance_report
from deepseek.batches import check_token_ids, evaluation_batches
from deepseek.model import DeepSeekLM


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
) -> dict:
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
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    depths = model.config.mtp_depth
    mtp_correct = torch.zeros(depths, dtype=torch.long, device=device)
    mtp_scored = torch.zeros(depths, dtype=torch.long, device=device)
    mtp_agreed = torch.zeros(depths, dtype=torch.long, device=device)
    counts = torch.zeros(len(model.moe_layers()), model.config.num_routed_experts, device=device)
    scored = 0
    batches = evaluation_batches(tokens, seq_len, batch_size, max_batches)
    for inputs, targets in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            out = model(inputs, predict_ahead=depths > 0)
        nll += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        choices = out.logits.argmax(dim=-1)  # the main model's prediction of token i + 1 at index i
        correct += (choices == targets).sum()
        for k, depth_logits in enumerate(out.mtp_logits, start=1):  # depth k's of token i + k + 1
            drafts = depth_logits.argmax(dim=-1)
            mtp_correct[k - 1] += (drafts == targets[:, k:]).sum()
            mtp_agreed[k - 1] += (drafts == choices[:, k:]).sum()
            mtp_scored[k - 1] += targets[:, k:].numel()
        counts += out.expert_counts
        scored += targets.numel()
    model.train(was_training)
    loss = nll.item() / scored
    metrics: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": correct.item() / scored,
        "tokens": scored,
        "mtp_accuracy": (mtp_correct / mtp_scored.clamp(min=1)).tolist(),
        "mtp_acceptance": (mtp_agreed / mtp_scored.clamp(min=1)).tolist(),
    }
    if characters:
        metrics["bits_per_character"] = nll.item() / math.log(2) / (characters * scored / (len(tokens) - 1))
    metrics["balance"] = balance_report(counts.cpu())
    return metrics
