"""PNG figures people would rather look at than read: loss curves and expert load."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deepseek.files import atomic_file


def _save(fig: Figure, path: Path) -> Path:
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def loss_curves(
    train_rows: list[dict[str, float]], val_rows: list[dict[str, float]], final_val_loss: float, path: Path
) -> Path:
    """Training loss, the sampled validation loss of training, and the whole-split one of evaluate, by step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train (logging window)")
    depths = sorted(key for key in (train_rows[0] if train_rows else {}) if key.startswith("mtp_loss_"))
    for key in depths:  # multi-token prediction: depth k predicts the token k + 1 places on
        depth = key.removeprefix("mtp_loss_")
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], "--", label=f"train, MTP depth {depth}")
    ax.plot(
        [r["step"] for r in val_rows],
        [r["val_loss_sampled"] for r in val_rows],
        "o-",
        label="validation, sampled batches",
    )
    last_step = max((r["step"] for r in train_rows + val_rows), default=0)
    ax.plot([last_step], [final_val_loss], "*", markersize=12, label="validation, whole split (evaluate)")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def compared_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """The training loss of two or more runs by step, one line each, named by the run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (name, points) in enumerate(curves.items()):
        # The first wide and pale beneath the others: curves that coincide still both show.
        width, alpha = (4.0, 0.4) if index == 0 else (1.3, 1.0)
        ax.plot([step for step, _ in points], [loss for _, loss in points], label=name, linewidth=width, alpha=alpha)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Training loss (logging window)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def expert_load(fractions: np.ndarray, layer_names: list[str], path: Path) -> Path:
    """Each MoE layer's share of routed tokens per expert, in percent, as a heatmap centred on the uniform share;
    one row per layer, labelled by layer_names.

    The colour scale is fixed, from 0% (blue) through the uniform share (white) to twice it (red; more is drawn
    as twice), so figures of two runs, such as `dvc plots diff` shows side by side, share one scale; each cell is
    labelled with its percentage.
    """
    layers, experts = fractions.shape
    percent, uniform = 100 * fractions, 100 / experts
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=2 * uniform)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.6 * experts), 1.5 + 0.45 * layers))
    image = ax.imshow(percent, cmap="RdBu_r", norm=norm, aspect="auto")
    for (layer, expert), share in np.ndenumerate(percent):
        dark = abs(share - uniform) > 0.6 * uniform
        ax.text(expert, layer, f"{share:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set(
        xlabel="expert",
        ylabel="MoE layer",
        title=f"Expert load (uniform = {uniform:.1f}%)",
        xticks=range(experts),
        yticks=range(layers),
        yticklabels=layer_names,
    )
    fig.colorbar(image, ax=ax, label="% of routed tokens", extend="max")
    return _save(fig, path)


def study_metrics(
    cells: Iterable[str], metrics: dict[str, str], values: dict[str, dict[str, list[float]]], path: Path
) -> Path:
    """A panel per metric (headed by metrics' headings): each run's value as a dot, each cell's mean as a dash.

    No bars: the axis is zoomed on the runs, which bars (whose length reads from zero) would misstate; the axis
    label says whether it starts at 0, and the ticks are plain values, never an offset such as "1e-5 + 3.683"."""
    cells = list(cells)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 0.9 * len(cells)) * len(metrics), 3.6), squeeze=False)
    for ax, (metric, heading) in zip(axes[0], metrics.items(), strict=True):
        runs = [values[cell][metric] for cell in cells]
        for x, points in enumerate(runs):
            ax.plot([x] * len(points), points, "o", color="tab:blue", markersize=4)
            if points:
                ax.plot([x - 0.3, x + 0.3], [float(np.mean(points))] * 2, color="tab:blue", linewidth=2)
        finite = [v for points in runs for v in points]
        zoomed = True
        if finite:
            low, high = min(finite), max(finite)
            margin = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
            # Values at least 0 whose margin would reach 0 anyway: start at 0, and the axis is no zoom.
            zoomed = low < 0 or low - margin > 0
            ax.set_ylim(low - margin if zoomed else 0.0, high + margin)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xticks(range(len(cells)), cells, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(cells) - 0.4)
        ax.set(title=heading, ylabel="axis zoomed: not from 0" if zoomed else "from 0")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("dots: runs (one per seed); dash: their mean", fontsize=9, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def study_curves(metric: str, histories: dict[str, list[list[tuple[int, float]]]], path: Path) -> Path:
    """metric by step per cell: the mean over the cell's runs, each run's own curve faint behind it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    late: list[float] = []  # every run's values after its first fifth: the axis shows them all
    every: list[float] = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (cell, runs) in enumerate(histories.items()):
        colour = colours[index % len(colours)]
        if not runs:
            continue
        for points in runs:
            ax.plot(*zip(*points, strict=True), color=colour, alpha=0.25, linewidth=0.8)
            values = [value for _, value in points]
            late += values[len(values) // 5 :]
            every += values
        steps = sorted(set.intersection(*(set(step for step, _ in points) for points in runs)))
        means = [float(np.mean([dict(points)[step] for points in runs])) for step in steps]
        ax.plot(steps, means, color=colour, label=f"{cell} (mean of {len(runs)})")
    ylabel = metric
    if late:  # the first fifth of training falls steeply and would flatten the differences that matter
        margin = 0.05 * (max(late) - min(late)) or 0.01
        low, high = min(late) - margin, max(late) + margin
        ax.set_ylim(low, high)
        if any(not low <= value <= high for value in every):
            ylabel = f"{metric} (early steps off the axis)"
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
