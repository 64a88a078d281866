"""The MLflow UI, in a headless browser, compares two of the pipeline's runs side by side.

Needs Debian's Chromium (`apt-get install -y chromium`) and Playwright's Python package (`pip install playwright`);
Playwright's own browser download (`playwright install`) is not used. MLFLOW_UI_SCREENSHOT=path keeps a copy of
the screenshot of the comparison.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from mlflow_server import MlflowServer, mlflow_server

RUNS = {  # run name -> (train.lr, loss by step, val.bits_per_character)
    "lr-high": (3e-3, [3.0, 2.5, 2.1], 1.05),
    "lr-low": (1e-3, [3.1, 2.8, 2.6], 1.30),
}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
]
TIMEOUT_MS = 60_000  # for any one element to show up; two busy cores render the UI slowly


def browser_tools():
    """Playwright's sync API and a Chromium-based browser, or a failure that says how to install them."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    try:
        sync_api = importlib.import_module("playwright.sync_api")
    except ImportError:
        sync_api = None
    missing = (
        [] if sync_api else ["Playwright's Python package: pip install playwright (no `playwright install`)"]
    ) + ([] if chromium else ["Chromium: apt-get install -y chromium (Debian; gives /usr/bin/chromium)"])
    if missing:
        pytest.fail("the MLflow UI test needs " + " and ".join(missing), pytrace=False)
    return sync_api, chromium


def create_runs(store_dir: Path, monkeypatch) -> None:
    """Two runs of the pipeline's experiment, through the pipeline's own tracking code, in a SQLite store."""
    import mlflow

    from stages.tracking import Run

    store_dir.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(store_dir))  # tracking's lock file and artifact root go there, not the repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir / 'mlflow.db'}")
    try:
        for name, (lr, losses, bits) in RUNS.items():
            monkeypatch.setenv("DVC_EXP_NAME", name)
            # What the train stage logs, in its order: params, tags, the dataset, then metrics step by step.
            run = Run.start(
                params={"model": {"preset": "tiny"}, "train": {"lr": lr, "max_steps": len(losses)}},
                tags={"dvc_exp_name": name, "model.parameters.total": "23968"},
            )
            assert run.active, "tracking into a SQLite store failed"
            run.log_dataset(
                {"source": "shakespeare", "sha256": "94d71b2e6a4c", "characters": 30_000}, source="data/input-1.txt"
            )
            for step, loss in enumerate(losses, 1):
                run.log_metrics({"loss": loss, "accuracy": 0.1 * step}, step=step)
            run.log_metrics({"val.bits_per_character": bits}, step=len(losses))
            run.finish()
    finally:
        # Run.start set mlflow's process-wide URI; leave none behind (mlflow takes None though it says str | Path)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_mlflow_ui_compares_two_runs(tmp_path, monkeypatch):
    sync_api, chromium = browser_tools()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    store_dir = tmp_path / "server"
    create_runs(store_dir, monkeypatch)
    screenshot = tmp_path / "mlflow_compare.png"

    server: MlflowServer
    with mlflow_server(store_dir) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            # Only the server answers: the UI's telemetry, fonts or anything else remote is cut off.
            context.route(
                "**/*", lambda route: route.continue_() if route.request.url.startswith(server.url) else route.abort()
            )
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect = sync_api.expect
            expect.set_options(timeout=TIMEOUT_MS)

            # Home -> "Model training" -> the experiment (docs/tracking.md): the runs table lists both runs and
            # the dataset each trained on.
            page.goto(f"{server.url}/")
            page.get_by_text("Model training", exact=True).click()
            page.get_by_role("link", name="deepseek-repro", exact=True).first.click()
            for name in RUNS:
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
            expect(page.get_by_text(f"{len(RUNS)} matching runs")).to_be_visible()
            expect(page.get_by_text("shakespeare (94d71b2e6a4c)").first).to_be_visible()

            # Tick both rows and press Compare.
            for name in RUNS:
                row = page.locator(".ag-row", has=page.get_by_role("link", name=name, exact=True))
                row.get_by_role("checkbox", name=re.compile("row selection")).check()
            page.get_by_role("button", name="Compare", exact=True).click()

            expect(page.get_by_text(f"Comparing {len(RUNS)} Runs from 1 Experiment")).to_be_visible()
            assert "compare-runs" in page.url
            names = page.locator("tr", has=page.locator("th", has_text=re.compile(r"^Run Name:?$")))
            for name in RUNS:
                expect(names).to_contain_text(name)
            lr_row = page.locator("tr", has=page.locator("th", has_text=re.compile(r"^train\.lr$")))
            expect(lr_row).to_contain_text("0.003")
            expect(lr_row).to_contain_text("0.001")
            expect(page.get_by_role("link", name="val.bits_per_character")).to_be_visible()

            # The screenshot: without the assistant panel, tall enough for the plot, run names and parameters.
            close_assistant = page.get_by_role("button", name="Close", exact=True)
            if close_assistant.count():
                close_assistant.first.click()
            page.set_viewport_size({"width": 1400, "height": 1700})
            # The parallel-coordinates plot starts with the params that differ and the first metric the runs
            # logged: the training loss, not a constant fact of the data or the model.
            axes = page.locator(".js-plotly-plot .parcoords .axis-title")
            expect(axes.first).to_be_visible()
            assert axes.evaluate_all("titles => titles.map(t => t.textContent)") == ["train.lr", "loss"]
            lr_row.scroll_into_view_if_needed()
            expect(lr_row).to_be_in_viewport()
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()

    width, height = png_size(screenshot)
    assert (width, height) == (1400, 1700) and screenshot.stat().st_size > 20_000
    if os.environ.get("MLFLOW_UI_SCREENSHOT"):
        copy = Path(os.environ["MLFLOW_UI_SCREENSHOT"])
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, copy)
