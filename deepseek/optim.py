"""The optimizer and its learning-rate schedule: AdamW, or Muon for the hidden matrices with AdamW for the rest
(deepseek/muon.py); linear warmup, then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deepseek.model import DeepSeekLM
from deepseek.muon import MuonWithAdamW
from deepseek.train_config import TrainConfig


def build_optimizer(model: DeepSeekLM, config: TrainConfig, dtype: torch.dtype) -> torch.optim.AdamW:
    """AdamW, or Muon for the hidden matrices with AdamW for the rest (train.optimizer). Matrices decay, while
    norms and the embedding do not (the model has no biases)."""
    embedding, head = model.embed.weight, model.head.weight
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p is embedding]
    if config.optimizer == "muon":
        hidden = [p for p in model.parameters() if p.dim() >= 2 and p is not embedding and p is not head]
        decayed_head = [] if head is embedding else [head]
        groups = [
            {"params": hidden, "weight_decay": config.weight_decay, "muon": True},
            {"params": decayed_head, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        ns_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        return MuonWithAdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), ns_dtype=ns_dtype)
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not embedding]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters, on CPU as on CUDA (on CPU 4.7x faster than the per-tensor loop
    # for the seed preset, where the optimizer step took half of a 1 x 128-token training step).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


def lr_multiplier(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (as a multiple of lr)."""
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
