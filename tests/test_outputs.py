"""Every command that writes a directory replaces only a directory it wrote itself: never a folder of other files,
never its own input, never a checkpoint or another of this project's outputs. Deleting is atomic for readers,
and leftovers of killed processes go away on the next run without touching a live process's files."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepseek import files
from deepseek.checkpoint import (
    CHECKPOINT_DIR,
    INFO,
    MODEL_DIR,
    find_resume_point,
    list_checkpoints,
    save_checkpoint,
    save_model,
)
from deepseek.config import ModelConfig
from deepseek.errors import UserError
from deepseek.files import OWNER_FILE, remove_leftovers, replacing_dir
from deepseek.model import DeepSeekLM
from stages.cli import main
from stages.params import TokenizerParams
from stages.tokenizer import build_tokenizer

from pipeline_utils import stage_workspace, tiny_corpus

FOREIGN = {"config.json": "{}", "README.md": "another model", "model-00001-of-00002.safetensors": "shard"}


def foreign_folder(path: Path) -> Path:
    """A folder of someone else's files, such as another Hugging Face model."""
    path.mkdir(parents=True)
    for name, text in FOREIGN.items():
        (path / name).write_text(text)
    return path


def untouched(path: Path) -> bool:
    return {p.name: p.read_text() for p in path.iterdir()} == FOREIGN


@pytest.fixture
def trained(tmp_path) -> Path:
    """model/final as the train stage writes it (weights, config, tokenizer), and a checkpoint beside it."""
    tokenizer = build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus())
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    save_model(model, tmp_path / "model" / "final", tokenizer_dir=tmp_path / "tokenizer")
    save_checkpoint(tmp_path / "model" / "checkpoints", 2, model, {}, {"fingerprint": {}}, keep=3)
    return tmp_path / "model"


