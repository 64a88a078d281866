"""The default run's numbers that README.md and docs/pipeline.md state are the committed run's: the metrics and
training summary that `dvc repro` left in reports/ (dvc.lock records that run)."""

from __future__ import annotations

import json
import re

from pipeline_utils import ROOT

METRICS = json.loads((ROOT / "reports" / "metrics.json").read_text())["val"]
SUMMARY = json.loads((ROOT / "reports" / "train_summary.json").read_text())


def table_value(page: str, label: str) -> str:
    """The value cell of the row labelled `label` in a two-column markdown table, without bold marks."""
    rows = re.findall(rf"^\| \**{re.escape(label)}\** \| \**([^|*]+?)\**\s*\|$", page, flags=re.MULTILINE)
    assert len(rows) == 1, f"one table row {label!r} expected, found {len(rows)}"
    return rows[0]


def test_pipeline_page_states_the_committed_default_run():
    page = (ROOT / "docs" / "pipeline.md").read_text()
    assert table_value(page, "validation bits per character") == f"{METRICS['bits_per_character']:.3f}"
    assert table_value(page, "global MaxVio (validation)") == f"{METRICS['max_vio']:.3f}"
    assert table_value(page, "validation token accuracy") == f"{METRICS['accuracy']:.3f}"
    assert table_value(page, "training tokens/s") == f"{SUMMARY['tokens_per_s']:,.0f}"


def test_readme_states_the_committed_default_run():
    claims = re.findall(
        r"(\d\.\d{3})\s+bits\s+per\s+character\s+and\s+a\s+global\s+MaxVio\s+of\s+(\d\.\d{3})",
        (ROOT / "README.md").read_text(),
    )
    assert claims == [(f"{METRICS['bits_per_character']:.3f}", f"{METRICS['max_vio']:.3f}")]
