"""What the benchmark scripts share: device and run description, the transformers twin, steps, timing, tables."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import torch
import torch.nn.functional as F
from torch import nn

from deepseek import files
from deepseek.config import ModelConfig
from deepseek.cpu import describe_machine, native_bf16_units
from deepseek.device import resolve_device
from deepseek.evaluation import autocast
from deepseek.generate import generate
from deepseek.hf import export_hf
from deepseek.model import DeepSeekLM

if TYPE_CHECKING:
    from transformers import DeepseekV3ForCausalLM

T = TypeVar("T")
FC = TypeVar("FC", bound=Callable[..., Any])  # a click command function, as click's decorators take
OURS, THEIRS = "ours", "transformers"

# (batch size, sequence length) per preset and device type when --batch-size / --seq-len are not given. On a CPU,
# small enough that a default train_throughput run of both models takes about a minute on two cores (the cpu
# preset's is params.yaml's micro-batch); on a GPU, full windows and batches that keep it busy.
DEFAULT_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "tiny": {"cpu": (8, 64), "cuda": (64, 64)},
    "cpu": {"cpu": (16, 256), "cuda": (64, 256)},
    "seed": {"cpu": (4, 128), "cuda": (8, 2048)},
}

# The square matmul that measures a device's peak for MFU: large enough to reach the GEMM library's best rate, unless
# one product takes longer than PEAK_MATMUL_SECONDS (a CPU that only emulates bf16 needs minutes for a 2048^3 one).
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
PEAK_MATMUL_SECONDS = 0.1

device_option = click.option(
    "--device",
    "device_name",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: cuda when available, else cpu.",
)
json_option = click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the header and tables as JSON to this file.",
)


def repeats_option(default: int) -> Callable[[FC], FC]:
    """--repeats, with the default that suits the script."""
    return click.option(
        "--repeats",
        default=default,
        show_default=True,
        type=click.IntRange(min=1),
        help="Time each measurement this many times and keep the fastest.",
    )


seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Seed for weights and tokens.")
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="torch CPU threads [default: torch's choice]. On a machine shared with other "
    "work, fewer threads than cores avoids OpenMP threads waiting on each other.",
)


def pick_device(name: str, threads: int | None) -> torch.device:
    """The device to run on; also sets torch's CPU thread count when one is given."""
    if threads:
        torch.set_num_threads(threads)
    try:
        return resolve_device(name)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def run_header(title: str, device: torch.device, precision: str) -> dict[str, str]:
    return {
        "benchmark": title,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": describe_machine(device),
        **(
            {"CPU bf16 units": ", ".join(native_bf16_units()) or "none (bf16 emulated)"} if device.type == "cpu" else {}
        ),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "precision": precision,
    }


@dataclass(frozen=True)
class MatmulPeak:
    flops: float  # FLOP/s
    size: int  # of the square matmul that gave them


def measured_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> MatmulPeak:
    """FLOP/s of a large square matmul in dtype on device, the best of repeats: the peak that MFU divides by.

    Measured in the same run as the models, so a busy or throttled machine lowers both alike. The size doubles from
    256 up to PEAK_MATMUL_SIZE while one product takes under PEAK_MATMUL_SECONDS.
    """
    size = 256
    while True:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        a @ b  # the first call selects and warms up the kernel
        _, seconds = timed(lambda: a @ b, device)  # noqa: B023 (called at once)
        if seconds >= PEAK_MATMUL_SECONDS or size >= PEAK_MATMUL_SIZE[device.type]:
            break
        size *= 2
    _, seconds = timed(lambda: a @ b, device, repeats)
    return MatmulPeak(2 * size**3 / seconds, size)


def batch_shape(preset: str, device: torch.device, batch_size: int | None, seq_len: int | None) -> tuple[int, int]:
    """The requested shape, defaults filled in per preset; refuses a sequence longer than the model's window."""
    default_batch, default_seq = DEFAULT_SHAPES[preset][device.type]
    batch_size, seq_len = batch_size or default_batch, seq_len or default_seq
    max_seq_len = ModelConfig.from_preset(preset).max_seq_len
    if seq_len > max_seq_len:
        raise click.BadParameter(
            f"{seq_len} exceeds the {preset} preset's max_seq_len ({max_seq_len})", param_hint="--seq-len"
        )
    return batch_size, seq_len


