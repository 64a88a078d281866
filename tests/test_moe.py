import pytest
import torch
import torch.nn.functional as F

from deepseek import moe as moe_module
from deepseek.config import ModelConfig
from deepseek.moe import MoE


def reference_moe(moe: MoE, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE one token at a time, with Python loops and no batching tricks."""
    out = torch.zeros_like(x)
    per_group = config.num_routed_experts // config.n_group
    for t in range(x.shape[0]):
        logits = moe.gate.weight @ x[t]
        scores = logits.sigmoid() if config.score_func == "sigmoid" else logits.softmax(-1)
        choice = scores + moe.gate.expert_bias
        allowed = list(range(config.num_routed_experts))
        if config.n_group > 1:  # V2 (softmax) ranks groups by their best expert, V3 (sigmoid) by their best two
            groups = [choice[g * per_group : (g + 1) * per_group] for g in range(config.n_group)]
            ranked = 1 if config.score_func == "softmax" else 2
            group_score = [sorted(g.tolist(), reverse=True)[:ranked] for g in groups]
            best = sorted(range(config.n_group), key=lambda g: -sum(group_score[g]))[: config.topk_group]
            allowed = [e for e in allowed if e // per_group in best]
        chosen = sorted(allowed, key=lambda e: -choice[e].item())[: config.num_experts_per_tok]
        weights = scores[chosen]
        if config.score_func == "sigmoid":
            weights = weights / weights.sum()
        for w, e in zip(weights * config.routed_scaling_factor, chosen, strict=True):
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
        if moe.shared_experts is not None:
            out[t] += moe.shared_experts(x[t])
    return out


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(score_func="softmax", num_shared_experts=0),
        dict(num_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5),
        dict(score_func="softmax", num_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2),
        dict(num_shared_experts=2, num_experts_per_tok=1),
        dict(moe_intermediate_size=6),  # 24-byte rows: experts run one matmul each instead of grouped_mm
    ],
)
def test_moe_matches_per_token_reference(changes):
    config = ModelConfig.from_preset("tiny", **changes)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.expert_bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 12, config.hidden_size)
    out, counts, _ = moe(x)
    with torch.no_grad():
        expected = reference_moe(moe, config, x.view(-1, config.hidden_size))
    torch.testing.assert_close(out.view(-1, config.hidden_size), expected, atol=1e-5, rtol=1e-5)
    assert counts.sum() == 24 * config.num_experts_per_tok


def test_float64_runs_the_per_expert_path_on_cpu():
    """torch's grouped GEMM takes no float64; the experts then run one matmul each, to the same result."""
    config = ModelConfig.from_preset("tiny")
    moe = MoE(config).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, config.hidden_size, dtype=torch.float64)
    out, _, _ = moe(x)
    with torch.no_grad():
        expected = reference_moe(moe, config, x.view(-1, config.hidden_size))
    torch.testing.assert_close(out.view(-1, config.hidden_size), expected, atol=1e-5, rtol=1e-5)  # fp32 router


