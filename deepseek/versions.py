"""The library versions a model or checkpoint was made with, recorded beside it and compared when it is loaded.

A different torch or transformers can change a model's numbers in the last digits (other kernels, other
defaults); loading says so in one line, a warning and never a refusal.
"""

from __future__ import annotations

import platform
import warnings
from importlib import metadata

RECORDED = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "dvc", "mlflow")
COMPARED = ("torch", "transformers")  # the ones that compute: a difference is worth a warning
NOT_INSTALLED = "not installed"


class EnvironmentWarning(UserWarning):
    """A model or checkpoint made with other versions of the libraries that compute it."""


def versions() -> dict[str, str]:
    """Python's version and the installed version of each RECORDED library."""
    found = {"python": platform.python_version()}
    for name in RECORDED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # dvc and mlflow where a model is only served
            found[name] = NOT_INSTALLED
    return found


def difference(recorded: dict[str, str], what: str) -> str | None:
    """One line on how the COMPARED versions recorded for `what` differ from this environment's, or None."""
    current = versions()
    changed = [
        f"{name} {recorded[name]} (here {current[name]})"
        for name in COMPARED
        if name in recorded and recorded[name] != current[name]
    ]
    if not changed:
        return None
    return f"{what} was made with {', '.join(changed)}: its numbers may differ here in the last digits"


def warn_if_different(recorded: dict[str, str] | None, what: str) -> None:
    """An EnvironmentWarning when the recorded versions differ from these; nothing for a record-less old model."""
    message = difference(recorded, what) if recorded else None
    if message is not None:
        warnings.warn(message, EnvironmentWarning, stacklevel=3)
