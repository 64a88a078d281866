"""The documentation works as written: every shell command and Python snippet in the README, docs/ and
benchmarks/README.md runs here, in a tiny copy of the project, so a documented command cannot break silently.

Commands CI runs itself are not run again here: the README's install and test commands, which must appear
verbatim in .ci/run, and any other documented command that is a line of .ci/run (the lint line); nor are
docs/ci.md's regression-gate commands, which tests/test_regression.py runs and whose tables it checks, or the
study commands of docs/studies/README.md, which tests/test_study.py runs on a study of its own; nor is a
benchmark measurement that another page shows too (with or without `--json PATH`), or that tests/test_benchmarks.py
makes itself with the same arguments (tests/documented.py). Commands that train run with
tiny settings: the tiny repository's params, plus the adjustments of DocRunner.tiny, each named with its reason.
A benchmark's printed tables are checked, and `dvc exp show`'s columns.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM

from documented import (
    MEASURED_BY_TEST_BENCHMARKS,
    Command,
    fenced_blocks,
    gate_commands,
    python_snippets,
    shell_commands,
    study_commands,
    tiny_benchmark,
)
from pipeline_utils import (
    ROOT,
    free_port,
    markdown_tables,
    pipeline_env,
    run_captured,
)
from reader_project import workspace

README = ROOT / "README.md"
# In the order a reader meets them: the README first, then the pages.
DOC_FILES = [
    README,
    *(
        ROOT / "docs" / name
        for name in ("pipeline.md", "tracking.md", "ci.md", "model.md", "operations.md", "benchmarks.md")
    ),
    ROOT / "docs" / "studies" / "README.md",
    ROOT / "benchmarks" / "README.md",
    ROOT / "docs" / "environment.md",
    ROOT / "docs" / "results.md",
    ROOT / "docs" / "team.md",  # last: it applies an experiment to the workspace
]
RESULTS_LOG = ROOT / "docs" / "results.md"
# What marks history in a reference page: it belongs in the results log.
HISTORY = re.compile(
    r"\bmissed\b|\b(defaults|machine) of the time\b|\bissue \d+|\bbefore this work\b|\bwas lent\b", re.IGNORECASE
)


def quickstart() -> tuple[str, str]:
    """The README's install and test commands: the lines its quickstart marks # install and # the tests."""
    lines = [command.text for command in shell_commands(README)]
    install = next(line for line in lines if line.endswith("# install"))
    test = next(line for line in lines if "# the tests" in line)
    return install, test


CI_LINES = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
# What CI runs itself, verbatim: the README's install and test commands, which must be in .ci/run, and any other
# documented command that is a line of .ci/run (the lint line of docs/ci.md): running them here again would only
# repeat CI's own run of them, in the same tree.
RUN_BY_CI = {re.sub(r"\s+#\s.*$", "", line) for line in quickstart()} | {
    command.code for path in DOC_FILES for command in shell_commands(path) if command.code in CI_LINES
}
# Run by a test of its own, which checks what they print or leave: the gate's commands (tests/test_regression.py)
# and the study commands (tests/test_study.py, on a study of its own).
RUN_BY_TESTS = {*gate_commands(ROOT / "docs" / "ci.md"), *study_commands(ROOT / "docs" / "studies" / "README.md")}


# --- fast checks ------------------------------------------------------------------------------------------------


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    assert len(RUN_BY_CI) >= 3  # install, tests, lint
    for command in RUN_BY_CI:
        assert command in CI_LINES, f".ci/run does not run the documented command verbatim: {command}"
    assert shutil.which("deepseek"), "the install puts the deepseek command on PATH"


def test_shell_snippets_are_fenced_as_bash():
    """The runner below finds shell commands by their fence; another language tag would hide them from it."""
    for path in DOC_FILES:
        languages = {language for language, _ in fenced_blocks(path)}
        assert languages <= {"bash", "python", "text"}, f"{path.name}: fence languages {languages}"


def test_history_lives_only_in_the_results_log():
    """Reference pages say what holds now; targets missed, earlier defaults and what was tried are dated entries of
    docs/results.md, which every page that measures something can link to."""
    for path in DOC_FILES:
        if path != RESULTS_LOG:
            lines = [line for line in path.read_text().splitlines() if "results.md" not in line]
            assert not [line for line in lines if HISTORY.search(line)], f"{path.name}: history outside the results log"
    dates = re.findall(r"^## (\d{4}-\d\d-\d\d)", RESULTS_LOG.read_text(), re.MULTILINE)
    assert len(dates) >= 3 and dates == sorted(dates, reverse=True), "results log entries, newest first"


