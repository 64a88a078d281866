"""End to end: the DVC pipeline on a tiny config, in a temporary git + DVC repository."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "tokenize", "train", "evaluate", "sample")

TINY_PARAMS = {
    "model": {"preset": "tiny"},
    "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2, "seq_len": 32, "lr": 3e-3,
              "warmup_steps": 2, "log_interval": 2, "eval_interval": 3, "eval_batches": 2, "sample_interval": 6,
              "sample_tokens": 10, "checkpoint_interval": 3, "keep_checkpoints": 2},
    "evaluate": {"batch_size": 32},
    "sample": {"max_new_tokens": 12},
}


def tiny_corpus() -> str:
    lines = [f"{name}:\nWhat say you, {other}? The {thing} is {mood} tonight.\n"
             for name, other, thing, mood in zip(["ROMEO", "JULIET", "HAMLET", "OPHELIA"] * 150,
                                                 ["sir", "madam", "good friend", "my lord"] * 150,
                                                 ["moon", "sea", "crown", "rose", "storm"] * 120,
                                                 ["fair", "cold", "heavy", "sweet", "wild", "still"] * 100)]
    return "\n".join(lines)


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def set_params(repo: Path, **changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section] = {**(params.get(section) or {}), **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of this project's tracked files, with a tiny corpus and tiny params, committed."""
    repo = tmp_path_factory.mktemp("pipeline")
    tracked = run(["git", "ls-files"], ROOT).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file() and not name.startswith(("reports/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    corpus = tiny_corpus()
    (repo / "data").mkdir(exist_ok=True)
    (repo / "data" / "input-1.txt").write_text(corpus)
    set_params(repo, data={"sha256": hashlib.sha256(corpus.encode()).hexdigest()}, **TINY_PARAMS)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    return repo


@pytest.mark.slow
def test_pipeline_end_to_end(repo):
    # 1. A fresh repro runs all five stages; a second runs nothing and leaves dvc status clean.
    first = run(["dvc", "repro"], repo)
    assert stages_run(first.stdout) == set(STAGES)
    assert stages_run(run(["dvc", "repro"], repo).stdout) == set()
    assert "up to date" in run(["dvc", "status"], repo).stdout

    # 4. Default results: bits per character, and samples for the five prompts.
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())["val"]
    assert 0 < metrics["bits_per_character"] < 8
    samples = json.loads((repo / "reports" / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["The future of AI is", "Once upon a time", "In a galaxy far away",
                                              "The secret to happiness is", "Python is a programming language that"]
    assert all(s["text"].startswith(s["prompt"]) and len(s["text"]) > len(s["prompt"]) for s in samples)
    assert (repo / "reports" / "figures" / "loss.png").stat().st_size > 0

    # 3. Reruns: sample params re-run only sample; train params re-run train, evaluate and sample.
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    set_params(repo, sample={"max_new_tokens": 8})
    assert stages_run(run(["dvc", "repro"], repo).stdout) == {"sample"}
    set_params(repo, train={"lr": 2e-3})
    assert stages_run(run(["dvc", "repro"], repo).stdout) == {"train", "evaluate", "sample"}
    run(["git", "checkout", "-q", "params.yaml", "dvc.lock", "reports"], repo)
    run(["dvc", "checkout", "-q"], repo)

    # 2. Experiments: a new experiment with its params and metrics; diffs against the baseline work.
    run(["dvc", "exp", "run", "-S", "train.lr=1e-3"], repo)
    shown = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "0.001" in shown and "bits_per_character" in shown
    diff = run(["dvc", "metrics", "diff", "--md"], repo)
    assert "bits_per_character" in diff.stdout
    run(["dvc", "plots", "diff", "-o", str(repo / "plots_out")], repo)
    assert (repo / "plots_out" / "index.html").exists()


@pytest.mark.slow
def test_exported_model_generates_what_deepseek_generate_does(repo):
    if not (repo / "model" / "final" / "model.safetensors").exists():
        run(["dvc", "repro"], repo)
    prompt = "ROMEO:\nWhat say"
    ours = run([sys.executable, "-m", "deepseek.cli", "generate", prompt, "--temperature", "0",
                "--max-new-tokens", "24"], repo).stdout.rstrip("\n")
    run([sys.executable, "-m", "deepseek.cli", "export-hf", "--out", "model/hf"], repo)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(repo / "model" / "hf")
    model = AutoModelForCausalLM.from_pretrained(repo / "model" / "hf", dtype=torch.float32)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert tokenizer.decode(out[0]) == ours
    assert len(ours) > len(prompt)
