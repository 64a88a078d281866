import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM


def expected_counts(c: ModelConfig) -> dict[str, int]:
    """Parameter counts written out from the architecture, independently of the module tree."""
    q = (
        c.hidden_size * c.num_heads * c.qk_head_dim
        if c.q_lora_rank == 0
        else c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.num_heads * c.qk_head_dim
    )
    kv = (
        c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
        + c.kv_lora_rank
        + c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim)
    )
    attn = q + kv + c.num_heads * c.v_head_dim * c.hidden_size
    norms = 2 * c.hidden_size
    dense = 3 * c.hidden_size * c.intermediate_size
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    gate = c.num_routed_experts * c.hidden_size
    moe_total = gate + (c.num_shared_experts + c.num_routed_experts) * expert
    moe_active = gate + (c.num_shared_experts + c.num_experts_per_tok) * expert
    embedding = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
    body_total = c.num_layers * (attn + norms) + c.first_k_dense_layers * dense + c.num_moe_layers * moe_total
    body_active = c.num_layers * (attn + norms) + c.first_k_dense_layers * dense + c.num_moe_layers * moe_active
    final_norm = c.hidden_size
    return {
        "total": body_total + final_norm + embedding,
        "active": body_active + final_norm + embedding,
        "total_non_embedding": body_total + final_norm,
        "active_non_embedding": body_active + final_norm,
    }


def test_seed_preset_builds_on_meta_and_reports_counts(capsys):
    config = ModelConfig.from_preset("seed")
    with torch.device("meta"):
        model = DeepSeekLM(config)
    counts = model.parameter_counts()
    assert counts == expected_counts(config)
    # The original project claimed ~135M; the real model is about twice that, half of it active.
    assert 270e6 < counts["total"] < 280e6
    assert 150e6 < counts["active"] < 160e6
    print({k: f"{v / 1e6:.1f}M" for k, v in counts.items()})


def test_counts_with_tied_embeddings_and_plain_query():
    config = ModelConfig.from_preset("tiny", tie_embeddings=True, q_lora_rank=0, num_shared_experts=2)
    assert DeepSeekLM(config).parameter_counts() == expected_counts(config)
