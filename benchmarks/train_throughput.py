"""Training throughput: tokens/s of forward + backward + AdamW step, ours against transformers' DeepseekV3.

Both models hold the same weights (transformers' is loaded from our export; the largest logit difference is
printed) and train on the same random batches, in each precision asked for: float32, and bf16 autocast over
float32 weights and optimizer state (what our trainer's train.dtype bfloat16 does).

Model FLOPs utilisation (MFU) = tokens/s * training FLOPs per token / the peak FLOP/s of a large square matmul in
the same precision, measured in the same run, where

    FLOPs per token = 6 * (active non-embedding parameters + LM head parameters)
                    + 3 * num_layers * seq_len * num_heads * (qk_head_dim + v_head_dim)

The first term is the matmuls: 2 FLOPs per multiply-add, forward once and backward twice, counting only the
routed experts a token uses (the embedding is a lookup). The second is attention's scores and weighted values:
6 * num_layers * seq_len * num_heads * (qk_head_dim + v_head_dim) if every query saw every key, halved because a
causal query sees half of them on average.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from benchmarks.common import (
    DEFAULT_SHAPES,
    OURS,
    THEIRS,
    batch_shape,
    device_option,
    dtype_name,
    implementation_of,
    json_option,
    make_train_step,
    max_logit_diff,
    measured_peak_flops,
    pick_device,
    print_header,
    print_table,
    run_header,
    seed_option,
    seeded_model,
    threads_option,
    timed,
    token_batches,
    transformers_twin,
    write_json,
)
from deepseek.cpu import keep_freed_memory
from deepseek.model import DeepSeekLM

COLUMNS = [
    "preset",
    "precision",
    "batch",
    "seq len",
    "GFLOP/token",
    "ours tok/s",
    "transformers tok/s",
    "ours / transformers",
    "ours MFU %",
    "transformers MFU %",
    "max logit diff",
]
BEST_COLUMNS = [
    "preset",
    "ours best",
    "ours tok/s",
    "transformers best",
    "transformers tok/s",
    "ours best / transformers best",
    "ours best / ours float32",
]
PEAK_COLUMNS = ["precision", "matmul", "GFLOP/s"]
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def training_flops_per_token(model: DeepSeekLM, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward), by the formula in this module's docstring."""
    config = model.config
    matmul_params = model.parameter_counts()["active_non_embedding"] + config.vocab_size * config.hidden_size
    attention = 3 * config.num_layers * seq_len * config.num_heads * (config.qk_head_dim + config.v_head_dim)
    return 6 * matmul_params + attention


def tokens_per_second(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool,
) -> float:
    """Train on batches; the first warmup steps (allocations, kernel selection, compiling) are not timed."""
    step = make_train_step(model, device, dtype, compile)
    for inputs, targets in batches[:warmup]:
        step(inputs, targets)
    timed_batches = batches[warmup:]
    _, seconds = timed(lambda: [step(inputs, targets) for inputs, targets in timed_batches], device)
    return sum(inputs.numel() for inputs, _ in timed_batches) / seconds


def measure_preset(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    peak: float,
    shape: tuple[int, int],
    steps: int,
    warmup: int,
    seed: int,
    compile: bool,
) -> tuple[dict, str]:
    """One table row: the preset in one precision, both models from the same weights, MFU against peak FLOP/s;
    and which attention and experts kernels transformers chose."""
    batch_size, seq_len = shape
    ours = seeded_model(preset, seed)
    theirs = transformers_twin(ours)
    ours.to(device)
    theirs.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self from mypy
    batches = token_batches(ours.config.vocab_size, warmup + steps, batch_size, seq_len, seed, device)
    diff = max_logit_diff(ours, theirs, batches[0][0][:1])  # before training moves the weights apart
    speed = {}
    for model in (ours, theirs):
        click.echo(
            f"{preset}, {dtype_name(dtype)}: training {implementation_of(model)} "
            f"({batch_size} x {seq_len}, {warmup} + {steps} steps)",
            err=True,
        )
        speed[implementation_of(model)] = tokens_per_second(model, batches, warmup, device, dtype, compile)
    flops = training_flops_per_token(ours, seq_len)
    row = {
        "preset": preset,
        "precision": dtype_name(dtype),
        "batch": batch_size,
        "seq len": seq_len,
        "GFLOP/token": flops / 1e9,
        "ours tok/s": speed[OURS],
        "transformers tok/s": speed[THEIRS],
        "ours / transformers": speed[OURS] / speed[THEIRS],
        "ours MFU %": 100 * speed[OURS] * flops / peak,
        "transformers MFU %": 100 * speed[THEIRS] * flops / peak,
        "max logit diff": diff,
    }
    kernels = f"attention={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"
    return row, kernels


