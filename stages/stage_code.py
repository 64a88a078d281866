"""The code each pipeline stage depends on, as dvc.yaml lists it: the train stage's resume fingerprint hashes
exactly that, so that DVC and resuming agree on when the code changed (tests/test_dvc_deps.py checks that
the list covers every module a stage imports)."""

from __future__ import annotations

from pathlib import Path

import yaml

from deepseek.checkpoint import run_fingerprint

ROOT = Path(__file__).resolve().parents[1]  # the checkout holding dvc.yaml, stages/ and deepseek/


def stage_code(stage: str, root: Path = ROOT) -> list[Path]:
    """The Python files among the stage's dependencies in root/dvc.yaml, directories expanded, relative to root.

    Without a dvc.yaml (an installed package, not a checkout), every module of both packages.
    """
    dvc_file = root / "dvc.yaml"
    deps = (
        yaml.safe_load(dvc_file.read_text())["stages"][stage]["deps"] if dvc_file.exists() else ["deepseek", "stages"]
    )
    files: set[Path] = set()
    for dep in deps:
        path = root / dep
        if path.is_dir():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.suffix == ".py":
            files.add(path)
    return sorted(path.relative_to(root) for path in files)


def code_version(stage: str = "train", root: Path = ROOT) -> str:
    """A hash of the code DVC reruns the stage for: a checkpoint made by other code is not resumed."""
    return run_fingerprint({str(path): (root / path).read_text() for path in stage_code(stage, root)})
