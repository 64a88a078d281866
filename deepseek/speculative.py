"""Self-speculative decoding: the multi-token prediction modules draft, the main model verifies.

Each step, with n tokens committed and the main model's latent cache holding the first n - 1:

1. Draft. Depth k reads h^{k-1} at index n - 2 and token n - 2 + k (the last committed one for depth 1, the
   previous depth's draft after that) and proposes token n - 1 + k. Each depth keeps a latent cache of its own.
2. Verify. One forward of the main model over [token n - 1, draft 1, ..., draft m] scores every draft and
   yields the token after the last one accepted: each step commits between 1 and m + 1 tokens.
3. Roll back. Cache entries computed from a rejected draft are dropped (LatentCache.truncate).

Greedy decoding accepts a draft when it equals the main model's argmax, so the output is exactly that of
non-speculative greedy decoding. Sampling accepts draft d with probability min(1, p(d) / q(d)) and otherwise
draws from the normalised residual max(0, p - q) (Leviathan et al., 2023; Chen et al., 2023), so the tokens
follow the main model's distribution p exactly, whatever the drafts' q.

The context window is rebuilt from its most recent half exactly when non-speculative decoding rebuilds it, and
no verification crosses the cache's end, so both decode with the same contexts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deepseek.model import DeepSeekLM
from deepseek.sampling import next_token_probs


@dataclass
class SpeculativeStats:
    """What speculation did in one generation: drafts proposed and accepted, and main-model verifications."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> str:
        return (
            f"speculative decoding: {self.accepted}/{self.drafted} drafts accepted ({100 * self.acceptance:.1f}%), "
            f"{self.verifications} main-model steps"
        )


@dataclass
class Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(vocab,) distribution from (vocab,) logits."""
        return next_token_probs(logits[None], self.temperature, self.top_k, self.top_p)[0]

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.generator.device if self.generator else None))


class SpeculativeDecoder:
    """The state of one speculative generation (batch 1): committed tokens, the caches and hidden states."""

    def __init__(self, model: DeepSeekLM, max_len: int, sampling: Sampling, stats: SpeculativeStats) -> None:
        self.model, self.max_len, self.sampling, self.stats = model, max_len, sampling, stats
        self.depth = model.config.mtp_depth
        self.main = model.new_cache(1, max_len)
        self.mtp = [model.new_cache(1, max_len, depth=k) for k in range(1, self.depth + 1)]
        param = model.embed.weight
        # hidden[k][p]: h^k at window position p, for the positions its cache holds (the last depth's is not needed).
        self.hidden = torch.zeros(self.depth, max_len, model.config.hidden_size, device=param.device, dtype=param.dtype)
        self.tokens: list[int] = []  # every committed token, prompt included
        self.start = 0  # where the window, position 0 of every cache, begins in tokens

    @property
    def window_length(self) -> int:
        """How many tokens the window holds: the main cache holds all but the newest."""
        return len(self.tokens) - self.start

    def prefill(self, tokens: list[int]) -> int:
        """Start a window over tokens (a prompt, or the last half of a full window): the main model reads them
        all and commits the next token, which is returned."""
        self.start = len(self.tokens) - len(tokens)
        for cache in (self.main, *self.mtp):
            cache.reset()
        out = self.model(torch.tensor([tokens], device=self.hidden.device), cache=self.main)
        self.hidden[0, : len(tokens)] = out.hidden[0]
        logits = out.logits[0, -1]
        token = int(logits.argmax()) if self.sampling.greedy else self.sampling.draw(self.sampling.probs(logits))
        self.tokens.append(token)
        return token

    def step(self, budget: int) -> list[int]:
        """Draft, verify and roll back once; returns the 1 to budget tokens committed."""
        n = self.window_length
        drafts, draft_probs = self._draft(min(self.depth, self.max_len - n, budget - 1))
        chunk = torch.tensor([[self.tokens[-1], *drafts]], device=self.hidden.device)
        out = self.model(chunk, cache=self.main)
        if self.depth:
            self.hidden[0, n - 1 : n + len(drafts)] = out.hidden[0]
        accepted, token = self._verify(out.logits[0], drafts, draft_probs)
        new = [*drafts[:accepted], token]
        self.tokens += new
        self.main.truncate(n - 1 + len(new))
        for k, cache in enumerate(self.mtp, start=1):  # entries read a token that may have been a rejected draft
            cache.truncate(max(0, min(cache.length, n - 1 + len(new) - k)))
        self.stats.drafted += len(drafts)
        self.stats.accepted += accepted
        self.stats.verifications += 1
        return new

    def _draft(self, count: int) -> tuple[list[int], list[torch.Tensor]]:
        """Drafts for the next count tokens, each depth first catching up on the positions it has not read."""
        n, sequence = self.window_length, self.tokens[self.start :]
        drafts, draft_probs = [], []
        for k in range(1, count + 1):
            cache = self.mtp[k - 1]
            begin, end = cache.length, n - 1  # depth k reads positions begin..n-2
            ids = torch.tensor([sequence[begin + k : end + k]], device=self.hidden.device)
            out = self.model.draft(k, self.hidden[k - 1, begin:end][None], ids, cache)
            if k < self.depth:
                self.hidden[k, begin:end] = out.hidden[0]
            if self.sampling.greedy:
                draft = int(out.logits[0].argmax())
            else:
                draft_probs.append(self.sampling.probs(out.logits[0]))
                draft = self.sampling.draw(draft_probs[-1])
            drafts.append(draft)
            sequence.append(draft)
        return drafts, draft_probs

    def _verify(self, logits: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor]) -> tuple[int, int]:
        """How many drafts the main model's logits (one row per draft, and one more) accept, and the token after
        them: its correction of the first rejected draft, or its next token when all were accepted."""
        if self.sampling.greedy:
            choices = logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
                accepted += 1
            return accepted, choices[accepted]
        for i, (draft, q) in enumerate(zip(drafts, draft_probs, strict=True)):
            p = self.sampling.probs(logits[i])
            if self.sampling.uniform() * q[draft] < p[draft]:  # accept with probability min(1, p / q)
                continue
            residual = (p - q).clamp(min=0)
            return i, self.sampling.draw(residual / residual.sum() if residual.sum() > 0 else p)
        return len(drafts), self.sampling.draw(self.sampling.probs(logits[len(drafts)]))


def stream_speculative(
    model: DeepSeekLM,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[int]:
    """The tokens after prompt, one at a time, decoded speculatively (see the module's docstring)."""
    window = model.config.max_seq_len
    decoder = SpeculativeDecoder(
        model, min(window, len(prompt) + max_new_tokens), sampling, stats or SpeculativeStats()
    )
    decoder.tokens = list(prompt)
    pending = [decoder.prefill(prompt[-window:])]
    produced = 0
    while True:
        for token in pending:
            yield token
            produced += 1
            if produced == max_new_tokens or token == eos_token_id:
                return
        if decoder.window_length - 1 == decoder.max_len:  # the main cache is full: rebuild it, as stream() does
            pending = [decoder.prefill(decoder.tokens[-(decoder.max_len // 2) :])]
        else:
            pending = decoder.step(max_new_tokens - produced)
