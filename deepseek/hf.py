"""Export to and import from the Hugging Face `transformers` DeepseekV3 layout: our weights under its names and
shapes, and whole model directories (config.json, which deepseek/hf_config.py converts, and safetensors).

Our module names follow DeepSeek-V3's reference code; transformers uses its own. Routed experts are
stacked tensors here and one key per expert there. Our RoPE pairs (x[i], x[i + d/2]), which is
transformers' `rope_interleave=False`; checkpoints with interleaved pairs (DeepSeek's own) are
converted on import by permuting the rows that produce the RoPE halves.

Multi-token prediction modules, when asked for, are written as DeepSeek-V3's checkpoint holds them: layers
numbered after the main ones (`num_nextn_predict_layers` of them), each a decoder layer plus `enorm`, `hnorm`,
`eh_proj` and `shared_head.norm`, with copies of the shared embedding and head. transformers'
DeepseekV3ForCausalLM skips them on load (listing their keys as UNEXPECTED), so the export leaves them out by
default; transformers' MTP layers (`transformers.modeling_layers.MtpModel`) and serving engines read them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepseek.config import ModelConfig
from deepseek.errors import UserError, first_line
from deepseek.files import OWNER_FILE, DirectoryKind, replacing_dir
from deepseek.hf_config import from_hf_config, to_hf_config
from deepseek.model import DeepSeekLM

WEIGHTS_FILE = "model.safetensors"
FP8_BLOCK = 128  # DeepSeek-V3's fp8 weights have one scale per 128 x 128 block
HF_EXPORT_DIR = DirectoryKind("deepseek's export_hf")  # a marker alone: what an export holds depends on the tokenizer

# Our name -> transformers' name, inside model.layers.{i}.
_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.down_proj.weight": "mlp.shared_experts.down_proj.weight",
}
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
# Our name -> the checkpoint's, inside a multi-token prediction module (its block takes _LAYER_RENAMES).
_MTP_RENAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "head_norm.weight": "shared_head.norm.weight",
}


def to_hf_state_dict(model: DeepSeekLM, mtp: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, one set of keys per routed expert; mtp: the multi-token prediction
    modules too."""
    config = model.config if mtp else model.config.replace(mtp_depth=0)
    out = {}
    for name, tensor in model.state_dict().items():
        if (name == "head.weight" and config.tie_embeddings) or (name.startswith("mtp.") and not mtp):
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = tensor
            continue
        group, index, rest = name.split(".", 2)
        if group == "mtp":  # module k is layer num_layers + k, its block's weights directly under the layer
            prefix = f"model.layers.{config.num_layers + int(index)}."
            if rest in _MTP_RENAMES:
                out[prefix + _MTP_RENAMES[rest]] = tensor
                continue
            rest = rest.removeprefix("block.")
        else:
            prefix = f"model.layers.{index}."
        if rest == "ffn.experts.gate_up_proj":
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up
        elif rest == "ffn.experts.down_proj":
            for e, down in enumerate(tensor):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = down
        else:
            out[prefix + _LAYER_RENAMES[rest]] = tensor
    for k in range(config.mtp_depth):  # DeepSeek-V3's checkpoint repeats the shared embedding and head per module
        prefix = f"model.layers.{config.num_layers + k}."
        out[prefix + "embed_tokens.weight"] = model.embed.weight
        out[prefix + "shared_head.head.weight"] = model.head.weight
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(
    hf: dict[str, torch.Tensor], config: ModelConfig, rope_interleave: bool
) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict; interleaved RoPE rows are reordered into our layout."""
    out: dict[str, torch.Tensor] = {}
    for i in range(config.num_layers):
        out |= _block_from_hf(hf, i, f"layers.{i}.", i >= config.first_k_dense_layers, config, rope_interleave)
    for k in range(config.mtp_depth):
        layer = config.num_layers + k
        for ours, theirs in _MTP_RENAMES.items():
            out[f"mtp.{k}.{ours}"] = hf[f"model.layers.{layer}.{theirs}"]
        out |= _block_from_hf(hf, layer, f"mtp.{k}.block.", True, config, rope_interleave)
    for theirs, ours in {v: k for k, v in _TOP_RENAMES.items()}.items():
        if theirs in hf:
            out[ours] = hf[theirs]
    if config.tie_embeddings or "head.weight" not in out:
        out["head.weight"] = out["embed.weight"]
    return out


def _block_from_hf(
    hf: dict[str, torch.Tensor], layer: int, ours: str, is_moe: bool, config: ModelConfig, rope_interleave: bool
) -> dict[str, torch.Tensor]:
    """One decoder layer's weights (model.layers.{layer}) under our names, which start with ours."""
    prefix = f"model.layers.{layer}."
    out = {ours + name: hf[prefix + theirs] for name, theirs in _LAYER_RENAMES.items() if prefix + theirs in hf}
    if is_moe:
        experts = range(config.num_routed_experts)

        def expert(e: int, proj: str) -> torch.Tensor:
            return hf[f"{prefix}mlp.experts.{e}.{proj}.weight"]

        out[ours + "ffn.experts.gate_up_proj"] = torch.stack(
            [torch.cat((expert(e, "gate_proj"), expert(e, "up_proj"))) for e in experts]
        )
        out[ours + "ffn.experts.down_proj"] = torch.stack([expert(e, "down_proj") for e in experts])
    if rope_interleave:
        _deinterleave_rope_rows(out, ours + "attn.", config)
    return out


