"""Writing outputs so that nothing is ever left half-written: temporary name, fsync, rename."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepseek.errors import UserError


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, values: Any) -> Path:
    return write_text(path, json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def check_replaceable(target: str | Path, marker: str) -> None:
    """target must be missing, empty, or a previous output (it holds marker), since it gets replaced whole.

    This keeps a mistyped output option from deleting a folder of other files.
    """
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} is a file: pass a new or empty directory")
    if any(target.iterdir()) and not (target / marker).is_file():
        raise UserError(
            f"{target} holds files but no {marker}, so it is not a previous output of this stage: "
            "pass a new or empty directory"
        )


@contextmanager
def replacing_dir(target: str | Path, marker: str) -> Iterator[Path]:
    """An empty directory beside target that replaces target when the block succeeds and vanishes when it fails.

    Readers never see a half-written target: the old one stays whole until the new one is complete. The new
    one must hold marker, and target must pass check_replaceable.
    """
    target = Path(target)
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    for leftover in (staging, old):  # from a run of this pid that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()  # mkdir, not mkdtemp: the directory gets the umask's permissions, not 0700
    try:
        yield staging
        if not (staging / marker).is_file():
            raise RuntimeError(f"replacing_dir: the new {target} lacks {marker}")
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)  # os.replace cannot put a directory over a non-empty one
    os.replace(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for item in root.rglob("*"):
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
