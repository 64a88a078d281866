"""Evaluation metrics against what they must be by hand, and the batches they are computed on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepseek.batches import evaluation_batches
from deepseek.config import ModelConfig
from deepseek.evaluation import evaluate
from deepseek.model import DeepSeekLM


def test_zero_logits_give_log2_vocab_bits_per_token_spread_over_the_characters():
    """Uniform predictions cost log2(V) bits per token; per character, times the tokens over the characters."""
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=100))
    with torch.no_grad():
        model.head.weight.zero_()
    tokens = np.random.default_rng(0).integers(0, 100, 1001).astype(np.uint16)
    metrics = evaluate(model, tokens, seq_len=32, batch_size=4, characters=2500)
    assert metrics["tokens"] == 1000  # every token but the first is predicted once
    assert metrics["loss"] == pytest.approx(math.log(100), rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(100, rel=1e-5)
    assert metrics["bits_per_character"] == pytest.approx(math.log2(100) * 1000 / 2500, rel=1e-6)


def test_bits_per_character_prorate_the_characters_to_the_tokens_scored():
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=50))
    with torch.no_grad():
        model.head.weight.zero_()
    tokens = np.zeros(641, dtype=np.uint16)
    sampled = evaluate(model, tokens, seq_len=32, batch_size=2, characters=1600, max_batches=3)
    assert sampled["tokens"] == 3 * 2 * 32
    # 192 of the 640 predicted tokens span 192/640 of the 1,600 characters.
    assert sampled["bits_per_character"] == pytest.approx(math.log2(50) * 192 / (1600 * 192 / 640), rel=1e-6)


@pytest.mark.parametrize("length", [2, 33, 64, 65, 100, 257, 1000])
@pytest.mark.parametrize("seq_len, batch_size", [(1, 1), (8, 3), (32, 4), (64, 16)])
def test_batches_predict_every_token_exactly_once(length, seq_len, batch_size):
    tokens = np.arange(length).astype(np.int64)  # a token's value is its position
    predicted = []
    for inputs, targets in evaluation_batches(tokens, seq_len, batch_size):
        assert inputs.shape == targets.shape and inputs.shape[1] <= seq_len
        assert torch.equal(targets, inputs + 1)  # each target is the token after its input
        predicted += targets.flatten().tolist()
    assert sorted(predicted) == list(range(1, length))


def test_sampled_batches_are_spread_over_the_split():
    tokens = np.arange(100 * 8 + 1).astype(np.int64)
    batches = list(evaluation_batches(tokens, seq_len=8, batch_size=2, max_batches=5))  # 50 batches in all
    assert len(batches) == 5
    starts = [inputs[0, 0].item() for inputs, _ in batches]
    assert starts[0] == 0 and starts[-1] >= 90 * 8  # the first and the last batch, not the first five
    assert starts == sorted(starts) and len(set(starts)) == 5


@pytest.mark.parametrize("was_training", [False, True])
def test_dropout_scores_in_training_mode_and_restores_the_mode(was_training):
    """dropout=True scores as training saw the text: with dropout 0.5 the loss is that of the model in training
    mode under the same seed, not the eval loss; the model's own mode is left as it was."""
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=100, dropout=0.5)).train(was_training)
    tokens = np.random.default_rng(0).integers(0, 100, 257).astype(np.uint16)
    torch.manual_seed(3)
    with_dropout = evaluate(model, tokens, seq_len=32, batch_size=4, dropout=True)
    assert model.training == was_training
    eval_loss = evaluate(model, tokens, seq_len=32, batch_size=4)["loss"]
    assert abs(with_dropout["loss"] - eval_loss) > 1e-4
    torch.manual_seed(3)
    with torch.no_grad():
        inputs, targets = zip(*evaluation_batches(tokens, 32, 4), strict=True)
        model.train()
        losses = [
            model(x).logits.flatten(0, 1).log_softmax(-1).gather(1, y.reshape(-1, 1))
            for x, y in zip(inputs, targets, strict=True)
        ]
    assert with_dropout["loss"] == pytest.approx(-torch.cat(losses).mean().item(), rel=1e-5)