def best_precisions(rows: list[dict]) -> list[dict]:
    """Per preset, each implementation at its fastest precision, and ours against our float32."""
    best = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        mine = [row for row in rows if row["preset"] == preset]
        ours = max(mine, key=lambda row: row["ours tok/s"])
        theirs = max(mine, key=lambda row: row["transformers tok/s"])
        fp32 = next((row["ours tok/s"] for row in mine if row["precision"] == "float32"), None)
        best.append(
            {
                "preset": preset,
                "ours best": ours["precision"],
                "ours tok/s": ours["ours tok/s"],
                "transformers best": theirs["precision"],
                "transformers tok/s": theirs["transformers tok/s"],
                "ours best / transformers best": ours["ours tok/s"] / theirs["transformers tok/s"],
                "ours best / ours float32": None if fp32 is None else ours["ours tok/s"] / fp32,
            }
        )
    return best


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--preset",
    "presets",
    multiple=True,
    type=click.Choice(list(DEFAULT_SHAPES)),
    default=("cpu", "seed"),
    show_default=True,
    help="Model preset; repeat for several.",
)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(list(PRECISIONS)),
    default=tuple(PRECISIONS),
    show_default=True,
    help="float32, or bfloat16 mixed precision (autocast over float32 weights, as our trainer); repeat for several.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Sequences per step [default: per preset and device, see benchmarks/common.py].",
)
@click.option("--seq-len", type=click.IntRange(min=1), help="Tokens per sequence [default: per preset and device].")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Timed optimizer steps.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed steps first.")
@click.option(
    "--compile",
    "compile_models",
    is_flag=True,
    help="torch.compile both models' forward and loss (compiling happens in the warmup steps).",
)
@device_option
@threads_option
@seed_option
@json_option
def main(
    presets: tuple[str, ...],
    precisions: tuple[str, ...],
    batch_size: int | None,
    seq_len: int | None,
    steps: int,
    warmup: int,
    compile_models: bool,
    device_name: str,
    threads: int | None,
    seed: int,
    json_path: Path | None,
) -> None:
    """Training tokens/s and MFU of DeepSeekLM against transformers' DeepseekV3ForCausalLM, same weights, in each
    precision; MFU divides by a matmul peak measured in the same run."""
    device = pick_device(device_name, threads)
    keep_freed_memory()
    if device.type == "cuda":  # as our trainer does; fp32 leftovers under autocast (the router) use TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shapes = {preset: batch_shape(preset, device, batch_size, seq_len) for preset in presets}  # fail before work
    peaks = {name: measured_peak_flops(device, PRECISIONS[name]) for name in precisions}
    rows, kernels = [], ""
    for preset, shape in shapes.items():
        for name in precisions:
            row, kernels = measure_preset(
                preset, device, PRECISIONS[name], peaks[name].flops, shape, steps, warmup, seed, compile_models
            )
            rows.append(row)
    header = run_header("Training throughput", device, ", ".join(precisions)) | {
        "transformers kernels": kernels,
        "torch.compile": "both models" if compile_models else "no (eager)",
    }
    peak_rows = [
        {"precision": name, "matmul": f"{peak.size}^3", "GFLOP/s": peak.flops / 1e9} for name, peak in peaks.items()
    ]
    print_header(header)
    print_table("Measured peak: the best of 5 square matmuls", PEAK_COLUMNS, peak_rows)
    print_table(
        "Tokens/s (forward + backward + AdamW step)",
        COLUMNS,
        rows,
        notes="MFU: model FLOPs per second (formula in the module docstring) over the measured peak of the same "
        "precision. bfloat16 is autocast over float32 weights and optimizer state, for both models. Max logit "
        "diff compares the two models in eval mode before training, in float32 (TF32 matmuls on CUDA).",
    )
    best = best_precisions(rows)
    print_table("Each implementation at its best precision", BEST_COLUMNS, best)
    write_json(json_path, header, {"peak": peak_rows, "train_throughput": rows, "best": best})


if __name__ == "__main__":
    main()
