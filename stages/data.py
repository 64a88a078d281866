"""The download and prepare stages' library: the raw corpus obtained; a train/val split and its stats out.

Choices a reader may want to know:
- The split is contiguous: the first int(len(text) * (1 - val_fraction)) characters are train, the rest val
  (nanoGPT's convention). The boundary is not snapped to a newline, so the sizes follow from the text alone.
- A smollm subset joins documents with a blank line and is cut at exactly data.smollm_max_chars characters,
  so only the last document may be truncated.
- "lines" counts "\\n"-separated lines, plus an unterminated last one; str.splitlines would also split on
  \\r, \\f, \\u2028 and friends.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deepseek.errors import UserError, first_line
from deepseek.files import DirectoryKind, atomic_file, check_replaceable, replacing_dir
from stages.params import DataParams

PREPARED_DIR = "data/prepared"
OUTPUT_FILES = ("train.txt", "val.txt", "stats.json")
PREPARED_KIND = DirectoryKind("deepseek prepare", frozenset(OUTPUT_FILES), "stats.json")
DOWNLOAD_TIMEOUT_S = 30
DOCUMENT_SEPARATOR = "\n\n"
MIN_SPLIT_CHARS = 2  # one next-character prediction on each side of the split
EXPERIMENT_COPIES = (".dvc", "tmp", "exps")  # where DVC copies the repository for a queued experiment


def download_corpus(params: DataParams) -> Path:
    """The raw corpus at data.path, where the download stage keeps it: for shakespeare the file there, downloaded
    from data.url if missing, checked against data.sha256; for smollm the first data.smollm_max_chars characters
    of the dataset, streamed into it."""
    path = Path(params.path)
    if params.source == "shakespeare":
        read_shakespeare(path, params.url, params.sha256)
        return path
    if path.is_file() and _sha256(path.read_bytes()) == params.sha256:
        raise UserError(
            f"{path} holds the corpus of data.sha256, which the smollm stream would replace: set data.path to "
            f"another file for the stream (for example data/smollm.txt)"
        )
    text = stream_smollm(params.smollm_dataset, params.smollm_subset, params.smollm_max_chars)
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8", newline="")
    return path


def prepare_corpus(params: DataParams, out_dir: str | Path = PREPARED_DIR) -> dict[str, Any]:
    """Split the raw corpus and write train.txt, val.txt and stats.json into out_dir; returns the stats."""
    # Refuse a bad output folder before a download, not after.
    check_replaceable(out_dir, PREPARED_KIND, inputs=[params.path])
    text = read_corpus(params)
    train, val = split_text(text, params.val_fraction)
    stats = {"source": params.source, **text_stats(text), "train_characters": len(train), "val_characters": len(val)}
    write_prepared(out_dir, train, val, stats, inputs=[params.path])
    return stats


def read_corpus(params: DataParams) -> str:
    """The raw corpus at data.path: shakespeare's checked against data.sha256 (and downloaded if missing, for a
    prepare run by hand); smollm's as the download stage streamed it."""
    if params.source == "shakespeare":
        return read_shakespeare(params.path, params.url, params.sha256)
    if not Path(params.path).exists():
        raise UserError(f"{params.path} not found: run the download stage first (dvc repro download)")
    return read_text_file(params.path)


def read_shakespeare(path: str | Path, url: str, sha256: str) -> str:
    """The text at path, obtained first if missing (from the project's own copy in a queued experiment, else from
    url); its sha256 must match either way."""
    path = Path(path)
    if not path.exists():
        project_copy = experiment_origin(path)
        if project_copy is not None and project_copy.is_file() and _sha256(project_copy.read_bytes()) == sha256:
            with atomic_file(path) as temp:
                shutil.copyfile(project_copy, temp)
        else:
            download(url, path, sha256)
    text = read_text_file(path)
    actual = _sha256(text.encode("utf-8"))
    if actual != sha256:
        raise UserError(
            f"{path} has sha256 {actual} but data.sha256 is {sha256}: set data.sha256 to {actual} "
            f"if this is the text you want, or replace the file (delete it to download data.url again)"
        )
    return text


def experiment_origin(path: Path) -> Path | None:
    """path in the project a queued (or --temp) experiment came from, or None outside one.

    DVC runs such experiments in a copy of the repository under .dvc/tmp/exps/, without git-ignored files such
    as the corpus; the project's own corpus, checked against data.sha256, spares a download (and works offline).
    """
    here = Path.cwd().resolve().parts
    for start in range(len(here) - len(EXPERIMENT_COPIES)):
        if here[start : start + len(EXPERIMENT_COPIES)] == EXPERIMENT_COPIES:
            return Path(*here[:start]) / path
    return None


