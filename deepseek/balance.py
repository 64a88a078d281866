"""Expert-load statistics (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", §4.1)."""

from __future__ import annotations

from typing import TypedDict

import torch


class LayerBalance(TypedDict):
    """One MoE layer's expert load."""

    counts: list[float]  # tokens routed to each expert
    load_fractions: list[float]  # each expert's share of them
    max_vio: float


class BalanceReport(TypedDict):
    """balance_report's statistics, JSON-ready."""

    max_vio_global: float  # the mean of the layers' MaxVio
    layers: list[LayerBalance]


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    """Share of routed tokens per expert; counts is (..., num_experts)."""
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load, over the last dim. 0 is perfectly balanced."""
    mean = counts.float().mean(dim=-1)
    return (counts.float().amax(dim=-1) - mean) / mean.clamp_min(1e-9)


def balance_report(counts: torch.Tensor) -> BalanceReport:
    """Per-layer counts (num_moe_layers, num_experts) -> JSON-ready statistics.

    The global MaxVio is the mean over layers of each layer's MaxVio on these counts; computed on the
    whole validation set, it is the paper's MaxVio_global.
    """
    per_layer = max_violation(counts)
    return {
        "max_vio_global": per_layer.mean().item() if len(per_layer) else 0.0,
        "layers": [
            {"counts": c.tolist(), "load_fractions": f.tolist(), "max_vio": v.item()}
            for c, f, v in zip(counts, load_fractions(counts), per_layer, strict=True)
        ],
    }
