"""DeepSeekLM: a decoder of MLA + (dense SwiGLU | DeepSeekMoE) blocks, pre-norm, with an LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.attention import LatentCache, MultiHeadLatentAttention
from deepseek.config import ModelConfig
from deepseek.layers import RMSNorm, SwiGLU, rope_tables
from deepseek.moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    loss: torch.Tensor | None  # cross-entropy + aux_loss, when targets are given
    aux_loss: torch.Tensor  # sequence-wise balance loss, summed over MoE layers (0 unless enabled)
    expert_counts: torch.Tensor  # (num_moe_layers, num_routed_experts) tokens routed in this forward


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(config, layer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer >= config.first_k_dense_layers
        self.ffn: MoE | SwiGLU = MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = x + dropout(self.attn(self.attn_norm(x), cos, sin, cache), self.dropout, self.training)
        if not self.is_moe:
            return x + dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training), None, None
        out, counts, aux_loss = self.ffn(self.ffn_norm(x))
        return x + dropout(out, self.dropout, self.training), counts, aux_loss


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Residual dropout (as nanoGPT and the original Transformer); p = 0 leaves x untouched and draws no random
    numbers, so a model without dropout trains exactly as before it existed."""
    return F.dropout(x, p, training) if p > 0 else x


class DeepSeekLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zero balancing biases."""
        std = self.config.init_std
        for param in self.parameters():
            if param.dim() >= 2:
                nn.init.normal_(param, mean=0.0, std=std)
            else:
                nn.init.ones_(param)
        for moe in self.moe_layers():
            moe.gate.expert_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [module for module in self.layers.modules() if isinstance(module, MoE)]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        last_logits_only: bool = False,
    ) -> ModelOutput:
        """input_ids: (batch, seq). With a cache, input_ids continue the sequence the cache holds.

        last_logits_only skips the LM head for all but the last position (what generation needs).
        """
        start = cache.length if cache is not None else 0
        end = start + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len ({self.config.max_seq_len})")
        cos, sin = rope_tables(self.config.qk_rope_head_dim, start, end, self.config.rope_theta, input_ids.device)
        x = dropout(self.embed(input_ids), self.config.dropout, self.training)
        all_counts, aux_loss = [], x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, counts, layer_aux = block(x, cos, sin, cache)
            if counts is not None:
                all_counts.append(counts)
                aux_loss = aux_loss + layer_aux
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_logits_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100) + aux_loss
        expert_counts = (
            torch.stack(all_counts)
            if all_counts
            else x.new_zeros((0, self.config.num_routed_experts), dtype=torch.float32)
        )
        return ModelOutput(logits, loss, aux_loss, expert_counts)

    @torch.no_grad()
    def update_expert_bias(self, loads: torch.Tensor | None = None) -> torch.Tensor:
        """Auxiliary-loss-free balancing step; call once after each optimizer step.

        Moves each expert's bias by rate * sign(mean load - load). loads, (num_moe_layers, num_experts), are
        the tokens routed since the last update: by default those this model counted, over every micro-batch
        (taken, so they start again from zero); a data-parallel trainer passes clear_expert_load() summed
        over its processes instead. Returns the loads used.
        """
        if loads is None:
            loads = self.clear_expert_load()
        rate = self.config.bias_update_rate
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.gate.expert_bias += rate * torch.sign(load.mean() - load)
        return loads

    @torch.no_grad()
    def clear_expert_load(self) -> torch.Tensor:
        """Drop the loads counted since the last bias update (for a skipped step); returns them."""
        moes = self.moe_layers()
        if not moes:
            return torch.zeros(0, self.config.num_routed_experts)
        loads = torch.stack([moe.pending_load for moe in moes])  # a copy: the buffers are zeroed next
        for moe in moes:
            moe.pending_load.zero_()
        return loads

    def new_cache(self, batch_size: int, max_len: int | None = None) -> LatentCache:
        param = self.embed.weight
        return LatentCache(self.config, batch_size, max_len or self.config.max_seq_len, param.device, param.dtype)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token (shared experts plus top-k routed ones).

        "non_embedding" excludes the token embedding and the LM head (counted once when tied).
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        embedding = self.embed.weight.numel() + (0 if self.config.tie_embeddings else self.head.weight.numel())
        inactive = 0
        for moe in self.moe_layers():
            per_expert = (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) // moe.num_experts
            inactive += (moe.num_experts - moe.top_k) * per_expert
        return {
            "total": total,
            "active": total - inactive,
            "total_non_embedding": total - embedding,
            "active_non_embedding": total - inactive - embedding,
        }
