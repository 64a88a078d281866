"""Data-parallel training across processes started by torchrun (gloo on CPU, NCCL on GPU).

Every rank trains on its own slice of each global batch; DistributedDataParallel averages gradients;
the Trainer sums expert loads across ranks before the balancing-bias update (DeepSeekLM.update_expert_bias),
so every rank applies the same update. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In place; returns the tensor for chaining."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here; a no-op for one process."""
    if active():
        dist.barrier()


def all_ranks_agree(ok: torch.Tensor) -> bool:
    """True only if `ok` (a boolean tensor) is true on every rank: one decision for all of them."""
    flag = ok.to(torch.int32)
    if active():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def imported_class(module: str, name: str) -> type | None:
    """A class of module if the module has been imported, else None. torch.distributed's tensor and FSDP modules
    take 1.6 s to import, which a training that does not shard would pay at start-up: code that only asks whether
    something is sharded checks this way, since nothing is an instance of a class never imported."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else None


def is_dtensor(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether tensor is a DTensor: a shard of FSDP2's (deepseek/fsdp.py)."""
    dtensor = imported_class("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(tensor, dtensor)
