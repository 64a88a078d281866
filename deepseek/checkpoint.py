"""Saving and loading models and training checkpoints, safely and atomically.

Weights are safetensors. Optimizer, scheduler and RNG state go through torch.save and are only read back
with torch.load(weights_only=True), which refuses pickled code. A directory appears whole or not at all:
it is written under a temporary name, fsynced, then renamed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from deepseek.config import ModelConfig
from deepseek.errors import UserError
from deepseek.files import replacing_dir
from deepseek.model import DeepSeekLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
INFO = "checkpoint.json"
TOKENIZER = "tokenizer"


def save_model(model: DeepSeekLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """config.json + model.safetensors, and a copy of the tokenizer so the directory stands alone."""
    with replacing_dir(out_dir, marker=CONFIG) as tmp:
        model.config.to_json(tmp / CONFIG)
        save_safetensors_model(model, str(tmp / WEIGHTS))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
    return Path(out_dir)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> DeepSeekLM:
    """A DeepSeekLM from a directory written by save_model or save_checkpoint; UserError if unusable."""
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
        raise UserError(f"{model_dir / WEIGHTS} is not a valid safetensors file for this model "
                        f"({str(error).splitlines()[0]})") from None
    if missing or unexpected:
        raise UserError(f"{model_dir / WEIGHTS} does not match {CONFIG}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model.to(device)


def save_checkpoint(directory: str | Path, step: int, model: DeepSeekLM, trainer_state: dict[str, Any],
                    info: dict[str, Any], keep: int) -> Path:
    """Write directory/step_{step:08d} and delete all but the newest `keep` checkpoints."""
    directory = Path(directory)

    path = directory / f"step_{step:08d}"
    with replacing_dir(path, marker=INFO) as tmp:
        model.config.to_json(tmp / CONFIG)
        save_safetensors_model(model, str(tmp / WEIGHTS))
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / INFO).write_text(json.dumps({"step": step, **info}, indent=2) + "\n")
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


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
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not a file we wrote"
        raise UserError(f"refusing to load {path}: {str(error).splitlines()[0]}") from None
