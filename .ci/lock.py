"""The lock file: requirements.lock pins every dependency of the project and its dev extras but torch, with
hashes, as pip-tools' pip-compile resolves them (docs/environment.md).

    python .ci/lock.py refresh             # after a change to pyproject.toml's dependencies; --upgrade for newest
    python .ci/lock.py check               # CI: fails when pyproject.toml's dependencies changed since the lock

torch stays out: the README's install command puts the CPU build of TORCH in first (with UV, which installs the
lock), and GPU users their own CUDA build instead, before the lock. The lock is resolved beside TORCH, so it holds
torch's own dependencies.
The lock's first line records the digest of the dependency ranges it was made from; `check` compares it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = "requirements.lock"
TORCH = "torch==2.13.0"  # the CPU build: also in the README's install command (tests/test_lock.py checks)
UV = "uv==0.13.9"  # installs the lock: in seconds where pip takes minutes (docs/environment.md)
REFRESH = "python .ci/lock.py refresh"
DIGEST_LINE = "# made from pyproject.toml's dependencies with sha256 "


def dependency_digest(pyproject: Path) -> str:
    """sha256 of what pyproject.toml says about dependencies (Python, the dependencies, the extras), and of
    nothing else there, so that a change to a tool's settings needs no new lock."""
    project = tomllib.loads(pyproject.read_text())["project"]
    ranges = {key: project.get(key) for key in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(ranges, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    """The digest the lock's first line records, or None for a lock without one."""
    first = lock.read_text().partition("\n")[0] if lock.is_file() else ""
    return first.removeprefix(DIGEST_LINE) if first.startswith(DIGEST_LINE) else None


@click.group()
def main() -> None:
    """Make and check requirements.lock."""


@main.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=ROOT, show_default=True)
def check(root: Path) -> None:
    """Fail unless requirements.lock was made from pyproject.toml's current dependencies."""
    lock, pyproject = root / LOCK, root / "pyproject.toml"
    if not lock.is_file():
        raise click.ClickException(f"{lock} is missing: run `{REFRESH}` and commit it")
    if recorded_digest(lock) != dependency_digest(pyproject):
        raise click.ClickException(
            f"{LOCK} is stale: pyproject.toml's dependencies changed since it was made; run `{REFRESH}` and commit it"
        )
    click.echo(f"{LOCK} matches pyproject.toml's dependencies")


@main.command()
@click.option("--upgrade", is_flag=True, help="Take the newest releases the ranges allow, not the locked ones.")
def refresh(upgrade: bool) -> None:
    """Resolve pyproject.toml's dependencies (and the dev extras) beside TORCH into requirements.lock."""
    lock = ROOT / LOCK
    with tempfile.TemporaryDirectory() as tmp:
        constraint = Path(tmp) / "torch.txt"
        constraint.write_text(TORCH + "\n")
        compiled = Path(tmp) / LOCK
        if lock.is_file() and not upgrade:  # pip-compile keeps the pins it finds in its output file
            compiled.write_text(lock.read_text())
        command = [
            *(sys.executable, "-m", "piptools", "compile", "pyproject.toml", "--extra", "dev"),
            *("--generate-hashes", "--strip-extras", "--unsafe-package", "torch"),
            *("--no-emit-index-url", "--no-emit-find-links", "--constraint", str(constraint)),
            *("--output-file", str(compiled), "--quiet"),
            *(["--upgrade"] if upgrade else []),
        ]
        env = os.environ | {"CUSTOM_COMPILE_COMMAND": REFRESH}
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        body = compiled.read_text().replace(str(constraint), "the torch pin of .ci/lock.py")
    lock.write_text(f"{DIGEST_LINE}{dependency_digest(ROOT / 'pyproject.toml')}\n{body}")
    click.echo(f"wrote {lock}")


if __name__ == "__main__":
    main()
