"""The one prepared GPU check: every CUDA path the project has, in one command, one Markdown table.

Whoever has a GPU (an H100 or H200) runs this one command and records the table in docs/benchmarks.md:

    benchmarks/gpu_check.sh --json reports/bench/gpu_check.json

It is sized to take under 8 minutes on one GPU (an estimate of 2 to 4: not yet timed on one; the header records
the duration). It checks, each on its own so that one failure hides no other:

1. seed-preset training in bf16 autocast (train_throughput.py's measurement, its default GPU shape): our tokens/s
   and transformers' on the same weights, their ratio, MFU against the bf16 matmul peak measured in the run and
   against the card's spec dense bf16 peak, and the two models' largest logit difference;
2. torch's grouped GEMM on CUDA (deepseek.moe.grouped_linear, bf16, some experts empty): forward, input and weight
   gradients against a float32 per-expert F.linear loop;
3. FSDP2 on one GPU: a one-process NCCL group, the Trainer with train.parallel fsdp against the same steps
   unsharded, from the same seed: the training losses must agree;
4. multi-token prediction and speculative decoding: greedy speculative decoding must give the tokens of plain
   greedy decoding (float32, TF32 off: random weights leave near-ties that bf16 rounding may flip), and tokens/s
   of both in bf16;
5. latent-cache decoding against transformers' generate on the same weights: the same greedy tokens (float32,
   TF32 off), and tokens/s of both in bf16 (generation.py's measurement);
6. the peak memory of one training step (memory.py's measurement, in this process);
7. the default model (the cpu preset, mtp_depth 1, 1,024 tokens) trained 200 steps by the Trainer with
   params.yaml's train settings on a synthetic, learnable token stream (a sparse random Markov chain, no
   download): the logged loss must fall by more than 1 nat.

A speed or memory row passes when it ran and its numbers are finite; the targets those numbers are judged by
are in docs/benchmarks.md. The command exits 1 if any row fails, after printing the table (tracebacks go to
stderr). --dry-run runs the same checks on the CPU with the tiny preset, tiny shapes and few steps, in about ten
seconds on one thread: tests/test_benchmarks.py runs it so the script keeps working without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import (
    THEIRS,
    batch_shape,
    dtype_name,
    greedy_generate,
    json_option,
    measured_peak_flops,
    print_header,
    print_table,
    run_header,
    seed_option,
    seeded_model,
    threads_option,
    timed,
    transformers_twin,
    write_json,
)
from benchmarks.generation import LATENT, NO_CACHE, measure_context
from benchmarks.memory import TRAIN, Case, measure
from benchmarks.train_throughput import measure_preset
from deepseek import fsdp
from deepseek.config import ModelConfig
from deepseek.cpu import keep_freed_memory
from deepseek.device import resolve_dtype, seed_everything
from deepseek.generate import generate
from deepseek.model import DeepSeekLM
from deepseek.moe import grouped_linear
from deepseek.speculative import SpeculativeStats
from deepseek.train_config import TrainConfig
from deepseek.trainer import Trainer, TrainOutputs

PASS, FAIL = "PASS", "FAIL"
COLUMNS = ["check", "what was measured", "result", "verdict"]
NO_CUDA = "no CUDA device: run it on a GPU, or --dry-run to try it on the CPU"

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendor's data sheets, in FLOP/s, by a piece of
# torch.cuda.get_device_name(); the first piece found wins, so a variant comes before its family.
SPEC_BF16_PEAKS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,  # SXM
    "A100": 312e12,
}
# What decoding computes in on an H100/H200 (train.dtype auto there; generation.py's choice on CUDA); the dry run
# decodes in it too, so that it runs the code the GPU runs.
DECODE_DTYPE = torch.bfloat16
# Each token of the synthetic Markov chain is followed by one of this many: ln 4 = 1.39 nats is its loss floor.
SUCCESSORS = 4
LOSS_DROP = 1.0  # nats the default model's logged loss must fall by in its training


@dataclass(frozen=True)
class Plan:
    """The sizes each check runs at: a GPU's, or the dry run's on the CPU."""

    preset: str  # checks 1 to 6
    throughput_steps: tuple[int, int]  # (untimed, timed) steps of check 1
    expert_rows: int  # routed (token, expert) rows of check 2
    fsdp_train: TrainConfig  # check 3 (parallel is set by the check)
    decode: tuple[int, int]  # (context, new tokens) of checks 4 and 5
    default_model: ModelConfig  # check 7
    default_train: TrainConfig
    synthetic_tokens: int  # length of check 7's token stream


def _quiet_train_config(steps: int, **fields: Any) -> TrainConfig:
    """A TrainConfig that evaluates, samples and checkpoints only after the last step."""
    return TrainConfig(
        max_steps=steps,
        eval_interval=steps,
        eval_batches=1,
        sample_interval=steps,
        checkpoint_interval=steps,
        keep_checkpoints=1,
        **fields,
    )


GPU_PLAN = Plan(
    preset="seed",
    throughput_steps=(2, 5),  # train_throughput.py's defaults
    expert_rows=8 * 2048 * 2,  # the seed preset's 8 x 2048 tokens, top-2
    fsdp_train=_quiet_train_config(
        4, micro_batch_size=4, grad_accum_steps=2, seq_len=512, warmup_steps=1, log_interval=1
    ),
    decode=(512, 32),
    default_model=ModelConfig.from_preset("cpu", mtp_depth=1, vocab_size=1024),
    # params.yaml's train section (TrainConfig's defaults: micro-batch 16 x 128, 4 accumulated, lr 2e-3, warmup 30,
    # dtype auto), 200 steps, a loss logged every 10
    default_train=_quiet_train_config(200),
    synthetic_tokens=2**20,
)
DRY_RUN_PLAN = Plan(
    preset="tiny",
    throughput_steps=(1, 1),
    expert_rows=64,
    fsdp_train=_quiet_train_config(
        3, micro_batch_size=2, grad_accum_steps=2, seq_len=16, warmup_steps=1, log_interval=1
    ),
    decode=(16, 6),
    # The tiny preset learns the same kind of chain over fewer tokens at a higher learning rate, in a few seconds.
    default_model=ModelConfig.from_preset("tiny", mtp_depth=1, vocab_size=128),
    default_train=_quiet_train_config(
        60, micro_batch_size=8, grad_accum_steps=1, seq_len=32, lr=1e-2, min_lr=1e-3, warmup_steps=5, log_interval=10
    ),
    synthetic_tokens=2**15,
)


@dataclass(frozen=True)
class Run:
    """What every check gets: the device, the plan, the seed and the --threads value."""

    device: torch.device
    plan: Plan
    seed: int
    threads: int | None

    @property
    def preset(self) -> str:
        return self.plan.preset

    @property
    def train_device(self) -> Literal["cpu", "cuda"]:
        """The device as train.device names it (pick_device resolves auto to one of these)."""
        assert self.device.type in ("cpu", "cuda"), self.device
        return "cuda" if self.device.type == "cuda" else "cpu"


def row(check: str, measured: str, result: str, ok: bool) -> dict[str, str]:
    return {"check": check, "what was measured": measured, "result": result, "verdict": PASS if ok else FAIL}


def finite(*values: float) -> bool:
    return all(math.isfinite(value) for value in values)


# --- helpers ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for a comparison of tokens: TF32's 10-bit mantissa flips the argmax at a random model's near-ties.
    The trainer and the speed checks turn it on, as training does."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def spec_bf16_peak(device: torch.device) -> tuple[str, float] | None:
    """(the card's name, its data-sheet dense bf16 FLOP/s), where the card is one we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((name, peak) for piece, peak in SPEC_BF16_PEAKS.items() if piece in name), None)


def markov_tokens(vocab_size: int, count: int, seed: int) -> np.ndarray:
    """count tokens (uint16, as the pipeline stores them) of a seeded random sparse first-order Markov chain: each
    token is followed by one of SUCCESSORS tokens drawn for it once, uniformly. A model learns the table and goes
    from ln(vocab_size) nats towards ln(SUCCESSORS)."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab_size, (vocab_size, SUCCESSORS))
    chains = 64  # walked side by side, so the Python loop runs count / 64 times
    length = -(-count // chains)
    walks = np.empty((chains, length), dtype=np.int64)
    walks[:, 0] = rng.integers(0, vocab_size, chains)
    picks = rng.integers(0, SUCCESSORS, (chains, length))
    for t in range(1, length):
        walks[:, t] = table[walks[:, t - 1], picks[:, t]]
    return walks.reshape(-1)[:count].astype(np.uint16)


def train(model_config: ModelConfig, config: TrainConfig, tokens: np.ndarray, seed: int) -> Trainer:
    """A Trainer that trained a freshly seeded model on tokens (its outputs in a temporary directory)."""
    seed_everything(seed)
    model = DeepSeekLM(model_config)
    # The trainer's log lines go to stderr, so that stdout holds the report alone.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(model, config, seed, TrainOutputs(Path(tmp) / "checkpoints"))
        trainer.fit(tokens, tokens[: len(tokens) // 8])
    return trainer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def one_process_group(device: torch.device) -> Iterator[None]:
    """A process group of this process alone (NCCL on CUDA, gloo on CPU), as torchrun would make with one rank."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- the checks ---------------------------------------------------------------------------------------------------


def check_training(run: Run) -> list[dict[str, str]]:
    """1. The preset's bf16 training speed, ours against transformers, MFU, and whether they hold the same weights."""
    dtype = torch.bfloat16
    shape = batch_shape(run.preset, run.device, None, None)
    peak = measured_peak_flops(run.device, dtype).flops
    warmup, steps = run.plan.throughput_steps
    result, _ = measure_preset(run.preset, run.device, dtype, peak, shape, steps, warmup, run.seed, compile=False)
    ours, theirs = result["ours tok/s"], result["transformers tok/s"]
    name = f"{run.preset} training, bf16"
    measured = f"tokens/s of forward + backward + fused AdamW, {shape[0]} x {shape[1]}, {warmup} + {steps} steps"
    mfu = f"ours {result['ours MFU %']:.1f}%, transformers {result['transformers MFU %']:.1f}% of {peak / 1e12:.1f}"
    mfu += " TFLOP/s measured"
    spec = spec_bf16_peak(run.device)
    if spec is not None:
        card, spec_peak = spec
        mfu += f"; ours {result['ours MFU %'] * peak / spec_peak:.1f}% of the {card}'s {spec_peak / 1e12:.0f} TFLOP/s"
    else:
        mfu += "; no data-sheet peak for this device"
    # Both models hold float32 weights here, but on CUDA their matmuls run in TF32 (on, as in training), whose
    # 10-bit mantissas leave differences of some 1e-3 (an estimate: to be confirmed by the first GPU run).
    tolerance = 5e-2 if run.device.type == "cuda" else 1e-4
    diff = result["max logit diff"]
    return [
        row(
            f"{name}: speed",
            measured,
            f"ours {ours:,.0f} tok/s, transformers {theirs:,.0f} tok/s, ours / transformers {ours / theirs:.2f}x",
            finite(ours, theirs) and ours > 0 and theirs > 0,
        ),
        row(
            f"{name}: MFU",
            "model FLOPs/s over the bf16 matmul peak (train_throughput.py's formula)",
            mfu,
            finite(result["ours MFU %"], result["transformers MFU %"]),
        ),
        row(
            f"{run.preset}: same weights as transformers",
            "largest absolute logit difference, float32 weights, eval mode, before training",
            f"{diff:.3g} (tolerance {tolerance:g})",
            diff <= tolerance,
        ),
    ]


def expert_counts(rows: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Random rows per expert summing to rows, with the second and the last expert empty."""
    empty = {1, experts - 1}
    used = torch.tensor([0.0 if e in empty else 1.0 for e in range(experts)])
    return torch.multinomial(used, rows, replacement=True, generator=generator).bincount(minlength=experts)


def check_grouped_mm(run: Run) -> list[dict[str, str]]:
    """2. grouped_linear's grouped GEMM in bf16 against a float32 per-expert F.linear loop on the same values."""
    config = ModelConfig.from_preset(run.preset)
    experts, dim, out_dim = config.num_routed_experts, config.hidden_size, 2 * config.moe_intermediate_size
    gen = torch.Generator().manual_seed(run.seed)
    counts = expert_counts(run.plan.expert_rows, experts, gen)
    x = torch.randn(int(counts.sum()), dim, generator=gen).to(run.device, torch.bfloat16).requires_grad_()
    # float32 weights cast inside grouped_linear, as the model's master weights under autocast
    weight = (torch.randn(experts, out_dim, dim, generator=gen) / dim**0.5).to(run.device).requires_grad_()
    grad_out = torch.randn(len(x), out_dim, generator=gen).to(run.device, torch.bfloat16)
    ends = counts.cumsum(0, dtype=torch.int32).to(run.device)
    out = grouped_linear(x, weight, ends)
    out.backward(grad_out)

    x_ref = x.detach().float().requires_grad_()
    w_ref = weight.detach().to(torch.bfloat16).float().requires_grad_()  # the bf16 values the GEMM multiplies
    sizes = counts.tolist()
    with exact_float32():  # a reference without TF32's rounding
        out_ref = torch.cat([F.linear(rows, w_ref[e]) for e, rows in enumerate(x_ref.split(sizes))])
        out_ref.backward(grad_out.float())

    assert x.grad is not None and weight.grad is not None and x_ref.grad is not None and w_ref.grad is not None
    # bf16 rounds each result to 8 significant bits (relative 2^-8); the GEMM's float32 accumulation adds little.
    errors = {
        name: (got.float() - want).abs().max().item() / want.abs().max().item()
        for name, got, want in (("out", out, out_ref), ("dx", x.grad, x_ref.grad), ("dW", weight.grad, w_ref.grad))
    }
    empty = [e for e, n in enumerate(sizes) if n == 0]
    empty_zero = all(not weight.grad[e].any() for e in empty)
    tolerance = 1e-2
    summary = ", ".join(f"{name} {error:.2g}" for name, error in errors.items())
    return [
        row(
            f"grouped_mm, bf16, {run.device.type}",
            f"grouped_linear vs per-expert F.linear (float32), {len(x)} rows, {experts} experts "
            f"({len(empty)} empty), {dim} -> {out_dim}: largest absolute difference / largest absolute reference value",
            f"{summary} (tolerance {tolerance:g}); empty experts' weight gradients zero: "
            f"{'yes' if empty_zero else 'no'}",
            all(error <= tolerance for error in errors.values()) and empty_zero,
        )
    ]


def check_fsdp(run: Run) -> list[dict[str, str]]:
    """3. FSDP2 sharding on one process against the same training unsharded: the same losses."""
    base = dataclasses.replace(run.plan.fsdp_train, device=run.train_device, threads=torch.get_num_threads())
    model_config = ModelConfig.from_preset(run.preset)
    tokens = markov_tokens(model_config.vocab_size, 2**16, run.seed)
    plain = train(model_config, base, tokens, run.seed)
    with one_process_group(run.device):
        sharded = train(model_config, dataclasses.replace(base, parallel="fsdp"), tokens, run.seed)
        was_sharded = fsdp.is_sharded(sharded.model)
    losses = [[entry["loss"] for entry in trainer.history.train] for trainer in (plain, sharded)]
    diffs = [abs(a - b) for a, b in zip(*losses, strict=True)]
    # On CUDA FSDP computes with bf16 copies of every weight (the embedding's too, so the residual stream is bf16),
    # where plain training autocasts the matmuls over float32 weights; on CPU both autocast alike.
    tolerance = 1e-2 if run.device.type == "cuda" and sharded.dtype != torch.float32 else 1e-4
    close = all(diff <= tolerance * abs(loss) for diff, loss in zip(diffs, losses[0], strict=True))
    backend = "NCCL" if run.device.type == "cuda" else "gloo"
    return [
        row(
            f"FSDP2, one process ({backend})",
            f"Trainer with parallel fsdp vs unsharded, {run.preset}, {base.max_steps} steps of "
            f"{base.micro_batch_size} x {base.seq_len} x {base.grad_accum_steps} accumulated, "
            f"{dtype_name(sharded.dtype)}: loss per step",
            f"final loss {losses[1][-1]:.4f} vs {losses[0][-1]:.4f} (from {losses[0][0]:.4f}); largest step diff "
            f"{max(diffs):.2g} (tolerance {tolerance:g} x loss); sharded: {'yes' if was_sharded else 'no'}",
            close and was_sharded and finite(*losses[1]),
        )
    ]


def decode_speeds(model: DeepSeekLM, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> dict[str, Any]:
    """Greedy plain and speculative decoding of prompt: tokens, tokens/s, and the drafts accepted."""
    stats = SpeculativeStats()
    for speculative in (False, True):  # first-call allocations, untimed
        generate(model, prompt, 2, temperature=0, speculative=speculative)
    plain, plain_s = timed(lambda: generate(model, prompt, new_tokens, temperature=0), device)
    spec, spec_s = timed(
        lambda: generate(model, prompt, new_tokens, temperature=0, speculative=True, stats=stats), device
    )
    return {
        "same": torch.equal(plain, spec),
        "plain": new_tokens / plain_s,
        "speculative": new_tokens / spec_s,
        "accepted": stats.acceptance,
    }


def check_speculative(run: Run) -> list[dict[str, str]]:
    """4. Multi-token prediction drafts, verified: speculative greedy decoding gives plain greedy decoding's tokens."""
    context, new_tokens = run.plan.decode
    torch.manual_seed(run.seed)
    model = DeepSeekLM(ModelConfig.from_preset(run.preset, mtp_depth=1)).to(run.device).eval()
    gen = torch.Generator().manual_seed(run.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(run.device)
    with exact_float32():
        exact = decode_speeds(model, prompt, new_tokens, run.device)
    fast = decode_speeds(model.to(DECODE_DTYPE), prompt, new_tokens, run.device)
    measured = f"greedy, batch 1, prompt {context} + {new_tokens} new tokens, {run.preset} with mtp_depth 1"

    def speeds(result: dict[str, Any]) -> str:
        return (
            f"plain {result['plain']:,.0f} tok/s, speculative {result['speculative']:,.0f} tok/s "
            f"({100 * result['accepted']:.0f}% of drafts accepted: random weights)"
        )

    return [
        row(
            "speculative = plain decoding, float32",
            f"{measured}, random weights, TF32 off: same tokens",
            f"same tokens: {'yes' if exact['same'] else 'no'}; {speeds(exact)}",
            exact["same"],
        ),
        row(
            f"speculative decoding speed, {dtype_name(DECODE_DTYPE)}",
            f"{measured}: tokens/s",
            f"{speeds(fast)}; same tokens: {'yes' if fast['same'] else 'no (bf16 near-ties; not judged)'}",
            finite(fast["plain"], fast["speculative"]),
        ),
    ]


def latent_vs_transformers(
    ours: DeepSeekLM, theirs: torch.nn.Module, dtype: torch.dtype, run: Run
) -> tuple[dict[str, Any], dict[str, Any]]:
    """generation.py's rows (ours with the latent cache, transformers) for one context, ours cast to dtype."""
    theirs.to(run.device).eval()
    ours.to(device=run.device, dtype=dtype).eval()
    for model in (ours, theirs):  # first-call allocations, untimed
        greedy_generate(model, torch.zeros(1, 8, dtype=torch.long, device=run.device), 2)
    context, new_tokens = run.plan.decode
    models = {LATENT: ours, NO_CACHE: ours, THEIRS: theirs}
    # no_cache_max_context 0: the uncached variant is skipped, it checks no CUDA path of its own
    rows = measure_context(models, context, new_tokens, 0, 1, run.seed, run.device)
    by_variant = {entry["variant"]: entry for entry in rows}
    return by_variant[LATENT], by_variant[THEIRS]


def check_latent_decoding(run: Run) -> list[dict[str, str]]:
    """5. Our latent-cache decoding against transformers' generate on the same weights: tokens and speed."""
    context, new_tokens = run.plan.decode
    ours = seeded_model(run.preset, run.seed)
    # Both twins exported from our float32 weights; transformers loads the bf16 one as users do (router float32).
    exact_twin, fast_twin = (transformers_twin(ours, dtype) for dtype in (torch.float32, DECODE_DTYPE))
    with exact_float32():
        _, theirs_exact = latent_vs_transformers(ours, exact_twin, torch.float32, run)
    del exact_twin
    ours_fast, theirs_fast = latent_vs_transformers(ours, fast_twin, DECODE_DTYPE, run)
    ratio = ours_fast["tok/s"] / theirs_fast["tok/s"]
    measured = f"greedy, batch 1, prompt {context} + {new_tokens} new tokens, {run.preset}, random weights"
    return [
        row(
            "latent cache = transformers, float32",
            f"{measured}, TF32 off: same tokens as transformers' generate",
            f"same tokens: {theirs_exact['same tokens as latent']}",
            theirs_exact["same tokens as latent"] == "yes",
        ),
        row(
            f"latent-cache decoding speed, {dtype_name(DECODE_DTYPE)}",
            f"{measured}: tokens/s (prefill included) and decode tokens/s (generation.py)",
            f"ours {ours_fast['tok/s']:,.0f} tok/s (decode {ours_fast['decode tok/s'] or 0:,.0f}), transformers "
            f"{theirs_fast['tok/s']:,.0f} tok/s (decode {theirs_fast['decode tok/s'] or 0:,.0f}), ours / "
            f"transformers {ratio:.2f}x; same tokens: {theirs_fast['same tokens as latent']} (not judged)",
            finite(ours_fast["tok/s"], theirs_fast["tok/s"]),
        ),
    ]


def check_memory(run: Run) -> list[dict[str, str]]:
    """6. The peak memory of one training step of the preset, measured as memory.py does."""
    batch_size, seq_len = batch_shape(run.preset, run.device, None, None)
    dtype = resolve_dtype("auto", run.device)  # what memory.py trains in: autocast over float32 weights
    case = Case(TRAIN, "ours", run.preset, run.device.type, run.threads, run.seed, batch_size, seq_len, 0, 0)
    at_rest, peak = (value / 2**20 for value in measure(case))
    if run.device.type == "cuda":
        meter, holds = "torch.cuda.max_memory_allocated", "weights, AdamW state"
        capacity = torch.cuda.get_device_properties(run.device).total_memory / 2**20
    else:  # in this process, so the resident set holds the libraries and the earlier checks' leftovers too
        meter, holds, capacity = "process RSS (VmHWM after a reset)", "the whole process", math.inf
    return [
        row(
            f"peak memory, {run.preset} training step",
            f"{meter}, our second AdamW step, {batch_size} x {seq_len}, {dtype_name(dtype)} (memory.py)",
            f"at rest {at_rest:,.0f} MiB ({holds}), peak {peak:,.0f} MiB, increase {peak - at_rest:,.0f} MiB",
            0 < at_rest <= peak < capacity,
        )
    ]


def check_loss_falls(run: Run) -> list[dict[str, str]]:
    """7. The default model, trained by the Trainer on a learnable synthetic stream: its loss falls."""
    plan = run.plan
    config = dataclasses.replace(plan.default_train, device=run.train_device, threads=torch.get_num_threads())
    tokens = markov_tokens(plan.default_model.vocab_size, plan.synthetic_tokens, run.seed)
    trainer = train(plan.default_model, config, tokens, run.seed)
    first, last = trainer.history.train[0]["loss"], trainer.history.train[-1]["loss"]
    model = plan.default_model
    return [
        row(
            f"default model, {config.max_steps} steps: loss falls",
            f"Trainer, {model.hidden_size}-wide {model.num_layers} layers, mtp_depth {model.mtp_depth}, "
            f"{config.micro_batch_size} x {config.seq_len} x {config.grad_accum_steps}, lr {config.lr:g}, "
            f"{dtype_name(trainer.dtype)}, a Markov chain over {model.vocab_size} tokens (floor "
            f"ln {SUCCESSORS} = {math.log(SUCCESSORS):.2f})",
            f"logged loss {first:.3f} -> {last:.3f} (must fall > {LOSS_DROP:g}); {trainer.clock.overall:,.0f} tok/s",
            finite(last) and first - last > LOSS_DROP,
        )
    ]


# In the module docstring's order; each row's check starts with its number there.
CHECKS: dict[str, Callable[[Run], list[dict[str, str]]]] = {
    "training speed": check_training,
    "grouped_mm": check_grouped_mm,
    "FSDP2": check_fsdp,
    "speculative decoding": check_speculative,
    "latent-cache decoding": check_latent_decoding,
    "peak memory": check_memory,
    "loss falls": check_loss_falls,
}


def run_check(number: int, name: str, check: Callable[[Run], list[dict[str, str]]], run: Run) -> list[dict[str, str]]:
    """The check's rows, numbered; a FAIL row with the exception's first line if it raised (traceback on stderr)."""
    click.echo(f"--- {number}. {name}", err=True)
    start = time.perf_counter()
    try:
        rows = check(run)
    except Exception as error:  # one broken path must not hide the others
        click.echo(traceback.format_exc(), err=True)
        message = (str(error).strip().splitlines() or [""])[0]
        rows = [row(name, "-", f"{type(error).__name__}: {message}", False)]
    finally:
        gc.collect()  # free the check's models before the next one
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    click.echo(f"--- {number}. {name}: {time.perf_counter() - start:.1f} s", err=True)
    return [entry | {"check": f"{number}. {entry['check']}"} for entry in rows]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dry-run", is_flag=True, help="The same checks on the CPU, tiny preset and shapes, in seconds.")
@threads_option
@seed_option
@json_option
def main(dry_run: bool, threads: int | None, seed: int, json_path: Path | None) -> None:
    """Run every CUDA path of the project once and print one table of PASS/FAIL rows; exit 1 if any failed."""
    if not dry_run and not torch.cuda.is_available():
        raise click.ClickException(NO_CUDA)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    run = Run(device, DRY_RUN_PLAN if dry_run else GPU_PLAN, seed, threads)
    keep_freed_memory()
    if device.type == "cuda":  # as our trainer does; float32 leftovers under autocast (the router) use TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    rows = [
        entry
        for number, (name, check) in enumerate(CHECKS.items(), start=1)
        for entry in run_check(number, name, check, run)
    ]
    header = run_header("GPU check" + (" (dry run on the CPU)" if dry_run else ""), device, "see each row") | {
        "preset": run.preset,
        "seed": str(seed),
        "duration": f"{time.perf_counter() - start:.0f} s",
    }
    print_header(header)
    print_table(
        "Checks",
        COLUMNS,
        rows,
        notes="Speed, MFU and memory rows pass when they ran and their numbers are finite; "
        "docs/benchmarks.md judges the numbers.",
    )
    write_json(json_path, header, {"checks": rows})
    if any(entry["verdict"] == FAIL for entry in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
