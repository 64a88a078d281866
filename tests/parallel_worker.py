"""Trains the tiny model for a few steps; run by test_distributed.py alone or under torchrun.

Usage: python parallel_worker.py OUT_DIR [--accum N] [--log-interval N] [--parallel ddp|fsdp] [--dtype D]
                                        [--optimizer adamw|muon] [--resume CHECKPOINT]
Writes OUT_DIR/reports/train_log.csv and, per rank, OUT_DIR/rankR.pt with the balancing biases, the head, an
expert weight and the optimizer's class.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from deepseek import distributed, fsdp
from deepseek.checkpoint import find_resume_point
from deepseek.config import ModelConfig
from deepseek.device import seed_everything
from deepseek.model import DeepSeekLM
from deepseek.train_config import TrainConfig
from deepseek.trainer import Trainer, TrainOutputs

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--accum", type=int, default=1)
parser.add_argument("--log-interval", type=int, default=1)
parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
parser.add_argument("--dtype", default="float32")
parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
parser.add_argument("--resume", type=Path)
args = parser.parse_args()

fingerprint = {"worker": args.parallel}
distributed.init_from_env()
tokens = np.random.default_rng(0).integers(0, 65, 20_000).astype(np.uint16)
params = TrainConfig(
    max_steps=6,
    micro_batch_size=2,
    grad_accum_steps=args.accum,
    seq_len=32,
    lr=3e-3,
    warmup_steps=2,
    log_interval=args.log_interval,
    eval_interval=6,
    eval_batches=2,
    sample_interval=100,
    checkpoint_interval=2,
    keep_checkpoints=3,
    device="cpu",
    dtype=args.dtype,
    parallel=args.parallel,
    optimizer=args.optimizer,
)
seed_everything(0)
model = DeepSeekLM(ModelConfig.from_preset("tiny", bias_update_rate=0.01))
outputs = TrainOutputs(args.out / "checkpoints", args.out / "reports" / "train_log.csv")
trainer = Trainer(model, params, seed=0, outputs=outputs, checkpoint_info={"fingerprint": fingerprint})
if args.resume is not None:
    if distributed.is_main():
        shutil.copytree(args.resume, outputs.checkpoint_dir / args.resume.name)
    distributed.barrier()
    point = find_resume_point(outputs.checkpoint_dir, fingerprint)
    assert point is not None, f"no checkpoint to resume in {outputs.checkpoint_dir}"
    trainer.resume(point)
trainer.fit(tokens, tokens)
biases = torch.stack([moe.gate.expert_bias for moe in model.moe_layers()])
# Under FSDP gathered from the shards: collectives.
head = fsdp.full_tensor(model.head.weight.detach())
experts = fsdp.full_tensor(model.get_parameter("layers.1.ffn.experts.down_proj").detach())
torch.save(
    {
        "biases": biases,
        "head": head,
        "experts": experts,
        "sharded": fsdp.is_sharded(model),
        "optimizer": type(trainer.train_step.optimizer).__name__,
    },
    args.out / f"rank{distributed.rank()}.pt",
)