def seeded_model(preset: str, seed: int) -> DeepSeekLM:
    torch.manual_seed(seed)
    return DeepSeekLM(ModelConfig.from_preset(preset))


def transformers_twin(model: DeepSeekLM, dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
    """transformers' DeepseekV3ForCausalLM holding our model's weights, through the export users run.

    Loaded the way users load it: with a dtype other than float32, transformers keeps the router in float32.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        twin = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype)
    assert isinstance(twin, transformers.DeepseekV3ForCausalLM)  # the architecture our export's config.json names
    return twin


@torch.no_grad()
def max_logit_diff(ours: DeepSeekLM, theirs: nn.Module, input_ids: torch.Tensor) -> float:
    """Largest |difference| of the two models' logits in eval mode, in the models' own dtype."""
    modes = {model: model.training for model in (ours, theirs)}
    for model in modes:
        model.eval()
    diff = (ours(input_ids).logits.float() - theirs(input_ids=input_ids).logits.float()).abs().max().item()
    for model, training in modes.items():
        model.train(training)
    return diff


def implementation_of(model: nn.Module) -> str:
    return OURS if isinstance(model, DeepSeekLM) else THEIRS


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the same formula for both (transformers' own loss would shift the labels)."""
    if isinstance(model, DeepSeekLM):
        return model(inputs, targets).loss
    # use_cache=False: transformers' config default would build a KV cache during training forwards.
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def make_train_step(
    model: nn.Module, device: torch.device, dtype: torch.dtype, compile: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimizer step of fused AdamW (as our trainer's) on one micro-batch: forward, backward, step, zero_grad.

    compile: the forward and loss go through torch.compile (compiled on the first steps, the untimed ones).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    model.train()
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = partial(lm_loss, model)
    if compile:
        loss_of = torch.compile(loss_of)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(device, dtype):
            loss = loss_of(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(model, DeepSeekLM):
            model.update_expert_bias()  # part of our optimizer step: auxiliary-loss-free balancing

    return step


def token_batches(
    vocab_size: int, count: int, batch_size: int, seq_len: int, seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """count random (inputs, targets) pairs, targets shifted by one, made up front so both models see them."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches


def greedy_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """prompt + new_tokens greedy tokens: our generate, or transformers' generate with its own cache."""
    if isinstance(model, DeepSeekLM):
        return generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
    from transformers import GenerationMixin

    assert isinstance(model, GenerationMixin), type(model)
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device, repeats: int = 1) -> tuple[T, float]:
    """fn's result and wall-clock seconds, the fastest of repeats runs; queued device work is waited for."""
    best = None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[1]:
            best = result, seconds
    assert best is not None  # repeats >= 1
    return best


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of rows (dicts keyed by column); columns holding numbers are right-aligned."""
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    numeric = [
        any(isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool) for row in rows)
        for column in columns
    ]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule_cells = ("-" * (w - 1) + (":" if num else "-") for w, num in zip(widths, numeric, strict=True))
    rule = "| " + " | ".join(rule_cells) + " |"
    return "\n".join([line(columns), rule, *(line(values) for values in cells)])


def print_header(header: dict[str, str]) -> None:
    click.echo(f"# {header['benchmark']}\n")
    for key, value in header.items():
        if key != "benchmark":
            click.echo(f"- {key}: {value}")
    click.echo()


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], notes: str = "") -> None:
    click.echo(f"## {title}\n\n{markdown_table(columns, rows)}\n")
    if notes:
        click.echo(notes + "\n")


def write_json(path: Path | None, header: dict[str, str], tables: dict[str, list[dict[str, Any]]]) -> None:
    if path is not None:
        files.write_json(path, {"header": header, "tables": tables})
