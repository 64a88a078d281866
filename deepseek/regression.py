"""The CI regression gate: train the CI profile, compare with the committed baseline, print one table.

`python -m deepseek.regression check` fails (exit 1) when validation bits per character, global MaxVio
or relative training throughput regress beyond .ci/tolerances.yaml, or when dvc.lock is out of date
with the code and params. `python -m deepseek.regression update-baseline` records a new baseline.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from torch import nn

from deepseek.files import write_json
from deepseek.trainer import run_fingerprint

PROFILE = Path(".ci/profile.yaml")
TOLERANCES = Path(".ci/tolerances.yaml")
BASELINE = Path(".ci/baseline.json")
METRIC_FILES = ("metrics.json", "train_metrics.json")


@dataclass
class Row:
    metric: str
    baseline: str
    now: str
    tolerance: str
    ok: bool


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


# --- throughput reference -------------------------------------------------------------------------------------

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


def reference_throughput(steps: int = 20, batch: int = 16, seq_len: int = 128, warmup: int = 3) -> float:
    """Training tokens per second of ReferenceLM on this machine, now."""
    torch.manual_seed(0)
    model = ReferenceLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (batch, seq_len + 1))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        logits = model(ids[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch * seq_len / (time.perf_counter() - start)


# --- running the CI profile -----------------------------------------------------------------------------------

def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost", "GIT_COMMITTER_NAME": "ci",
           "GIT_COMMITTER_EMAIL": "ci@localhost", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DVC_ROOT", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise click.ClickException(f"{' '.join(args)} failed in {cwd}:\n{result.stdout[-3000:]}\n"
                                   f"{result.stderr[-3000:]}")
    return result


def profile_params(repo: Path, profile: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with the profile and then the overrides ({"train.lr": 0}) merged in."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in (yaml.safe_load(profile.read_text()) or {}).items():
        params[section] = {**params.get(section, {}), **values} if isinstance(values, dict) else values
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            params.setdefault(section, {})[name] = value
        else:
            params[section] = value
    return params


def run_profile(repo: Path, params: dict[str, Any], baseline: dict[str, Any] | None, workdir: Path) -> dict:
    """Run the pipeline on params in a scratch copy of repo; returns its reports and `dvc metrics diff --md`."""
    tracked = _run(["git", "ls-files"], repo).stdout.splitlines()
    for name in tracked + ["data/input-1.txt"]:
        if (repo / name).is_file() and not name.startswith("reports/"):
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, workdir / name)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (workdir / "dvc.lock").unlink(missing_ok=True)
    for name, values in (baseline or {}).get("reports", {}).items():  # so `dvc metrics diff` compares with them
        (workdir / "reports").mkdir(exist_ok=True)
        (workdir / "reports" / name).write_text(json.dumps(values, indent=2))
    _run(["git", "init", "-q"], workdir)
    _run(["git", "add", "-A"], workdir)
    _run(["git", "commit", "-qm", "baseline"], workdir)
    # Share the project's DVC cache: data preparation comes from DVC's run cache when nothing changed it.
    # Training always runs (--no-run-cache), since its throughput is one of the things measured.
    _run(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], workdir)
    click.echo("running the pipeline on the CI profile ...")
    _run(["dvc", "repro", "tokenize"], workdir)
    _run(["dvc", "repro", "--no-run-cache"], workdir)
    diff = _run(["dvc", "metrics", "diff", "--md"], workdir, check=False)
    return {"reports": {name: json.loads((workdir / "reports" / name).read_text()) for name in METRIC_FILES},
            "metrics_diff": diff.stdout if diff.returncode == 0 else f"(dvc metrics diff failed: {diff.stderr})"}


def measure(repo: Path, params: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """The gate's metrics for params: the reference is timed before and after the pipeline, and averaged."""
    reference_before = reference_throughput()
    with tempfile.TemporaryDirectory(prefix="deepseek-regression-") as tmp:
        result = run_profile(repo, params, baseline, Path(tmp))
    reference = (reference_before + reference_throughput()) / 2
    val, train = result["reports"]["metrics.json"]["val"], result["reports"]["train_metrics.json"]
    result["metrics"] = {"bits_per_character": val["bits_per_character"], "max_vio_global": val["max_vio_global"],
                         "relative_throughput": train["tokens_per_s"] / reference}
    result["throughput"] = {"ours_tokens_per_s": train["tokens_per_s"], "reference_tokens_per_s": reference}
    return result


# --- comparing --------------------------------------------------------------------------------------------------

