"""The evaluate stage's figures, drawn from the train stage's loss logs as they are written to disk."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from deepseek.trainer import History
from stages import figures
from stages.evaluate import _read_csv


@pytest.fixture
def drawn(monkeypatch):
    """The figures each function drew, kept open for inspection instead of saved."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    yield kept
    for fig in kept:
        plt.close(fig)


def test_loss_curves_plot_steps_as_numbers_on_an_integer_axis(tmp_path, drawn):
    history = History(
        train=[{"step": s, "loss": 5 - s / 100, "accuracy": 0.1} for s in range(10, 610, 10)],
        val=[{"step": s, "val_loss_sampled": 5 - s / 120} for s in range(100, 700, 100)],
    )
    history.write(tmp_path)  # the CSV files evaluate reads back
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


def test_expert_load_is_centred_on_the_uniform_share(tmp_path, drawn):
    fractions = np.array([[0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    figures.expert_load(fractions, ["layer 1", "MTP 1"], tmp_path / "load.png")
    (image,) = drawn[0].axes[0].get_images()
    assert [label.get_text() for label in drawn[0].axes[0].get_yticklabels()] == ["layer 1", "MTP 1"]
    low, high = image.get_clim()
    assert low + high == pytest.approx(2 * 25.0)  # symmetric about 25%, in percent
    assert high == pytest.approx(40.0)
    texts = [text.get_text() for text in drawn[0].axes[0].texts]
    assert texts[:4] == ["40.0", "20.0", "20.0", "20.0"]
