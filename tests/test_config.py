import json

import pytest

from deepseek.config import PRESETS, ModelConfig
from deepseek.model import DeepSeekLM

from test_parameter_counts import expected_counts


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_experts_per_tok=9, num_routed_experts=8), "num_experts_per_tok"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_group=3, num_routed_experts=8), "n_group"),
        (dict(n_group=4, topk_group=1, num_routed_experts=8, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_heads=-2), "num_heads"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(score_func="relu"), "score_func"),
        (dict(first_k_dense_layers=5, num_layers=4), "first_k_dense_layers"),
        (dict(bias_update_rate=-1e-3), "bias_update_rate"),
        (dict(bias_update_rule="proportional"), "bias_update_rule"),
        (dict(vocab_size=65.5), "vocab_size"),
        (dict(rms_norm_eps=0), "rms_norm_eps"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
    ],
)
def test_impossible_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        ModelConfig(**changes)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 64})


def test_json_round_trip(tmp_path):
    config = ModelConfig.from_preset("seed", score_func="softmax", q_lora_rank=0)
    config.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == config
    assert json.loads((tmp_path / "c.json").read_text())["num_shared_experts"] == 2


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_preset("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta(name):
    import torch

    with torch.device("meta"):
        model = DeepSeekLM(ModelConfig.from_preset(name))
    assert model.parameter_counts() == expected_counts(model.config)  # the counts written out from the formulas
