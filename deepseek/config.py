"""Model configuration: DeepSeek's field names, validated on construction, JSON round-trippable."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


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
    seq_aux_loss_coef: float = 0.0
    # Other.
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "max_seq_len", "num_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "intermediate_size", "n_group", "topk_group")
        for name in positive:
            _check(name, isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)
                   and getattr(self, name) > 0, "must be a positive integer")
        for name in ("q_lora_rank", "num_shared_experts", "first_k_dense_layers"):
            value = getattr(self, name)
            _check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                   "must be a non-negative integer")
        for name in ("rope_theta", "rms_norm_eps", "init_std", "routed_scaling_factor"):
            _check(name, _is_number(getattr(self, name)) and getattr(self, name) > 0, "must be a positive number")
        for name in ("bias_update_rate", "seq_aux_loss_coef"):
            _check(name, _is_number(getattr(self, name)) and getattr(self, name) >= 0, "must be a number >= 0")
        _check("tie_embeddings", isinstance(self.tie_embeddings, bool), "must be true or false")
        _check("qk_rope_head_dim", self.qk_rope_head_dim % 2 == 0, "must be even (RoPE rotates pairs)")
        _check("score_func", self.score_func in ("sigmoid", "softmax"), "must be 'sigmoid' or 'softmax'")
        _check("first_k_dense_layers", self.first_k_dense_layers <= self.num_layers,
               f"({self.first_k_dense_layers}) must be <= num_layers ({self.num_layers})")
        _check("num_experts_per_tok", self.num_experts_per_tok <= self.num_routed_experts,
               f"({self.num_experts_per_tok}) must be <= num_routed_experts ({self.num_routed_experts})")
        _check("n_group", self.num_routed_experts % self.n_group == 0,
               f"({self.n_group}) must divide num_routed_experts ({self.num_routed_experts})")
        _check("topk_group", self.topk_group <= self.n_group,
               f"({self.topk_group}) must be <= n_group ({self.n_group})")
        experts_reachable = self.topk_group * (self.num_routed_experts // self.n_group)
        _check("num_experts_per_tok", self.num_experts_per_tok <= experts_reachable,
               f"({self.num_experts_per_tok}) must be <= topk_group * experts per group ({experts_reachable})")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**values)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(field: str, ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(f"model config field {field} {problem}")


# Named starting points. Every preset is a complete ModelConfig once the defaults above fill in the rest.
PRESETS: dict[str, dict[str, Any]] = {
    # A few seconds of CPU: for tests.
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64, num_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=16, intermediate_size=64, first_k_dense_layers=1),
    # The default CPU model: trains on tiny Shakespeare in minutes on two cores.
    "cpu": dict(),
    # The original project's configuration (../shared/seed/README-seed.md), with its SmolLM2 vocabulary.
    "seed": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, q_lora_rank=128, kv_lora_rank=128,
                 qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, max_seq_len=2048, num_shared_experts=2,
                 num_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=384, first_k_dense_layers=0,
                 intermediate_size=1536, tie_embeddings=False),
}
