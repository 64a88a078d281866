"""The CI regression gate: its comparison, its dvc.lock check, and a damaged run that it rejects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_utils import ROOT, make_pipeline_repo, run
from regression import Row, compare, render, stale_lock_entries

TOLERANCES = {
    "bits_per_character": {"direction": "lower", "abs": 0.02},
    "relative_throughput": {"direction": "higher", "rel": 0.3},
}


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


def gate(*args: str, repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "regression.py"), *args, "--repo", str(repo)],
        capture_output=True,
        text=True,
        cwd=repo,
    )


@pytest.mark.slow
def test_damaged_training_fails_the_gate_and_unchanged_code_passes_after_an_applied_experiment(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo")
    (tmp_path / "profile.yaml").write_text("seed: 7\n")
    # The tiny run lasts seconds, too short to time precisely: its throughput margin is wide.
    (tmp_path / "tolerances.yaml").write_text(
        yaml.safe_dump(
            {
                "bits_per_character": {"direction": "lower", "abs": 0.02},
                "max_vio": {"direction": "lower", "abs": 0.15},
                "relative_throughput": {"direction": "higher", "rel": 0.8},
            }
        )
    )
    common = ["--profile", str(tmp_path / "profile.yaml"), "--baseline", str(tmp_path / "baseline.json")]
    created = gate("update-baseline", *common, repo=repo)
    assert created.returncode == 0, created.stderr

    # The README's experiment applies its params to the workspace; the gate tests the committed params.
    run(["dvc", "exp", "run", "-S", "train.lr=1e-3"], repo)
    assert "lr: 0.001" in (repo / "params.yaml").read_text()
    checks = [*common, "--tolerances", str(tmp_path / "tolerances.yaml"), "--no-lock-check"]
    unchanged = gate("check", *checks, repo=repo)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert "| bits_per_character |" in unchanged.stdout and "FAIL" not in unchanged.stdout
    assert "| baseline made with this profile | yes | yes |" in unchanged.stdout
    assert "interleaved rounds; 10th-90th percentile" in unchanged.stdout

    damaged = gate("check", *checks, "--set", "train.lr=0", "--set", "train.min_lr=0", repo=repo)
    assert damaged.returncode != 0
    row = next(line for line in damaged.stdout.splitlines() if line.startswith("| bits_per_character |"))
    assert row.endswith("| FAIL |")
    assert "regression check failed" in damaged.stderr
    assert "Traceback" not in damaged.stderr
