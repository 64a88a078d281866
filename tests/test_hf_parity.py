"""Our DeepSeekLM against transformers' DeepseekV3ForCausalLM, an implementation we did not write."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek.config import ModelConfig
from deepseek.errors import UserError
from deepseek.hf import export_hf, import_hf
from deepseek.model import DeepSeekLM
from stages.params import TokenizerParams
from stages.tokenizer import build_tokenizer

from conftest import randomized
from pipeline_utils import tiny_corpus

CONFIGS = {
    "q_lora+first_dense": dict(q_lora_rank=16, first_k_dense_layers=1, num_layers=3),
    "plain_q+all_moe+tied+2_shared": dict(
        q_lora_rank=0, first_k_dense_layers=0, tie_embeddings=True, num_shared_experts=2
    ),
    "group_limited_routing": dict(
        num_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        routed_scaling_factor=2.5,
        first_k_dense_layers=2,
        num_layers=4,
    ),
    "no_shared_experts": dict(num_shared_experts=0, num_heads=3, qk_rope_head_dim=4, v_head_dim=12),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_exported_model_gives_our_logits_in_transformers(name, tmp_path):
    config = ModelConfig.from_preset("tiny", **CONFIGS[name])
    ours = randomized(DeepSeekLM(config)).eval()
    assert any(moe.gate.expert_bias.abs().sum() > 0 for moe in ours.moe_layers())
    export_hf(ours, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert isinstance(theirs, DeepseekV3ForCausalLM)
    ids = torch.randint(0, config.vocab_size, (2, config.max_seq_len))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("rope_interleave", [False, True])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_transformers_model_imports_with_the_same_logits(tmp_path, rope_interleave, q_lora_rank):
    hf_config = DeepseekV3Config(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=3,
        n_shared_experts=1,
        n_routed_experts=6,
        kv_lora_rank=20,
        q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=12,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        rope_interleave=rope_interleave,
        num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        max_position_embeddings=64,
        routed_scaling_factor=1.5,
    )
    theirs = DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # make norms and balancing biases non-trivial
        for param in theirs.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
        for layer in theirs.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_export_refuses_softmax_routing(tmp_path):
    model = DeepSeekLM(ModelConfig.from_preset("tiny", score_func="softmax"))
    with pytest.raises(UserError, match="score_func"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_copies_the_tokenizer_and_its_end_of_text_id(tmp_path):
    tokenizer = build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus())
    tokenizer.save_pretrained(tmp_path / "tok")
    model = DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=len(tokenizer)))
    out = export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} < {p.name for p in out.iterdir()}
    assert tokenizer.eos_token_id is not None
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
