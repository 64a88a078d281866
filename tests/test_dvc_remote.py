"""Models shared through DVC: one clone trains and pushes to a DVC remote (a local directory) and its git remote;
a fresh clone pulls and generates and exports without training, and an experiment travels with `dvc exp push`
and `dvc exp pull`. In temporary repositories, on tiny params."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.params import load_yaml

from pipeline_utils import make_pipeline_repo, run

PROMPT = "ROMEO:\nWhat say"  # in the tiny corpus's style, so that greedy text differs between models
EXPERIMENT = "lower-lr"


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


def model_digest(repo: Path) -> str:
    return hashlib.sha256((repo / "model" / "final" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_model_and_an_experiment(tmp_path: Path) -> None:
    # 1. The first clone trains, commits, and pushes to its git remote (a bare repository) and its DVC remote.
    first = make_pipeline_repo(tmp_path / "first")
    run(["dvc", "repro"], first)
    run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], first)
    run(["dvc", "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")], first)
    run(["git", "add", "-A"], first)  # .dvc/config with the remote, dvc.lock, reports/
    run(["git", "commit", "-qm", "trained"], first)
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], first).stdout.strip()
    run(["git", "push", "-q", "-u", "origin", branch], first)
    run(["dvc", "push"], first)
    outputs = cached_outputs(first)
    assert {"model/final", "data/tokenizer", "data/tokens", "data/prepared/train.txt"} <= set(outputs)
    shared = digests(first, outputs)
    assert any(name.startswith("model/final/") for name in shared) and len(shared) >= 10
    text, metrics = generate(first), (first / "reports" / "metrics.json").read_text()

    # 2. An experiment with a different model, pushed: its git commit to origin, its outputs to the DVC remote.
    run(["dvc", "exp", "run", "-n", EXPERIMENT, "-S", "train.lr=1e-3"], first)
    experiment_model, experiment_text = model_digest(first), generate(first)
    experiment_metrics = (first / "reports" / "metrics.json").read_text()
    assert experiment_model != shared["model/final/model.safetensors"] and experiment_text != text
    assert experiment_metrics != metrics
    run(["dvc", "exp", "push", "origin", EXPERIMENT], first)

    # 3. A fresh clone: `dvc pull` brings every cached output, byte for byte, and only the checkpoints are amiss.
    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", "--branch", branch, str(tmp_path / "origin.git"), str(fresh)], tmp_path)
    assert not (fresh / "model" / "final").exists() and not (fresh / "data" / "tokens").exists()
    run(["dvc", "pull"], fresh)
    assert digests(fresh, outputs) == shared
    assert not (fresh / "data" / "input-1.txt").exists()  # the corpus is neither in git nor a DVC output
    assert run(["git", "status", "--porcelain"], fresh).stdout == ""
    assert json.loads(run(["dvc", "status", "--json"], fresh).stdout) == {}  # nothing to reproduce

    # 4. Without training, it generates what the first clone did, and exports for transformers.
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

    # 5. The experiment: pulled from origin (commit) and the DVC remote (outputs), applied to the workspace.
    run(["dvc", "exp", "pull", "origin", EXPERIMENT], fresh)
    run(["dvc", "exp", "apply", EXPERIMENT], fresh)
    assert load_yaml((fresh / "params.yaml").read_text())["train"]["lr"] == 1e-3
    assert model_digest(fresh) == experiment_model
    assert (fresh / "reports" / "metrics.json").read_text() == experiment_metrics  # metrics are in git
    assert generate(fresh) == experiment_text
