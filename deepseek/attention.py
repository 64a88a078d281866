"""Multi-Head Latent Attention (DeepSeek-V2 §2.1) and its latent KV cache.

Notation follows the paper. For a hidden state h_t:

    c_Q  = RMSNorm(W_DQ h)          q = W_UQ c_Q = [q_nope ; q_rope]        (per head)
    c_KV = RMSNorm(W_DKV h)         k_nope = W_UK c_KV,  v = W_UV c_KV      (per head)
    k_rope = RoPE(W_KR h)                                                  (one key, shared by all heads)
    attention(q, [k_nope ; k_rope], v) with scale 1/sqrt(nope + rope)

Training, and a prompt on an empty cache, materialise per-head keys and values and call
scaled_dot_product_attention. Decoding never does: the cache holds only c_KV and k_rope, W_UK is folded
into the query and W_UV is applied after attention over the latent ("weight absorption").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.config import ModelConfig
from deepseek.layers import RMSNorm, apply_rope

# Both reference implementations (DeepSeek-V3's inference code and transformers) fix the epsilon of the
# two latent norms at 1e-6 whatever rms_norm_eps says; we do the same so that weights move between them.
LATENT_NORM_EPS = 1e-6


class LatentCache:
    """What MLA keeps per generated token: the normalised latent c_KV and the rotated RoPE key.

    One tensor of shape (layers, batch, max_len, kv_lora_rank + qk_rope_head_dim), so that the keys of
    absorbed attention are a view of it, with no copy per step. layers: the model's layers it serves (all
    the main ones by default; one multi-token prediction module's, numbered after them, for its own cache).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        layers: range | None = None,
    ) -> None:
        if max_len > config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len ({config.max_seq_len})")
        layers = layers if layers is not None else range(config.num_layers)
        self.first_layer = layers.start
        self.kv_lora_rank = config.kv_lora_rank
        self.data = torch.zeros(
            len(layers),
            batch_size,
            max_len,
            config.kv_lora_rank + config.qk_rope_head_dim,
            device=device,
            dtype=dtype,
        )
        self.length = 0  # tokens stored so far: read it, move it with advance() and reset()

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    @property
    def values_per_token_per_layer(self) -> int:
        return self.data.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        return self.data.shape[0] * self.data.shape[-1] * self.data.element_size()

    def advance(self, tokens: int) -> None:
        """Count tokens that every layer has appended (the model calls this after each forward)."""
        if self.length + tokens > self.max_len:
            raise ValueError(f"cache is full: {self.length + tokens} tokens do not fit in {self.max_len}")
        self.length += tokens

    def reset(self) -> None:
        """Forget everything stored; the next forward starts at position 0."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget the entries from position length on (speculative decoding drops rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def append(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Store this layer's new entries at positions [length, length + seq); return all entries so far."""
        end = self.length + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache is full: {end} tokens do not fit in {self.max_len}")
        slot = layer - self.first_layer
        self.data[slot, :, self.length : end] = torch.cat((latent, k_rope), dim=-1).to(self.data.dtype)
        return self.data[slot, :, :end]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which slot of a LatentCache is this layer's
        self.num_heads = config.num_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.scale = config.qk_head_dim**-0.5
        qk_out = config.num_heads * config.qk_head_dim
        if config.q_lora_rank == 0:
            self.wq = nn.Linear(config.hidden_size, qk_out, bias=False)
        else:
            self.wq_a = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)  # W_DQ
            self.q_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(config.q_lora_rank, qk_out, bias=False)  # W_UQ (and W_QR)
        # W_DKV and W_KR in one matmul: the latent and the shared RoPE key both come from h.
        self.wkv_a = nn.Linear(config.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        # W_UK and W_UV stacked per head: rows [head, nope + v].
        self.wkv_b = nn.Linear(
            config.kv_lora_rank, config.num_heads * (config.qk_nope_head_dim + config.v_head_dim), bias=False
        )
        self.wo = nn.Linear(config.num_heads * config.v_head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> torch.Tensor:
        """x: (batch, seq, hidden). cos, sin: RoPE tables for the positions of x."""
        batch, seq, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_rope = q.view(batch, seq, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)

        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # one key for all heads

        if cache is None:
            out = self._attend_expanded(q_nope, q_rope, latent, k_rope)
        else:
            start = cache.length
            cached = cache.append(self.layer, latent, k_rope)
            if start == 0 and seq > 1:
                # A prompt on an empty cache sees only itself: the expanded path runs fused causal SDPA,
                # several times faster than absorbed attention over a long prompt. Decoding absorbs.
                out = self._attend_expanded(q_nope, q_rope, latent, k_rope)
            else:
                out = self._attend_absorbed(q_nope, q_rope, cached, start)
        projected: torch.Tensor = self.wo(out.reshape(batch, seq, -1))  # typed here: nn.Module calls return Any
        return projected

    def _attend_expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> torch.Tensor:
        """Training path: up-project the latent to per-head keys and values, causal SDPA."""
        batch, seq, heads, _ = q_nope.shape
        k_nope, v = self.wkv_b(latent).view(batch, seq, heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(-1, -1, heads, -1)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        # The fused (flash) SDPA kernels want one head size for q, k and v; zero columns in v cost
        # little and come out as zero columns, which are dropped.
        v_pad = q.shape[-1] - self.v_dim
        if v_pad > 0:
            v = F.pad(v, (0, v_pad))
        out = causal_attention(q, k, v, self.scale)
        return out[..., : self.v_dim].transpose(1, 2)  # (batch, seq, heads, v_dim)

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cached: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Decoding path over the cache (batch, cached_len, kv_lora_rank + rope_dim), queries at start.

        q_nope . (W_UK c) = (W_UK^T q_nope) . c, so the query moves into latent space and the keys stay
        compressed. Attention then runs as multi-query attention whose single key is [c ; k_rope] and
        whose single value is c; W_UV maps the result back to per-head values.
        """
        batch, seq, heads, _ = q_nope.shape
        w_kv_b = self.wkv_b.weight.view(heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = torch.split(w_kv_b, [self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        # Every head attends over the same single key and value per position, so the heads are folded into
        # the query rows of one single-head attention: no per-head copy of the cache. Plain matmuls, not SDPA:
        # with a value narrower than the key, SDPA's CPU fallback also rescales every cached key, every step.
        q = torch.cat((q_latent, q_rope), dim=-1).reshape(batch, seq * heads, -1)
        keys = cached.to(q.dtype)  # (batch, cached_len, rank + rope)
        scores = (q * self.scale) @ keys.transpose(1, 2)  # (batch, seq * heads, cached_len)
        if seq > 1:  # a prompt chunk: query i sits at position start + i and sees keys up to there
            positions = torch.arange(cached.shape[1], device=q.device)
            query_positions = (start + torch.arange(seq, device=q.device)).repeat_interleave(heads)
            scores = scores.masked_fill(positions[None, :] > query_positions[:, None], float("-inf"))
        out = scores.softmax(dim=-1, dtype=torch.float32).type_as(q) @ keys[..., : self.kv_lora_rank]
        out = out.view(batch, seq, heads, self.kv_lora_rank)
        return torch.einsum("bshc,hdc->bshd", out, w_uv)


# Up to this many positions, bf16 attention on CPU materialises its scores (see causal_attention).
CPU_MATERIALISED_MAX_SEQ = 512


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over (batch, heads, seq, dim) tensors: SDPA, except in bf16 or fp16 on CPU.

    There torch's flash kernel runs slower than in fp32 at this model's head sizes (forward and backward of
    16 x 4 heads x 128 positions x 48: 13.3 ms in bf16, 7.6 in fp32), while the plain formula, bf16 matmuls
    around a float32 softmax, trains the `cpu` preset 1.3x faster than fp32 flash attention (and fuses under
    torch.compile). Its (seq x seq) scores grow with the square of the length, so longer sequences attend in
    float32 with the flash kernel instead.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    seq = q.shape[-2]
    if seq > CPU_MATERIALISED_MAX_SEQ:
        with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale)
        return out.to(q.dtype)
    scores = (q @ k.transpose(-2, -1)).float() * scale
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return weights.to(v.dtype) @ v
