"""Expert matmul shapes: what a matmul of a new shape costs, and what padding the experts' token groups saves.

On CPU, torch's bf16 (and fp16) matmuls run oneDNN kernels that are generated for each new shape and then cached;
float32 ones are not. The routed experts' token counts change every training step, so unpadded expert groups give
the matmuls new shapes every step. `deepseek/moe.py` pads each expert's rows to a multiple of a row block
(`row_block`), which bounds the shapes. This script measures, in one run:

1. one `[256, K] x [K, 128]` product (an expert weight gradient of the `cpu` preset, K the expert's rows) on shapes
   already seen and on new ones, per precision;
2. one MoE layer's forward and backward over steps whose routing changes every step (a random balancing bias per
   step), with the rows padded as the model does and unpadded, the two alternating step by step: ms per step and
   the distinct group sizes the experts' matmuls saw.

Where the penalty exists (a Xeon with AMX: bf16, new shapes), the padded layer is the faster; elsewhere the two
are about equal.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from benchmarks.common import (
    dtype_name,
    json_option,
    pick_device,
    print_header,
    print_table,
    run_header,
    seed_option,
    threads_option,
    write_json,
)
from deepseek import moe
from deepseek.config import PRESETS, ModelConfig

PRECISIONS = (torch.float32, torch.bfloat16)
MATMUL_COLUMNS = ["precision", "Ks", "known K ms", "new Ks ms", "the same Ks again ms", "new / known"]
LAYER_COLUMNS = ["precision", "rows", "row block", "ms per step", "distinct group sizes"]


def ms_per_matmul(sizes: list[int], dtype: torch.dtype) -> float:
    """Mean ms of a [256, K] x [K, 128] product over the K in sizes."""
    pairs = [(torch.randn(256, k).to(dtype), torch.randn(k, 128).to(dtype)) for k in sizes]
    start = time.perf_counter()
    for a, b in pairs:
        a @ b
    return (time.perf_counter() - start) / len(sizes) * 1e3


def matmul_row(dtype: torch.dtype, count: int, rng: random.Random) -> dict:
    """A known K (seen count times), count Ks that no earlier row used, then the same Ks again."""
    known = ms_per_matmul([768] * count, dtype)
    fresh = rng.sample(range(400, 900), count)
    new = ms_per_matmul(fresh, dtype)
    return {
        "precision": dtype_name(dtype),
        "Ks": f"768, {count} new in 400-899",
        "known K ms": known,
        "new Ks ms": new,
        "the same Ks again ms": ms_per_matmul(fresh, dtype),
        "new / known": new / known,
    }


def layer_step(layer: moe.MoE, inputs: torch.Tensor, dtype: torch.dtype, seen: set[int]) -> Callable[[], float]:
    """One forward and backward of layer under a new random routing; returns its seconds, and records the
    expert group sizes its grouped matmuls got."""

    def step() -> float:
        layer.gate.expert_bias.uniform_(-0.3, 0.3)  # training moves the router; this moves it further, every step
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out, counts, _ = layer(inputs)
        out.float().square().mean().backward()
        seconds = time.perf_counter() - start
        counts = counts.long()
        block = moe.row_block(int(counts.sum()), len(counts), torch.empty(0, dtype=dtype))
        experts = torch.repeat_interleave(torch.arange(len(counts)), counts)
        seen.update(moe.group_sizes(moe.PaddedLayout.of(experts, counts, block).ends).tolist())
        return seconds

    return step


def block_label(size: int, models: int) -> str:
    if size > 1:
        return f"{size} (the model's)"
    return "1 (unpadded, the model's)" if models == 1 else "1 (unpadded)"


def layer_rows(config: ModelConfig, tokens: int, steps: int, seed: int) -> list[dict]:
    """Padded and unpadded MoE layers in each precision, alternating step by step."""
    rows = []
    for dtype in PRECISIONS:
        torch.manual_seed(seed)
        layer = moe.MoE(config).train()
        for parameter in layer.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
        inputs = torch.randn(1, tokens, config.hidden_size)
        routed = tokens * config.num_experts_per_tok
        block = moe.row_block(routed, config.num_routed_experts, torch.empty(0, dtype=dtype))
        variants = {block: set[int](), 1: set[int]()} if block > 1 else {1: set[int]()}
        seconds: dict[int, list[float]] = {size: [] for size in variants}
        models_block = moe.MAX_ROW_BLOCK
        try:
            for _ in range(steps):
                for size, seen in variants.items():
                    moe.MAX_ROW_BLOCK = size  # 1: no padding, as before the row block existed
                    seconds[size].append(layer_step(layer, inputs, dtype, seen)())
        finally:
            moe.MAX_ROW_BLOCK = models_block
        for size, seen in variants.items():
            rows.append(
                {
                    "precision": dtype_name(dtype),
                    "rows": routed,
                    "row block": block_label(size, block),
                    "ms per step": 1e3 * sum(seconds[size]) / steps,
                    "distinct group sizes": len(seen),
                }
            )
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--preset", default="cpu", show_default=True, type=click.Choice(list(PRESETS)), help="Whose MoE layer to time."
)
@click.option("--tokens", default=2048, show_default=True, type=click.IntRange(min=1), help="Tokens per step.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Steps per variant.")
@click.option("--matmuls", default=40, show_default=True, type=click.IntRange(min=1, max=500), help="Per timing.")
@threads_option
@seed_option
@json_option
def main(
    preset: str, tokens: int, steps: int, matmuls: int, threads: int | None, seed: int, json_path: Path | None
) -> None:
    """The cost of a new matmul shape in each precision on this CPU, and a MoE layer's step with its experts'
    rows padded to a row block and unpadded."""
    device = pick_device("cpu", threads)
    rng = random.Random(seed)
    matmul_rows = [matmul_row(dtype, matmuls, rng) for dtype in PRECISIONS]
    config = ModelConfig.from_preset(preset)
    rows = layer_rows(config, tokens, steps, seed)
    header = run_header("Expert matmul shapes", device, ", ".join(dtype_name(d) for d in PRECISIONS))
    print_header(header)
    print_table(
        "One [256, K] x [K, 128] matmul: shapes seen before, and new ones",
        MATMUL_COLUMNS,
        matmul_rows,
        notes="Each K's first product makes its kernel in bf16; the same Ks again reuse them.",
    )
    print_table(
        f"One {preset}-preset MoE layer, forward + backward, {tokens} tokens, the routing new every step",
        LAYER_COLUMNS,
        rows,
        notes="Padded and unpadded alternate step by step in one process. Distinct group sizes: the expert row "
        "counts the grouped matmuls were given over all steps.",
    )
    write_json(json_path, header, {"matmul": matmul_rows, "moe_layer": rows})


if __name__ == "__main__":
    main()
