"""params.yaml, section by section: every value is checked before any work starts."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from deepseek.errors import UserError

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class DataParams:
    source: Literal["shakespeare", "smollm"] = "shakespeare"
    path: str = "data/input-1.txt"  # the shakespeare source's local file, downloaded if missing
    url: str = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    sha256: str = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    smollm_dataset: str = "HuggingFaceTB/smollm-corpus"  # hub id or local directory
    smollm_subset: str = "cosmopedia-v2"
    smollm_max_chars: int = 20_000_000
    val_fraction: float = 0.1

    def check(self) -> None:
        _require(0 < self.val_fraction < 1, "data.val_fraction", "must be between 0 and 1")
        _require(self.smollm_max_chars > 0, "data.smollm_max_chars", "must be positive")


@dataclass(frozen=True)
class TokenizerParams:
    kind: Literal["char", "bpe", "pretrained"] = "char"
    vocab_size: int = 1024  # bpe only
    pretrained: str = "HuggingFaceTB/SmolLM2-135M"  # pretrained only: hub id or local directory

    def check(self) -> None:
        _require(self.vocab_size >= 260, "tokenizer.vocab_size", "must be at least 260 (256 bytes + specials)")


SECTIONS: dict[str, type] = {"data": DataParams, "tokenizer": TokenizerParams}


def load_section(name: str, path: str | Path = PARAMS_FILE) -> Any:
    """One validated section of params.yaml; missing keys take the defaults above."""
    return parse_section(name, read_params(path).get(name) or {})


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project root, or pass --params PATH")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of sections (data:, tokenizer:, ...)")
    return values


def parse_section(name: str, values: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        raise UserError(f"params {name} must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(f"unknown params key {name}.{key}; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise UserError(f"params {name}.{key} = {value!r} must be {_describe(hints[key])}")
    section = cls(**values)
    section.check()
    return section


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise UserError(f"params {key} {problem}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, str(hint))
