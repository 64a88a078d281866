"""Training beside a busy process: tokens/s alone and beside a one-core busy loop, per thread setting.

OpenMP's threads wait for each other at the end of every parallel region, so a training whose thread pool counts
a core that another program keeps busy waits on that core's time slices at every op. `train.threads: 0` sizes
the pool to the cores other programs leave free (`deepseek.cpu.CoreShare`, `ForeignLoad`), rechecked as it trains;
`train.threads: N` fixes N, which on this machine's cores is what `0` did before it read other programs' load.

Each case trains the default model (the `cpu` preset with one multi-token prediction module, the pipeline's
micro-batch) on random tokens in a fresh process, in the precision `train.dtype: auto` picks, and reports the
tokens/s after its first steps; a busy loop (a Python `while True`) runs beside it in the cases that say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import torch

from benchmarks.common import json_option, print_header, print_table, run_header, write_json
from deepseek.config import PRESETS
from deepseek.cpu import machine_cores

COLUMNS = ["case", "train.threads", "threads used", "tok/s", "of alone"]

# Run in the child: train, and print the tokens/s of the steps after the first log interval, and the threads.
TRAIN = """
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch
from deepseek.config import ModelConfig
from deepseek.device import configure_host
from deepseek.train_config import TrainConfig
from deepseek.model import DeepSeekLM
from deepseek.trainer import Trainer, TrainOutputs

threads, steps, preset, seq_len = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
seen = []

class Rates:
    def log_metrics(self, metrics, step):
        if "tokens_per_s" in metrics:  # not the last step's validation loss
            seen.append((metrics["tokens_per_s"], torch.get_num_threads()))

torch.manual_seed(0)
tokens = np.random.default_rng(0).integers(0, 1024, 200_000).astype(np.uint16)
config = TrainConfig(max_steps=steps, micro_batch_size=16, grad_accum_steps=1, seq_len=seq_len, log_interval=5,
                     eval_interval=10**6, sample_interval=10**6, checkpoint_interval=10**6, threads=threads)
with tempfile.TemporaryDirectory() as tmp:
    model = DeepSeekLM(ModelConfig.from_preset(preset, vocab_size=1024, mtp_depth=1))
    core_share = configure_host(torch.device("cpu"), threads)  # as the train stage does
    trainer = Trainer(model, config, 0, TrainOutputs(Path(tmp)), sinks=[Rates()], core_share=core_share)
    trainer.fit(tokens, tokens[:20_000])
later = seen[1:]  # the first interval holds the start: kernel selection, the first load reading
print(json.dumps({"tok/s": sum(r for r, _ in later) / len(later), "threads": sorted({t for _, t in later})}))
"""


def train(threads: int, steps: int, preset: str, seq_len: int) -> dict:
    """One training in a fresh process; its mean tokens/s after the first interval and the thread counts seen."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-c", TRAIN, str(threads), str(steps), preset, str(seq_len)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def beside_busy_loop(threads: int, steps: int, preset: str, seq_len: int) -> dict:
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        return train(threads, steps, preset, seq_len)
    finally:
        loop.kill()
        loop.wait()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="cpu", show_default=True, type=click.Choice(list(PRESETS)), help="Model preset.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens per sequence.")
@click.option("--steps", default=40, show_default=True, type=click.IntRange(min=11), help="Optimizer steps per case.")
@json_option
def main(preset: str, seq_len: int, steps: int, json_path: Path | None) -> None:
    """Training tokens/s alone and beside a one-core busy loop, with train.threads 0 and with every core fixed."""

    cores = machine_cores()
    cases = [
        ("alone", 0, False),
        ("beside a one-core busy loop", 0, True),
        ("beside a one-core busy loop", cores, True),
        ("beside a one-core busy loop", max(1, cores - 1), True),
    ]
    rows, alone = [], None
    for name, threads, busy in cases:
        click.echo(f"{name}, train.threads {threads} ({steps} steps) ...", err=True)
        result = (beside_busy_loop if busy else train)(threads, steps, preset, seq_len)
        alone = alone or result["tok/s"]
        rows.append(
            {
                "case": name,
                "train.threads": f"{threads}" + (" (the default)" if threads == 0 else ""),
                "threads used": ", ".join(map(str, result["threads"])),
                "tok/s": result["tok/s"],
                "of alone": f"{100 * result['tok/s'] / alone:.0f}%",
            }
        )
    header = run_header("Training beside a busy process", torch.device("cpu"), "train.dtype auto")
    print_header(header)
    print_table(
        f"The {preset} preset with one MTP module, 16 x {seq_len} tokens a step, {steps} steps, each case alone "
        "in a fresh process",
        COLUMNS,
        rows,
        notes=f"train.threads {cores} is every core of this machine: what 0 chose before it read other programs' load.",
    )
    write_json(json_path, header, {"busy_machine": rows})


if __name__ == "__main__":
    main()
