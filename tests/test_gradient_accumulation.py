import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM

from conftest import randomized


@pytest.mark.parametrize("seq_aux_loss_coef", [0.0, 0.01])
def test_micro_batches_give_the_gradients_of_one_big_batch(seq_aux_loss_coef):
    config = ModelConfig.from_preset("tiny", seq_aux_loss_coef=seq_aux_loss_coef)
    big = randomized(DeepSeekLM(config)).train()
    accumulated = randomized(DeepSeekLM(config)).train()
    accumulated.load_state_dict(big.state_dict())
    ids = torch.randint(0, config.vocab_size, (8, 33))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    big(inputs, targets).loss.backward()
    k = 4
    for x, y in zip(inputs.chunk(k), targets.chunk(k), strict=True):
        (accumulated(x, y).loss / k).backward()

    for (name, p_big), p_acc in zip(big.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p_acc.grad, p_big.grad, atol=1e-6, rtol=1e-4, msg=name)
    for moe_big, moe_acc in zip(big.moe_layers(), accumulated.moe_layers(), strict=True):
        assert torch.equal(moe_big.pending_load, moe_acc.pending_load)
