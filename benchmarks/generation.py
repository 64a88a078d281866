"""Greedy decoding speed at several context lengths, and the KV-cache bytes each token costs.

Three ways to generate from the same weights, one sequence at a time:

- ours, latent cache: `deepseek.generate.generate`, caching c_KV and the RoPE key, absorbed attention;
- ours, no cache: the same with use_cache=False, recomputing the whole sequence for every token;
- transformers: `generate(do_sample=False)` of DeepseekV3ForCausalLM loaded from our export, with its own cache.

The context is the prompt length, cut to max_seq_len - new_tokens where it would not fit (so with the seed
preset's window of 2048 and 32 new tokens, "context 2048" is a 2016-token prompt): past the window our
generate rebuilds its cache and transformers' RoPE runs past its table. Every time is a whole generate call,
model loading excluded: "prefill s" generates one token (the forward over the prompt, then one LM head row),
"total s" generates all of them, so decode tok/s = (new tokens - 1) / (total - prefill) is the speed of the
steps that feed one token against a context of about the prompt's length, and tok/s = new tokens / total
includes the prefill. fp32 on CPU; bf16 weights on CUDA.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click
import torch
from torch import nn

from benchmarks.common import (
    THEIRS,
    device_option,
    dtype_name,
    greedy_generate,
    json_option,
    max_logit_diff,
    pick_device,
    print_header,
    print_table,
    repeats_option,
    run_header,
    seed_option,
    seeded_model,
    threads_option,
    timed,
    transformers_twin,
    write_json,
)
from deepseek.config import PRESETS, ModelConfig
from deepseek.device import resolve_dtype
from deepseek.model import DeepSeekLM

LATENT, NO_CACHE = "ours, latent cache", "ours, no cache"
VARIANTS = (LATENT, NO_CACHE, THEIRS)
COLUMNS = ["context", "prompt", "variant", "prefill s", "total s", "tok/s", "decode tok/s", "same tokens as latent"]
CACHE_COLUMNS = [
    "preset",
    "dtype",
    "ours (latent) B/token",
    "standard MHA B/token",
    "MHA / ours",
    "transformers B/token (measured)",
]


def prompt_length(context: int, new_tokens: int, max_seq_len: int) -> int:
    return min(context, max_seq_len - new_tokens)


def context_prompt(config: ModelConfig, context: int, new_tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """The random prompt (1, length) of one context."""
    length = prompt_length(context, new_tokens, config.max_seq_len)
    gen = torch.Generator().manual_seed(seed + context)
    return torch.randint(0, config.vocab_size, (1, length), generator=gen).to(device)


@torch.no_grad()
def transformers_cache_bytes_per_token(model: nn.Module, prompt: torch.Tensor) -> int:
    """What transformers' cache holds per prompt token after the prefill."""
    cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1).cache
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return stored // prompt.shape[1]


def measure_context(
    models: dict[str, nn.Module],
    context: int,
    new_tokens: int,
    no_cache_max_context: int,
    repeats: int,
    seed: int,
    device: torch.device,
) -> list[dict]:
    """Rows for one context, one per variant."""
    ours = models[LATENT]
    assert isinstance(ours, DeepSeekLM)
    prompt = context_prompt(ours.config, context, new_tokens, seed, device)
    length = prompt.shape[1]
    rows, reference = [], None
    for variant in VARIANTS:
        row = {"context": context, "prompt": length, "variant": variant}
        if variant == NO_CACHE and context > no_cache_max_context:
            rows.append(row | {column: "skipped" for column in COLUMNS[3:]})
            continue
        click.echo(f"context {context}: {variant}", err=True)
        model, use_cache = models[variant], variant != NO_CACHE
        _, prefill_s = timed(partial(greedy_generate, model, prompt, 1, use_cache=use_cache), device, repeats)
        tokens, total_s = timed(
            partial(greedy_generate, model, prompt, new_tokens, use_cache=use_cache), device, repeats
        )
        continuation = tokens[:, length:]
        if variant == LATENT:
            reference = continuation
        decode_s = total_s - prefill_s
        rows.append(
            row
            | {
                "prefill s": prefill_s,
                "total s": total_s,
                "tok/s": continuation.shape[1] / total_s,
                # None where the one-token call was not faster than the whole call (noise)
                "decode tok/s": (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
                "same tokens as latent": same_tokens(continuation, reference, variant),
            }
        )
    return rows


def same_tokens(continuation: torch.Tensor, reference: torch.Tensor | None, variant: str) -> str:
    if variant == LATENT:
        return "-"
    assert reference is not None, "the latent variant, first in VARIANTS, sets the reference"
    return "yes" if torch.equal(continuation, reference) else "no"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="seed", show_default=True, type=click.Choice(list(PRESETS)))
