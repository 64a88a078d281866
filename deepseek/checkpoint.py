"""Saving and loading models and training checkpoints, safely and atomically.

Weights are safetensors. Optimizer, scheduler and RNG state go through torch.save and are only read back
with torch.load(weights_only=True), which refuses pickled code. A directory appears whole or not at all:
it is written under a temporary name, fsynced, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from deepseek.config import ModelConfig
from deepseek.errors import UserError, first_line
from deepseek.files import OWNER_FILE, DirectoryKind, JSONValue, remove_dir, remove_leftovers, replacing_dir
from deepseek.model import DeepSeekLM
from deepseek.versions import versions, warn_if_different

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
INFO = "checkpoint.json"
TOKENIZER = "tokenizer"
ENVIRONMENT = "environment.json"  # in a saved model: the library versions it was made with
SUPERSEDED = "superseded"  # in the checkpoints folder: checkpoints of other params, data or code, set aside
MODEL_DIR = DirectoryKind("deepseek's save_model", frozenset({CONFIG, WEIGHTS, TOKENIZER, ENVIRONMENT}), WEIGHTS)
CHECKPOINT_DIR = DirectoryKind("deepseek's save_checkpoint", frozenset({CONFIG, WEIGHTS, TRAINER_STATE, INFO}), INFO)


def save_model(model: DeepSeekLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """config.json + model.safetensors, the library versions, and a copy of the tokenizer so the directory
    stands alone."""
    inputs = [tokenizer_dir] if tokenizer_dir is not None else []
    with replacing_dir(out_dir, MODEL_DIR, inputs=inputs) as tmp:
        model.config.to_json(tmp / CONFIG)
        save_safetensors_model(model, str(tmp / WEIGHTS))
        (tmp / ENVIRONMENT).write_text(json.dumps(versions(), indent=2) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER, ignore=shutil.ignore_patterns(OWNER_FILE))
    return Path(out_dir)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> DeepSeekLM:
    """A DeepSeekLM from a directory written by save_model or save_checkpoint, in eval mode (no dropout, no expert
    load counting; call .train() to train it); UserError if unusable."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).exists() or not (model_dir / WEIGHTS).exists():
        raise UserError(f"no model in {model_dir} (expected {CONFIG} and {WEIGHTS}): run the train stage first")
    try:
        config = ModelConfig.from_json(model_dir / CONFIG)
    except (ValueError, json.JSONDecodeError) as error:
        raise UserError(f"{model_dir / CONFIG} is not a valid model config: {error}") from None
    model = DeepSeekLM(config)
    try:
        missing, unexpected = load_safetensors_model(model, str(model_dir / WEIGHTS), strict=False)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise UserError(
            f"{model_dir / WEIGHTS} is not a valid safetensors file for this model ({first_line(error)})"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{model_dir / WEIGHTS} does not match {CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    # A saved model records its environment in its own file; a checkpoint, in checkpoint.json.
    recorded = _read_json(model_dir / ENVIRONMENT) or _read_json(model_dir / INFO).get("environment")
    warn_if_different(recorded, str(model_dir))
    return model.to(device).eval()


def run_fingerprint(*parts: Any) -> str:
    """Identifies what a checkpoint was trained on; resuming is only allowed onto the same fingerprint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: DeepSeekLM,
    trainer_state: Mapping[str, object],
    info: Mapping[str, JSONValue],
    keep: int,
) -> Path:
    """Write directory/step_{step:08d} and delete all but the newest `keep` checkpoints.

    checkpoint.json is written last and records every file's sha256, so a damaged copy is recognised.
    """
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    with replacing_dir(path, CHECKPOINT_DIR) as tmp:
        model.config.to_json(tmp / CONFIG)
        save_safetensors_model(model, str(tmp / WEIGHTS))
        torch.save(trainer_state, tmp / TRAINER_STATE)
        hashes = {name: _sha256(tmp / name) for name in (CONFIG, WEIGHTS, TRAINER_STATE)}
        record = {"step": step, "sha256": hashes, "environment": versions(), **info}
        (tmp / INFO).write_text(json.dumps(record, indent=2) + "\n")
    for old in list_checkpoints(directory)[:-keep]:
        remove_dir(old)  # a kill mid-way leaves a trash copy for the next run to remove, never half a checkpoint
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are skipped)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(p for p in directory.glob("step_*") if p.is_dir() and (p / INFO).exists())


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler and RNG state; torch.load(weights_only=True) never runs pickled code."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not a file we wrote"
        raise UserError(f"refusing to load {path}: {first_line(error)}") from None
    return state


@dataclass
class ResumePoint:
    path: Path
    info: dict[str, JSONValue]  # checkpoint.json: step, fingerprint, history, ...
    trainer_state: Mapping[str, object]  # what Trainer.state_dict returned

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    # checkpoint.json's fields as save_checkpoint and the Trainer write them (its sha256 list vouches for the rest).

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return cast(int, self.info["step"])

    @property
    def history(self) -> Mapping[str, list[dict[str, float]]]:
        """The loss histories so far: {"train": rows, "val": rows}."""
        return cast(Mapping[str, list[dict[str, float]]], self.info["history"])

    @property
    def environment(self) -> dict[str, str] | None:
        """The library versions that wrote it (deepseek.versions)."""
        return cast(dict[str, str] | None, self.info.get("environment"))

    @property
    def mlflow_run_id(self) -> str | None:
        """The tracking run of the training, where the pipeline trained it."""
        return cast(str | None, self.info.get("mlflow_run_id"))

    def load_weights(self, model: DeepSeekLM) -> None:
        load_safetensors_model(model, str(self.weights_file))


def find_resume_point(directory: str | Path, fingerprint: dict[str, str]) -> ResumePoint | None:
    """The newest intact checkpoint made with this fingerprint (what was trained: params, data, code), or None.

    A damaged or unsafe checkpoint is skipped with a warning, and the one before it is used. Checkpoints of
    another fingerprint are never resumed (that would mix two runs) and never deleted: they are moved to
    directory/superseded/, with a warning that says what changed and where they went. Leftovers of killed
    processes (copies being written or deleted, checkpoints a kill left without checkpoint.json) are removed.
    """
    directory = Path(directory)
    remove_leftovers(directory)
    for incomplete in directory.glob("step_*"):
        if (
            incomplete.is_dir()
            and not (incomplete / INFO).exists()
            and CHECKPOINT_DIR.files >= set(item.name for item in incomplete.iterdir())
        ):
            remove_dir(incomplete)
    checkpoints = list_checkpoints(directory)
    foreign = [c for c in checkpoints if _read_json(c / INFO).get("fingerprint") != fingerprint]
    if foreign:
        _set_aside(foreign, directory, fingerprint)
    for checkpoint in reversed([c for c in checkpoints if c not in foreign]):
        try:
            return _load_resume_point(checkpoint)
        except UserError as error:
            warnings.warn(f"skipping checkpoint {checkpoint.name}: {error}", stacklevel=2)
    return None


def _set_aside(checkpoints: list[Path], directory: Path, fingerprint: dict[str, str]) -> None:
    """Move checkpoints of another fingerprint to directory/superseded/NAME, and say why and where."""
    theirs = _read_json(checkpoints[-1] / INFO).get("fingerprint")
    changed = (
        [part for part in fingerprint if theirs.get(part) != fingerprint[part]]
        if isinstance(theirs, dict)
        else ["the checkpoint format"]
    )
    destination = directory / SUPERSEDED / f"{'-'.join(changed).replace(' ', '_')}-{_short_id(theirs)}"
    destination.mkdir(parents=True, exist_ok=True)
    for checkpoint in checkpoints:
        checkpoint.rename(destination / checkpoint.name)
    warnings.warn(
        f"the checkpoints in {directory} were made with other {' and '.join(changed)}, so training "
        f"starts over; they are kept in {destination} (delete it if you do not need them)",
        stacklevel=3,
    )


def _short_id(fingerprint: Any) -> str:
    return run_fingerprint(fingerprint)[:8]


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in path; {} for a missing or damaged file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _load_resume_point(checkpoint: Path) -> ResumePoint:
    info = _read_json(checkpoint / INFO)
    if "sha256" not in info:
        raise UserError(f"{checkpoint / INFO} is damaged")
    for name, expected in info["sha256"].items():
        if not (checkpoint / name).is_file() or _sha256(checkpoint / name) != expected:
            raise UserError(f"{name} is truncated or altered (its sha256 differs from {INFO})")
    try:  # the header is enough to refuse a file that is not safetensors; resume reads the tensors later
        with safe_open(checkpoint / WEIGHTS, "pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise UserError(f"{WEIGHTS} is not a valid safetensors file ({first_line(error)})") from None
    return ResumePoint(checkpoint, info, load_trainer_state(checkpoint))
