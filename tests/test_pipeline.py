"""End to end: the DVC pipeline on a tiny config, in a temporary git + DVC repository."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.params import load_params

from pipeline_utils import STAGES, run, set_params, stages_run
from reader_project import ReaderProject, workspace


@pytest.mark.slow
def test_pipeline_end_to_end(repo, reader_project):
    # 1. A fresh repro ran every stage (the project's first, committed, which repo clones); a second runs nothing
    # and leaves dvc status clean.
    assert stages_run(reader_project.first_repro.read_text()) == set(STAGES)
    assert stages_run(run(["dvc", "repro"], repo).stdout) == set()
    assert "up to date" in run(["dvc", "status"], repo).stdout

    # 4. Default results: bits per character, and samples for the five prompts.
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    # Only the headline goes to DVC's metrics, so that `dvc exp show` stays readable; corpus facts are not metrics.
    assert list(metrics) == ["val"]
    depths = range(1, load_params(repo / "params.yaml").model.config(1).mtp_depth + 1)
    mtp = {f"mtp_{name}_{k}" for k in depths for name in ("accuracy", "acceptance")}
    assert set(metrics["val"]) == {"bits_per_character", "loss", "perplexity", "accuracy", "max_vio"} | mtp
    val, meta = metrics["val"], json.loads((repo / "data" / "tokens" / "meta.json").read_text())
    # Bits per character are the loss in bits over the split's characters; the model beats a uniform guess.
    tokens_per_character = meta["val_tokens"] / meta["val_characters"]
    assert val["bits_per_character"] == pytest.approx(val["loss"] / math.log(2) * tokens_per_character, rel=0.01)
    assert val["perplexity"] == pytest.approx(math.exp(val["loss"]))
    assert val["loss"] < math.log(meta["vocab_size"]) - 0.1
    assert "metrics" not in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["prepare"]
    samples = json.loads((repo / "reports" / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == load_params(repo / "params.yaml").sample.prompts
    assert all(s["text"].startswith(s["prompt"]) and len(s["text"]) > len(s["prompt"]) for s in samples)
    assert (repo / "reports" / "figures" / "loss.png").stat().st_size > 0

    # 3. Reruns: sample params re-run only sample; train params re-run train, evaluate and sample (and the check
    # of params.yaml, every time it changes).
    set_params(repo, sample={"max_new_tokens": 8})
    assert stages_run(run(["dvc", "repro"], repo).stdout) == {"check", "sample"}
    set_params(repo, train={"lr": 2e-3})
    assert stages_run(run(["dvc", "repro"], repo).stdout) == {"check", "train", "evaluate", "sample"}
    run(["git", "checkout", "-q", "params.yaml", "dvc.lock", "reports"], repo)
    run(["dvc", "checkout", "-q"], repo)
    # 2. Experiments, `dvc exp show`, metrics and plots diffs: every command the docs show runs in test_docs.py.

    # 5. Code: an edit to the latent-cache code makes every stage that runs it out of date, even the sample
    # stage, whose input (the trained model) would come out bit-identical.
    with open(repo / "deepseek" / "attention.py", "a") as source:
        source.write("# an edit\n")
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    changed_code = {
        stage
        for stage, changes in status.items()
        for change in changes
        if isinstance(change, dict) and change.get("changed deps", {}).get("deepseek") == "modified"
    }
    assert changed_code == {"train", "evaluate", "sample"}
    run(["git", "checkout", "-q", "deepseek/attention.py"], repo)


@pytest.mark.slow
def test_exported_model_generates_what_deepseek_generate_does(repo):
    if not (repo / "model" / "final" / "model.safetensors").exists():
        run(["dvc", "repro"], repo)
    prompt = "ROMEO:\nWhat say"
    ours = run(
        [sys.executable, "-m", "stages.cli", "generate", prompt, "--temperature", "0", "--max-new-tokens", "24"], repo
    ).stdout.removesuffix("\n")  # the newline the command ends with; the text's own newlines stay
    run([sys.executable, "-m", "stages.cli", "export-hf", "--out", "model/hf"], repo)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo / "model" / "hf")
    model = AutoModelForCausalLM.from_pretrained(repo / "model" / "hf", dtype=torch.float32)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert tokenizer.decode(out[0]) == ours
    assert len(ours) > len(prompt)


def completed(repo: Path) -> dict[str, bytes]:
    """The pipeline run and committed; returns every output file of the stages after download, by path."""
    if "up to date" not in run(["dvc", "status"], repo).stdout:
        run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "completed", "--allow-empty"], repo)
    folders = ("data/prepared", "data/tokenizer", "data/tokens", "model/final", "reports")
    return {str(f.relative_to(repo)): f.read_bytes() for d in folders for f in (repo / d).rglob("*") if f.is_file()}


def files_now(repo: Path, before: dict[str, bytes]) -> dict[str, bytes]:
    return {path: (repo / path).read_bytes() for path in before if (repo / path).is_file()}


@pytest.mark.slow
def test_a_bad_value_fails_before_any_output_is_removed(repo):
    """A typo'd value: the check stage refuses it in one line before DVC removes any output, and once params.yaml
    is restored there is nothing to rerun."""
    before = completed(repo)
    result = run(["dvc", "exp", "run", "-S", "train.lr=fast"], repo, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Error: params train.lr = 'fast' must be a finite number" in output
    assert "Traceback" not in output
    assert files_now(repo, before) == before  # the model, every report and every data output
    run(["git", "checkout", "-q", "params.yaml"], repo)
    assert "up to date" in run(["dvc", "status"], repo).stdout


@pytest.mark.slow
def test_a_training_that_fails_midway_leaves_the_other_stages_outputs(repo):
    before = completed(repo)
    # Weights blown up by the first update: every later step is non-finite, and training stops after two.
    result = run(["dvc", "exp", "run", "-S", "train.lr=1e30", "-S", "train.max_nonfinite_steps=2"], repo, check=False)
    assert result.returncode != 0
    assert "Running stage 'train'" in result.stdout and "non-finite" in result.stdout + result.stderr
    others = {path: data for path, data in before.items() if not path.startswith(TRAIN_OUTPUTS)}
    assert files_now(repo, others) == others  # data outputs, the evaluation's metrics, figures, the samples
    # Back as docs/operations.md says: git's files (params, lock, the logs), then DVC's (the model, from its cache).
    run(["git", "checkout", "-q", "--", "."], repo)
    run(["dvc", "checkout", "-q"], repo)
    assert files_now(repo, before) == before
    assert "up to date" in run(["dvc", "status"], repo).stdout


@pytest.mark.slow
def test_a_removed_or_edited_corpus_is_seen_by_dvc_and_never_replaced(repo):
    completed(repo)
    corpus = repo / "data" / "input-1.txt"
    text = corpus.read_text()
    corpus.unlink()
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    assert status["download"] == [{"changed outs": {"data/input-1.txt": "deleted"}}]
    assert status["prepare"] == [{"changed deps": {"data/input-1.txt": "deleted"}}]
    # The stage fetches data.url again: offline that fails, and online the text is not the tiny corpus of
    # data.sha256; either way with one line, and nothing is written.
    result = run(["dvc", "repro"], repo, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and ("offline?" in output or "data.sha256" in output)
    assert "Traceback" not in result.stderr and not corpus.exists()
    corpus.write_text(text + "an edit")
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout)["download"] == [
        {"changed outs": {"data/input-1.txt": "modified"}}
    ]
    result = run(["dvc", "repro"], repo, check=False)  # the download stage refuses a corpus of another sha256
    assert result.returncode != 0 and "has sha256" in result.stderr + result.stdout
    assert corpus.read_text() == text + "an edit"  # refused, not replaced
    corpus.write_text(text)
    assert "up to date" in run(["dvc", "status"], repo).stdout


TRAIN_OUTPUTS = (
    "model/final",
    "reports/train_log.csv",
    "reports/val_log.csv",
    "reports/mlflow_run.json",
    "reports/train_summary.json",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reader_project: ReaderProject) -> Path:
    """A clone of the tiny project with its first run's outputs; its runs make an MLflow store of their own."""
    path = tmp_path_factory.mktemp("pipeline") / "repo"
    return workspace(reader_project, path, after_quickstart=True, with_store=False)
