"""Autoregressive sampling with the latent KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from deepseek.attention import LatentCache
from deepseek.errors import UserError
from deepseek.model import DeepSeekLM, ModelOutput
from deepseek.sampling import sample_next
from deepseek.speculative import Sampling, SpeculativeStats, stream_speculative


class TextTokenizer(Protocol):
    """What generating text needs of a tokenizer (stages.tokenizer.SavedTokenizer is one)."""

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...  # without added special tokens

    def decode(self, ids: list[int]) -> str: ...


def generate(
    model: DeepSeekLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    speculative: bool = False,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """Continue prompt (batch, seq) by up to max_new_tokens tokens; returns prompt + continuation."""
    new = stream(
        model, prompt, max_new_tokens, temperature, top_k, top_p, generator, eos_token_id, use_cache, speculative, stats
    )
    return torch.cat((prompt, *new), dim=1)


@torch.no_grad()
def stream(
    model: DeepSeekLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    speculative: bool = False,
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """The next token of every sequence in prompt (batch, seq), (batch, 1) at a time, as each is chosen.

    With the cache, each step feeds one token. When the context reaches max_seq_len, the cache is
    rebuilt from the most recent half window. use_cache=False recomputes the window every step
    (for benchmarks and checks only). Stops after max_new_tokens, or when every sequence has ended.
    speculative: the multi-token prediction modules draft and the model verifies (one prompt at a time; same
    greedy output, same sampling distribution); stats, if given, counts the drafts and acceptances.
    """
    _check_prompt(model, prompt)
    if speculative:
        check_speculative(model, prompt)
    sampling = Sampling(temperature, top_k, top_p, generator)
    was_training = model.training
    model.eval()  # in training mode forward would count these tokens towards expert balancing
    try:
        if speculative:
            for token in stream_speculative(model, prompt[0].tolist(), max_new_tokens, sampling, eos_token_id, stats):
                yield prompt.new_tensor([[token]])
        else:
            yield from _stream_plain(model, prompt, max_new_tokens, sampling, eos_token_id, use_cache)
    finally:
        model.train(was_training)


def _check_prompt(model: DeepSeekLM, prompt: torch.Tensor) -> None:
    """Refuse an empty prompt, and token ids the model has no embedding for."""
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if int(prompt.max()) >= model.config.vocab_size:  # an index error deep in the embedding, otherwise
        raise UserError(
            f"the prompt holds token id {int(prompt.max())}, but the model's vocabulary has "
            f"{model.config.vocab_size} ids: use the tokenizer the model was trained with"
        )


def _stream_plain(
    model: DeepSeekLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | None,
    use_cache: bool,
) -> Iterator[torch.Tensor]:
    """stream without speculation: each token sampled from the model's prediction, then fed back to it."""
    window = model.config.max_seq_len
    tokens = prompt
    cache = model.new_cache(prompt.shape[0], min(window, prompt.shape[1] + max_new_tokens)) if use_cache else None
    logits = model(tokens[:, -window:], cache=cache, last_logits_only=True).logits[:, -1]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        next_token = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.generator)
        tokens = torch.cat((tokens, next_token), dim=1)
        yield next_token
        if eos_token_id is not None:
            finished |= next_token.squeeze(1) == eos_token_id
            if finished.all():
                break
        if step == max_new_tokens - 1:
            break
        logits = _next_logits(model, tokens, next_token, cache)


def _next_logits(
    model: DeepSeekLM, tokens: torch.Tensor, next_token: torch.Tensor, cache: LatentCache | None
) -> torch.Tensor:
    """The prediction after tokens, whose last is next_token: from the whole window without a cache; from the
    most recent half window when the cache is full (rebuilt); from next_token alone otherwise."""
    out: ModelOutput
    if cache is None:
        out = model(tokens[:, -model.config.max_seq_len :], last_logits_only=True)
    elif cache.length == cache.max_len:
        cache.reset()
        out = model(tokens[:, -(cache.max_len // 2) :], cache=cache, last_logits_only=True)
    else:
        out = model(next_token, cache=cache)
    return out.logits[:, -1]


def check_speculative(model: DeepSeekLM, prompt: torch.Tensor) -> None:
    if model.config.mtp_depth == 0:
        raise UserError(
            "speculative decoding drafts with the multi-token prediction modules, and this model has none "
            "(model.mtp_depth 0): train one with model.mtp_depth 1 or more, or decode without --speculative"
        )
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time, not a batch of {prompt.shape[0]}")


def stream_text(
    model: DeepSeekLM, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int, **sampling: Any
) -> Iterator[str]:
    """The prompt, then its continuation piece by piece as it is generated; stops at the end-of-text token.

    sampling: stream's temperature, top_k, top_p and generator. A piece is held back while it ends inside a
    character (byte-level tokens can split one), so that what is printed never changes afterwards.
    """
    prompt_ids = tokenizer.encode(prompt)
    ids, shown = list(prompt_ids), ""
    for token in stream(
        model, torch.tensor([prompt_ids]), max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling
    ):
        ids.append(int(token))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(ids)
    if text != shown:
        yield text[len(shown) :]


def generate_text(
    model: DeepSeekLM, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int, **sampling: Any
) -> str:
    """prompt and its continuation as text; generation stops early at the tokenizer's end-of-text token."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **sampling))


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

    def sample(self, model: DeepSeekLM, device: torch.device) -> str:
        prompt = torch.tensor([self.encode(self.prompt)], device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        tokens = generate(
            model, prompt, self.max_new_tokens, self.temperature, self.top_k, self.top_p, generator=generator
        )
        return self.decode(tokens[0].tolist())
