"""params.yaml, read once into one typed Params; every value is checked before any stage starts work.

Each section is a frozen dataclass that checks its values on construction, the way the library's
ModelConfig and TrainConfig do (deepseek.errors.require). This module adds what only a file needs: the
YAML 1.2 reading of numbers that DVC writes, a type check of every value against the dataclass's hints,
and the section's name in front of any error ("params train.lr must be >= 0").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from deepseek.config import PRESETS, ModelConfig
from deepseek.errors import ConfigError, UserError, first_line, require
from deepseek.train_config import TrainConfig

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

    def __post_init__(self) -> None:
        require(0 < self.val_fraction < 1, "val_fraction", "must be between 0 and 1")
        require(self.smollm_max_chars > 0, "smollm_max_chars", "must be positive")


@dataclass(frozen=True)
class TokenizerParams:
    kind: Literal["char", "bpe", "pretrained"] = "bpe"
    vocab_size: int = 1024  # bpe only
    pretrained: str = "HuggingFaceTB/SmolLM2-135M"  # pretrained only: hub id or local directory

    def __post_init__(self) -> None:
        require(self.vocab_size >= 260, "vocab_size", "must be at least 260 (256 bytes + specials)")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 16

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "batch_size", "must be positive")


@dataclass(frozen=True)
class SampleParams:
    """The sample stage's generations, and the sample that training prints every train.sample_interval steps."""

    prompts: list[str] = dataclasses.field(
        default_factory=lambda: [
            "ROMEO:",
            "JULIET:",
            "KING RICHARD III:",
            "First Citizen:",
            "Now is the winter of our discontent",
        ]
    )
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50  # 0 = no top-k cut
    top_p: float = 0.95  # 1.0 = no nucleus cut
    seed: int = 1337
    speculative: bool = False  # draft with the multi-token prediction modules (model.mtp_depth >= 1)

    def __post_init__(self) -> None:
        require(isinstance(self.speculative, bool), "speculative", "must be true or false")
        require(len(self.prompts) > 0, "prompts", "must hold at least one prompt")
        require(all(self.prompts), "prompts", "must not contain an empty prompt")
        require(self.max_new_tokens > 0, "max_new_tokens", "must be positive")
        require(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        require(self.top_k >= 0, "top_k", "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@dataclass(frozen=True)
class MlflowParams:
    register_model: bool = True  # register each run's final model in the MLflow model registry
    model_name: str = "deepseek-repro"  # the registered model's name
    alias: str = "candidate"  # the alias the newest version gets (promote one by hand with e.g. "champion")

    def __post_init__(self) -> None:
        require(bool(self.model_name.strip()), "model_name", "must not be empty")
        require(self.alias.replace("-", "_").isidentifier(), "alias", "must be a simple name")


@dataclass(frozen=True)
class StudyParams:
    """Set by `deepseek study run` on each run it queues: MLflow tags the run with them (tags `study` and
    `study.cell`), which is how `deepseek study report` and the MLflow UI find a study's runs."""

    name: str = ""  # empty: not part of a study
    cell: str = ""

    def __post_init__(self) -> None:
        require(bool(self.name) or not self.cell, "cell", "needs study.name as well")


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "tokenizer": TokenizerParams,
    "train": TrainConfig,
    "evaluate": EvaluateParams,
    "sample": SampleParams,
    "mlflow": MlflowParams,
    "study": StudyParams,
}


@dataclass(frozen=True)
class ModelParams:
    """A preset plus the ModelConfig fields params.yaml sets; a null field keeps the preset's value."""

    preset: str = "cpu"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, vocab_size: int) -> ModelConfig:
        """The model these params describe; the tokenizer decides the vocabulary."""
        with _in_section("model"):
            return ModelConfig.from_preset(self.preset, vocab_size=vocab_size, **self.overrides)


@dataclass(frozen=True)
class Params:
    """All of params.yaml, read once and checked as a whole."""

    seed: int
    data: DataParams
    tokenizer: TokenizerParams
    model: ModelParams
    train: TrainConfig
    evaluate: EvaluateParams
    sample: SampleParams
    mlflow: MlflowParams
    study: StudyParams
    values: dict[str, Any]  # the file as written, for tracking


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml, every value checked, so that no stage starts work on bad params; UserError names the key."""
    return parse_params(read_params(path))


def parse_params(values: dict[str, Any]) -> Params:
    """Params from the mapping a params file holds, checked as load_params checks them."""
    known = ["seed", "model", *SECTIONS]
    for name in values:
        if name not in known:
            raise UserError(f"params {name} is not a known section{_did_you_mean(name, known)}")
    sections = {name: _section(name, values.get(name) or {}) for name in SECTIONS}
    params = Params(
        seed=_seed(values.get("seed", 1337)), model=_model(values.get("model") or {}), values=values, **sections
    )
    model = params.model.config(vocab_size=params.tokenizer.vocab_size)
    if params.train.seq_len > model.max_seq_len:
        raise UserError(
            f"params train.seq_len ({params.train.seq_len}) exceeds the model's max_seq_len "
            f"({model.max_seq_len}); lower train.seq_len or raise model.max_seq_len"
        )
    if model.mtp_depth >= params.train.seq_len:
        raise UserError(
            f"params model.mtp_depth ({model.mtp_depth}) must be below train.seq_len ({params.train.seq_len}): "
            "depth k predicts k + 1 tokens ahead inside each training sequence"
        )
    if params.sample.speculative and not model.mtp_depth:
        raise UserError(
            "params sample.speculative is true, but model.mtp_depth is 0: speculative decoding drafts with the "
            "multi-token prediction modules; set model.mtp_depth to 1 or more, or sample.speculative to false"
        )
    return params


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: `3e-05` would be the string '3e-05'. DVC writes
    `-S train.lr=3e-5` that way because it follows YAML 1.2, so this loader reads exponents as YAML 1.2 does."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML as DVC writes it (1.2 numbers): the one way this project reads params files."""
    return yaml.load(text, Loader=_Yaml12Loader)  # safe: a SafeLoader subclass


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project root, or pass --params PATH")
    try:
        values = load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {first_line(error)}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a mapping of sections (data:, tokenizer:, ...)")
    return values


