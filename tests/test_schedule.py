"""The learning-rate schedule: linear warmup to train.lr, then cosine decay to train.min_lr at max_steps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deepseek.optim import lr_multiplier
from deepseek.train_config import TrainConfig

CONFIG = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)


def learning_rates(config: TrainConfig) -> list[float]:
    """What the optimizer sees at each step, through the LambdaLR the Trainer builds."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))
    rates = []
    for _ in range(config.max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_rises_linearly_to_the_peak():
    rates = learning_rates(CONFIG)
    assert rates[:10] == pytest.approx([1e-3 * (step + 1) / 10 for step in range(10)])
    assert rates[10] == pytest.approx(1e-3)  # the peak, where the cosine starts


def test_cosine_decays_to_min_lr_at_max_steps():
    rates = learning_rates(CONFIG)
    for step in (10, 32, 55, 77, 99):
        progress = (step - 10) / 90
        assert rates[step] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert rates[55] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the decay
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert lr_multiplier(CONFIG)(100) * CONFIG.lr == pytest.approx(1e-4)
    assert lr_multiplier(CONFIG)(500) * CONFIG.lr == pytest.approx(1e-4)  # and stays there


def test_no_warmup_and_a_zero_rate():
    assert learning_rates(TrainConfig(max_steps=5, warmup_steps=0, lr=1e-3, min_lr=1e-3)) == pytest.approx([1e-3] * 5)
    assert learning_rates(TrainConfig(max_steps=5, warmup_steps=2, lr=0.0, min_lr=0.0)) == [0.0] * 5