def one_line_error(result) -> str:
    """The command's error line, after checking it failed with exactly one and no traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def export(model_dir: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["export-hf", "--model", str(model_dir / "final"), "--out", str(out), *extra])


def test_export_refuses_another_models_folder_and_force_replaces_it(trained, tmp_path):
    other = foreign_folder(tmp_path / "other-model")
    assert "did not write" in one_line_error(export(trained, other))
    assert untouched(other)
    assert export(trained, other, "--force").exit_code == 0
    assert (other / "model.safetensors").exists() and not (other / "README.md").exists()


def test_export_replaces_its_own_earlier_export(trained, tmp_path):
    assert export(trained, tmp_path / "hf").exit_code == 0
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"stale")
    assert export(trained, tmp_path / "hf").exit_code == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != b"stale"


@pytest.mark.parametrize("force", [(), ("--force",)])
@pytest.mark.parametrize("target", ["final", "checkpoints/step_00000002", "checkpoints", ".", "final/tokenizer"])
def test_export_never_replaces_its_input_a_checkpoint_or_another_output(trained, target, force):
    before = sorted(str(p.relative_to(trained)) for p in trained.rglob("*"))
    output = one_line_error(export(trained, trained / target, *force))
    assert "refusing" in output or "this command reads" in output
    assert sorted(str(p.relative_to(trained)) for p in trained.rglob("*")) == before


def test_save_model_refuses_a_foreign_folder(tmp_path):
    other = foreign_folder(tmp_path / "other")
    with pytest.raises(UserError, match="did not write"):
        save_model(DeepSeekLM(ModelConfig.from_preset("tiny")), other)
    assert untouched(other)


@pytest.mark.parametrize("option", ["--out"])
def test_prepare_refuses_to_write_over_its_input(tmp_path, monkeypatch, option):
    path = stage_workspace(tmp_path, monkeypatch)
    result = CliRunner().invoke(main, ["prepare", option, "data"])
    assert "this command reads" in one_line_error(result)
    assert (path / "data" / "input-1.txt").exists()


def test_tokenize_refuses_one_folder_for_both_outputs(tmp_path, monkeypatch):
    stage_workspace(tmp_path, monkeypatch)
    result = CliRunner().invoke(main, ["tokenize", "--tokenizer-dir", "same", "--tokens-dir", "same"])
    assert "this command reads" in one_line_error(result)
    assert not (tmp_path / "same").exists()


@pytest.mark.parametrize(
    "command, target",
    [
        (["prepare", "--out", "{target}"], "prepared-elsewhere"),
        (["tokenize", "--tokenizer-dir", "{target}"], "tokenizer-elsewhere"),
        (["tokenize", "--tokens-dir", "{target}"], "tokens-elsewhere"),
    ],
)
def test_every_stage_refuses_a_folder_of_other_files(tmp_path, monkeypatch, command, target):
    stage_workspace(tmp_path, monkeypatch)
    other = foreign_folder(tmp_path / target)
    result = CliRunner().invoke(main, [arg.format(target=other) for arg in command])
    assert "did not write" in one_line_error(result)
    assert untouched(other)


def test_train_refuses_a_model_dir_whose_final_is_not_its_own(tmp_path, monkeypatch):
    stage_workspace(tmp_path, monkeypatch, max_steps=2)
    other = foreign_folder(tmp_path / "elsewhere" / "final")
    result = CliRunner().invoke(main, ["train", "--model-dir", str(tmp_path / "elsewhere")])
    assert "did not write" in one_line_error(result)
    assert untouched(other)


def test_outputs_from_before_markers_are_still_replaced(tmp_path):
    legacy = tmp_path / "final"
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny")), legacy)
    (legacy / OWNER_FILE).unlink()  # what earlier versions wrote: exactly the files, no marker
    assert MODEL_DIR.owns(legacy)
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny")), legacy)
    assert (legacy / OWNER_FILE).read_text().strip() == MODEL_DIR.writer


# --- deleting and leftovers -------------------------------------------------------------------------------------


def test_a_kill_while_rotating_checkpoints_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    model = DeepSeekLM(ModelConfig.from_preset("tiny"))
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(directory, step, model, {}, {"fingerprint": {}}, keep=2)

    rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deleting a checkpoint: one file goes, then the process dies
        if not str(path).endswith(".trash"):
            return rmtree(path, *args, **kwargs)
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise SystemExit(137)

    monkeypatch.setattr("deepseek.files.shutil.rmtree", killed_midway)
    with pytest.raises(SystemExit):
        save_checkpoint(directory, 3, model, {}, {"fingerprint": {}}, keep=2)
    monkeypatch.undo()
    # Readers see whole checkpoints only: step 1 went to a trash name before any of it was deleted.
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("step_")) == [
        "step_00000002",
        "step_00000003",
    ]
    assert all((p / INFO).exists() for p in list_checkpoints(directory))
    (trash,) = [p for p in directory.iterdir() if p.name.endswith(".trash")]
    # The next run, in another process, removes what the dead one left.
    dead = trash.with_name(f".step_00000001.{dead_pid()}.trash")
    trash.rename(dead)
    find_resume_point(directory, {})
    assert not dead.exists()


def test_incomplete_checkpoints_of_earlier_versions_are_removed_before_training_reaches_them(tmp_path):
    directory = tmp_path / "checkpoints"
    half = directory / "step_00000004"  # what a kill in the old rmtree left: files, no checkpoint.json
    half.mkdir(parents=True)
    (half / "trainer_state.pt").write_bytes(b"x")
    assert find_resume_point(directory, {}) is None
    assert not half.exists()
    save_checkpoint(directory, 4, DeepSeekLM(ModelConfig.from_preset("tiny")), {}, {"fingerprint": {}}, keep=2)
    assert CHECKPOINT_DIR.owns(half)


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".final.{sleeper.pid}.tmp"
        dead = tmp_path / f".final.{dead_pid()}.tmp"
        for leftover in (live, dead):
            leftover.mkdir()
            (leftover / "model.safetensors").write_bytes(b"x")
        assert remove_leftovers(tmp_path) == [dead]
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_failure_leaves_the_old_directory_whole(tmp_path):
    kind = files.DirectoryKind("a test writer", frozenset({"a.txt"}), "a.txt")
    with replacing_dir(tmp_path / "out", kind) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing_dir(tmp_path / "out", kind) as staging:
        (staging / "a.txt").write_text("new")
        raise RuntimeError("crash")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- one training at a time on one folder -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_training_on_the_same_folder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch):
    path = stage_workspace(tmp_path, monkeypatch, max_steps=400, checkpoint_interval=2, keep_checkpoints=2)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow.db'}"}
    first = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert first.stdout is not None
    try:
        while not list_checkpoints(path / "model" / "checkpoints"):
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.05)  # not a spin: the training waited on needs the core
        shutil.copy(path / "params.yaml", path / "params.first.yaml")
        (path / "params.yaml").write_text((path / "params.yaml").read_text().replace("lr: 0.003", "lr: 0.001"))
        second = subprocess.run(
            [sys.executable, "-m", "stages.train"], cwd=path, env=env, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 1
        assert f"in use by another training (pid {first.pid})" in second.stderr
        assert not (path / "model" / "checkpoints" / "superseded").exists()  # the first one's checkpoints stay
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    shutil.copy(path / "params.first.yaml", path / "params.yaml")
    (path / "params.yaml").write_text((path / "params.yaml").read_text().replace("max_steps: 400", "max_steps: 4"))
    third = subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=path, env=env, capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr
    assert json.loads((path / "reports" / "train_summary.json").read_text())["steps"] == 4  # the dead one's lock


# --- a full disk ------------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_path_in_every_stage(tmp_path, monkeypatch):
    path = stage_workspace(tmp_path, monkeypatch, max_steps=2, checkpoint_interval=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
    assert CliRunner().invoke(main, ["train"]).exit_code == 0
    before = {p: p.read_bytes() for p in (path / "data" / "prepared").iterdir()}

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    cases: list[tuple[str, str | tuple[str, ...]]] = [
        ("prepare", "data/prepared"),
        ("tokenize", "data/tok"),
        ("train", ("model/", "reports/")),
        ("evaluate", "reports/"),
        ("sample", "reports/"),
    ]
    for stage, written in cases:
        line = one_line_error(CliRunner().invoke(main, [stage]))
        match = re.fullmatch(
            r"Error: no space left on the device writing (\S+): it needed more than [\d.,]+ MiB "
            r"and [\d.,]+ MiB are free; free some space and rerun",
            line,
        )
        assert match and match[1].removeprefix(f"{path}/").startswith(written), (stage, line)
    assert {p: p.read_bytes() for p in (path / "data" / "prepared").iterdir()} == before  # still whole
