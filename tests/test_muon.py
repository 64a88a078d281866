"""Muon (deepseek/muon.py) against a plain Newton-Schulz written out, against torch.optim.Muon, and in a model."""

import math

import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from deepseek.muon import MuonWithAdamW, newton_schulz
from deepseek.optim import build_optimizer
from deepseek.train_config import TrainConfig

LR, WEIGHT_DECAY, MOMENTUM = 0.02, 0.1, 0.95


def plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """One matrix in float64, the quintic spelled out: X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if transposed else x


def plain_muon_steps(weight: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Moonlight's update for one matrix, step by step: Nesterov momentum, orthogonalised, RMS matched to AdamW."""
    w, momentum = weight.double(), torch.zeros_like(weight, dtype=torch.float64)
    scale = 0.2 * math.sqrt(max(weight.shape))
    for grad in grads:
        g = grad.double()
        momentum = MOMENTUM * momentum + (1 - MOMENTUM) * g
        nesterov = g + MOMENTUM * (momentum - g)
        w = w * (1 - LR * WEIGHT_DECAY) - LR * scale * plain_newton_schulz(nesterov)
    return w


def ours_after(weight: torch.Tensor, grads: list[torch.Tensor], ns_dtype: torch.dtype) -> torch.Tensor:
    param = torch.nn.Parameter(weight.clone())
    optimizer = MuonWithAdamW(
        [{"params": [param], "muon": True, "weight_decay": WEIGHT_DECAY}], lr=LR, betas=(0.9, 0.95), ns_dtype=ns_dtype
    )
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_steps_on_a_matrix_equal_the_update_written_out(shape):
    torch.manual_seed(0)
    weight, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
    ours = ours_after(weight, grads, torch.float32)
    torch.testing.assert_close(ours.double(), plain_muon_steps(weight, grads), rtol=0, atol=2e-5)
    assert not torch.allclose(ours, weight, atol=1e-3)  # the steps moved it


def test_muon_steps_on_stacked_experts_orthogonalise_each_expert_on_its_own():
    torch.manual_seed(1)
    weight, grads = torch.randn(4, 24, 40), [torch.randn(4, 24, 40) for _ in range(3)]
    grads[0][2] = 0  # an expert no token reached at the first step
    ours = ours_after(weight, grads, torch.float32)
    for expert in range(4):
        reference = plain_muon_steps(weight[expert], [g[expert] for g in grads])
        torch.testing.assert_close(ours[expert].double(), reference, rtol=0, atol=2e-5)
    # Orthogonalising the whole stack as one matrix would give another update.
    whole = plain_newton_schulz(grads[1].reshape(-1, 40)).reshape(4, 24, 40)
    assert not torch.allclose(newton_schulz(grads[1], dtype=torch.float32).double(), whole, atol=1e-2)


@pytest.mark.parametrize("shape", [(64, 128), (192, 64)])
def test_muon_steps_in_bf16_equal_torch_optim_muon_with_moonlights_scale(shape):
    torch.manual_seed(2)
    weight, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
    reference = torch.nn.Parameter(weight.clone())
    torch_muon = torch.optim.Muon(
        [reference], lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, adjust_lr_fn="match_rms_adamw"
    )
    for grad in grads:
        reference.grad = grad.clone()
        torch_muon.step()
    assert torch.equal(ours_after(weight, grads, torch.bfloat16), reference.detach())


def test_newton_schulz_brings_every_singular_value_near_one():
    torch.manual_seed(3)
    matrices = torch.randn(3, 32, 48) @ torch.diag(torch.logspace(-2, 0, 48))  # condition number ~100
    singular_values = torch.linalg.svdvals(newton_schulz(matrices, dtype=torch.float32))
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25  # the quintic's band, not exactly 1
    assert torch.linalg.svdvals(matrices).max() / torch.linalg.svdvals(matrices).min() > 100


def test_the_model_splits_into_muon_matrices_and_adamw_for_embedding_head_and_norms():
    model = DeepSeekLM(ModelConfig.from_preset("tiny", mtp_depth=1))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.float32)
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.param_groups if group["muon"] for p in group["params"]}
    adamw = {names[id(p)] for group in optimizer.param_groups if not group["muon"] for p in group["params"]}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert {"embed.weight", "head.weight", "norm.weight"} <= adamw
    assert {"layers.1.ffn.experts.gate_up_proj", "layers.0.attn.wkv_b.weight", "mtp.0.eh_proj.weight"} <= muon
    assert all(model.get_parameter(name).dim() >= 2 for name in muon)


def test_the_adamw_part_equals_torch_adamw_and_the_default_optimizer_is_plain_adamw():
    torch.manual_seed(4)
    model = DeepSeekLM(ModelConfig.from_preset("tiny"))
    reference = DeepSeekLM(ModelConfig.from_preset("tiny"))
    reference.load_state_dict(model.state_dict())
    config = TrainConfig(optimizer="muon", lr=1e-2)
    ours = build_optimizer(model, config, torch.float32)
    plain = build_optimizer(reference, TrainConfig(lr=1e-2), torch.float32)
    assert type(plain) is torch.optim.AdamW
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for m, optimizer in ((model, ours), (reference, plain)):  # one step: the same gradients in both
        m(ids, ids).loss.backward()
        optimizer.step()
    for name in ("embed.weight", "head.weight", "norm.weight", "layers.0.attn_norm.weight"):
        assert torch.equal(model.get_parameter(name), reference.get_parameter(name)), name
    assert not torch.equal(
        model.get_parameter("layers.0.attn.wo.weight"), reference.get_parameter("layers.0.attn.wo.weight")
    )


def test_the_state_round_trips_through_state_dict():
    torch.manual_seed(5)
    model = DeepSeekLM(ModelConfig.from_preset("tiny"))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, ids).loss.backward()
    optimizer.step()
    restored = build_optimizer(model, TrainConfig(optimizer="muon"), torch.float32)
    restored.load_state_dict(optimizer.state_dict())
    expert = model.get_parameter("layers.1.ffn.experts.down_proj")
    assert torch.equal(restored.state[expert]["momentum_buffer"], optimizer.state[expert]["momentum_buffer"])
    assert restored.state[expert]["momentum_buffer"].abs().sum() > 0
    assert [group["muon"] for group in restored.param_groups] == [True, False, False]
