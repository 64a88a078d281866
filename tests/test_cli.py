"""The `deepseek` command: help everywhere, one-line errors for bad input, tracebacks for bugs."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from deepseek.checkpoint import save_model
from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from stages.cli import main

from pipeline_utils import stage_workspace

COMMANDS = ["prepare", "tokenize", "train", "evaluate", "sample", "generate", "export-hf"]


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4


@pytest.mark.parametrize(
    "args, expected",
    [
        (["generate", "hello", "--model", "nowhere"], "no model in nowhere"),
        (["export-hf", "--model", "nowhere"], "no model in nowhere"),
        (["evaluate", "--model-dir", "nowhere"], "no model in nowhere"),
        (["sample", "--model-dir", "nowhere"], "no model in nowhere"),
    ],
)
def test_commands_before_training_say_to_train_first(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert (
        result.output.strip() == f"Error: {expected} (expected config.json and model.safetensors): "
        "run the train stage first"
    )


def test_empty_prompt_is_refused(tmp_path):
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny")), tmp_path / "model")
    result = CliRunner().invoke(main, ["generate", "", "--model", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: the prompt is empty: give some text to continue"


def test_generate_options_are_range_checked():
    result = CliRunner().invoke(main, ["generate", "hi", "--temperature", "-1"])
    assert result.exit_code == 2
    assert "--temperature" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("bug", ["ValueError", "RuntimeError"])
def test_an_internal_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    """Only the user's mistakes become one line: a shape error deep in training is shown as the bug it is."""
    path = stage_workspace(tmp_path, monkeypatch, max_steps=2)
    broken_forward = (
        f"import deepseek.model as m\n"
        f"def forward(self, *args, **kwargs):\n"
        f"    raise {bug}('mat1 and mat2 shapes cannot be multiplied (4x32 and 16x8)')\n"
        f"m.DeepSeekLM.forward = forward\n"
        f"from stages.train import train\n"
        f"train()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", broken_forward],
        cwd=path,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow.db'}"},
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"{bug}: mat1 and mat2 shapes cannot be multiplied" in result.stderr
    assert not any(line.startswith("Error:") for line in (result.stderr + result.stdout).splitlines())
