"""ModelConfig: the network, in DeepSeek's field names, and its named presets (how to train it is
deepseek/train_config.py).

A frozen dataclass that checks its values on construction, with one mechanism (errors.require): a bad value raises
ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deepseek.errors import ConfigError, require


@dataclass(frozen=True)
class ModelConfig:
    # Sizes.
    vocab_size: int = 65
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    # Multi-Head Latent Attention.
    q_lora_rank: int = 64  # 0 = plain query projection (as in DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    rms_norm_eps: float = 1e-6
    # DeepSeekMoE.
    num_shared_experts: int = 1
    num_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    first_k_dense_layers: int = 1
    intermediate_size: int = 384  # width of the dense SwiGLU MLP in the first_k_dense_layers
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # expert groups for group-limited routing; 1 = no grouping
    topk_group: int = 1
    # Auxiliary-loss-free balancing (and the optional sequence-wise auxiliary loss of DeepSeek-V3).
    bias_update_rate: float = 1e-3
    # sign: b_i += rate * sign(e_i), the paper's rule; error: b_i += rate * e_i, with e_i = (mean load - load_i) / mean
    # load, the relative error (Wang et al. 2024 compare the two on raw counts, whose scale depends on the batch).
    bias_update_rule: Literal["sign", "error"] = "sign"
    seq_aux_loss_coef: float = 0.0
    # Other.
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0  # training only: on the embeddings and on each block's attention and FFN outputs
    # Multi-token prediction (DeepSeek-V3 §2.2): modules that predict 2..mtp_depth+1 tokens ahead; 0 = none.
    mtp_depth: int = 0

    def __post_init__(self) -> None:
        self._check_values()
        self._check_consistency()

    def _check_values(self) -> None:
        for name in _POSITIVE_INTEGERS:
            require(_is_integer(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("q_lora_rank", "num_shared_experts", "first_k_dense_layers", "mtp_depth"):
            require(_is_integer(getattr(self, name)) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        for name in ("rope_theta", "rms_norm_eps", "init_std", "routed_scaling_factor"):
            value = getattr(self, name)
            # These become float32 tensors: a smaller value rounds to 0 there (an eps of 0 divides by 0).
            require(
                _is_number(value) and FLOAT32_TINY <= value <= FLOAT32_MAX,
                name,
                "must be a positive number that float32 holds (1.2e-38 to 3.4e38)",
            )
        for name in ("bias_update_rate", "seq_aux_loss_coef"):
            require(_is_number(getattr(self, name)) and getattr(self, name) >= 0, name, "must be a number >= 0")
        require(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", "must be a number in [0, 1)")
        require(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")
        require(self.score_func in ("sigmoid", "softmax"), "score_func", "must be 'sigmoid' or 'softmax'")
        require(self.bias_update_rule in ("sign", "error"), "bias_update_rule", "must be 'sign' or 'error'")

    def _check_consistency(self) -> None:
        require(
            self.max_seq_len <= MAX_CONTEXT, "max_seq_len", f"({self.max_seq_len:,}) must be at most {MAX_CONTEXT:,}"
        )
        require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        require(
            self.first_k_dense_layers <= self.num_layers,
            "first_k_dense_layers",
            f"({self.first_k_dense_layers}) must be <= num_layers ({self.num_layers})",
        )
        require(
            self.num_experts_per_tok <= self.num_routed_experts,
            "num_experts_per_tok",
            f"({self.num_experts_per_tok}) must be <= num_routed_experts ({self.num_routed_experts})",
        )
        require(
            self.num_routed_experts % self.n_group == 0,
            "n_group",
            f"({self.n_group}) must divide num_routed_experts ({self.num_routed_experts})",
        )
        require(
            self.topk_group <= self.n_group, "topk_group", f"({self.topk_group}) must be <= n_group ({self.n_group})"
        )
        experts_reachable = self.topk_group * (self.num_routed_experts // self.n_group)
        require(
            self.num_experts_per_tok <= experts_reachable,
            "num_experts_per_tok",
            f"({self.num_experts_per_tok}) must be <= topk_group * experts per group ({experts_reachable})",
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    def cache_bytes_per_token(self, bytes_per_value: int = 2) -> dict[str, int]:
        """Decoding cache per token over all layers, bf16 by default: MLA's latent cache (c^KV and the shared
        RoPE key) against a standard multi-head cache of this model's keys and values."""
        latent = self.kv_lora_rank + self.qk_rope_head_dim
        mha = self.num_heads * (self.qk_head_dim + self.v_head_dim)
        return {name: size * bytes_per_value * self.num_layers for name, size in (("latent", latent), ("mha", mha))}

    def moe_layer_names(self) -> list[str]:
        """A name per MoE layer, in DeepSeekLM.moe_layers() order: the main blocks', then the MTP modules'."""
        main = [f"layer {i}" for i in range(self.first_k_dense_layers, self.num_layers)]
        return main + [f"MTP {k}" for k in range(1, self.mtp_depth + 1)]

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(", ".join(unknown), f"is not a model config field; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError("preset", f"{name!r} is unknown; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


FLOAT32_TINY = 2.0**-126  # float32's smallest normal number
FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127
MAX_CONTEXT = 2**20  # tokens; far beyond what these models train on, and what position tables stay exact for
_POSITIVE_INTEGERS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_seq_len",
    "num_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "intermediate_size",
    "n_group",
    "topk_group",
)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Named starting points. Every preset is a complete ModelConfig once the defaults above fill in the rest.
PRESETS: dict[str, dict[str, Any]] = {
    # A few seconds of CPU: for tests.
    "tiny": dict(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_seq_len=64,
        num_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        first_k_dense_layers=1,
    ),
    # The default CPU model: trains on tiny Shakespeare in minutes on two cores.
    "cpu": dict(),
    # The original project's configuration (../shared/seed/README-seed.md), with its SmolLM2 vocabulary.
    "seed": dict(
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_seq_len=2048,
        num_shared_experts=2,
        num_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=384,
        first_k_dense_layers=0,
        intermediate_size=1536,
        tie_embeddings=False,
    ),
}
