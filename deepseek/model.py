"""DeepSeekLM: a decoder of MLA + (dense SwiGLU | DeepSeekMoE) blocks, pre-norm, with an LM head, and optionally
DeepSeek-V3's multi-token prediction modules."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    hidden: torch.Tensor  # (batch, seq, hidden) the normed final states the head reads, h^0 of multi-token prediction
    # Depth k (1-based) at index i predicts token i + k + 1: logits (batch, seq - k, vocab), when the modules ran.
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    mtp_losses: torch.Tensor | None = None  # (mtp_depth,) cross-entropy of each depth, when targets are given


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, is_moe: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(config, layer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = is_moe
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


@dataclass
class DraftOutput:
    hidden: torch.Tensor  # (batch, new, hidden) h^k at the new indices
    logits: torch.Tensor  # (batch, vocab) the prediction at the last of them


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in float32 over the targets that are not -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def _losses(
    logits: torch.Tensor, mtp_logits: list[torch.Tensor], aux_loss: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss (next-token cross-entropy + aux_loss), and each multi-token prediction depth's
    cross-entropy, (mtp_depth,): depth k's logits at index i predict targets[:, i + k]."""
    loss = cross_entropy(logits, targets) + aux_loss
    if not mtp_logits:
        return loss, logits.new_zeros(0)
    return loss, torch.stack(
        [cross_entropy(depth_logits, targets[:, k:]) for k, depth_logits in enumerate(mtp_logits, start=1)]
    )


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Residual dropout (as nanoGPT and the original Transformer); p = 0 leaves x untouched and draws no random
    numbers, so a model without dropout trains exactly as before it existed."""
    return F.dropout(x, p, training) if p > 0 else x


class MultiTokenPrediction(nn.Module):
    """Depth k of multi-token prediction (DeepSeek-V3 §2.2, eqs. 21-22), in the layout of DeepSeek-V3's checkpoint
    and of transformers' MTP layers:

        h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      M_k = eh_proj; the checkpoint puts the token first
        h^k_i = head_norm(Block_k(h'_i))                             shared_head.norm in the checkpoint
        P^k_{i+k+1} = softmax(OutHead(h^k_i))                        the main model's head and embedding, shared

    h^0 is the main model's normed final state, the one its head reads.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer, is_moe=True)  # DeepSeek-V3's MTP blocks are MoE blocks
        self.head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        previous: torch.Tensor,
        embeddings: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """previous: h^{k-1} at indices i; embeddings: Emb(t_{i+k}). Returns h^k, expert counts and aux loss."""
        x = self.eh_proj(torch.cat((self.enorm(embeddings), self.hnorm(previous)), dim=-1))
        x, counts, aux_loss = self.block(x, cos, sin, cache)
        return self.head_norm(x), counts, aux_loss


class DeepSeekLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, i, is_moe=i >= config.first_k_dense_layers) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        # Registered last and built under a forked RNG (reset_parameters overwrites their default initialisation),
        # so that the main model draws the same random weights with or without them.
        with torch.random.fork_rng(devices=[]):
            self.mtp = nn.ModuleList(
                MultiTokenPrediction(config, config.num_layers + k) for k in range(config.mtp_depth)
            )
        self.num_moe_layers = len(self.moe_layers())  # counted once: forward needs it, and walking modules is slow
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
        """The main model's MoE layers, then those of the multi-token prediction modules."""
        return [module for module in self.modules() if isinstance(module, MoE)]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        last_logits_only: bool = False,
        predict_ahead: bool = False,
    ) -> ModelOutput:
        """input_ids: (batch, seq). With a cache, input_ids continue the sequence the cache holds.

        last_logits_only skips the LM head for all but the last position (what generation needs). The
        multi-token prediction modules run over the whole sequence when targets are given (their losses train
        them) or when predict_ahead asks for their logits; speculative decoding drives them with draft().
        """
        start = cache.length if cache is not None else 0
        end = start + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len ({self.config.max_seq_len})")
        cos, sin = rope_tables(self.config.qk_rope_head_dim, start, end, self.config.rope_theta, input_ids.device)
        x = embeddings = dropout(self.embed(input_ids), self.config.dropout, self.training)
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
        hidden = self.norm(x)
        logits = self.head(hidden)
        mtp_logits: list[torch.Tensor] = []
        if self.mtp and cache is None and not last_logits_only and (targets is not None or predict_ahead):
            mtp_logits, mtp_counts, mtp_aux = self._predict_ahead(hidden, embeddings, cos, sin)
            all_counts += mtp_counts
            aux_loss = aux_loss + mtp_aux
        loss = mtp_losses = None
        if targets is not None:
            loss, mtp_losses = _losses(logits, mtp_logits, aux_loss, targets)
        counts = self._expert_counts(all_counts, x)
        return ModelOutput(logits, loss, aux_loss, counts, hidden, mtp_logits, mtp_losses)

    def _expert_counts(self, all_counts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The tokens each expert was routed in one forward, (num_moe_layers, num_routed_experts), on like's device:
        a row per MoE layer; the modules that did not run (multi-token prediction, at times) routed nothing."""
        missing = self.num_moe_layers - len(all_counts)
        rows = [*all_counts, *like.new_zeros((missing, self.config.num_routed_experts), dtype=torch.float32)]
        if not rows:
            return like.new_zeros((0, self.config.num_routed_experts), dtype=torch.float32)
        return torch.stack(rows)

    def _predict_ahead(
        self, hidden: torch.Tensor, embeddings: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Every depth over the whole sequence. Depth k reads h^{k-1} at indices 0..seq-k-1 and the tokens at
        positions k..seq-1 (their RoPE rows too, as in DeepSeek-V3 and transformers); returns each depth's
        logits, its modules' expert counts and their auxiliary loss."""
        all_logits, all_counts, aux_loss = [], [], hidden.new_zeros((), dtype=torch.float32)
        for k, module in enumerate(self.mtp, start=1):
            hidden, counts, layer_aux = module(hidden[:, :-1], embeddings[:, k:], cos[k:], sin[k:], None)
            all_logits.append(self.head(hidden))
            all_counts.append(counts)
            aux_loss = aux_loss + layer_aux
        return all_logits, all_counts, aux_loss

    def draft(self, depth: int, previous: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache) -> DraftOutput:
        """Multi-token prediction depth (1-based) over new indices, continuing its own cache (speculative
        decoding): previous is h^{depth-1} at indices cache.length.., next_ids the tokens depth positions later.
        Returns h^depth and the logits at the last index."""
        start, new = cache.length + depth, next_ids.shape[1]
        cos, sin = rope_tables(
            self.config.qk_rope_head_dim, start, start + new, self.config.rope_theta, next_ids.device
        )
        hidden, _, _ = self.mtp[depth - 1](previous, self.embed(next_ids), cos, sin, cache)
        cache.advance(new)
        return DraftOutput(hidden, self.head(hidden[:, -1]))

    @torch.no_grad()
    def update_expert_bias(self, loads: torch.Tensor | None = None) -> torch.Tensor:
        """Auxiliary-loss-free balancing step; call once after each optimizer step.

        Moves each expert's bias by rate * sign(mean load - load), or with bias_update_rule "error" by rate times
        the relative error (mean load - load) / mean load. loads, (num_moe_layers, num_experts), are
        the tokens routed since the last update: by default those this model counted, over every micro-batch
        (taken, so they start again from zero); a data-parallel trainer passes clear_expert_load() summed
        over its processes instead. Returns the loads used.
        """
        if loads is None:
            loads = self.clear_expert_load()
        rate = self.config.bias_update_rate
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            error = load.mean() - load
            if self.config.bias_update_rule == "error":
                moe.gate.expert_bias += rate * error / load.mean().clamp_min(1)
            else:
                moe.gate.expert_bias += rate * torch.sign(error)
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

    def new_cache(self, batch_size: int, max_len: int | None = None, depth: int = 0) -> LatentCache:
        """A latent cache for the main model (depth 0) or for multi-token prediction depth k."""
        param, layers = self.embed.weight, range(self.config.num_layers)
        if depth:
            layers = range(self.config.num_layers + depth - 1, self.config.num_layers + depth)
        max_len = max_len or self.config.max_seq_len
        return LatentCache(self.config, batch_size, max_len, param.device, param.dtype, layers)

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
