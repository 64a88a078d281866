"""Our ModelConfig to and from the Hugging Face `transformers` DeepseekV3 configuration (config.json).

The export writes `rope_interleave=False`, our RoPE pairing (deepseek/hf.py reorders interleaved checkpoints'
weights on import); the import refuses the settings of DeepseekV3 that this model does not implement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepseek.config import ModelConfig
from deepseek.errors import UserError

if TYPE_CHECKING:
    from transformers import DeepseekV3Config


def to_hf_config(config: ModelConfig, eos_token_id: int | None = None) -> DeepseekV3Config:
    """The transformers DeepseekV3Config describing the same network (and the tokenizer's end-of-text id)."""
    from transformers import DeepseekV3Config

    if config.score_func != "sigmoid":
        raise UserError("transformers' DeepseekV3 routes with sigmoid scores; export needs score_func=sigmoid")
    return DeepseekV3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        q_lora_rank=config.q_lora_rank or None,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rope_interleave=False,
        n_shared_experts=config.num_shared_experts,
        n_routed_experts=config.num_routed_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size,
        first_k_dense_replace=config.first_k_dense_layers,
        intermediate_size=config.intermediate_size,
        routed_scaling_factor=config.routed_scaling_factor,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=True,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        num_mtp_layers=config.mtp_depth,
        architectures=["DeepseekV3ForCausalLM"],
        bos_token_id=None,
        eos_token_id=eos_token_id,
    )


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a transformers DeepseekV3 config.json; refuses what we do not implement."""
    if hf.get("model_type") != "deepseek_v3":
        raise UserError(f"expected a deepseek_v3 config, got model_type={hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    for key, wanted in (("attention_bias", False), ("hidden_act", "silu"), ("norm_topk_prob", True)):
        if hf.get(key, wanted) != wanted:
            raise UserError(f"config.json has {key}={hf[key]!r}; only {wanted!r} is supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf["max_position_embeddings"],
        rms_norm_eps=hf["rms_norm_eps"],
        num_shared_experts=hf.get("n_shared_experts") or 0,
        num_routed_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense_layers=hf["first_k_dense_replace"],
        intermediate_size=hf["intermediate_size"],
        routed_scaling_factor=hf["routed_scaling_factor"],
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
    )
