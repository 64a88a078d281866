"""Fully sharded data parallel training (FSDP2, train.parallel: fsdp) under torchrun.

Each rank holds 1/N of every weight, gradient and optimizer state. fully_shard wraps each transformer block and
each multi-token prediction module, then the whole model (embedding, final norm, head): a block's weights are
all-gathered just before its forward and its backward and freed after them, so a rank holds its shards plus about
one block whole. Gradients are reduce-scattered, so each rank updates only its shards.

What stays as under DDP: each rank trains on its own slice of every global batch, and buffers are not sharded, so
every rank keeps the balancing biases whole and sums the expert loads across ranks before the bias update.
Every forward is a collective, so every rank runs evaluation and sampling too (rank 0 alone reports them).

Checkpoints keep the single-process layout: the full weights are gathered into rank 0's CPU memory and written as
one model.safetensors, and the optimizer state is gathered the same way, keyed by parameter name
(torch.distributed.checkpoint.state_dict with full_state_dict). Resuming reads those files on every rank and
shards them again. A model too large for one host's CPU memory would need Distributed Checkpoint's sharded files
instead; these models are far from that.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from safetensors.torch import load_file

from deepseek import distributed
from deepseek.model import DeepSeekLM

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.fsdp import FSDPModule

# torch.distributed's FSDP and checkpoint modules are imported by the functions that shard (1.6 s of start-up that
# a training without FSDP would pay otherwise); the checks of whether something is sharded import nothing.


def _gathered_options(on_rank_0_cpu: bool) -> StateDictOptions:
    """Whole tensors; on_rank_0_cpu: gathered into rank 0's CPU memory only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=on_rank_0_cpu)


def shard(model: DeepSeekLM, compute_dtype: torch.dtype | None = None) -> None:
    """Shard model in place across the ranks, block by block and then as a whole. compute_dtype: the dtype the
    gathered weights compute in (bf16 on GPU), with gradients reduced in float32 and weights kept in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for block in [*model.layers, *model.mtp]:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> TypeGuard[FSDPModule]:
    fsdp_module = distributed.imported_class("torch.distributed.fsdp", "FSDPModule")
    return fsdp_module is not None and isinstance(model, fsdp_module)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Off for all but the last micro-batch of a step: gradients accumulate unsharded, then reduce-scatter once."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights a forward without backward left behind: FSDP2 keeps the root module's weights
    whole after its forward, for the backward that evaluation and sampling never run."""
    if is_sharded(model):
        model.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value on every rank (a collective for a DTensor); a plain tensor as it is."""
    return tensor.full_tensor() if distributed.is_dtensor(tensor) else tensor


def gathered(model: DeepSeekLM) -> DeepSeekLM:
    """A plain, unsharded copy of a sharded model on rank 0's CPU (other ranks get the sharded model back).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_gathered_options(on_rank_0_cpu=True))
    if not distributed.is_main():
        return model
    with torch.random.fork_rng(devices=[]):  # building a model draws initial weights: leave training's RNG alone
        plain = DeepSeekLM(model.config)
    plain.load_state_dict(state)
    return plain.train(model.training)


def load_weights(model: DeepSeekLM, weights_file: Path) -> None:
    """Load a model.safetensors that save_model or save_checkpoint wrote into a sharded model: every rank reads
    the whole file and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state: dict[str, Any] = load_file(str(weights_file))
    set_model_state_dict(model, state, options=_gathered_options(on_rank_0_cpu=False))


def optimizer_state(model: DeepSeekLM, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank 0, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_gathered_options(on_rank_0_cpu=True))


def load_optimizer_state(model: DeepSeekLM, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard optimizer_state()'s result, read from the checkpoint on every rank, onto this rank's parameters."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_gathered_options(on_rank_0_cpu=False))
    # set_optimizer_state_dict first gives every parameter a state (one AdamW step with lr 0). A parameter that had
    # none when the checkpoint was written (an expert no token has reached yet) must have none again, or its first
    # update would count one step too many in AdamW's bias correction.
    for name, param in model.named_parameters():
        if name not in state["state"]:
            optimizer.state.pop(param, None)