def test_a_cast_to_bf16_keeps_the_balancing_bias_and_loads_float32():
    from deepseek.model import DeepSeekLM

    model = DeepSeekLM(ModelConfig.from_preset("tiny", bias_update_rate=1e-3)).to(torch.bfloat16)
    moe = model.moe_layers()[0]
    assert moe.gate.expert_bias.dtype == moe.pending_load.dtype == torch.float32
    moe.gate.expert_bias.fill_(1.0)
    model.update_expert_bias(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert moe.gate.expert_bias.tolist() == pytest.approx([1.001, 1.001, 0.999, 0.999])  # 1 +- 1e-3 is 1 in bf16
    assert model.head.weight.dtype == torch.bfloat16


def test_bias_changes_selection_but_not_gating_weights():
    config = ModelConfig.from_preset("tiny", num_routed_experts=6, num_experts_per_tok=2, routed_scaling_factor=2.0)
    moe = MoE(config)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(64, config.hidden_size)
    plain = moe.gate(x)
    moe.gate.expert_bias[3] = 10.0  # every token now picks expert 3
    biased = moe.gate(x)
    assert (biased.indices == 3).any(dim=-1).all()
    assert not torch.equal(plain.indices.sort(-1).values, biased.indices.sort(-1).values)
    # Gating weights are the unbiased scores of the chosen experts, normalised, times the scaling factor.
    chosen_scores = biased.scores.gather(-1, biased.indices)
    torch.testing.assert_close(biased.weights, 2.0 * chosen_scores / chosen_scores.sum(-1, keepdim=True))
    torch.testing.assert_close(biased.scores, plain.scores)
    # Where the bias leaves the chosen set alone, the weights are identical.
    same = (plain.indices.sort(-1).values == biased.indices.sort(-1).values).all(-1)
    assert same.any()
    order_p, order_b = plain.indices.argsort(-1), biased.indices.argsort(-1)
    torch.testing.assert_close(plain.weights.gather(-1, order_p)[same], biased.weights.gather(-1, order_b)[same])


def test_bias_is_a_buffer_not_a_parameter(tiny_config):
    moe = MoE(tiny_config)
    names = dict(moe.named_parameters())
    assert "gate.expert_bias" not in names
    assert "gate.expert_bias" in moe.state_dict()


def test_forward_never_changes_the_bias(tiny_config):
    moe = MoE(tiny_config).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    before = moe.gate.expert_bias.clone()
    moe(torch.randn(2, 8, tiny_config.hidden_size))[0].sum().backward()
    assert torch.equal(moe.gate.expert_bias, before)
    assert moe.pending_load.sum() == 16 * tiny_config.num_experts_per_tok


def test_sequence_aux_loss_matches_formula():
    config = ModelConfig.from_preset("tiny", seq_aux_loss_coef=0.01)
    moe = MoE(config).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(3, 10, config.hidden_size)
    _, _, aux = moe(x)
    expected = 0.0
    for seq in x:
        routing = moe.gate(seq)
        s = routing.scores / routing.scores.sum(-1, keepdim=True)
        f = torch.stack([(routing.indices == i).sum() for i in range(config.num_routed_experts)]).float()
        f = f * config.num_routed_experts / (config.num_experts_per_tok * 10)
        expected += 0.01 * (f * s.mean(0)).sum() / 3
    torch.testing.assert_close(aux, expected)
    assert aux.requires_grad
    moe.eval()
    assert moe(x)[2] == 0  # the auxiliary loss is a training signal only


@pytest.mark.parametrize("dim, grouped", [(8, True), (6, False)])  # 6 floats: rows grouped_mm cannot take
def test_grouped_linear_matches_a_matmul_per_expert_with_empty_experts(dim, grouped):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 1])  # experts 1 and 3 get no tokens
    x = torch.randn(int(counts.sum()), dim, requires_grad=True)
    weight = torch.randn(len(counts), 4, dim, requires_grad=True)
    assert moe_module.grouped_mm_supported(x, weight) == grouped
    sizes = None if grouped else counts.tolist()
    out = moe_module.grouped_linear(x, weight, counts.cumsum(0).to(torch.int32), sizes)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    expected = torch.stack([weight[e] @ x[i] for i, e in enumerate(expert_of_row.tolist())])
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight), grad)
    want = torch.autograd.grad(expected, (x, weight), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_row_block_pads_only_reduced_precision_on_cpu_and_only_many_rows():
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert moe_module.row_block(4096, 8, bf16) == 32  # the default training step: 16 x 128 tokens, top-2 of 8
    assert moe_module.row_block(10**6, 8, bf16) == moe_module.MAX_ROW_BLOCK
    assert moe_module.row_block(2, 8, bf16) == 1  # decoding one token: nothing to pad
    assert moe_module.row_block(4096, 8, fp32) == 1  # float32 kernels are not made per shape


def test_padded_layout_puts_each_expert_on_block_boundaries_within_a_fixed_capacity():
    counts = torch.tensor([5, 0, 17, 1])
    experts = torch.repeat_interleave(torch.arange(4), counts)
    layout = moe_module.PaddedLayout.of(experts, counts, block=8)
    assert layout.capacity == 56  # 23 rows + 4 x 7 at most, in whole blocks: the same for any counts summing to 23
    assert layout.ends.tolist() == [8, 8, 32, 56]  # the last group runs to the capacity
    assert layout.positions.tolist() == [*range(5), *range(8, 25), 32]
    sizes = moe_module.group_sizes(layout.ends)
    assert all(size % 8 == 0 for size in sizes.tolist())


def test_expert_group_shapes_are_bounded_however_the_routing_changes():
    torch.manual_seed(0)
    rows, num_experts, block = 4096, 8, 32
    seen = set()
    for _ in range(200):  # routings from balanced to very skewed, as training moves the router
        skew = torch.rand(num_experts) ** torch.randint(1, 8, ()).item()
        experts = torch.multinomial(skew / skew.sum(), rows, replacement=True).sort().values
        counts = torch.bincount(experts, minlength=num_experts)
        layout = moe_module.PaddedLayout.of(experts, counts, block)
        seen |= set(moe_module.group_sizes(layout.ends).tolist())
    assert all(size % block == 0 for size in seen)
    assert len(seen) <= layout.capacity // block + 1  # unpadded, nearly every step brings new counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_experts_give_the_unpadded_outputs_and_gradients(monkeypatch, dtype):
    config = ModelConfig.from_preset("tiny", num_routed_experts=4, moe_intermediate_size=16)
    x = torch.randn(64, 32, config.hidden_size)  # 4,096 routed rows: padded to multiples of 32 rows
    results = []
    for block in (1, moe_module.MAX_ROW_BLOCK):
        monkeypatch.setattr(moe_module, "MAX_ROW_BLOCK", block)
        torch.manual_seed(0)
        moe = MoE(config)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.3)
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            out, _, _ = moe(inputs)
        out.float().square().sum().backward()
        results.append([out, inputs.grad, *(p.grad for p in moe.parameters())])
    assert moe_module.row_block(64 * 32 * 2, 4, torch.zeros(1, dtype=dtype)) > 1
    for unpadded, padded in zip(*results, strict=True):
        torch.testing.assert_close(padded, unpadded, atol=1e-2, rtol=1e-2)
