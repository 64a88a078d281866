"""Our DeepSeekLM against transformers' DeepseekV3ForCausalLM, an implementation we did not write."""

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedModel

from deepseek.config import ModelConfig
from deepseek.errors import UserError
from deepseek.hf import export_hf, import_hf
from deepseek.model import DeepSeekLM
from stages.params import TokenizerParams
from stages.tokenizer import build_tokenizer

from conftest import randomized
from pipeline_utils import tiny_corpus

CONFIGS: dict[str, dict[str, Any]] = {
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


# --- importing checkpoints one did not make -----------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path) -> Path:
    return export_hf(randomized(DeepSeekLM(ModelConfig.from_preset("tiny"))), tmp_path / "hf")


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "name, expected",
    [("../outside.safetensors", "outside .*: refusing to read it"), ("pytorch_model.bin", "not a .safetensors file")],
)
def test_import_reads_only_safetensors_inside_the_directory(exported, name, expected):
    (exported / "model.safetensors").rename(exported.parent / "outside.safetensors")
    write_index(exported, {"model.embed_tokens.weight": name})
    with pytest.raises(UserError, match=expected):
        import_hf(exported)


def test_a_pickle_under_a_safetensors_name_is_refused_by_name(exported):
    ran = exported / "payload-ran"
    torch.save({"x": torch.zeros(1)}, exported / "model.safetensors")  # a pickle, however named
    with pytest.raises(UserError, match=r"model\.safetensors is not a safetensors file .*refusing to read it"):
        import_hf(exported)
    assert not ran.exists()


def block_dequantized(weight: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """The reference: every block of the fp8 weight times its own scale, one block at a time."""
    out = weight.float().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= scale[i, j]
    return out


def test_fp8_block_quantised_weights_are_dequantised_as_deepseek_does(exported):
    """DeepSeek-V3's checkpoints store matrices as fp8 with one float32 scale per block (weight_scale_inv)."""
    block = 8
    weights = load_file(exported / "model.safetensors")
    quantised, expected = {}, dict(weights)
    for name, weight in weights.items():
        if name.endswith("proj.weight") and weight.dim() == 2:
            rows, cols = weight.shape
            scale = torch.rand(-(-rows // block), -(-cols // block)) + 0.5
            fp8 = (weight / scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]).to(
                torch.float8_e4m3fn
            )
            quantised[name], quantised[f"{name}_scale_inv"] = fp8, scale
            expected[name] = block_dequantized(fp8, scale, block)
        else:
            quantised[name] = weight
    save_file(quantised, exported / "model.safetensors")
    config = json.loads((exported / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block], "fmt": "e4m3"}
    (exported / "config.json").write_text(json.dumps(config))
    (exported / "reference").mkdir()
    save_file(expected, exported / "reference" / "model.safetensors")
    (exported / "reference" / "config.json").write_text(json.dumps(config))
    ours, reference = import_hf(exported), import_hf(exported / "reference")
    assert any(v.dtype == torch.float8_e4m3fn for v in quantised.values())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_fp8_weights_without_scales_are_refused(exported):
    weights = load_file(exported / "model.safetensors")
    name = next(n for n in weights if n.endswith("q_b_proj.weight"))
    weights[name] = weights[name].to(torch.float8_e4m3fn)
    save_file(weights, exported / "model.safetensors")
    with pytest.raises(UserError, match=f"{name} is fp8 but the checkpoint has no {name}_scale_inv"):
        import_hf(exported)


def test_mtp_modules_export_as_deepseek_v3_layers_that_transformers_runs_alike(tmp_path):
    """transformers' DeepseekV3 skips the modules (logits unchanged); its own MTP layers, loaded from the same
    export, give our multi-token prediction logits; import restores every weight."""
    from transformers.modeling_layers import MtpModel

    config = ModelConfig.from_preset("tiny", mtp_depth=2, first_k_dense_layers=1, num_layers=3)
    ours = randomized(DeepSeekLM(config)).eval()
    export_hf(ours, tmp_path / "hf", mtp=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 2
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    # transformers finds MTP weights by DeepSeek-V3's layer number (61); ours come after 3 layers.
    theirs._keys_to_ignore_on_load_unexpected = [r"model\.layers\.3\.", r"model\.layers\.4\."]
    mtp = MtpModel.from_pretrained(theirs).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():
        out = ours(ids, predict_ahead=True)
        hidden = theirs(ids, output_hidden_states=True).hidden_states[-1]
        assert (out.logits - theirs(ids).logits).abs().max().item() <= 1e-4
        for k in range(2):  # depth k + 1 reads the tokens (and positions) k + 1 on
            positions = torch.arange(k + 1, ids.shape[1]).expand(2, -1)
            hidden = mtp.forward_layer(k, hidden[:, :-1], positions, None, input_ids=ids[:, k + 1 :])
            assert (mtp._project_to_logits(hidden) - out.mtp_logits[k]).abs().max().item() <= 1e-4
    back = import_hf(tmp_path / "hf")
    assert back.config == config
    assert all(torch.equal(back.state_dict()[name], tensor) for name, tensor in ours.state_dict().items())


def test_by_default_the_export_leaves_out_the_mtp_modules_and_loads_without_unexpected_keys(tmp_path):
    config = ModelConfig.from_preset("tiny", mtp_depth=2)
    ours = randomized(DeepSeekLM(config)).eval()
    export_hf(ours, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    # output_loading_info=True returns (model, info), though from_pretrained's annotation says a model
    theirs, info = cast(
        tuple[PreTrainedModel, dict[str, Any]],
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True),
    )
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (ours(ids).logits - theirs.eval()(ids).logits).abs().max().item() <= 1e-4
    back = import_hf(tmp_path / "hf")
    assert back.config == config.replace(mtp_depth=0)
