"""Turning next-token logits into a token: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch, 1) from last-position logits (batch, vocab). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(next_token_probs(logits, temperature, top_k, top_p), 1, generator=generator)


def next_token_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (batch, vocab) that sampling draws from: logits / temperature, cut to the top_k tokens and
    to the smallest set whose probability reaches top_p. temperature must be positive."""
    logits = logits.float()
    # Shifted so that the best logit is 0 before dividing: any positive temperature, however small, then gives
    # finite or -inf logits, never inf - inf = nan. A temperature below float32's smallest normal number would
    # round to 0 in the division (0 / 0 = nan); there the distribution is already all on the best tokens, so the
    # smallest normal number stands for it.
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the best one always stays.
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)
