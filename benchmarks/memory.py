"""Peak memory of one training step and of one generate call, ours against transformers' DeepseekV3.

Every case runs in a fresh (spawned) process, so none inherits another's allocations or allocator caches.

- CPU (Linux, glibc): resident set size from /proc/self/status. "at rest" is VmRSS just before the measured call,
  after malloc_trim has returned the heap's free pages to the OS; the peak is VmHWM after resetting it to the
  current RSS (writing 5 to /proc/self/clear_refs), so the transient memory of building the model does not hide
  the call's own peak. At rest includes the Python process and the libraries it imported (transformers only in
  its own cases).
- CUDA: torch.cuda.memory_allocated before the call and max_memory_allocated after resetting the peak.

"increase" = peak - at rest. The training case is the second AdamW step, so at rest holds the weights and the
optimizer state and the increase is activations, gradients and temporaries; dtypes as in train_throughput.py.
The generation case is one greedy generate (prompt cut as in generation.py) after a short warm-up generate;
dtypes as in generation.py. Each process builds its model from the preset (transformers' from our exported
config): memory does not depend on the weights' values, except through routing, which moves tokens between
experts but not their total.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from benchmarks.common import (
    OURS,
    THEIRS,
    batch_shape,
    device_option,
    dtype_name,
    greedy_generate,
    json_option,
    make_train_step,
    pick_device,
    print_header,
    print_table,
    run_header,
    seed_option,
    seeded_model,
    threads_option,
    token_batches,
    write_json,
)
from benchmarks.generation import prompt_length
from deepseek.config import PRESETS, ModelConfig
from deepseek.device import resolve_dtype
from deepseek.hf_config import to_hf_config

TRAIN, GENERATE = "training step", "generate"
COLUMNS = [
    "case",
    "shape",
    "ours at rest MiB",
    "ours peak MiB",
    "ours increase MiB",
    "transformers at rest MiB",
    "transformers peak MiB",
    "transformers increase MiB",
    "increase ours / transformers",
]


@dataclass(frozen=True)
class Case:
    kind: str  # TRAIN or GENERATE
    implementation: str  # OURS or THEIRS
    preset: str
    device_name: str
    threads: int | None
    seed: int
    batch_size: int
    seq_len: int
    context: int
    new_tokens: int


def measure_in_fresh_process(case: Case) -> tuple[int, int]:
    """(at rest, peak) bytes of the case, measured in a process started for it alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, case).result()


def measure(case: Case) -> tuple[int, int]:
    """Build the case's model, prepare its call, and measure the call's memory (runs in the fresh process)."""
    device = pick_device(case.device_name, case.threads)
    dtype = resolve_dtype("auto", device)
    torch.manual_seed(case.seed)
    config = ModelConfig.from_preset(case.preset)  # build_model builds either implementation from this config
    if case.kind == TRAIN:
        model = build_model(case, device, torch.float32)  # fp32 weights; autocast does the rest on CUDA
        step = make_train_step(model, device, dtype)
        (warm_inputs, warm_targets), (inputs, targets) = token_batches(
            config.vocab_size, 2, case.batch_size, case.seq_len, case.seed, device
        )
        step(warm_inputs, warm_targets)  # creates AdamW's state, which then counts as at rest
        return peak_memory(lambda: step(inputs, targets), device)
    model = build_model(case, device, dtype).eval()
    greedy_generate(model, torch.zeros(1, 8, dtype=torch.long, device=device), 2)  # first-call allocations
    length = prompt_length(case.context, case.new_tokens, config.max_seq_len)
    prompt = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(case.seed))
    prompt = prompt.to(device)
    return peak_memory(lambda: greedy_generate(model, prompt, case.new_tokens), device)


def build_model(case: Case, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if case.implementation == OURS:
        return seeded_model(case.preset, case.seed).to(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    hf_config = to_hf_config(ModelConfig.from_preset(case.preset))
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device)


def peak_memory(call: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(bytes in use before the call, peak bytes during it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        at_rest = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return at_rest, torch.cuda.max_memory_allocated(device)
    # Give free heap pages back to the OS first: memory glibc kept from earlier calls would otherwise count as at
    # rest and then serve the measured call without raising the RSS.
    ctypes.CDLL(None).malloc_trim(0)
    at_rest = proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    call()
    return at_rest, proc_status_bytes("VmHWM")


def proc_status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match, f"no {field} in /proc/self/status"
    return int(match.group(1)) * 1024


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="seed", show_default=True, type=click.Choice(list(PRESETS)))
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Training sequences per step [default: per preset and device, as in train_throughput].",
)
@click.option("--seq-len", type=click.IntRange(min=1), help="Training tokens per sequence [default: per preset].")
@click.option(
    "--context",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="Generation prompt length (cut to max_seq_len - new tokens).",
)
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@device_option
@threads_option
@seed_option
@json_option
def main(
    preset: str,
    batch_size: int | None,
    seq_len: int | None,
    context: int,
    new_tokens: int,
    device_name: str,
    threads: int | None,
    seed: int,
    json_path: Path | None,
) -> None:
    """Peak memory of a training step and of generation: DeepSeekLM against transformers' DeepseekV3."""
    device = pick_device(device_name, threads)  # the parent only describes the machine; cases run in children
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise click.UsageError("measuring CPU memory needs Linux's /proc/self/status and /proc/self/clear_refs")
    config = ModelConfig.from_preset(preset)
    if new_tokens >= config.max_seq_len:
        raise click.BadParameter(f"must be < max_seq_len ({config.max_seq_len})", param_hint="--new-tokens")
    batch_size, seq_len = batch_shape(preset, device, batch_size, seq_len)
    length = prompt_length(context, new_tokens, config.max_seq_len)
    shapes = {TRAIN: f"{batch_size} x {seq_len}", GENERATE: f"prompt {length} + {new_tokens} new"}

    rows = []
    for kind, shape in shapes.items():
        row: dict[str, Any] = {"case": kind, "shape": shape}
        for implementation in (OURS, THEIRS):
            click.echo(f"{kind}: {implementation}", err=True)
            case = Case(
                kind, implementation, preset, device_name, threads, seed, batch_size, seq_len, context, new_tokens
            )
            at_rest, peak = (value / 2**20 for value in measure_in_fresh_process(case))
            row |= {
                f"{implementation} at rest MiB": at_rest,
                f"{implementation} peak MiB": peak,
                f"{implementation} increase MiB": peak - at_rest,
            }
        theirs_increase = row["transformers increase MiB"]  # 0 when the allocator had the memory already
        row["increase ours / transformers"] = row["ours increase MiB"] / theirs_increase if theirs_increase else None
        rows.append(row)

    dtype = resolve_dtype("auto", device)
    precision = (
        "float32"
        if dtype == torch.float32
        else f"training: {dtype_name(dtype)} autocast, float32 weights; generation: {dtype_name(dtype)} weights"
    )
    meter = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "process RSS (VmRSS at rest, VmHWM peak after a reset)"
    )
    header = run_header("Memory", device, precision) | {"preset": preset, "measured": meter}
    print_header(header)
    print_table(
        "Peak memory (each case in a fresh process)",
        COLUMNS,
        rows,
        notes="increase = peak - at rest. Training: the second AdamW step (weights and optimizer state are "
        "at rest). Generation: one greedy generate, batch 1.",
    )
    write_json(json_path, header, {"memory": rows})


if __name__ == "__main__":
    main()