def test_readme_stays_a_front_door():
    assert len(README.read_text().splitlines()) <= 150


def test_every_test_named_in_the_bad_input_table_exists():
    table = (ROOT / "docs" / "operations.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", table))
    assert len(named) >= 15
    for module, test in named:
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / module).read_text(), re.MULTILINE), f"{module}::{test}"


def test_preset_table_gives_the_counts_of_the_model_built():
    """docs/model.md's parameter counts, per preset, vocabulary and multi-token prediction depth, equal
    DeepSeekLM.parameter_counts()."""
    rows = re.findall(
        r"^\| `(\w+)`(?: \+ `mtp_depth: (\d+)`)?[^|]*\| ([\d,]+)[^|]*\|(.*)\|$",
        (ROOT / "docs" / "model.md").read_text(),
        re.MULTILINE,
    )
    assert [(preset, depth) for preset, depth, _, _ in rows] == [("tiny", ""), ("cpu", ""), ("cpu", "1"), ("seed", "")]
    for preset, depth, vocab, cells in rows:
        config = ModelConfig.from_preset(preset, vocab_size=int(vocab.replace(",", "")), mtp_depth=int(depth or 0))
        with torch.device("meta"):
            model = DeepSeekLM(config)
        counts = model.parameter_counts()
        written = [cell.strip().strip("*") for cell in cells.split("|")]
        keys = ("total", "active", "total_non_embedding", "active_non_embedding")
        for cell, key in zip(written, keys, strict=True):
            match = re.fullmatch(r"([\d.]+)([KM])", cell)
            assert match, (preset, key, cell)
            number, unit = match.groups()
            decimals = len(number.partition(".")[2])
            assert f"{counts[key] / {'K': 1e3, 'M': 1e6}[unit]:.{decimals}f}" == number, (preset, key, cell)


# --- running them -----------------------------------------------------------------------------------------------