def compare(baseline: dict[str, float], now: dict[str, float], tolerances: dict[str, dict]) -> list[Row]:
    rows = []
    for metric, rule in tolerances.items():
        old, new = baseline[metric], now[metric]
        lower = rule["direction"] == "lower"
        allowed = rule.get("abs", 0.0) + rule.get("rel", 0.0) * abs(old)
        worse_by = new - old if lower else old - new
        limit = old + allowed if lower else old - allowed
        tolerance = f"{'<=' if lower else '>='} {limit:.4f} ({'+' if lower else '-'}" + (
            f"{rule['abs']}" if "abs" in rule else f"{rule['rel']:.0%}") + ")"
        rows.append(Row(metric, f"{old:.4f}", f"{new:.4f}", tolerance, worse_by <= allowed + 1e-12))
    return rows


def render(rows: list[Row]) -> str:
    lines = ["| metric | baseline | now | tolerance | verdict |", "| --- | ---: | ---: | --- | --- |"]
    lines += [f"| {r.metric} | {r.baseline} | {r.now} | {r.tolerance} | {'PASS' if r.ok else 'FAIL'} |"
              for r in rows]
    return "\n".join(lines)


def _parse_overrides(items: tuple[str, ...]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        overrides[key] = yaml.safe_load(value)
    return overrides


# --- command line -----------------------------------------------------------------------------------------------

@click.group()
def main() -> None:
    """The regression gate that CI runs after the tests."""


def _common(command):
    for option in reversed([
        click.option("--repo", default=".", show_default=True, type=click.Path(file_okay=False, path_type=Path),
                     help="The project checkout to test."),
        click.option("--profile", default=str(PROFILE), show_default=True, type=click.Path(path_type=Path),
                     help="Params merged over params.yaml for the CI run."),
        click.option("--baseline", "baseline_path", default=str(BASELINE), show_default=True,
                     type=click.Path(path_type=Path)),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Extra params over the profile, e.g. --set train.lr=0 (to see the gate fail)."),
    ]):
        command = option(command)
    return command


@main.command()
@_common
@click.option("--tolerances", default=str(TOLERANCES), show_default=True, type=click.Path(path_type=Path))
@click.option("--no-lock-check", is_flag=True, help="Skip the dvc.lock check (for a work in progress).")
def check(repo: Path, profile: Path, baseline_path: Path, overrides: tuple[str, ...], tolerances: Path,
          no_lock_check: bool) -> None:
    """Train the CI profile and fail if it regressed against the baseline, or if dvc.lock is stale."""
    repo = repo.resolve()
    if not (repo / baseline_path).exists():
        raise click.ClickException(f"no baseline at {baseline_path}: run `python -m deepseek.regression "
                                   "update-baseline` and commit it")
    baseline = json.loads((repo / baseline_path).read_text())
    stale = [] if no_lock_check else lock_status(repo)
    params = profile_params(repo, repo / profile, _parse_overrides(overrides))
    result = measure(repo, params, baseline)
    rows = compare(baseline["metrics"], result["metrics"], yaml.safe_load((repo / tolerances).read_text()))
    if not no_lock_check:
        rows.append(Row("dvc.lock up to date", "yes", "yes" if not stale else "no: " + "; ".join(stale[:4]),
                        "must be yes (run `dvc repro` and commit dvc.lock)", not stale))
    same_profile = baseline.get("profile_hash") == run_fingerprint(params)
    rows.append(Row("baseline made with this profile", "yes", "yes" if same_profile else "no",
                    "must be yes (update the baseline after changing the profile)", same_profile))
    table = render(rows)
    click.echo("\nDVC metrics, baseline -> now:\n" + result["metrics_diff"])
    click.echo(f"throughput: ours {result['throughput']['ours_tokens_per_s']:,.0f} tok/s, reference "
               f"{result['throughput']['reference_tokens_per_s']:,.0f} tok/s\n")
    click.echo(table)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as summary:
            summary.write(f"## Regression check\n\n{table}\n\n### DVC metrics\n\n{result['metrics_diff']}\n")
    if not all(row.ok for row in rows):
        raise click.ClickException("regression check failed: see the FAIL rows above")
    click.echo("regression check passed")


@main.command("update-baseline")
@_common
def update_baseline(repo: Path, profile: Path, baseline_path: Path, overrides: tuple[str, ...]) -> None:
    """Train the CI profile and record its metrics as the new baseline (commit the file afterwards)."""
    repo = repo.resolve()
    params = profile_params(repo, repo / profile, _parse_overrides(overrides))
    result = measure(repo, params, None)
    baseline = {"metrics": result["metrics"], "reports": result["reports"],
                "profile_hash": run_fingerprint(params), "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, torch {torch.__version__}",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(repo / baseline_path, baseline)
    click.echo(json.dumps(result["metrics"], indent=2))
    click.echo(f"wrote {baseline_path}; commit it")


if __name__ == "__main__":
    main()
