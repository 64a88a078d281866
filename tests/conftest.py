import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM


def randomized(model: DeepSeekLM, seed: int = 0) -> DeepSeekLM:
    """Perturb what initialisation leaves constant (norm weights, balancing biases) so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=gen))
        for moe in model.moe_layers():
            moe.gate.expert_bias.copy_(torch.empty_like(moe.gate.expert_bias).uniform_(-0.05, 0.05, generator=gen))
    return model


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