@click.option(
    "--contexts",
    default="128,512,2048",
    show_default=True,
    help="Comma-separated prompt lengths (each cut to max_seq_len - new tokens).",
)
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--no-cache-max-context",
    default=512,
    show_default=True,
    type=click.IntRange(min=0),
    help="Skip the no-cache variant above this context (it redoes the whole sequence per token).",
)
@repeats_option(default=1)
@device_option
@threads_option
@seed_option
@json_option
def main(
    preset: str,
    contexts: str,
    new_tokens: int,
    no_cache_max_context: int,
    repeats: int,
    device_name: str,
    threads: int | None,
    seed: int,
    json_path: Path | None,
) -> None:
    """Decode tokens/s of our latent-cache generate, our uncached generate and transformers' generate."""
    device = pick_device(device_name, threads)
    dtype = resolve_dtype("auto", device)
    config = ModelConfig.from_preset(preset)
    try:
        context_list = [int(value) for value in contexts.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{contexts!r} is not a comma-separated list of integers", param_hint="--contexts"
        ) from None
    if new_tokens >= config.max_seq_len or min(context_list) < 1:
        raise click.BadParameter(f"contexts must be >= 1 and new tokens < max_seq_len ({config.max_seq_len})")

    ours = seeded_model(preset, seed)
    theirs = transformers_twin(ours, dtype)
    theirs.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self from mypy
    theirs.eval()
    ours.to(device=device, dtype=dtype).eval()
    models: dict[str, nn.Module] = {LATENT: ours, NO_CACHE: ours, THEIRS: theirs}
    for model in (ours, theirs):
        greedy_generate(model, torch.zeros(1, 8, dtype=torch.long, device=device), 2)  # first-call allocations
    diff = max_logit_diff(ours, theirs, torch.randint(0, config.vocab_size, (1, 64), device=device))

    rows = [
        row
        for context in context_list
        for row in measure_context(models, context, new_tokens, no_cache_max_context, repeats, seed, device)
    ]
    latent = ours.new_cache(1, 1).bytes_per_token
    standard = config.cache_bytes_per_token(dtype.itemsize)["mha"]
    last_prompt = context_prompt(config, context_list[-1], new_tokens, seed, device)
    cache_row = {
        "preset": preset,
        "dtype": dtype_name(dtype),
        "ours (latent) B/token": latent,
        "standard MHA B/token": standard,
        "MHA / ours": standard / latent,
        "transformers B/token (measured)": transformers_cache_bytes_per_token(theirs, last_prompt),
    }

    precision = "float32" if dtype == torch.float32 else f"{dtype_name(dtype)} weights"
    header = run_header("Generation", device, precision) | {
        "preset": preset,
        "new tokens": str(new_tokens),
        "batch": "1",
        "transformers kernels": f"attention={theirs.config._attn_implementation}, "
        f"experts={theirs.config._experts_implementation}",
        "max logit diff (ours vs transformers, 64 tokens)": f"{diff:.3g}",
    }
    print_header(header)
    print_table(
        "Greedy decoding",
        COLUMNS,
        rows,
        notes="prefill s: generate of 1 token; total s: generate of all new tokens; tok/s = new tokens / "
        "total; decode tok/s = (new tokens - 1) / (total - prefill). 'same tokens' compares the "
        "greedy continuation with the latent-cache one.",
    )
    print_table(
        "KV cache per token (all layers)",
        CACHE_COLUMNS,
        [cache_row],
        notes="ours: LatentCache.bytes_per_token, (kv_lora_rank + qk_rope_head_dim) values per layer. "
        "standard MHA: num_heads * (qk_nope + qk_rope + v head dims) values per layer. transformers: "
        "its cache's tensor bytes after the prefill of the last context, divided by the prompt length.",
    )
    write_json(json_path, header, {"generation": rows, "cache": [cache_row]})


if __name__ == "__main__":
    main()
