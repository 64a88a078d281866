import math

import pytest
import torch
import torch.nn.functional as F

from deepseek.attention import CPU_MATERIALISED_MAX_SEQ, MultiHeadLatentAttention, causal_attention
from deepseek.config import ModelConfig
from deepseek.layers import apply_rope, rope_tables
from deepseek.model import DeepSeekLM

from conftest import randomized


def reference_mla(attn, x, cos, sin):
    """MLA written out head by head with an explicit causal softmax: no SDPA, no absorption."""
    batch, seq, _ = x.shape
    q = attn.wq(x) if attn.q_lora_rank == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(batch, seq, attn.num_heads, -1)
    latent, k_rope = attn.wkv_a(x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    kv = attn.wkv_b(attn.kv_norm(latent)).view(batch, seq, attn.num_heads, -1)
    k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)
    heads = []
    for h in range(attn.num_heads):
        q_rope = apply_rope(q[:, :, h : h + 1, attn.nope_dim :], cos, sin)[:, :, 0]
        q_h = torch.cat((q[:, :, h, : attn.nope_dim], q_rope), -1)
        k_h = torch.cat((kv[:, :, h, : attn.nope_dim], k_rope[:, :, 0]), -1)
        v_h = kv[:, :, h, attn.nope_dim :]
        scores = q_h @ k_h.transpose(1, 2) / math.sqrt(attn.nope_dim + attn.rope_dim)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v_h)
    return attn.wo(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_sdpa_attention_matches_plain_reference(q_lora_rank):
    model = randomized(DeepSeekLM(ModelConfig.from_preset("tiny", q_lora_rank=q_lora_rank)))
    attn = model.layers[0].attn
    assert isinstance(attn, MultiHeadLatentAttention)
    x = torch.randn(2, 20, model.config.hidden_size)
    c = model.config
    cos, sin = rope_tables(c.qk_rope_head_dim, 0, 20, c.rope_theta)
    torch.testing.assert_close(attn(x, cos, sin), reference_mla(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_changing_a_token_changes_no_earlier_logit(tiny_config):
    model = randomized(DeepSeekLM(tiny_config)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 48))
    for t in (0, 17, 47):
        changed = ids.clone()
        changed[0, t] = (ids[0, t] + 1) % tiny_config.vocab_size
        with torch.no_grad():
            before, after = model(ids).logits, model(changed).logits
        assert torch.equal(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t], after[:, t])


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_latent_cache_decoding_equals_full_forward(q_lora_rank):
    config = ModelConfig.from_preset("tiny", q_lora_rank=q_lora_rank, max_seq_len=96)
    model = randomized(DeepSeekLM(config)).eval()
    ids = torch.randint(0, config.vocab_size, (2, 88))
    cache = model.new_cache(batch_size=2, max_len=88)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :16], cache=cache).logits, model(ids[:, 16:24], cache=cache).logits]  # prompt chunks
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(24, 88)]  # 64 single-token steps
    assert cache.length == 88
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cache_holds_only_latent_and_rope_key(tiny_config):
    model = DeepSeekLM(tiny_config)
    cache = model.new_cache(batch_size=3, max_len=40)
    per_token = tiny_config.kv_lora_rank + tiny_config.qk_rope_head_dim
    assert cache.values_per_token_per_layer == per_token
    assert cache.data.shape == (tiny_config.num_layers, 3, 40, per_token)
    assert cache.data.numel() == tiny_config.num_layers * 3 * 40 * per_token
    assert cache.bytes_per_token == per_token * 4 * tiny_config.num_layers


def test_too_long_input_is_refused(tiny_config):
    model = DeepSeekLM(tiny_config)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, tiny_config.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("seq", [64, CPU_MATERIALISED_MAX_SEQ + 16])  # materialised scores, then flash in fp32
def test_bf16_causal_attention_on_cpu_follows_float32_sdpa(seq):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, seq, 48, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.15)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    low_q, low_k, low_v = low
    actual = causal_attention(low_q, low_k, low_v, scale=0.15)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)  # bf16 keeps 8 bits of mantissa
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad.bfloat16())
    for reference, ours in zip((q, k, v), low, strict=True):
        assert ours.grad is not None and reference.grad is not None
        torch.testing.assert_close(ours.grad.float(), reference.grad, atol=5e-2, rtol=5e-2)
    # the future never leaks into the past: the first position attends to itself only
    torch.testing.assert_close(actual[:, :, 0].float(), low[2][:, :, 0].float(), atol=0, rtol=0)
