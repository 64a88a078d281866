"""DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2): shared experts plus top-k routed experts.

The router picks experts by score + bias, where the bias is the auxiliary-loss-free balancing term
(V3 eq. 16). The bias only steers *which* experts are chosen: the gating weights come from the
unbiased scores. The bias is a buffer, moved by `DeepSeekLM.update_expert_bias` after optimizer steps,
never by the optimizer and never by forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._compile import _disable_dynamo

from deepseek.config import ModelConfig
from deepseek.layers import SwiGLU


@dataclass
class Routing:
    weights: torch.Tensor  # (tokens, k) gating weights of the chosen experts
    indices: torch.Tensor  # (tokens, k) chosen experts
    scores: torch.Tensor  # (tokens, num_experts) unbiased affinities, float32


class Router(nn.Module):
    expert_bias: torch.Tensor  # a buffer: the balancing bias, moved by DeepSeekLM.update_expert_bias

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.score_func = config.score_func
        self.scaling = config.routed_scaling_factor
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.weight = nn.Parameter(torch.empty(config.num_routed_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_routed_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (tokens, hidden)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias
        if self.n_group > 1:
            choice = self._keep_best_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.score_func == "sigmoid":  # sigmoid scores do not sum to one over the chosen experts
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights * self.scaling, indices, scores)

    def _keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: rank the expert groups, keep the topk_group best, mask the rest.

        Groups rank by their best score with softmax scores (DeepSeek-V2), and by the sum of their two best with
        sigmoid scores (DeepSeek-V3), as DeepSeek's reference code does.
        """
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        if self.score_func == "softmax":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands: fp32, bf16 or fp16 on CPU, bf16 on CUDA (torch 2.13),
    with rows a multiple of 16 bytes."""
    aligned = all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])
    on_cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return aligned and (on_cpu or x.dtype == torch.bfloat16)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, sizes: list[int] | None = None
) -> torch.Tensor:
    """x @ weight[e].T for each expert e's rows of x, which are sorted by expert; expert e's rows end at ends[e].

    sizes None: torch's grouped GEMM runs every expert in one call, with no host sync. Given (the row count of
    each expert, on the host), each expert runs its own matmul: the path where grouped_mm does not apply.
    """
    weight = weight.to(x.dtype)
    if sizes is not None:
        return torch.cat([F.linear(rows, weight[e]) for e, rows in enumerate(torch.split(x, sizes))])
    if x.dtype == torch.bfloat16 or not torch.compiler.is_compiling():
        return F.grouped_mm(x, weight.transpose(1, 2), offs=ends)
    return _grouped_mm_outside_compile(x, weight, ends)  # torch.compile traces grouped_mm in bf16 only (torch 2.13)


# A graph break in fp32 and fp16: dynamo's shape rule for grouped_mm admits bf16 only. torch's lazy form of
# torch.compiler.disable: importing dynamo takes seconds, which a process that never compiles need not pay.
@_disable_dynamo
def _grouped_mm_outside_compile(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, weight.transpose(1, 2), offs=ends)


# On CPU, torch's bf16 (and fp16) matmuls run oneDNN kernels generated for each new shape, then cached: on a Xeon
# with AMX a new shape cost about 1 ms against 0.1 ms for a known one (float32 has no such cost). The experts'
# token counts change every step, so unpadded groups brought new shapes every step, and a bf16 training step took
# 2.4 times a float32 one (docs/benchmarks.md). Padding each group to a multiple of a row block bounds the shapes.
MAX_ROW_BLOCK = 64
PADDING_SHARE = 16  # the padding rows are at most about 1/PADDING_SHARE of the routed rows


def row_block(rows: int, num_experts: int, x: torch.Tensor) -> int:
    """The multiple each expert's rows are padded to for x (the sorted expert inputs): a power of two up to
    MAX_ROW_BLOCK, small enough that padding stays a small share of the rows, so decoding's few rows are not
    padded. 1 (no padding) in float32, whose kernels are not made per shape, and off the CPU, where the grouped
    GEMM is one kernel whatever the counts."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return 1
    limit = min(MAX_ROW_BLOCK, rows // (PADDING_SHARE * num_experts))
    return 1 << (limit.bit_length() - 1) if limit > 0 else 1


@dataclass
class PaddedLayout:
    """Where each expert's rows go when every group is padded with zero rows to a multiple of block."""

    positions: torch.Tensor  # (rows,) each row's place in the padded layout, rows sorted by expert
    ends: torch.Tensor  # (num_experts,) int32: where each expert's padded group ends
    capacity: int  # padded rows in all: fixed by the row count, so the total shape never changes either

    @classmethod
    def of(cls, experts: torch.Tensor, counts: torch.Tensor, block: int) -> PaddedLayout:
        """experts: each row's expert, sorted; counts: rows per expert."""
        rows, num_experts = len(experts), len(counts)
        padded_counts = (counts + block - 1) // block * block
        padded_ends = padded_counts.cumsum(dim=0)
        rank = torch.arange(rows, device=experts.device) - (counts.cumsum(dim=0) - counts)[experts]
        positions = (padded_ends - padded_counts)[experts] + rank
        # The last expert's group runs to the fixed capacity; the zero rows past its padded end change nothing.
        capacity = -(-(rows + num_experts * (block - 1)) // block) * block
        ends = padded_ends.to(torch.int32)
        ends[-1] = capacity
        return cls(positions, ends, capacity)


def group_sizes(ends: torch.Tensor) -> torch.Tensor:
    """Each group's rows, from where each group ends."""
    return ends.diff(prepend=ends.new_zeros(1))


class RoutedExperts(nn.Module):
    """num_experts SwiGLU experts whose weights are stacked, so dispatch is a sort and two grouped matmuls."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))  # [gate ; up] per expert
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    def forward(self, x: torch.Tensor, routing: Routing, counts: torch.Tensor) -> torch.Tensor:
        """x: (tokens, dim); counts: tokens per expert. Returns the weighted sum of each token's experts."""
        tokens, k = routing.indices.shape
        # Sort the (token, slot) assignments by expert so each expert sees one contiguous slice.
        experts, order = routing.indices.flatten().sort(stable=True)
        # index_select, not x[...]: its backward is an index_add, several times faster than advanced indexing's.
        sorted_inputs = x.index_select(0, order // k)
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast-aware: cast as F.linear would
            sorted_inputs = sorted_inputs.to(torch.get_autocast_dtype(x.device.type))
        block = row_block(len(experts), len(counts), sorted_inputs)
        if block > 1:  # zero rows in, zero rows out: they add nothing to any output or gradient
            layout = PaddedLayout.of(experts, counts, block)
            padding = sorted_inputs.new_zeros(layout.capacity, sorted_inputs.shape[1])
            sorted_inputs, ends = padding.index_copy(0, layout.positions, sorted_inputs), layout.ends
        else:
            ends = counts.cumsum(dim=0, dtype=torch.int32)
        grouped = all(grouped_mm_supported(sorted_inputs, w) for w in (self.gate_up_proj, self.down_proj))
        sizes = None if grouped else group_sizes(ends).tolist()  # the fallback's one host sync
        gate, up = grouped_linear(sorted_inputs, self.gate_up_proj, ends, sizes).chunk(2, dim=-1)
        sorted_outputs = grouped_linear(F.silu(gate) * up, self.down_proj, ends, sizes)
        if block > 1:
            sorted_outputs = sorted_outputs.index_select(0, layout.positions)
        outputs = torch.empty_like(sorted_outputs).index_copy_(0, order, sorted_outputs)
        weights = routing.weights.type_as(outputs).unsqueeze(-1)
        return (outputs.view(tokens, k, -1) * weights).sum(dim=1)


class MoE(nn.Module):
    pending_load: torch.Tensor  # a buffer: tokens routed to each expert since the last balancing update

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_routed_experts
        self.top_k = config.num_experts_per_tok
        self.seq_aux_loss_coef = config.seq_aux_loss_coef
        self.gate = Router(config)
        self.experts = RoutedExperts(config.num_routed_experts, config.hidden_size, config.moe_intermediate_size)
        # n shared experts of width m are one SwiGLU of width n*m (their sum is a concatenation).
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.num_shared_experts * config.moe_intermediate_size)
            if config.num_shared_experts
            else None
        )
        # Tokens routed to each expert over the micro-batches of the current optimizer step (training only).
        self.register_buffer("pending_load", torch.zeros(config.num_routed_experts), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoE:
        """model.to(torch.bfloat16) and the like cast every floating buffer; the balancing bias and the loads stay
        float32, as in DeepSeek's reference: bias steps of 1e-3 vanish in bf16, and counts above 256 round."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves Module._apply unhinted
        self.gate.expert_bias = self.gate.expert_bias.float()
        self.pending_load = self.pending_load.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (batch, seq, hidden) -> (output, tokens per expert, sequence-wise auxiliary loss)."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        routing = self.gate(flat)
        chosen = routing.indices.flatten()
        # Tokens per expert; a scatter_add rather than bincount, whose data-dependent output shape breaks
        # torch.compile's graph at every MoE layer.
        counts = chosen.new_zeros(self.num_experts).scatter_add_(0, chosen, torch.ones_like(chosen))
        out = self.experts(flat, routing, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        counts = counts.float()
        if self.training:
            self.pending_load += counts
        aux_loss = x.new_zeros((), dtype=torch.float32)
        if self.training and self.seq_aux_loss_coef > 0:
            aux_loss = self._sequence_balance_loss(routing, batch, seq)
        return out.view(batch, seq, dim), counts, aux_loss

    def _sequence_balance_loss(self, routing: Routing, batch: int, seq: int) -> torch.Tensor:
        """DeepSeek-V3 eqs. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch."""
        scores = routing.scores.view(batch, seq, -1)
        probs = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # P_i
        chosen = F.one_hot(routing.indices.view(batch, -1), self.num_experts).sum(dim=1).float()
        fractions = chosen * self.num_experts / (self.top_k * seq)  # f_i
        return self.seq_aux_loss_coef * (fractions * probs).sum(dim=-1).mean()
