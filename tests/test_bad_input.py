"""Bad input that used to end in a traceback deep in the model gets one line naming the problem and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deepseek.checkpoint import save_model
from deepseek.config import ModelConfig
from deepseek.errors import UserError
from deepseek.evaluation import evaluate
from deepseek.generate import generate
from deepseek.model import DeepSeekLM
from deepseek.sampling import next_token_probs, sample_next
from deepseek.train_config import TrainConfig
from deepseek.trainer import Trainer, TrainOutputs
from stages.cli import main
from stages.params import TokenizerParams
from stages.tokenizer import build_tokenizer

from pipeline_utils import set_params, stage_workspace, tiny_corpus


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def small_model_big_tokenizer(tmp_path) -> Path:
    """A model directory whose tokenizer has more ids than the model has embeddings."""
    tokenizer = build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus())
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=65)), tmp_path / "model", tmp_path / "tokenizer")
    return tmp_path / "model"


@pytest.mark.parametrize("command", [["generate", "ROMEO:"], ["export-hf", "--out", "{tmp}/hf"]])
def test_a_tokenizer_larger_than_the_model_is_refused_at_load(small_model_big_tokenizer, tmp_path, command):
    args = [arg.format(tmp=tmp_path) for arg in command] + ["--model", str(small_model_big_tokenizer)]
    line = one_line(CliRunner().invoke(main, args))
    assert "token ids but the model's vocabulary has 65" in line


def test_the_sample_stage_refuses_it_too(small_model_big_tokenizer, tmp_path, monkeypatch):
    stage_workspace(tmp_path / "work", monkeypatch)
    line = one_line(CliRunner().invoke(main, ["sample", "--model-dir", str(small_model_big_tokenizer)]))
    assert "token ids but the model's vocabulary has 65" in line


def test_ids_beyond_the_vocabulary_are_refused_before_the_forward():
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=65))
    with pytest.raises(UserError, match="token id 70, but the model's vocabulary has 65"):
        generate(model, torch.tensor([[1, 70]]), 3)
    tokens = np.array([1, 2, 99] * 100, dtype=np.uint16)
    with pytest.raises(UserError, match="evaluation tokens hold token id 99"):
        evaluate(model, tokens, seq_len=8, batch_size=2)
    config = TrainConfig(max_steps=1, micro_batch_size=2, grad_accum_steps=1, seq_len=8, eval_batches=1, device="cpu")
    trainer = Trainer(model, config, 0, TrainOutputs(Path("unused")))
    with pytest.raises(UserError, match="training tokens hold token id 99"):
        trainer.fit(tokens, tokens)


def test_evaluate_refuses_tokens_of_a_larger_tokenizer(tmp_path, monkeypatch):
    stage_workspace(tmp_path, monkeypatch, max_steps=2)  # a char tokenizer of the tiny corpus
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=10)), tmp_path / "model" / "final")
    line = one_line(CliRunner().invoke(main, ["evaluate"]))
    assert "the tokens in data/tokens has" in line and "the model's vocabulary has 10" in line


# Every size of positive float down to the smallest double: below float32's smallest normal number (1.2e-38) a
# temperature would round to 0 in float32 arithmetic.
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-40, 1e-30, 1e-8])
def test_a_tiny_positive_temperature_samples_the_best_token(temperature):
    logits = torch.tensor([[2.0, 5.0, 1.0, 4.999], [0.0, -1.0, 3.0, 2.0]])
    assert sample_next(logits, temperature).tolist() == [[1], [2]]
    assert sample_next(logits, temperature, top_k=2, top_p=0.5).tolist() == [[1], [2]]
    # Tied best tokens share the probability.
    probs = next_token_probs(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), temperature)
    assert probs.tolist() == [[0.0, 0.5, 0.5, 0.0]]


@pytest.mark.parametrize("temperature", [1e30, 1e300, float("inf")])
def test_a_huge_temperature_samples_uniformly(temperature):
    probs = next_token_probs(torch.tensor([[2.0, 5.0, -1.0, 4.0]]), temperature)
    assert torch.allclose(probs, torch.full((1, 4), 0.25))


@pytest.mark.parametrize(
    "option, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"), ("--top-p", "-inf")]
)
def test_generate_refuses_a_float_that_is_not_finite(option, value):
    result = CliRunner().invoke(main, ["generate", "hi", option, value])
    assert result.exit_code == 2, result.output
    assert "is not a finite number" in result.output or "not in the range" in result.output
    assert "Traceback" not in result.output


def test_a_tiny_temperature_through_the_sample_params(small_model_big_tokenizer, tmp_path, monkeypatch):
    stage_workspace(tmp_path, monkeypatch, max_steps=2)
    set_params(tmp_path, sample={"temperature": 1e-45, "max_new_tokens": 5})
    assert CliRunner().invoke(main, ["train"]).exit_code == 0
    result = CliRunner().invoke(main, ["sample"])
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower()


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path, small_model_big_tokenizer):
    """The shell hands over bytes; Python turns the invalid ones into surrogates, which encode() would refuse."""
    model = tmp_path / "fits"
    save_model(DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=300)), model, tmp_path / "tokenizer")
    result = subprocess.run(
        [sys.executable, "-m", "stages.cli", "generate", b"ROMEO\xff:", "--model", str(model)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr
    assert (
        stderr.strip() == "Error: the prompt is not UTF-8 text: byte 0xff at offset 5 is invalid; convert it to "
        "UTF-8 (e.g. with iconv) and rerun"
    )


@pytest.mark.parametrize("length", [10**12, 2**20 + 1])
def test_an_absurd_context_is_refused_by_the_params(tmp_path, length):
    path = tmp_path / "params.yaml"
    path.write_text(f"model:\n  max_seq_len: {length}\n")
    from stages.params import load_params

    with pytest.raises(UserError, match=r"params model\.max_seq_len \(.*\) must be at most 1,048,576"):
        load_params(path)


def test_a_long_context_costs_nothing_until_used():
    """Position tables are made for the positions at hand: a model with the largest context holds no table."""
    model = DeepSeekLM(ModelConfig.from_preset("tiny", max_seq_len=2**20))
    assert sum(b.numel() for b in model.buffers()) < 100  # the balancing biases and loads only
    assert model(torch.randint(0, 65, (1, 16))).logits.shape == (1, 16, 65)