@contextmanager
def _in_section(name: str) -> Iterator[None]:
    """Puts "params NAME." in front of a ConfigError raised inside the block."""
    try:
        yield
    except ConfigError as error:
        raise UserError(f"params {name}.{error}") from None


def _section(name: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"params {name} must be a mapping of keys to values")
    cls = SECTIONS[name]
    with _in_section(name):
        return cls(**_typed_fields(values, cls, name))


def _model(values: Any) -> ModelParams:
    if not isinstance(values, dict):
        raise UserError("params model must be a mapping of keys to values")
    with _in_section("model"):
        values = dict(values)
        require(
            values.get("vocab_size") is None,
            "vocab_size",
            "is set by the tokenizer; remove it (for bpe, set tokenizer.vocab_size)",
        )
        values.pop("vocab_size", None)
        preset = values.pop("preset", "cpu")
        require(
            isinstance(preset, str) and preset in PRESETS,
            "preset",
            f"= {preset!r} must be one of {', '.join(map(repr, PRESETS))}",
        )
        fields = _typed_fields(values, ModelConfig, "model", nullable=True)
        return ModelParams(preset, {key: value for key, value in fields.items() if value is not None})


def _seed(seed: Any) -> int:
    seed = _whole(seed)
    # numpy's global seed must fit in 32 bits.
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise UserError("params seed must be an integer from 0 to 2**32 - 1")
    return seed


def _typed_fields(values: dict[str, Any], cls: type, section: str, nullable: bool = False) -> dict[str, Any]:
    """values checked against cls's fields and type hints; a whole float (1e3) may stand for an integer.

    nullable: any field may be null (the model section's fields, whose null means the preset's value).
    """
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "vocab_size" or cls is not ModelConfig]
    for key in values:
        require(key in fields, key, f"is not a known key{_did_you_mean(key, fields, section)}")
    hints = typing.get_type_hints(cls)
    typed = {}
    for key, value in values.items():
        hint = hints[key] | None if nullable else hints[key]
        value = _whole(value) if _accepts_int(hint) else value
        require(_matches(value, hint), key, f"= {value!r} must be {_describe(hint)}")
        typed[key] = value
    return typed


# What other trainers call some of these keys (transformers' TrainingArguments and model configs, nanoGPT), so that
# one of their names, or a typo of one, is answered with ours.
OTHER_NAMES = {
    "learning_rate": "lr",
    "max_lr": "lr",
    "min_learning_rate": "min_lr",
    "max_iters": "max_steps",
    "num_steps": "max_steps",
    "steps": "max_steps",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "block_size": "seq_len",
    "warmup_iters": "warmup_steps",
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "max_grad_norm": "grad_clip",
    "eval_iters": "eval_batches",
    "precision": "dtype",
    "num_threads": "threads",
    "n_layer": "num_layers",
    "num_hidden_layers": "num_layers",
    "n_head": "num_heads",
    "num_attention_heads": "num_heads",
    "n_embd": "hidden_size",
    "d_model": "hidden_size",
    "max_position_embeddings": "max_seq_len",
    "n_routed_experts": "num_routed_experts",
    "n_shared_experts": "num_shared_experts",
    "num_nextn_predict_layers": "mtp_depth",
    "temp": "temperature",
}


def _did_you_mean(name: str, known: list[str], section: str = "") -> str:
    """ "; did you mean train.lr?" for the known name closest to name (or to another trainer's name for it), else
    the list of known names."""
    candidates = {key: key for key in known} | {other: ours for other, ours in OTHER_NAMES.items() if ours in known}
    close = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    if not close:
        return f"; known: {', '.join(known)}"
    return f"; did you mean {section + '.' if section else ''}{candidates[close[0]]}?"


def _whole(value: Any) -> Any:
    """1000.0 (how YAML reads 1e3) as the integer 1000; anything else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _accepts_int(hint: Any) -> bool:
    return hint is int or int in typing.get_args(hint)


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
    if hint is float:  # nan and inf pass every range check (no comparison with nan fails), so none is allowed
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
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
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(hint, str(hint))
