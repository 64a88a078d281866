"""Trains the tiny model for a few steps; run by test_distributed.py alone or under torchrun.

Usage: python ddp_worker.py OUT_DIR GRAD_ACCUM_STEPS [LOG_INTERVAL [CHECKPOINT_TO_RESUME]]
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from deepseek import distributed
from deepseek.checkpoint import find_resume_point
from deepseek.config import ModelConfig, TrainConfig
from deepseek.model import DeepSeekLM
from deepseek.trainer import Trainer, TrainOutputs, seed_everything

out, accum = Path(sys.argv[1]), int(sys.argv[2])
log_interval = int(sys.argv[3]) if len(sys.argv) > 3 else 1
resume_from = Path(sys.argv[4]) if len(sys.argv) > 4 else None
fingerprint = {"worker": "ddp"}
distributed.init_from_env()
tokens = np.random.default_rng(0).integers(0, 65, 20_000).astype(np.uint16)
params = TrainConfig(
    max_steps=6,
    micro_batch_size=2,
    grad_accum_steps=accum,
    seq_len=32,
    lr=3e-3,
    warmup_steps=2,
    log_interval=log_interval,
    eval_interval=6,
    eval_batches=2,
    sample_interval=100,
    checkpoint_interval=2,
    keep_checkpoints=3,
    device="cpu",
)
seed_everything(0)
model = DeepSeekLM(ModelConfig.from_preset("tiny", bias_update_rate=0.01))
outputs = TrainOutputs(out / "checkpoints", out / "reports")
trainer = Trainer(model, params, seed=0, outputs=outputs, checkpoint_info={"fingerprint": fingerprint})
if resume_from is not None:
    if distributed.is_main():
        shutil.copytree(resume_from, outputs.checkpoint_dir / resume_from.name)
    distributed.barrier()
    trainer.resume(find_resume_point(outputs.checkpoint_dir, fingerprint))
trainer.fit(tokens, tokens)
biases = torch.stack([moe.gate.expert_bias for moe in model.moe_layers()])
torch.save({"biases": biases, "head": model.head.weight.detach()}, out / f"rank{distributed.rank()}.pt")
