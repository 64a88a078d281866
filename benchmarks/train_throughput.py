"""Training throughput: tokens/s of forward + backward + AdamW step, ours against transformers' DeepseekV3.

Both models hold the same weights (transformers' is loaded from our export; the largest logit difference is
printed) and train on the same random batches. fp32 on CPU; on CUDA, bf16 autocast over fp32 weights, as our
trainer does.

Model FLOPs utilisation (MFU) = tokens/s * training FLOPs per token / the GPU's dense bf16 peak, where

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
    peak_bf16_flops,
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
from deepseek.model import DeepSeekLM
from deepseek.trainer import resolve_dtype

COLUMNS = [
    "preset",
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
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    seed: int,
    compile: bool,
) -> tuple[dict, str]:
    """One table row for the preset, and which attention and experts kernels transformers chose."""
    ours = seeded_model(preset, seed)
    theirs = transformers_twin(ours)
    ours.to(device)
    theirs.to(device)
    batches = token_batches(ours.config.vocab_size, warmup + steps, batch_size, seq_len, seed, device)
    diff = max_logit_diff(ours, theirs, batches[0][0][:1])  # before training moves the weights apart
    speed = {}
    for model in (ours, theirs):
        click.echo(
            f"{preset}: training {implementation_of(model)} ({batch_size} x {seq_len}, {warmup} + {steps} steps)",
            err=True,
        )
        speed[implementation_of(model)] = tokens_per_second(model, batches, warmup, device, dtype, compile)
    flops = training_flops_per_token(ours, seq_len)
    peak = peak_bf16_flops(device)
    mfu = {name: None if peak is None else 100 * tokens * flops / peak for name, tokens in speed.items()}
    row = {
        "preset": preset,
        "batch": batch_size,
        "seq len": seq_len,
        "GFLOP/token": flops / 1e9,
        "ours tok/s": speed[OURS],
        "transformers tok/s": speed[THEIRS],
        "ours / transformers": speed[OURS] / speed[THEIRS],
        "ours MFU %": mfu[OURS],
        "transformers MFU %": mfu[THEIRS],
        "max logit diff": diff,
    }
    kernels = f"attention={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"
    return row, kernels


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
    """Training tokens/s and MFU of DeepSeekLM against transformers' DeepseekV3ForCausalLM, same weights."""
    device = pick_device(device_name, threads)
    dtype = resolve_dtype("auto", device)
    if device.type == "cuda":  # as our trainer does; fp32 leftovers under autocast (the router) use TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shapes = {preset: batch_shape(preset, device, batch_size, seq_len) for preset in presets}  # fail before work
    rows, kernels = [], ""
    for preset, (preset_batch, preset_seq) in shapes.items():
        row, kernels = measure_preset(
            preset, device, dtype, preset_batch, preset_seq, steps, warmup, seed, compile_models
        )
        rows.append(row)
    precision = "float32" if dtype == torch.float32 else f"{dtype_name(dtype)} autocast, float32 weights"
    header = run_header("Training throughput", device, precision) | {
        "transformers kernels": kernels,
        "torch.compile": "both models" if compile_models else "no (eager)",
    }
    print_header(header)
    print_table(
        "Tokens/s (forward + backward + AdamW step)",
        COLUMNS,
        rows,
        notes="MFU needs the device's peak FLOP/s, known only for H100 SXM, H200 and A100 (bf16 dense). "
        "Max logit diff compares the two models in eval mode before training, in float32 "
        "(TF32 matmuls on CUDA).",
    )
    write_json(json_path, header, {"train_throughput": rows})


if __name__ == "__main__":
    main()
