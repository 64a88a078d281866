"""Models shared through DVC: a project that trained pushes to a DVC remote (a local directory) and its git remote;
a fresh clone pulls, generates and exports without training, and an experiment travels with `dvc exp push` and
`dvc exp pull`. In temporary repositories, on tiny params."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.params import load_yaml

from pipeline_utils import run

PROMPT = "ROMEO:\nWhat say"  # in the tiny corpus's style, so that greedy text differs between models
EXPERIMENT = "lr-3e-5"  # one of conftest.tracked_repo's experiments


def generate(repo: Path) -> str:
    """Greedy text from repo's model/final. `python -m stages.cli` is the `deepseek` command of repo's own code
    (the `deepseek` on PATH runs the checkout it was installed from)."""
    command = ["generate", PROMPT, "--temperature", "0", "--max-new-tokens", "24"]
    text = run([sys.executable, "-m", "stages.cli", *command], repo).stdout.removesuffix("\n")
    assert len(text) > len(PROMPT)
    return text


def cached_outputs(repo: Path) -> list[str]:
    """The outputs of dvc.yaml that DVC caches, and so pushes and pulls."""
    outputs = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if options.get("cache", True):
                outputs.append(path)
    return outputs


def digests(repo: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of every file of the outputs, by path."""
    files = []
    for output in outputs:
        path = repo / output
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def experiment_file(repo: Path, name: str, path: str) -> str:
    """A file as the experiment `name` committed it (its git ref under refs/exps)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    ref = next(ref for ref in refs if ref.endswith(f"/{name}"))
    return run(["git", "show", f"{ref}:{path}"], repo).stdout


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_model_and_an_experiment(tracked_repo: Path, tmp_path: Path) -> None:
    # 1. The project trained, with its experiments and its DVC remote (conftest.tracked_repo), pushes to the remote
    # and to its git remote (a bare repository).
    first = tracked_repo
    assert run(["dvc", "remote", "list"], first).stdout.startswith("team")
    run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], first)
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], first).stdout.strip()
    run(["git", "push", "-q", "-u", "origin", branch], first)
    run(["dvc", "push"], first)
    outputs = cached_outputs(first)
    assert {"model/final", "data/tokenizer", "data/tokens", "data/prepared/train.txt"} <= set(outputs)
    shared = digests(first, outputs)
    assert any(name.startswith("model/final/") for name in shared) and len(shared) >= 10
    text = generate(first)
    # An experiment with a different model: its git commit goes to origin, its outputs to the DVC remote.
    experiment_lock, experiment_metrics = (
        experiment_file(first, EXPERIMENT, path) for path in ("dvc.lock", "reports/metrics.json")
    )
    assert experiment_lock != (first / "dvc.lock").read_text()
    run(["dvc", "exp", "push", "origin", EXPERIMENT], first)

    # 2. A fresh clone: `dvc pull` brings every cached output, byte for byte, and nothing is left to reproduce.
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", "--branch", branch, str(tmp_path / "origin.git"), str(fresh)], tmp_path)
    assert not (fresh / "model" / "final").exists() and not (fresh / "data" / "tokens").exists()
    run(["dvc", "pull"], fresh)
    assert digests(fresh, outputs) == shared
    corpus = "data/input-1.txt"  # the download stage's output, never cached: neither in git nor in the remote
    assert not (fresh / corpus).exists()
    assert json.loads(run(["dvc", "status", "--json"], fresh).stdout)["download"] == [
        {"changed outs": {corpus: "deleted"}}
    ]
    shutil.copy(first / corpus, fresh / corpus)  # as the README says to, offline
    assert run(["git", "status", "--porcelain"], fresh).stdout == ""
    assert json.loads(run(["dvc", "status", "--json"], fresh).stdout) == {}  # nothing to reproduce

    # 3. Without training, it generates what the first clone did, and exports for transformers.
    assert generate(fresh) == text
    run([sys.executable, "-m", "stages.cli", "export-hf", "--out", "model/hf"], fresh)
    from transformers import AutoModelForCausalLM

    # (tests/test_pipeline.py checks that an export generates our text; here, that the export is complete)
    loaded: Any = AutoModelForCausalLM.from_pretrained(fresh / "model" / "hf", output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers' DeepseekV3 has no multi-token prediction module: it skips its weights, the layer after the last
    mtp_layer = f"model.layers.{model.config.num_hidden_layers}."
    assert all(key.startswith(mtp_layer) for key in info["unexpected_keys"])

    # 4. The experiment: pulled from origin (commit) and the DVC remote (outputs), applied to the workspace. Its
    # dvc.lock names the experiment's model by hash, and `dvc status` finds the files equal to it.
    run(["dvc", "exp", "pull", "origin", EXPERIMENT], fresh)
    run(["dvc", "exp", "apply", EXPERIMENT], fresh)
    assert load_yaml((fresh / "params.yaml").read_text())["train"]["lr"] == 3e-5
    assert (fresh / "dvc.lock").read_text() == experiment_lock
    assert json.loads(run(["dvc", "status", "--json"], fresh).stdout) == {}
    assert (fresh / "reports" / "metrics.json").read_text() == experiment_metrics
    assert generate(fresh) != text
