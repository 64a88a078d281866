"""Whether a metric moved the wrong way by more than its tolerance: the rule of the CI regression gate (against
its baseline) and of `deepseek report` (against another run). The tolerances live in .ci/tolerances.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOLERANCES = Path(".ci/tolerances.yaml")


@dataclass
class Row:
    metric: str
    baseline: str
    now: str
    tolerance: str
    ok: bool


def compare(baseline: dict[str, float], now: dict[str, float], tolerances: dict[str, Any]) -> list[Row]:
    """A row for each metric of tolerances that has a `direction` (lower or higher is better) and an `abs` or
    `rel` allowance in the worse direction; metrics missing on either side are left out."""
    rows = []
    for metric, rule in tolerances.items():
        if "direction" not in rule or metric not in baseline or metric not in now:
            continue
        old, new = baseline[metric], now[metric]
        lower = rule["direction"] == "lower"
        allowed = rule.get("abs", 0.0) + rule.get("rel", 0.0) * abs(old)
        worse_by = new - old if lower else old - new
        limit = old + allowed if lower else old - allowed
        tolerance = (
            f"{'<=' if lower else '>='} {limit:.4f} ({'+' if lower else '-'}"
            + (f"{rule['abs']}" if "abs" in rule else f"{rule['rel']:.0%}")
            + ")"
        )
        rows.append(Row(metric, f"{old:.4f}", f"{new:.4f}", tolerance, worse_by <= allowed + 1e-12))
    return rows


def render(rows: list[Row], baseline: str = "baseline", now: str = "now") -> str:
    """The rows as a Markdown table, with a PASS or FAIL verdict each."""
    lines = [f"| metric | {baseline} | {now} | tolerance | verdict |", "| --- | ---: | ---: | --- | --- |"]
    lines += [f"| {r.metric} | {r.baseline} | {r.now} | {r.tolerance} | {'PASS' if r.ok else 'FAIL'} |" for r in rows]
    return "\n".join(lines)