class DocRunner:
    """Runs documented commands in a tiny pipeline repository, as a reader would, one after another."""

    def __init__(self, repo: Path, home: Path, tokenizer_dir: Path) -> None:
        self.repo, self.tokenizer_dir = repo, tokenizer_dir
        # HOME is a scratch folder: a documented `git config --global` must not touch the real one.
        self.env = {**pipeline_env(), "HOME": str(home), "COLUMNS": "120", "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.served: set[str] = set()  # server commands seen answering: another page showing one is not rerun
        # Benchmark commands run, less --json (they read no state the docs change), and those test_benchmarks runs.
        self.measured: set[str] = set(MEASURED_BY_TEST_BENCHMARKS)

    def tiny(self, code: str) -> str:
        """The command with the tiny settings that keep it to seconds."""
        # A documented run length is minutes of training: two steps show that the command runs.
        code = re.sub(r"train\.max_steps=\d+", "train.max_steps=2", code)
        if code.startswith("dvc exp run -n seed"):
            # The original configuration: the hub's tokenizer is a local stand-in; one narrow layer of the preset.
            code += f" -S tokenizer.pretrained={self.tokenizer_dir} -S model.num_layers=1 -S model.hidden_size=64"
        if code == "dvc queue start":  # two workers: a tiny experiment is mostly start-up, which two cores overlap
            code += " -j 2"
        if code.startswith("deepseek generate"):  # the tiny model's context is 64 tokens
            code = re.sub(r"--max-new-tokens \d+", "--max-new-tokens 40", code)
        if re.match(r"python -m benchmarks\.", code):
            code = tiny_benchmark(code)
        return code

    def run(self, command: Command) -> None:
        code = self.tiny(command.code)
        if code.startswith(("mlflow ui", "mlflow server")):
            if code not in self.served:
                self.serve(code)
                self.served.add(code)
            return
        benchmark = re.match(r"python -m benchmarks\.", code)
        if benchmark:  # the same measurement shown on two pages (with --json PATH on one of them) runs once
            measurement = re.sub(r" --json \S+", "", code)
            if measurement in self.measured:
                return
            self.measured.add(measurement)
        result = run_captured(["bash", "-c", code], self.repo, self.env)
        output = result.stdout + result.stderr
        if "see it fail" in command.text:
            assert result.returncode != 0, f"{command.doc.name}: expected to fail: {code}\n{output}"
            assert "Traceback" not in output
        else:
            assert result.returncode == 0, f"{command.doc.name}: {code}\n{output[-4000:]}"
        if code.startswith("dvc queue start"):
            self.wait_for_queue()
        if code.startswith("dvc exp show"):
            check_exp_show(result.stdout)
        if benchmark:
            check_tables(code, result.stdout)

    def serve(self, code: str) -> None:
        """A server command runs until it answers on its port, then stops."""
        port = free_port()
        code = re.sub(r"--port \d+", f"--port {port}", code)
        server = subprocess.Popen(
            ["bash", "-c", f"exec {code}"],
            cwd=self.repo,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, f"{code} exited with {server.returncode}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                        assert response.status == 200
                        return
                except OSError:
                    assert time.monotonic() < deadline, f"{code} did not answer in 120 s"
                    time.sleep(1)
        finally:
            subprocess.run(["pkill", "-TERM", "-s", str(server.pid)], check=False)
            server.wait(timeout=30)

    def wait_for_queue(self) -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = subprocess.run(
                ["dvc", "queue", "status"], cwd=self.repo, env=self.env, capture_output=True, text=True
            ).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                assert "Failed" not in status, status
                return
            time.sleep(3)
        raise AssertionError("the queue did not finish in 15 minutes")

    def run_python(self, path: Path) -> None:
        """A page's Python snippets, in order, in one interpreter, as a reader pasting them would."""
        code = "\n".join(python_snippets(path))
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{path.name}'s Python:\n{result.stderr[-4000:]}"


def check_tables(code: str, output: str) -> None:
    """A benchmark prints its measurements as Markdown tables, every row as wide as its header, none of them
    empty or not a number."""
    tables = markdown_tables(output)
    assert tables, f"{code} printed no table:\n{output[-2000:]}"
    for header, *rows in tables:
        assert rows, f"{code}: a table without rows: {header}"
        for row in rows:
            assert len(row) == len(header), f"{code}: a row of another width than {header}: {row}"
            assert all(cell not in ("", "nan") for cell in row), f"{code}: an empty cell in {row}"


def check_exp_show(output: str) -> None:
    """The documented `dvc exp show` fits 120 columns, hides no column, and shows bits per character."""
    lines = output.splitlines()
    assert lines and max(len(line) for line in lines) <= 120, output
    assert "…" not in lines[1], f"columns left out:\n{output}"
    assert "val.bits_per_character" in lines[1] and "val.max_vio" in lines[1], output


# The pages run in groups, each group in its own clone, so that test workers run them side by side. A group's pages
# run one after another in one clone, as a reader reads them: the README's server is also tracking.md's, and a
# benchmark that two pages show runs once. Every group but the README's starts where its quickstart ends.
PAGE_GROUPS = {
    "quickstart": ("README.md", "docs/tracking.md"),
    "pipeline": ("docs/pipeline.md",),
    "ci": ("docs/ci.md", "docs/operations.md", "docs/results.md"),
    "benchmarks": ("docs/model.md", "docs/benchmarks.md", "benchmarks/README.md"),
    "studies": ("docs/studies/README.md", "docs/environment.md"),
    "team": ("docs/team.md",),  # it applies an experiment to its workspace
}


def test_the_page_groups_hold_every_page_once():
    grouped = [ROOT / page for pages in PAGE_GROUPS.values() for page in pages]
    assert sorted(grouped) == sorted(DOC_FILES)


@pytest.mark.slow
@pytest.mark.parametrize("group", PAGE_GROUPS)
def test_every_documented_command_runs(group, reader_project, tmp_path):
    repo = workspace(reader_project, tmp_path / "clone", after_quickstart=group != "quickstart")
    (tmp_path / "home").mkdir()
    runner = DocRunner(repo, tmp_path / "home", reader_project.tokenizer_dir)
    seconds: list[tuple[float, str]] = []  # each command's, with its page, in the order run
    for path in (ROOT / page for page in PAGE_GROUPS[group]):
        for command in shell_commands(path):
            if command.code not in RUN_BY_CI | RUN_BY_TESTS:
                start = time.monotonic()
                runner.run(command)
                seconds.append((time.monotonic() - start, f"{path.name}: {command.code}"))
        if python_snippets(path):
            start = time.monotonic()
            runner.run_python(path)
            seconds.append((time.monotonic() - start, f"{path.name}: its Python"))
    assert seconds, f"no command ran for {group}"
    # Where this test's time goes, the slowest first (`pytest -rP` shows it): the place to look when it grows.
    for took, name in sorted(seconds, reverse=True)[:10]:
        print(f"{took:6.1f} s  {name}")


def test_the_runner_sees_every_command_of_the_readme():
    codes = [command.code for command in shell_commands(README)]
    assert "dvc repro" in codes and any(code.startswith("dvc exp run --queue") for code in codes)
    assert all(shlex.split(code) for code in codes)  # each parses as a shell command
