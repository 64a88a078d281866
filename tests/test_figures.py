"""The evaluate stage's figures, drawn from the train stage's loss logs as they are written to disk."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from deepseek.train_metrics import History
from stages import figures
from stages.evaluate import _read_csv


@pytest.fixture
def drawn(monkeypatch):
    """The figures each function drew, kept open for inspection instead of saved."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        return path

    monkeypatch.setattr(figures, "_save", keep)
    yield kept
    for fig in kept:
        plt.close(fig)


def test_loss_curves_plot_steps_as_numbers_on_an_integer_axis(tmp_path, drawn):
    history = History(
        train=[{"step": s, "loss": 5 - s / 100, "accuracy": 0.1} for s in range(10, 610, 10)],
        val=[{"step": s, "val_loss_sampled": 5 - s / 120} for s in range(100, 700, 100)],
    )
    history.write(tmp_path / "train_log.csv", tmp_path / "val_log.csv")  # the CSV files evaluate reads back
    figures.loss_curves(
        _read_csv(tmp_path / "train_log.csv"), _read_csv(tmp_path / "val_log.csv"), 3.4, tmp_path / "loss.png"
    )
    (ax,) = drawn[0].axes
    ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
    # Steps read as strings would be categories: one tick per logged step, 60 overlapping labels.
    assert 3 <= len(ticks) <= 12
    assert all(float(tick).is_integer() for tick in ticks)
    assert ax.get_xlim()[1] >= 600
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["train (logging window)", "validation, sampled batches", "validation, whole split (evaluate)"]
    np.testing.assert_allclose(ax.get_lines()[2].get_xydata(), [[600, 3.4]])


@pytest.mark.parametrize("skew", [0.0, 0.15, 0.7])
def test_expert_load_has_one_scale_from_zero_centred_on_the_uniform_share(tmp_path, drawn, skew):
    """Whatever the loads, the colour scale runs from 0% through the uniform share (white) to twice it: two runs'
    figures compare by colour, and the colour bar never shows a negative share."""
    fractions = np.array([[0.25 + skew, 0.25, 0.25, 0.25 - skew], [0.25, 0.25, 0.25, 0.25]])
    figures.expert_load(fractions, ["layer 1", "MTP 1"], tmp_path / "load.png")
    (image,) = drawn[0].axes[0].get_images()
    assert [label.get_text() for label in drawn[0].axes[0].get_yticklabels()] == ["layer 1", "MTP 1"]
    assert image.get_clim() == (0.0, 50.0)  # in percent
    assert image.norm(25.0) == pytest.approx(0.5)  # the uniform share at the middle of the colour map
    colorbar = drawn[0].axes[1]
    assert min(colorbar.get_ylim()) >= 0 and all(tick >= 0 for tick in colorbar.get_yticks())
    texts = [text.get_text() for text in drawn[0].axes[0].texts]
    assert texts[:4] == [f"{100 * share:.1f}" for share in fractions[0]]


def test_study_metrics_show_runs_and_means_on_plain_ticks_without_bars(tmp_path, drawn):
    """Two cells 0.00005 apart: the ticks read as plain values (no "1e-5 + 3.683" offset), no bar suggests a
    length from zero, and the axis says it is zoomed."""
    values = {"a": {"loss": [3.68301, 3.68305]}, "b": {"loss": [3.68306, 3.68310]}}
    figures.study_metrics(["a", "b"], {"loss": "loss"}, values, tmp_path / "metrics.png")
    (ax,) = drawn[0].axes
    drawn[0].canvas.draw()
    assert ax.yaxis.get_offset_text().get_text() == ""
    ticks = [float(label.get_text()) for label in ax.get_yticklabels() if label.get_text()]
    assert ticks and all(3.6829 <= tick <= 3.6832 for tick in ticks)  # each tick a value in full
    assert not ax.patches  # no bars
    means = [
        line.get_ydata()[0] for line in ax.get_lines() if len(line.get_xdata()) == 2 and line.get_linestyle() == "-"
    ]
    assert means == pytest.approx([3.68303, 3.68308])
    assert "not from 0" in ax.get_ylabel()


def test_study_metrics_near_zero_start_at_zero_and_say_so(tmp_path, drawn):
    """Non-negative values whose zoomed axis would reach 0 anyway (MaxVio of well balanced runs) start at 0, and
    the label no longer calls the axis zoomed; a negative value keeps the zoom."""
    values = {"a": {"max_vio": [0.15, 0.2]}, "b": {"max_vio": [0.9, 1.2]}, "c": {"max_vio": [-0.1, 0.3]}}
    figures.study_metrics(["a", "b"], {"max_vio": "MaxVio"}, values, tmp_path / "one.png")
    figures.study_metrics(["c"], {"max_vio": "MaxVio"}, values, tmp_path / "two.png")
    (near_zero,), (negative,) = drawn[0].axes, drawn[1].axes
    assert near_zero.get_ylim()[0] == 0.0 and near_zero.get_ylabel() == "from 0"
    assert negative.get_ylim()[0] < -0.1 and "not from 0" in negative.get_ylabel()


def test_study_curves_keep_every_runs_late_values_on_the_axis(tmp_path, drawn):
    """The axis zooms past the steep first fifth, but never cuts off a run's later points, and says when early
    points fall off it."""
    steep = [(step, 10.0 / step) for step in range(1, 21)]  # falls from 10 to 0.5
    outlier = [(step, 1.0 + (0.8 if step == 15 else 0.0)) for step in range(1, 21)]  # one late high point
    figures.study_curves("loss", {"a": [steep, outlier], "b": [steep]}, tmp_path / "loss.png")
    (ax,) = drawn[0].axes
    low, high = ax.get_ylim()
    late = [value for points in (steep, outlier) for _, value in points[4:]]
    assert low <= min(late) and max(late) <= high
    assert high < 10.0 and ax.get_ylabel() == "loss (early steps off the axis)"


def test_compared_losses_show_both_runs_even_where_they_coincide(tmp_path, drawn):
    points = [(10, 6.0), (20, 4.0)]
    figures.compared_losses({"HEAD": points, "workspace": points}, tmp_path / "loss.png")
    (ax,) = drawn[0].axes
    under, over = ax.get_lines()
    assert [under.get_label(), over.get_label()] == ["HEAD", "workspace"]
    assert under.get_linewidth() > 2 * over.get_linewidth()  # the first, wide beneath, shows around the second
    np.testing.assert_allclose(under.get_xydata(), points)
