"""requirements.lock: every dependency but torch pinned with hashes, made from pyproject.toml's current ranges
(CI's lock check fails otherwise, naming the refresh command), and installed by the README's command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import lock

from pipeline_utils import ROOT


def lock_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "lock.py"), "check", "--root", str(root)], capture_output=True, text=True
    )


def test_the_committed_lock_matches_pyproject():
    result = lock_check(ROOT)
    assert result.returncode == 0, result.stderr


def test_a_changed_dependency_range_fails_the_check_with_the_refresh_command(tmp_path):
    for name in ("pyproject.toml", lock.LOCK):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"mlflow>=3.0"', '"mlflow>=3.1"'))
    assert pyproject.read_text() != text
    result = lock_check(tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"Error: {lock.LOCK} is stale: pyproject.toml's dependencies changed since it was made; run "
        f"`python .ci/lock.py refresh` and commit it"
    ]
    # A setting that is no dependency needs no new lock.
    pyproject.write_text(text.replace("line-length = 120", "line-length = 100"))
    assert lock_check(tmp_path).returncode == 0


def test_every_pin_has_hashes_and_torch_is_left_to_the_install_command():
    text = (ROOT / lock.LOCK).read_text()
    pins = re.findall(r"^([a-z0-9._-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(pins) == len(requirement_lines) > 100
    names = {name for name, _, _ in pins}
    assert {"transformers", "mlflow", "dvc", "pytest", "pip-tools"} <= names and "torch" not in names
    readme = (ROOT / "README.md").read_text()
    assert (
        f'pip install "{lock.TORCH}" "{lock.UV}" && uv pip install --compile-bytecode --require-hashes -r {lock.LOCK} '
        "&& uv pip install --no-deps -e ." in readme
    )
