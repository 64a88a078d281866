"""Trains the tiny model for a few steps; run by test_distributed.py alone or under torchrun.

Usage: python ddp_worker.py OUT_DIR GRAD_ACCUM_STEPS
"""

import sys
from pathlib import Path

import numpy as np
import torch

from deepseek import distributed
from deepseek.config import ModelConfig, TrainConfig
from deepseek.model import DeepSeekLM
from deepseek.trainer import Trainer, TrainOutputs, seed_everything

out, accum = Path(sys.argv[1]), int(sys.argv[2])
distributed.init_from_env()
tokens = np.random.default_rng(0).integers(0, 65, 20_000).astype(np.uint16)
params = TrainConfig(
    max_steps=6,
    micro_batch_size=2,
    grad_accum_steps=accum,
    seq_len=32,
    lr=3e-3,
    warmup_steps=2,
    log_interval=1,
    eval_interval=6,
    eval_batches=2,
    sample_interval=100,
    checkpoint_interval=100,
    device="cpu",
)
seed_everything(0)
model = DeepSeekLM(ModelConfig.from_preset("tiny", bias_update_rate=0.01))
Trainer(model, params, seed=0, outputs=TrainOutputs(out / "checkpoints", out / "reports")).fit(tokens, tokens)
biases = torch.stack([moe.gate.expert_bias for moe in model.moe_layers()])
torch.save({"biases": biases, "head": model.head.weight.detach()}, out / f"rank{distributed.rank()}.pt")
