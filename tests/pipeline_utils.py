"""A tiny copy of this project as a git + DVC repository, for end-to-end tests."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from stages.params import load_yaml

ROOT = Path(__file__).resolve().parents[1]
# The real corpus: where the README puts it (data/input-1.txt), else in shared/ beside the checkout, as CI has it.
CORPUS_PLACES = (ROOT / "data" / "input-1.txt", ROOT.parent / "shared" / "data" / "input-1.txt")
REAL_CORPUS = next((path for path in CORPUS_PLACES if path.is_file()), CORPUS_PLACES[0])
STAGES = ("check", "download", "prepare", "tokenize", "train", "evaluate", "sample")

TINY_PARAMS: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny"},
    "train": {
        "max_steps": 6,
        "micro_batch_size": 4,
        "grad_accum_steps": 2,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 2,
        "log_interval": 2,
        "eval_interval": 3,
        "eval_batches": 2,
        "sample_interval": 6,
        "checkpoint_interval": 3,
        "keep_checkpoints": 2,
        # Fixed, so that a tiny training gives the same numbers beside the other test workers' work; the shared
        # default (0) has tests of its own (test_threads.py).
        "threads": 1,
    },
    "evaluate": {"batch_size": 32},
    "sample": {"max_new_tokens": 12},
}


def tiny_corpus() -> str:
    lines = [
        f"{name}:\nWhat say you, {other}? The {thing} is {mood} tonight.\n"
        for name, other, thing, mood in zip(  # noqa: B905 - equal lengths by construction
            ["ROMEO", "JULIET", "HAMLET", "OPHELIA"] * 150,
            ["sir", "madam", "good friend", "my lord"] * 150,
            ["moon", "sea", "crown", "rose", "storm"] * 120,
            ["fair", "cold", "heavy", "sweet", "wild", "still"] * 100,
        )
    ]
    return "\n".join(lines)


def pipeline_env() -> dict[str, str]:
    """The environment for git and DVC commands: an identity for commits. (Bytecode that stage processes write
    changes no code dependency's hash: .dvcignore leaves __pycache__ out.)"""
    return {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }


# No test command takes longer on CI's machines: a hang fails its test instead of using up CI's time.
COMMAND_TIMEOUT_S = 900


def run_captured(
    args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """args run to completion, its output captured through temporary files rather than pipes.

    `dvc queue start` and `dvc exp run --run-all` leave DVC's queue workers behind, and the process that watches
    them inherits the command's output: a pipe would stay open, and the test wait, until the last worker exits.
    A worker that never finishes its shutdown (seen with DVC 3.67 after "shutting down due to empty queue")
    would hang the test run for good."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        result = subprocess.run(args, cwd=cwd, env=env, stdout=out, stderr=err, text=True, timeout=timeout_s)
        out.seek(0)
        err.seek(0)
        result.stdout, result.stderr = out.read(), err.read()
    return result


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = run_captured(args, cwd, pipeline_env())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def write_tiny_corpus(directory: Path) -> str:
    """directory/data/input-1.txt holding tiny_corpus(); returns its sha256, for params data.sha256."""
    corpus = tiny_corpus()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    (directory / "data" / "input-1.txt").write_text(corpus)
    return hashlib.sha256(corpus.encode()).hexdigest()


def make_pipeline_repo(repo: Path) -> Path:
    """A copy of this project's tracked files in repo, with a tiny corpus and tiny params, committed."""
    tracked = run(["git", "ls-files"], ROOT).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file() and not name.startswith(("reports/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    set_params(repo, data={"sha256": write_tiny_corpus(repo)}, **TINY_PARAMS)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    return repo


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def set_params(repo: Path, **changes: dict) -> None:
    params = load_yaml((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section] = {**(params.get(section) or {}), **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table in text as rows of cells, header first, the header rule under it left out; a table
    without one fails (an AssertionError), since Markdown would not show it as a table."""
    tables = []
    for block in re.findall(r"(?:^\|.*\|$\n?)+", text, re.MULTILINE):
        lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()]
        assert len(lines) >= 2 and all(cell and set(cell) <= set("-:") for cell in lines[1]), f"no rule:\n{block}"
        tables.append([lines[0], *lines[2:]])
    return tables


def free_port() -> int:
    """A local port that nothing listens on (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def empty_tracking_store() -> bytes:
    """An empty MLflow SQLite store, its tables made. MLflow spends about 2 s on its schema migrations when a
    process first opens a new store; a stage workspace starts with a copy of this one instead, since what its
    tests check comes later. (The end-to-end tests, on make_pipeline_repo, still make theirs as a project's
    first run does.) Its Default experiment, which the pipeline never uses, keeps the artifact folder MLflow
    chose then: mlruns/ in the test process's working directory."""
    import mlflow

    with tempfile.TemporaryDirectory() as directory:
        store = Path(directory) / "mlflow.db"
        mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()
        return store.read_bytes()


def stage_workspace(path: Path, monkeypatch, **train) -> Path:
    """A directory with tiny params (a char tokenizer), the prepare and tokenize outputs and an empty MLflow
    store, ready for `python -m stages.train`; the test's working directory becomes it."""
    from click.testing import CliRunner

    from stages.prepare import prepare
    from stages.tokenization import tokenize

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    set_params(path, **TINY_PARAMS)
    set_params(path, train=train, tokenizer={"kind": "char"}, data={"sha256": write_tiny_corpus(path)})
    (path / "mlflow.db").write_bytes(empty_tracking_store())
    monkeypatch.chdir(path)
    for command in (prepare, tokenize):
        result = CliRunner().invoke(command, [])
        assert result.exit_code == 0, result.output
    return path
