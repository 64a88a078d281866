"""Muon for the hidden weight matrices, AdamW for the rest (train.optimizer: muon).

Muon (Jordan et al. 2024) replaces each matrix's momentum by the nearest semi-orthogonal matrix, computed by a
Newton-Schulz iteration, so that every direction of the update moves at the same rate. Moonlight ("Muon is
Scalable for LLM Training", Liu et al. 2025) trained a DeepSeek-V3-style MoE with it; this follows their recipe.
For a weight W (A x B) with gradient G, momentum mu and learning rate lr:

    M <- mu M + (1 - mu) G                          momentum (torch.optim.Muon's form)
    U <- G + mu (M - G)                             Nesterov: the gradient moved towards the momentum
    O <- NS5(U)                                     ~ P Q^T for the SVD U = P S Q^T: every singular value near 1
    W <- (1 - lr wd) W - lr 0.2 sqrt(max(A, B)) O   Moonlight: O's RMS is 1/sqrt(max(A, B)), so the factor gives
                                                    the update AdamW's typical RMS of 0.2, and AdamW's lr, weight
                                                    decay and schedule carry over unchanged

An expert's matrices are stacked in one (experts, A, B) parameter here; each expert's matrix is orthogonalised on
its own, all experts in one batched iteration. Under FSDP2 a parameter is sharded by rows, and Newton-Schulz needs
each matrix whole: every rank gathers the update, orthogonalises it and keeps its own rows (an all-gather per
matrix, and the iteration computed on every rank).

The embedding, the output head and the norms' scales are no hidden matrices: AdamW trains them, as Moonlight does,
and the balancing biases are no parameters at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deepseek import distributed

MOMENTUM = 0.95  # Moonlight's and torch.optim.Muon's
NS_STEPS = 5
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan's Muon, as in torch.optim.Muon
NS_EPS = 1e-7
ADAMW_RMS = 0.2  # Moonlight: the RMS of a typical AdamW update, which Muon's is scaled to


def newton_schulz(matrices: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The orthogonalised (..., A, B) matrices: X <- a X + (b X X^T + c (X X^T)^2) X, computed in dtype from X
    scaled to a spectral norm of at most 1 (by its Frobenius norm). The same iteration as torch.optim.Muon's, for a
    batch of matrices: with a quintic tuned for speed, singular values end between about 0.7 and 1.2, not at 1."""
    a, b, c = NS_COEFFICIENTS
    x = matrices.to(dtype)
    wide = x.size(-2) <= x.size(-1)  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
    x = x if wide else x.mT
    norm: torch.Tensor = x.norm(dim=(-2, -1), keepdim=True)  # typed here: torch leaves Tensor.norm's return unhinted
    x = x / norm.clamp(min=NS_EPS)
    batch = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):
        gram = batch @ batch.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b X X^T + c (X X^T)^2
        batch = torch.baddbmm(batch, polynomial, batch, beta=a)
    x = batch.reshape(x.shape)
    return (x if wide else x.mT).to(matrices.dtype)


def orthogonalised(update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """newton_schulz of update; an FSDP2-sharded update is gathered whole first and comes back sharded alike."""
    if not distributed.is_dtensor(update):
        return newton_schulz(update, dtype=dtype)
    from torch.distributed.tensor import DTensor, Replicate  # imported already, since update is one

    mesh = update.device_mesh
    whole = newton_schulz(update.full_tensor(), dtype=dtype)
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, update.placements)


def update_scale(shape: torch.Size) -> float:
    """Moonlight's 0.2 sqrt(max(A, B)) for matrices of A x B (the last two dimensions: one expert's matrix)."""
    return ADAMW_RMS * math.sqrt(max(shape[-2], shape[-1]))


class MuonWithAdamW(torch.optim.AdamW):
    """One optimizer for the whole model, so the schedule, gradient scaler and checkpoints see one: parameter
    groups with muon=True take Muon's update (the module's docstring), the others torch's fused AdamW.

    ns_dtype: what Newton-Schulz computes in; bf16 where training computes in bf16 (as Muon's authors do), else
    float32."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(groups, lr=lr, betas=betas, fused=True)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            group.setdefault("muon", False)
            if group["muon"]:
                group.setdefault("momentum", MOMENTUM)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        # AdamW's own step over the other groups only: the Muon groups are hidden from it for this call.
        every_group = self.param_groups
        self.param_groups = [group for group in every_group if not group["muon"]]
        try:
            super().step()
        finally:
            self.param_groups = every_group

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                # A step count beside the momentum, as AdamW's state has (AdamW's loading code expects one).
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["momentum_buffer"] = torch.zeros_like(param)
            state["step"] += 1
            buffer = state["momentum_buffer"]
            buffer.lerp_(param.grad, 1 - momentum)
            update = orthogonalised(param.grad.lerp(buffer, momentum), self.ns_dtype)
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update, alpha=-lr * update_scale(param.shape))
