"""The CI regression gate: train the CI profile, compare with the committed baseline, print one table.

`python .ci/regression.py check` fails (exit 1) when validation bits per character, global MaxVio
or relative training throughput regress beyond .ci/tolerances.yaml, when the precision train.dtype picks
trains slower than the other one on this machine, or when dvc.lock is out of date with the code and params.
`python .ci/regression.py update-baseline` records a new baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from torch import nn

from deepseek.checkpoint import run_fingerprint
from deepseek.config import ModelConfig
from deepseek.cpu import cpu_model
from deepseek.device import describe_precision, resolve_dtype
from deepseek.evaluation import autocast
from deepseek.files import write_json
from deepseek.model import DeepSeekLM
from deepseek.optim import build_optimizer
from deepseek.train_config import TrainConfig
from deepseek.train_step import training_loss
from stages.comparison import TOLERANCES, Row, compare, render
from stages.params import load_yaml, parse_params

PROFILE = Path(".ci/profile.yaml")
BASELINE = Path(".ci/baseline.json")
METRICS = "reports/metrics.json"  # the evaluate stage's DVC metrics


# --- dvc.lock freshness ---------------------------------------------------------------------------------------


def stale_lock_entries(status: dict[str, Any]) -> list[str]:
    """What `dvc status --json` says has changed since dvc.lock, ignoring outputs that are merely absent.

    In a fresh clone the pipeline's data is not there ("deleted"); that is expected. A dependency that is
    "modified" or "new", changed params, or a changed command mean dvc.lock no longer matches the code.
    """
    stale = []
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed", ...
                stale.append(f"{stage}: {change}")
                continue
            for path, state in change.get("changed deps", {}).items():
                if isinstance(state, dict):  # params.yaml: {section: "modified"}
                    stale += [f"{stage}: params {key} {value}" for key, value in state.items()]
                elif state != "deleted":
                    stale.append(f"{stage}: {path} {state}")
    return stale


def lock_status(repo: Path) -> list[str]:
    result = subprocess.run(["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        return [f"dvc status failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}"]
    return stale_lock_entries(json.loads(result.stdout or "{}"))


# --- throughput, relative to a reference timed in the same process ---------------------------------------------


CPU = torch.device("cpu")


class ReferenceLM(nn.Module):
    """A fixed dense transformer built only from torch.nn, so our code changes never change it."""

    def __init__(self, vocab: int = 512, dim: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.blocks(self.embed(ids), mask=mask, is_causal=True))


def _training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, dtype: torch.dtype, mtp_loss_weight: float
) -> Callable[[], None]:
    """One optimizer step on ids in the trainer's precision: forward, backward, clipping, update (and, for ours,
    the multi-token prediction loss and the balancing update, as the trainer does)."""

    def step() -> None:
        with autocast(CPU, dtype):
            if isinstance(model, DeepSeekLM):
                loss = training_loss(model(ids[:, :-1], ids[:, 1:]), mtp_loss_weight)
            else:
                loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if isinstance(model, DeepSeekLM):
            model.update_expert_bias()

    return step


def our_step(config: ModelConfig, train: TrainConfig, ids: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """A training step of a fresh DeepSeekLM of config (seeded, so every call builds the same weights)."""
    torch.manual_seed(0)
    model = DeepSeekLM(config)
    return _training_step(model, build_optimizer(model, train, dtype), ids, dtype, train.mtp_loss_weight)


def reference_step(vocab_size: int, ids: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    torch.manual_seed(0)
    model = ReferenceLM(vocab=vocab_size)
    return _training_step(model, torch.optim.AdamW(model.parameters(), fused=True), ids, dtype, mtp_loss_weight=0.0)


def interleaved_speed_ratios(
    step: Callable[[], None],
    against: dict[str, Callable[[], None]],
    rounds: int = 30,
    warmup: int = 3,
    settled: dict[str, Callable[[list[float]], bool]] | None = None,
) -> dict[str, list[float]]:
    """step's speed over each of against's steps, by name: once per round of one step each, the order reversed
    every other round. A step of against leaves the rounds once settled[name](its ratios) says its answer is known.

    Load from other processes slows the steps of a round alike, so it cancels in the round's ratios; the median
    over rounds is robust to the rounds it does not. One round times step once for all its comparisons.
    """
    settled = settled or {}
    for _ in range(warmup):
        for run in (step, *against.values()):
            run()
    ratios: dict[str, list[float]] = {name: [] for name in against}
    timed = dict(against)
    for round_ in range(rounds):
        seconds = {}
        for name, run in [("step", step), *timed.items()][:: 1 if round_ % 2 else -1]:
            start = time.perf_counter()
            run()
            seconds[name] = time.perf_counter() - start
        for name in list(timed):
            ratios[name].append(seconds[name] / seconds["step"])
            if name in settled and settled[name](ratios[name]):
                del timed[name]
        if not timed:
            break
    return ratios


def far_from(threshold: float, first_rounds: int = 10, factor: float = 1.5) -> Callable[[list[float]], bool]:
    """Settled once at least first_rounds ratios all lie beyond threshold by factor, on the same side: more rounds
    could not carry the median across it. A CPU that emulates bf16 trains 5-10x slower in it, and 40 rounds of
    that step took minutes of CI."""

    def settled(ratios: list[float]) -> bool:
        return len(ratios) >= first_rounds and (min(ratios) >= threshold * factor or max(ratios) <= threshold / factor)

    return settled


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def the_other_precision(dtype: torch.dtype) -> torch.dtype:
    """What the precision check races against: float32 for a reduced precision, bf16 for float32."""
    return torch.bfloat16 if dtype == torch.float32 else torch.float32


@dataclass
class Spread:
    """The median of per-round speed ratios, and how far they spread."""

    name: str
    ratios: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def __str__(self) -> str:
        deciles = statistics.quantiles(self.ratios, n=10)
        return (
            f"{self.name}: median {self.median:.3f} of {len(self.ratios)} interleaved rounds; 10th-90th "
            f"percentile {deciles[0]:.3f}-{deciles[-1]:.3f}, min {min(self.ratios):.3f}, max {max(self.ratios):.3f}"
        )


def precision_row(picked: torch.dtype, other: torch.dtype, spread: Spread, min_speedup: float) -> Row:
    """The precision train.dtype resolves to must train at least min_speedup times as fast as the other one
    (min_speedup just under 1: the noise of the interleaved timing)."""
    return Row(
        "training precision is the faster",
        f"{dtype_name(picked)} picked",
        f"{spread.median:.3f}x {dtype_name(other)}",
        f">= {min_speedup:.2f}x (train.dtype: auto must not pick the slower)",
        spread.median >= min_speedup,
    )


# --- running the CI profile -----------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@localhost",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@localhost",
    }
    env.pop("DVC_ROOT", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise click.ClickException(
            f"{' '.join(args)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@contextmanager
def scratch_copy(repo: Path) -> Iterator[Path]:
    """A temporary git repository with repo's tracked files: the code as in the working tree, so a change can
    be checked before it is committed, but params.yaml and dvc.lock as committed at HEAD, so an experiment
    applied to the workspace (`dvc exp run` writes both) changes nothing here."""
    with tempfile.TemporaryDirectory(prefix="deepseek-regression-") as tmp:
        workdir = Path(tmp)
        for name in [*_run(["git", "ls-files"], repo).stdout.splitlines(), "data/input-1.txt"]:
            if (repo / name).is_file() and not name.startswith("reports/"):
                (workdir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / name, workdir / name)
        for name in ("params.yaml", "dvc.lock"):
            committed = _run(["git", "show", f"HEAD:{name}"], repo, check=name == "params.yaml")
            (workdir / name).unlink(missing_ok=True)
            if committed.returncode == 0:  # without a committed dvc.lock, the lock check finds every stage stale
                (workdir / name).write_text(committed.stdout)
        _run(["git", "init", "-q"], workdir)
        _run(["git", "add", "-A"], workdir)
        _run(["git", "commit", "-qm", "as committed"], workdir)
        # Share the project's DVC cache: data preparation comes from DVC's run cache when nothing changed it.
        _run(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], workdir)
        yield workdir


def profile_params(workdir: Path, profile: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """workdir's params.yaml with the profile and then the overrides ({"train.lr": 0}) merged in."""
    params = load_yaml((workdir / "params.yaml").read_text())
    for section, values in (load_yaml(profile.read_text()) or {}).items():
        params[section] = {**params.get(section, {}), **values} if isinstance(values, dict) else values
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            params.setdefault(section, {})[name] = value
        else:
            params[section] = value
    return params


