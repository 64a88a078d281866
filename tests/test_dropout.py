"""model.dropout: residual and embedding dropout while training, nothing at evaluation, nothing at all at 0."""

import pytest
import torch

from deepseek.checkpoint import load_model, save_model
from deepseek.config import ModelConfig
from deepseek.errors import ConfigError
from deepseek.model import DeepSeekLM

from conftest import randomized


def twins(p: float) -> tuple[DeepSeekLM, DeepSeekLM]:
    plain = randomized(DeepSeekLM(ModelConfig.from_preset("tiny")))
    dropped = DeepSeekLM(ModelConfig.from_preset("tiny", dropout=p))
    dropped.load_state_dict(plain.state_dict())
    return plain, dropped


def test_dropout_acts_in_training_only():
    plain, dropped = twins(0.2)
    ids = torch.randint(0, plain.config.vocab_size, (2, 16))
    for model in (plain, dropped):
        model.eval()
    torch.testing.assert_close(dropped(ids).logits, plain(ids).logits, atol=0, rtol=0)
    dropped.train()
    first, second = dropped(ids).logits, dropped(ids).logits
    assert not torch.equal(first, second)  # a new mask each forward
    torch.manual_seed(5)
    again = dropped(ids).logits
    torch.manual_seed(5)
    assert torch.equal(dropped(ids).logits, again)  # masks come from torch's seeded generator


def test_zero_dropout_draws_no_random_numbers():
    plain, _ = twins(0.0)
    plain.train()
    ids = torch.randint(0, plain.config.vocab_size, (2, 16))
    state = torch.get_rng_state()
    plain(ids)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("p", [-0.1, 1.0, "0.1"])
def test_dropout_outside_zero_to_one_is_refused(p):
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig.from_preset("tiny", dropout=p)


def test_a_loaded_model_is_ready_for_inference(tmp_path):
    """load_model gives eval mode: a model trained with dropout answers the same input the same way."""
    _, dropped = twins(0.2)
    save_model(dropped, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert not loaded.training
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16))
    assert torch.equal(loaded(ids).logits, loaded(ids).logits)
