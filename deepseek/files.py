"""Writing outputs so that nothing is ever left half-written, and nothing a command did not write is replaced.

Files: temporary name, fsync, rename. Directories: written beside their target under a temporary name and
swapped in whole (`replacing_dir`). A directory is replaced only when it is an earlier output of the same
kind (`DirectoryKind`): it holds the marker file naming its writer, or, from before markers, nothing but the
files that writer writes. Never a command's input, never another kind of output, never a folder of other files.
Leftovers of killed processes (staging, old and trash copies, each named after its process) are removed once
their process is gone; deleting a directory renames it to such a trash name first, so that it disappears
from readers at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepseek.errors import UserError

# A value json.dumps writes: read-only views (Sequence, Mapping), so that list[dict[str, float]] is one too.
JSONValue = str | int | float | bool | None | Sequence["JSONValue"] | Mapping[str, "JSONValue"]

OWNER_FILE = ".written-by"  # in every output directory: which kind of output it is
LOCK_FILE = ".lock"  # in a directory a process is writing (directory_lock)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:tmp|old|trash)$")
KINDS: list[DirectoryKind] = []  # every kind defined, so that --force never replaces one of them


@dataclass(frozen=True)
class DirectoryKind:
    """A kind of directory that a command writes whole: who writes it, and the names it holds."""

    writer: str  # recorded in OWNER_FILE
    files: frozenset[str] = frozenset()  # all it may hold; without a marker, a folder of only these is ours
    required: str = ""  # ... provided it holds this one

    def __post_init__(self) -> None:
        KINDS.append(self)

    def owns(self, directory: Path) -> bool:
        """Whether directory is an earlier output of this kind."""
        marker = directory / OWNER_FILE
        if marker.is_file():
            return marker.read_text().strip() == self.writer
        names = {item.name for item in directory.iterdir()}
        return bool(self.required) and self.required in names and names <= self.files


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside path to write; it becomes path (fsynced) when the block succeeds, and vanishes
    when it fails. A full disk is reported as one line naming path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise disk_full(error, path, written) from None
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, values: Any) -> Path:
    return write_text(path, json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def check_replaceable(
    target: str | Path, kind: DirectoryKind, inputs: Sequence[str | Path] = (), force: bool = False
) -> None:
    """Refuse, with one line, to replace target unless it is missing, empty, or an earlier output of kind.

    inputs: what the command reads; target may not be one of them, inside one, or around one. force: replace a
    folder of other files too (never an input, and never another kind of this project's outputs).
    """
    target = Path(target)
    for source in map(Path, inputs):
        if relation := _overlap(target, source):
            read = (
                "is the directory this command reads"
                if relation == "is"
                else f"{relation} {source}, which this command reads"
            )
            raise UserError(f"{target} {read}: choose another directory")
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} is a file: pass a new or empty directory")
    if not any(target.iterdir()) or kind.owns(target):
        return
    owner = target / OWNER_FILE
    if owner.is_file():
        raise UserError(
            f"{target} was written by {owner.read_text().strip()}, not {kind.writer}: refusing to "
            "replace it; choose another directory"
        )
    ours = [path for path in (target, *target.iterdir()) if path.is_dir() and any(k.owns(path) for k in KINDS)]
    if ours:
        raise UserError(
            f"{target} is or holds another output of this project ({ours[0]}): refusing to replace it; "
            "choose another directory"
        )
    if not force:
        names = sorted(item.name for item in target.iterdir())
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise UserError(
            f"{target} holds files that {kind.writer} did not write ({shown}): refusing to replace "
            "it; pass a new or empty directory"
        )


@contextmanager
def replacing_dir(
    target: str | Path, kind: DirectoryKind, inputs: Sequence[str | Path] = (), force: bool = False
) -> Iterator[Path]:
    """An empty directory beside target that replaces target when the block succeeds and vanishes when it fails.

    Readers never see a half-written target: the old one stays whole until the new one is complete. target
    must pass check_replaceable; the new one gets kind's marker.
    """
    target = Path(target)
    check_replaceable(target, kind, inputs, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target.parent)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # from an earlier failure of this same process
    staging.mkdir()  # mkdir, not mkdtemp: the directory gets the umask's permissions, not 0700
    try:
        yield staging
        (staging / OWNER_FILE).write_text(kind.writer + "\n")
        _fsync_tree(staging)
    except BaseException as error:
        written = _size(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise disk_full(error, target, written) from None
        raise
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, old)  # os.replace cannot put a directory over a non-empty one
    os.replace(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def directory_lock(directory: str | Path, purpose: str) -> Iterator[None]:
    """Hold directory/.lock for the block, so that two processes never write the same directory at once.

    Another process holding it makes this one stop with one line naming its pid. The system drops a lock when
    its holder dies, so a killed process never leaves a stale one behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(
                f"{directory} is in use by another {purpose} (pid {holder}): wait for it to end, or write elsewhere"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that readers see it whole or not at all: rename it to a trash name, then delete."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.{os.getpid()}.trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Staging, old and trash copies in directory whose process is gone (a live process's are left alone)."""
    directory = Path(directory)
    removed = []
    for item in directory.iterdir() if directory.is_dir() else ():
        match = _LEFTOVER.match(item.name)
        if match and item.is_dir() and not process_alive(int(match["pid"])):
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _overlap(target: Path, source: Path) -> str:
    """How replacing target would touch source: "is", "is inside" or "holds"; "" if it would not."""
    target, source = target.absolute(), source.absolute()
    return (
        "is"
        if target == source
        else "is inside"
        if source in target.parents
        else "holds"
        if target in (source.parents)
        else ""
    )


def disk_full(error: OSError, path: Path, needed: int) -> OSError | UserError:
    """A full disk as one line naming the path and the space; any other OSError as itself."""
    if error.errno != errno.ENOSPC:
        return error
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    return UserError(
        f"no space left on the device writing {path}: it needed more than {needed / 2**20:,.1f} MiB "
        f"and {free / 2**20:,.1f} MiB are free; free some space and rerun"
    )


def _size(root: Path) -> int:
    return sum(item.stat().st_size for item in root.rglob("*") if item.is_file()) if root.exists() else 0


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