def download(url: str, dest: str | Path, sha256: str) -> None:
    """Fetch url into dest, checking its sha256; dest appears complete or not at all."""
    dest = Path(dest)
    with atomic_file(dest) as temp:
        digest = hashlib.sha256()
        with open(temp, "wb") as out:
            # Only network failures become "could not download": a disk error while writing stays itself.
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(1 << 16):
                        digest.update(chunk)
                        out.write(chunk)
            except (
                urllib.error.URLError,
                http.client.HTTPException,
                ConnectionError,
                TimeoutError,
                ValueError,
            ) as error:
                raise UserError(
                    f"could not download {url} ({_reason(error)}): check your connection (offline?) "
                    f"and data.url, or copy the file to {dest} yourself and rerun"
                ) from None
        if digest.hexdigest() != sha256:
            raise UserError(
                f"{url} downloaded with sha256 {digest.hexdigest()} but data.sha256 is {sha256}: "
                f"check data.url and data.sha256"
            )


def read_text_file(path: str | Path) -> str:
    """The file's text, which must be non-empty UTF-8; read as bytes so line endings stay as they are."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    if not raw:
        raise UserError(f"{path} is empty: replace it with the corpus (or delete it to download data.url again)")
    return utf8_text(raw, str(path))


def utf8_text(raw: bytes, source: str) -> str:
    """raw decoded as UTF-8, or a one-line error naming source and the first byte that is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{source} is not UTF-8 text: byte 0x{raw[error.start]:02x} at offset {error.start} "
            f"is invalid; convert it to UTF-8 (e.g. with iconv) and rerun"
        ) from None


def stream_smollm(dataset: str, subset: str, max_chars: int) -> str:
    """Up to max_chars characters of the dataset's train split, streamed rather than downloaded whole."""
    text = join_capped(_documents(dataset, subset), max_chars)
    if not text:
        raise UserError(f"{dataset} ({subset}) holds no text: check data.smollm_dataset and data.smollm_subset")
    return text


def join_capped(documents: Iterable[str], max_chars: int) -> str:
    """Documents joined by a blank line, cut at exactly max_chars characters; stops reading at the cap."""
    parts: list[str] = []
    size = 0
    for document in documents:
        if not document:
            continue
        piece = (DOCUMENT_SEPARATOR if parts else "") + document
        parts.append(piece[: max_chars - size])
        size += len(parts[-1])
        if size >= max_chars:
            break
    return "".join(parts)


def _documents(dataset: str, subset: str) -> Iterator[str]:
    """The "text" field of each row; hub and file errors, which can surface on any row, become UserErrors."""
    # Imported here: datasets takes seconds to import and the shakespeare source never needs it.
    from datasets import load_dataset

    try:
        rows = iter(load_dataset(dataset, subset, split="train", streaming=True))
    except Exception as error:
        raise _stream_error(dataset, subset, error) from None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as error:
            raise _stream_error(dataset, subset, error) from None
        if not isinstance(row.get("text"), str):
            raise UserError(f"rows of {dataset} ({subset}) need a string field 'text'; they have {', '.join(row)}")
        yield row["text"]


def _stream_error(dataset: str, subset: str, error: Exception) -> UserError:
    return UserError(
        f"could not stream {dataset} ({subset}): {_reason(error)}; check your connection, "
        f"data.smollm_dataset and data.smollm_subset, or set data.smollm_dataset to a local "
        f"directory laid out like the hub repository"
    )


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Contiguous split: the first 1 - val_fraction of the characters train, the rest validation."""
    cut = int(len(text) * (1 - val_fraction))
    train, val = text[:cut], text[cut:]
    if min(len(train), len(val)) < MIN_SPLIT_CHARS:
        raise UserError(
            f"the text has {len(text)} characters: too short to split with data.val_fraction = "
            f"{val_fraction} (each side needs at least {MIN_SPLIT_CHARS}); use a longer corpus"
        )
    return train, val


def text_stats(text: str) -> dict[str, Any]:
    """Size, line count, alphabet size and sha256 (of the UTF-8 bytes) of the text."""
    return {
        "characters": len(text),
        "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
        "unique_characters": len(set(text)),
        "sha256": _sha256(text.encode("utf-8")),
    }


def write_prepared(
    out_dir: str | Path, train: str, val: str, stats: dict[str, Any], inputs: Sequence[str | Path] = ()
) -> None:
    """Write the three outputs so that all of them appear, or none."""
    with replacing_dir(out_dir, PREPARED_KIND, inputs=inputs) as staging:
        # newline="" keeps "\n" as is on every platform, so the files hold exactly the split text.
        (staging / "train.txt").write_text(train, encoding="utf-8", newline="")
        (staging / "val.txt").write_text(val, encoding="utf-8", newline="")
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reason(error: BaseException) -> str:
    """A one-line description of a library's exception."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    return f"{type(error).__name__}: {first_line(error)}"
