"""The CI regression gate: its comparison, its dvc.lock check, and a damaged run that it rejects."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from deepseek.checkpoint import run_fingerprint
from deepseek.config import ModelConfig
from deepseek.train_config import TrainConfig

from documented import GATE, gate_commands
from pipeline_utils import ROOT, make_pipeline_repo, run, set_params
from regression import (
    PROFILE,
    Row,
    Spread,
    compare,
    far_from,
    interleaved_speed_ratios,
    lock_status,
    our_step,
    precision_row,
    profile_params,
    render,
    scratch_copy,
    stale_lock_entries,
)

TOLERANCES = {
    "bits_per_character": {"direction": "lower", "abs": 0.02},
    "relative_throughput": {"direction": "higher", "rel": 0.3},
}


def test_the_committed_baseline_was_made_with_the_current_params_and_profile():
    """The gate refuses a baseline of other params, after the whole test run: a new key in params.yaml or a changed
    .ci/profile.yaml must come with a new baseline, and this says so in seconds."""
    baseline = json.loads((ROOT / ".ci" / "baseline.json").read_text())
    params = profile_params(ROOT, ROOT / PROFILE, {})
    assert baseline["profile_hash"] == run_fingerprint(params), (
        "params.yaml or .ci/profile.yaml changed since .ci/baseline.json was made: "
        "run `python .ci/regression.py update-baseline` and commit it (docs/ci.md)"
    )


def test_compare_applies_direction_and_tolerance():
    baseline = {"bits_per_character": 2.0, "relative_throughput": 1.0}
    assert [
        r.ok for r in compare(baseline, {"bits_per_character": 2.019, "relative_throughput": 0.71}, TOLERANCES)
    ] == [True, True]
    assert [r.ok for r in compare(baseline, {"bits_per_character": 2.03, "relative_throughput": 0.69}, TOLERANCES)] == [
        False,
        False,
    ]
    assert all(r.ok for r in compare(baseline, {"bits_per_character": 1.5, "relative_throughput": 3.0}, TOLERANCES))


def test_table_names_metric_baseline_now_tolerance_verdict():
    table = render([Row("bits_per_character", "2.0000", "2.5000", "<= 2.0200 (+0.02)", False)])
    assert table.splitlines()[0] == "| metric | baseline | now | tolerance | verdict |"
    assert table.splitlines()[2] == "| bits_per_character | 2.0000 | 2.5000 | <= 2.0200 (+0.02) | FAIL |"


@pytest.mark.alone  # times two steps against each other
def test_the_precision_check_fails_when_the_picked_precision_trains_slower():
    config, train = ModelConfig.from_preset("tiny"), TrainConfig(micro_batch_size=2, seq_len=16)
    ids = torch.randint(0, config.vocab_size, (2, 17))
    step = our_step(config, train, ids, torch.float32)

    def slower() -> None:  # a precision whose step takes twice as long: the one the gate must not let auto pick
        step()
        step()

    ratios = interleaved_speed_ratios(slower, {"float32": step}, rounds=6, warmup=1)["float32"]
    spread = Spread("bfloat16 over float32", ratios)
    assert 0.3 < spread.median < 0.8
    row = precision_row(torch.bfloat16, torch.float32, spread, min_speedup=0.95)
    assert not row.ok
    assert (
        render([row])
        .splitlines()[2]
        .startswith(f"| training precision is the faster | bfloat16 picked | {spread.median:.3f}x float32 | >= 0.95x")
    )
    assert "median" in str(spread) and "of 6 interleaved rounds" in str(spread)
    assert precision_row(torch.bfloat16, torch.float32, spread, min_speedup=spread.median).ok


@pytest.mark.alone  # times sleeps
def test_the_timing_stops_early_only_when_far_from_the_threshold():
    settled = far_from(0.95)  # 10 rounds all beyond 0.95 x 1.5 or 0.95 / 1.5
    assert not settled([2.0] * 9) and settled([2.0] * 10) and settled([0.5] * 10)
    assert not settled([2.0] * 9 + [1.2]) and not settled([0.5] * 9 + [0.7])

    def sleeper(seconds: float) -> Callable[[], None]:
        return lambda: time.sleep(seconds)

    # A step four times as slow as the timed one leaves the rounds after 10; one alike stays for every round.
    # Sleeps of tens of milliseconds: a 2 ms sleep overslept by 2 ms once in CI, and the slower step read 1.95x.
    against = {"slower": sleeper(0.040), "alike": sleeper(0.010)}
    ratios = interleaved_speed_ratios(sleeper(0.010), against, 30, 0, {"slower": settled, "alike": settled})
    assert len(ratios["slower"]) == 10 and len(ratios["alike"]) == 30
    assert statistics.median(ratios["slower"]) > 2 and 0.5 < statistics.median(ratios["alike"]) < 2


def test_stale_lock_ignores_missing_outputs_but_not_changed_code_or_params():
    fresh_clone = {
        "train": [{"changed deps": {"data/tokens": "deleted"}}, {"changed outs": {"model/final": "deleted"}}]
    }
    assert stale_lock_entries(fresh_clone) == []
    stale = {
        "prepare": [{"changed deps": {"stages/prepare.py": "modified", "data/input": "deleted"}}],
        "sample": [{"changed deps": {"params.yaml": {"sample": "modified"}}}],
        "train": ["changed command"],
    }
    assert stale_lock_entries(stale) == [
        "prepare: stages/prepare.py modified",
        "sample: params sample modified",
        "train: changed command",
    ]


def test_dvc_lock_matches_the_code_and_the_committed_params():
    """The gate's `dvc.lock up to date` row, in the first minutes of CI rather than its last: after a change to
    deepseek/ or stages/ that leaves the outputs as they are, `dvc commit -f STAGE`; after one that changes them,
    `dvc repro`."""
    with scratch_copy(ROOT) as workdir:
        assert lock_status(workdir) == []


def gate(*args: str, repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "regression.py"), *args, "--repo", str(repo)],
        capture_output=True,
        text=True,
        cwd=repo,
    )


def documented_gate_arguments() -> tuple[list[str], list[str]]:
    """The arguments of docs/ci.md's two gate commands: the baseline's update, and the check that fails."""
    update, see_it_fail = (shlex.split(code.removeprefix(GATE)) for code in gate_commands(ROOT / "docs" / "ci.md"))
    assert update == ["update-baseline"] and see_it_fail[0] == "check", (update, see_it_fail)
    return update, see_it_fail


@pytest.mark.slow
def test_damaged_training_fails_the_gate_and_unchanged_code_passes_after_an_applied_experiment(tmp_path):
    """docs/ci.md's gate commands (test_docs leaves them to this test), on a tiny profile, with a check that passes
    between them."""
    update, see_it_fail = documented_gate_arguments()
    repo = make_pipeline_repo(tmp_path / "repo")
    (tmp_path / "profile.yaml").write_text("seed: 7\n")
    # The tiny run lasts seconds, too short to time precisely: its throughput margin is wide.
    (tmp_path / "tolerances.yaml").write_text(
        yaml.safe_dump(
            {
                "bits_per_character": {"direction": "lower", "abs": 0.02},
                "max_vio": {"direction": "lower", "abs": 0.15},
                "relative_throughput": {"direction": "higher", "rel": 0.8},
                "precision": {"min_speedup": 0.05},
            }
        )
    )
    common = ["--profile", str(tmp_path / "profile.yaml"), "--baseline", str(tmp_path / "baseline.json")]
    created = gate(*update, *common, repo=repo)
    assert created.returncode == 0, created.stderr

    # An experiment (the README's `dvc exp run -S train.lr=1e-3`) leaves its params in the workspace, uncommitted;
    # the gate tests the committed ones.
    set_params(repo, train={"lr": 1e-3})
    assert run(["git", "status", "--porcelain"], repo).stdout.strip() == "M params.yaml"
    checks = [*common, "--tolerances", str(tmp_path / "tolerances.yaml"), "--no-lock-check"]
    unchanged = gate("check", *checks, repo=repo)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert "| bits_per_character |" in unchanged.stdout and "FAIL" not in unchanged.stdout
    assert "| baseline made with this profile | yes | yes |" in unchanged.stdout
    assert "interleaved rounds; 10th-90th percentile" in unchanged.stdout
    assert "| training precision is the faster |" in unchanged.stdout

    # A damaged training, and a precision that must be 100 times faster than the other: both rows fail.
    strict = yaml.safe_load((tmp_path / "tolerances.yaml").read_text()) | {"precision": {"min_speedup": 100}}
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(strict))
    damaged = gate(*see_it_fail, *common, "--tolerances", str(tmp_path / "strict.yaml"), repo=repo)
    assert damaged.returncode != 0
    for metric in ("bits_per_character", "training precision is the faster"):
        row = next(line for line in damaged.stdout.splitlines() if line.startswith(f"| {metric} |"))
        assert row.endswith("| FAIL |")
    assert "regression check failed" in damaged.stderr
    assert "Traceback" not in damaged.stderr