def run_profile(workdir: Path, params: dict[str, Any], baseline: dict[str, Any] | None) -> dict:
    """Run the pipeline on params in the scratch copy; returns its metrics, its vocabulary, `dvc metrics diff --md`."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workdir / "dvc.lock").unlink(missing_ok=True)
    if baseline is not None:  # so that `dvc metrics diff` compares with the baseline's
        write_json(workdir / METRICS, baseline["reports"]["metrics.json"])
    _run(["git", "add", "-A"], workdir)
    _run(["git", "commit", "-qm", "CI profile"], workdir)
    click.echo("running the pipeline on the CI profile ...")
    _run(["dvc", "repro", "tokenize"], workdir)
    # Always train (a cached result would test nothing), up to the metrics: the samples are not compared.
    _run(["dvc", "repro", "--no-run-cache", "evaluate"], workdir)
    diff = _run(["dvc", "metrics", "diff", "--md", "--all"], workdir, check=False)
    return {
        "reports": {"metrics.json": json.loads((workdir / METRICS).read_text())},
        "vocab_size": json.loads((workdir / "data" / "tokens" / "meta.json").read_text())["vocab_size"],
        "metrics_diff": diff.stdout if diff.returncode == 0 else f"(dvc metrics diff failed: {diff.stderr})",
    }


def measure(
    workdir: Path, params: dict[str, Any], baseline: dict[str, Any] | None, rounds: int, min_speedup: float
) -> dict[str, Any]:
    """The gate's metrics for params: quality from the pipeline, then throughput timed against the reference and
    the precision train.dtype picks timed against the other one, each in interleaved rounds in this process (the
    latter stops early when far from min_speedup)."""
    result = run_profile(workdir, params, baseline)
    parsed = parse_params(params)
    config = parsed.model.config(result["vocab_size"])
    dtype = resolve_dtype(parsed.train.dtype, CPU)
    other = the_other_precision(dtype)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (parsed.train.micro_batch_size, parsed.train.seq_len + 1))
    ours = our_step(config, parsed.train, ids, dtype)
    against = {
        "reference": reference_step(config.vocab_size, ids, dtype),
        "other": our_step(config, parsed.train, ids, other),
    }
    click.echo(
        f"timing {rounds} interleaved rounds of our step ({describe_precision(dtype)}), the reference's in the same "
        f"precision, and ours in {dtype_name(other)} ..."
    )
    ratios = interleaved_speed_ratios(ours, against, rounds, settled={"other": far_from(min_speedup)})
    throughput = Spread("relative throughput", ratios["reference"])
    precision = Spread(f"{dtype_name(dtype)} over {dtype_name(other)}", ratios["other"])
    val = result["reports"]["metrics.json"]["val"]
    result["metrics"] = {
        "bits_per_character": val["bits_per_character"],
        "max_vio": val["max_vio"],
        "relative_throughput": throughput.median,
    }
    result["precision"] = (dtype, other, precision)
    result["throughput_spread"] = f"{throughput}\n{precision}"
    return result


def _parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        overrides[key] = load_yaml(value)
    return overrides


# --- command line -----------------------------------------------------------------------------------------------


@click.group()
def main() -> None:
    """The regression gate that CI runs after the tests."""


def _common(command):
    for option in reversed(
        [
            click.option(
                "--repo",
                default=".",
                show_default=True,
                type=click.Path(file_okay=False, path_type=Path),
                help="The project checkout to test: its working tree's code, its committed params.yaml.",
            ),
            click.option(
                "--profile",
                default=str(PROFILE),
                show_default=True,
                type=click.Path(path_type=Path),
                help="Params merged over the committed params.yaml for the CI run.",
            ),
            click.option(
                "--baseline", "baseline_path", default=str(BASELINE), show_default=True, type=click.Path(path_type=Path)
            ),
            click.option(
                "--set",
                "overrides",
                multiple=True,
                metavar="KEY=VALUE",
                help="Extra params over the profile, e.g. --set train.lr=0 (to see the gate fail).",
            ),
            click.option(
                "--rounds",
                default=40,
                show_default=True,
                type=click.IntRange(min=3),
                help="Interleaved rounds (one step of ours, one of the reference) timing the throughput.",
            ),
        ]
    ):
        command = option(command)
    return command


@main.command()
@_common
@click.option("--tolerances", default=str(TOLERANCES), show_default=True, type=click.Path(path_type=Path))
@click.option("--no-lock-check", is_flag=True, help="Skip the dvc.lock check (for a work in progress).")
def check(
    repo: Path,
    profile: Path,
    baseline_path: Path,
    overrides: tuple[str, ...],
    rounds: int,
    tolerances: Path,
    no_lock_check: bool,
) -> None:
    """Train the CI profile and fail if it regressed against the baseline, or if dvc.lock is stale."""
    repo = repo.resolve()
    if not (repo / baseline_path).exists():
        raise click.ClickException(
            f"no baseline at {baseline_path}: run `python .ci/regression.py update-baseline` and commit it"
        )
    baseline = json.loads((repo / baseline_path).read_text())
    limits = load_yaml((repo / tolerances).read_text())
    min_speedup = limits.pop("precision")["min_speedup"]
    with scratch_copy(repo) as workdir:
        stale = [] if no_lock_check else lock_status(workdir)
        params = profile_params(workdir, repo / profile, _parse_overrides(overrides))
        result = measure(workdir, params, baseline, rounds, min_speedup)
    rows = compare(baseline["metrics"], result["metrics"], limits)
    picked, other, spread = result["precision"]
    rows.append(precision_row(picked, other, spread, min_speedup))
    if not no_lock_check:
        rows.append(
            Row(
                "dvc.lock up to date",
                "yes",
                "yes" if not stale else "no: " + "; ".join(stale[:4]),
                "must be yes (run `dvc repro` and commit dvc.lock)",
                not stale,
            )
        )
    same_profile = baseline.get("profile_hash") == run_fingerprint(params)
    rows.append(
        Row(
            "baseline made with this profile",
            "yes",
            "yes" if same_profile else "no",
            "must be yes (update the baseline after changing the profile)",
            same_profile,
        )
    )
    table = render(rows)
    click.echo("\nDVC metrics, baseline -> now:\n" + result["metrics_diff"])
    click.echo(result["throughput_spread"] + "\n")
    click.echo(table)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as summary:
            summary.write(
                f"## Regression check\n\n{table}\n\n{result['throughput_spread']}\n\n"
                f"### DVC metrics\n\n{result['metrics_diff']}\n"
            )
    if not all(row.ok for row in rows):
        raise click.ClickException("regression check failed: see the FAIL rows above")
    click.echo("regression check passed")


@main.command("update-baseline")
@_common
def update_baseline(repo: Path, profile: Path, baseline_path: Path, overrides: tuple[str, ...], rounds: int) -> None:
    """Train the CI profile and record its metrics as the new baseline (commit the file afterwards)."""
    repo = repo.resolve()
    with scratch_copy(repo) as workdir:
        params = profile_params(workdir, repo / profile, _parse_overrides(overrides))
        min_speedup = load_yaml((repo / TOLERANCES).read_text())["precision"]["min_speedup"]
        result = measure(workdir, params, None, rounds, min_speedup)
    baseline = {
        "metrics": result["metrics"],
        "reports": result["reports"],
        "profile_hash": run_fingerprint(params),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(repo / baseline_path, baseline)
    click.echo(result["throughput_spread"])
    click.echo(json.dumps(result["metrics"], indent=2))
    click.echo(f"wrote {baseline_path}; commit it")


if __name__ == "__main__":
    main()
