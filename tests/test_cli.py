"""The `deepseek` command: help everywhere, one-line errors for bad input, tracebacks for bugs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deepseek.checkpoint import save_model
from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from stages.cli import main
from stages.params import TokenizerParams
from stages.tokenizer import build_tokenizer

from pipeline_utils import stage_workspace, tiny_corpus

COMMANDS = [
    "check",
    "download",
    "prepare",
    "tokenize",
    "train",
    "evaluate",
    "sample",
    "generate",
    "export-hf",
    "report",
]


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4


@pytest.mark.parametrize(
    "args", [["generate", "hello"], ["export-hf"], ["evaluate"], ["sample"], ["generate", "hi", "--model", "empty"]]
)
def test_commands_before_training_say_to_train_first(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    where = "empty" if "empty" in args else "model/final"
    assert (
        result.output.strip() == f"Error: no model in {where} (expected config.json and model.safetensors): "
        "run the train stage first"
    )


def test_empty_prompt_is_refused(tmp_path):
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny")), tmp_path / "model")
    result = CliRunner().invoke(main, ["generate", "", "--model", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: the prompt is empty: give some text to continue"


@pytest.mark.parametrize(
    "args",
    [["generate", "hi", "--model"], ["export-hf", "--model"], ["evaluate", "--model-dir"], ["sample", "--model-dir"]],
)
def test_a_model_folder_that_is_not_there_is_called_missing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*args, "model/nope"])
    assert result.exit_code == 2
    assert "model/nope does not exist (the train stage writes model/final)" in result.output
    assert "run the train stage first" not in result.output and "Traceback" not in result.output


HEAVY = {"torch", "mlflow", "transformers", "dvc", "matplotlib", "datasets"}


@pytest.mark.parametrize(
    "command", [[], *([name] for name in COMMANDS), ["study"], ["study", "run"], ["study", "report"]]
)
def test_help_starts_at_once_without_the_heavy_libraries(command):
    """`deepseek --help` and every command's: the libraries that take seconds to import are imported where a
    command uses them, never for its help (python -X importtime lists every module a process imports)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stages.cli", *command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr[-2000:]
    imported = {
        line.rpartition("|")[2].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "click" in imported  # the listing is what it claims to be
    assert not imported & HEAVY, sorted(imported & HEAVY)


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


@pytest.fixture
def model_with_tokenizer(tmp_path) -> Path:
    tokenizer = build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus())
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = ModelConfig.from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=64)
    return save_model(DeepSeekLM(config), tmp_path / "model", tokenizer_dir=tmp_path / "tokenizer")


def test_the_prompt_comes_from_the_argument_a_file_or_standard_input(model_with_tokenizer, tmp_path):
    common = ["--model", str(model_with_tokenizer), "--temperature", "0", "--max-new-tokens", "10"]
    prompt = "ROMEO:\nWhat say you, madam? The moon is"
    (tmp_path / "prompt.txt").write_text(prompt)
    by_argument = CliRunner().invoke(main, ["generate", prompt, *common])
    by_file = CliRunner().invoke(main, ["generate", "--prompt-file", str(tmp_path / "prompt.txt"), *common])
    by_stdin = CliRunner().invoke(main, ["generate", "-", *common], input=prompt)
    assert by_argument.exit_code == 0, by_argument.output
    assert by_argument.output.startswith(prompt) and len(by_argument.output) > len(prompt) + 1
    assert by_file.output == by_argument.output == by_stdin.output


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "give a PROMPT (or - to read standard input) or --prompt-file"),
        (["hello", "--prompt-file", "p.txt"], "give a PROMPT (or - to read standard input) or --prompt-file"),
    ],
)
def test_one_prompt_source_is_asked_for(model_with_tokenizer, args, expected):
    result = CliRunner().invoke(main, ["generate", *args, "--model", str(model_with_tokenizer)])
    assert result.exit_code == 2 and expected in result.output


def test_more_new_tokens_than_the_context_is_refused(model_with_tokenizer):
    result = CliRunner().invoke(
        main, ["generate", "ROMEO:", "--model", str(model_with_tokenizer), "--max-new-tokens", "1000"]
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --max-new-tokens 1000 is more than the model's context of 64 tokens: ask for at most 64"
    )


def test_text_is_streamed_as_it_is_generated(model_with_tokenizer):
    from deepseek.checkpoint import load_model
    from deepseek.generate import generate_text, stream_text
    from stages.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_with_tokenizer), load_tokenizer(model_with_tokenizer / "tokenizer")
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    pieces = stream_text(model, tokenizer, "ROMEO:", 30, temperature=0)
    first = next(pieces)
    assert first.startswith("ROMEO:") and len(forwards) <= 3  # the first piece after a forward or two, not thirty
    rest = list(pieces)
    assert len(rest) > 5 and len(forwards) >= 20
    assert first + "".join(rest) == generate_text(model, tokenizer, "ROMEO:", 30, temperature=0)


def test_generating_training_and_sampling_load_no_transformers(model_with_tokenizer):
    """They read the tokenizer with `tokenizers` alone: importing transformers would cost each process about a
    second (stages.tokenizer.SavedTokenizer)."""
    code = """
import sys
from click.testing import CliRunner
import stages.cli, stages.training, stages.sample
result = CliRunner().invoke(stages.cli.main, ["generate", "ROMEO:", "--model", sys.argv[1], "--max-new-tokens", "5"])
assert result.exit_code == 0 and result.output.startswith("ROMEO:"), result.output
print(sorted(name for name in sys.modules if name.split(".")[0] == "transformers"))
"""
    result = subprocess.run([sys.executable, "-c", code, str(model_with_tokenizer)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
