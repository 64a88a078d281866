"""Self-speculative decoding against plain decoding, batch 1, greedy.

Two kinds of model:

- a trained one (--model-dir, default model/final, trained with model.mtp_depth >= 1), with the prompts of
  params.yaml's sample section: what speculation gains depends on how often its drafts are accepted;
- a preset with random weights (--preset), where acceptance means nothing: the table shows instead what one
  verification of 1 + D tokens costs against one plain decoding step, the price paid per accepted draft.

Three ways to generate: ours plain (latent cache, one token per step), ours speculative (the multi-token
prediction modules draft, one forward verifies), and transformers' generate on our export (no MTP).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch

from benchmarks.common import (
    THEIRS,
    device_option,
    dtype_name,
    json_option,
    pick_device,
    print_header,
    print_table,
    repeats_option,
    run_header,
    seed_option,
    threads_option,
    timed,
    transformers_twin,
    write_json,
)
from deepseek.config import PRESETS, ModelConfig
from deepseek.device import resolve_dtype
from deepseek.generate import generate
from deepseek.model import DeepSeekLM
from deepseek.speculative import SpeculativeStats
from stages.params import load_params
from stages.trained import load_trained

if TYPE_CHECKING:
    from transformers import DeepseekV3ForCausalLM

PLAIN, SPECULATIVE = "ours, plain", "ours, speculative"
COLUMNS = ["variant", "new tokens", "s", "tok/s", "vs ours plain", "same tokens as plain", "drafts accepted"]
COST_COLUMNS = ["context", "D", "plain step ms", "verify step ms (1 + D tokens)", "draft ms (D depths)", "ratio"]


def decode_rows(
    ours: DeepSeekLM, theirs: DeepseekV3ForCausalLM, prompts: list[torch.Tensor], new_tokens: int, repeats: int
) -> list[dict]:
    """One row per variant: the time to continue every prompt by new_tokens greedy tokens."""
    device = prompts[0].device
    stats = SpeculativeStats()

    def run_all(variant: str) -> list[torch.Tensor]:
        outputs = []
        for prompt in prompts:
            if variant == THEIRS:
                outputs.append(
                    theirs.generate(
                        prompt,
                        attention_mask=torch.ones_like(prompt),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                    )
                )
            else:
                outputs.append(
                    generate(
                        ours,
                        prompt,
                        new_tokens,
                        temperature=0,
                        speculative=variant == SPECULATIVE,
                        stats=stats if variant == SPECULATIVE else None,
                    )
                )
        return outputs

    rows, reference, plain_s = [], None, 0.0
    for variant in (PLAIN, SPECULATIVE, THEIRS):
        click.echo(f"decoding: {variant}", err=True)
        stats.drafted = stats.accepted = stats.verifications = 0
        outputs, seconds = timed(partial(run_all, variant), device, repeats)
        generated = sum(out.shape[1] - prompt.shape[1] for out, prompt in zip(outputs, prompts, strict=True))
        if variant == PLAIN:
            reference, plain_s = outputs, seconds
        same = all(torch.equal(a, b) for a, b in zip(outputs, reference or [], strict=True))
        rows.append(
            {
                "variant": variant,
                "new tokens": generated,
                "s": seconds,
                "tok/s": generated / seconds,
                "vs ours plain": plain_s / seconds,
                "same tokens as plain": "-" if variant == PLAIN else ("yes" if same else "no"),
                "drafts accepted": f"{100 * stats.acceptance:.1f}%" if variant == SPECULATIVE else "-",
            }
        )
    return rows


@torch.no_grad()
def step_costs(model: DeepSeekLM, context: int, repeats: int, device: torch.device) -> dict:
    """At one context: a plain decoding step, a verification of 1 + D tokens, and the D draft steps, in ms."""
    depth = model.config.mtp_depth
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    cache = model.new_cache(1, context + depth + 1)
    hidden = model(prompt, cache=cache).hidden
    drafts = [model.new_cache(1, context + 1, depth=k) for k in range(1, depth + 1)]

    def forward(tokens: int) -> None:
        model(prompt[:, :tokens], cache=cache)
        cache.truncate(context)

    def draft() -> None:
        previous = hidden[:, -1:]
        for k, draft_cache in enumerate(drafts, start=1):
            draft_cache.length = context - 1  # as if every earlier position had been read
            previous = model.draft(k, previous, prompt[:, -1:], draft_cache).hidden

    _, plain_s = timed(partial(forward, 1), device, repeats)
    _, verify_s = timed(partial(forward, 1 + depth), device, repeats)
    _, draft_s = timed(draft, device, repeats)
    return {
        "context": context,
        "D": depth,
        "plain step ms": 1000 * plain_s,
        "verify step ms (1 + D tokens)": 1000 * verify_s,
        "draft ms (D depths)": 1000 * draft_s,
        "ratio": (verify_s + draft_s) / plain_s,
    }


def decoding_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU: one token at a time is latency-bound, and bf16 weights decoded the trained `cpu` model 1.8x
    slower (2.7 ms a step against 1.5, measured); bf16 where train.dtype auto picks it on CUDA."""
    return torch.float32 if device.type == "cpu" else resolve_dtype("auto", device)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model-dir",
    default="model/final",
    show_default=True,
    type=click.Path(path_type=Path),
    help="A trained model with multi-token prediction modules (ignored with --preset).",
)
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Random weights of this preset instead.")
@click.option("--mtp-depth", default=1, show_default=True, type=click.IntRange(min=1), help="With --preset.")
@click.option("--new-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--contexts", default="128,512", show_default=True, help="With --preset: contexts for the step costs.")
@repeats_option(default=3)
@device_option
@threads_option
@seed_option
@json_option
def main(
    model_dir: Path,
    preset: str | None,
    mtp_depth: int,
    new_tokens: int,
    contexts: str,
    repeats: int,
    device_name: str,
    threads: int | None,
    seed: int,
    json_path: Path | None,
) -> None:
    """Greedy decoding speed with and without speculation (and transformers'), and the cost of a verification."""
    device = pick_device(device_name, threads)
    dtype = decoding_dtype(device)
    torch.manual_seed(seed)
    if preset is None:
        ours, tokenizer = load_trained(model_dir)
        source = str(model_dir)
    else:
        ours, source = DeepSeekLM(ModelConfig.from_preset(preset, mtp_depth=mtp_depth)), f"{preset}, random weights"
    header = run_header("Speculative decoding", device, f"{dtype_name(dtype)} weights") | {
        "model": source,
        "mtp_depth": str(ours.config.mtp_depth),
        "batch": "1",
    }
    print_header(header)
    if preset is None:
        theirs = transformers_twin(ours, dtype)
        theirs.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self from mypy
        theirs.eval()
        ours.to(device=device, dtype=dtype).eval()
        texts = load_params().sample.prompts
        prompts = [torch.tensor([tokenizer.encode(t)], device=device) for t in texts]
        generate(ours, prompts[0], 4, temperature=0, speculative=True)  # first-call allocations
        tables = {"decoding": decode_rows(ours, theirs, prompts, new_tokens, repeats)}
        print_table(
            f"Greedy decoding of the {len(prompts)} sample prompts",
            COLUMNS,
            tables["decoding"],
            notes="transformers: generate(do_sample=False) of DeepseekV3ForCausalLM on our export, without MTP.",
        )
    else:
        ours.to(device=device, dtype=dtype).eval()
        context_list = [int(value) for value in contexts.split(",")]
        tables = {"step costs": [step_costs(ours, context, repeats, device) for context in context_list]}
        print_table(
            "What a verification costs",
            COST_COLUMNS,
            tables["step costs"],
            notes="ratio = (verify + draft) / plain step: speculation gains when the tokens committed per "
            "verification (1 + accepted drafts) exceed it.",
        )
    write_json(json_path, header, tables)


if __name__ == "__main__":
    main()