def mtp_layers_in(hf: dict[str, torch.Tensor], num_layers: int) -> int:
    """How many multi-token prediction modules a checkpoint holds (a config may announce some it lacks)."""
    depth = 0
    while f"model.layers.{num_layers + depth}.eh_proj.weight" in hf:
        depth += 1
    return depth


def _deinterleave_rope_rows(weights: dict[str, torch.Tensor], prefix: str, config: ModelConfig) -> None:
    """Reorder RoPE output rows from pairs (2i, 2i+1) to pairs (i, i + d/2)."""
    d = config.qk_rope_head_dim
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))
    q_name = prefix + ("wq.weight" if config.q_lora_rank == 0 else "wq_b.weight")
    q = weights[q_name].view(config.num_heads, config.qk_head_dim, -1)
    weights[q_name] = torch.cat(
        (q[:, : config.qk_nope_head_dim], q[:, config.qk_nope_head_dim :][:, perm]), dim=1
    ).reshape(-1, q.shape[-1])
    kv = weights[prefix + "wkv_a.weight"]
    weights[prefix + "wkv_a.weight"] = torch.cat((kv[: config.kv_lora_rank], kv[config.kv_lora_rank :][perm]))


def export_hf(
    model: DeepSeekLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    inputs: Sequence[str | Path] = (),
    force: bool = False,
    mtp: bool = False,
) -> Path:
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tokenizer files from tokenizer_dir, if given, are copied beside the weights, and its end-of-text token
    becomes the config's eos_token_id, so that transformers' generate stops where ours does. The directory
    appears whole or not at all, and replaces only an earlier export (or, with force, a folder of other files;
    never one of inputs, the tokenizer, or another of this project's outputs).

    mtp: write the multi-token prediction modules as well, as DeepSeek-V3's checkpoint holds them. Left out by
    default: DeepseekV3ForCausalLM does not use them, and lists every one of their keys as UNEXPECTED on load.
    """
    eos_token_id = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        eos_token_id = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    # Refuses what transformers cannot hold, before any write.
    config = to_hf_config(model.config if mtp else model.config.replace(mtp_depth=0), eos_token_id)
    sources = [*inputs, *([tokenizer_dir] if tokenizer_dir is not None else [])]
    with replacing_dir(out_dir, HF_EXPORT_DIR, inputs=sources, force=force) as tmp:
        config.save_pretrained(tmp)
        save_file(to_hf_state_dict(model, mtp), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for item in Path(tokenizer_dir).iterdir():
                if item.is_file() and item.name != OWNER_FILE:
                    shutil.copy2(item, tmp / item.name)
    return Path(out_dir)


def import_hf(path: str | Path) -> DeepSeekLM:
    """Load a transformers DeepseekV3 directory (single or sharded safetensors) into DeepSeekLM.

    Only safetensors files inside the directory are read; fp8 weights with block scales (DeepSeek's own
    checkpoints) are dequantised as DeepSeek's conversion script does.
    """
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    config = from_hf_config(hf_config)
    hf_weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            hf_weights.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{file} is not a safetensors file ({first_line(error)}): refusing to read it") from None
    block = (hf_config.get("quantization_config") or {}).get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    config = config.replace(mtp_depth=mtp_layers_in(hf_weights, config.num_layers))
    model = DeepSeekLM(config)
    state = from_hf_state_dict(dequantize_fp8(hf_weights, block), config, hf_config.get("rope_interleave", True))
    model.load_state_dict(state, strict=True)
    return model


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files a model directory names (its index's weight map, or model.safetensors), each of
    them inside the directory."""
    index = directory / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    files = []
    for name in names:
        file = (directory / name).resolve()
        if directory.resolve() not in file.parents:
            raise UserError(f"{index} names {name!r}, outside {directory}: refusing to read it")
        if file.suffix != ".safetensors":
            raise UserError(
                f"{index} names {name!r}, which is not a .safetensors file (a pickle, perhaps): only "
                "safetensors weights are read"
            )
        files.append(file)
    return files


def dequantize_fp8(weights: dict[str, torch.Tensor], block: Sequence[int]) -> dict[str, torch.Tensor]:
    """fp8 weights times their per-block scales (NAME_scale_inv, one per block of block[0] x block[1]), in
    float32; the scales themselves are dropped. Weights that are not fp8 pass unchanged."""
    out = {}
    for name, tensor in weights.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = weights.get(f"{name}_scale_inv")
            if scale is None:
                raise UserError(f"{name} is fp8 but the checkpoint has no {name}_scale_inv to dequantise it with")
            rows, cols = tensor.shape
            scales = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
            tensor = tensor.float() * scales
        out[name] = tensor
    return out
