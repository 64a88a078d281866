"""Multi-token prediction (DeepSeek-V3 §2.2): the modules, their loss, and self-speculative decoding with them."""

import math

import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.errors import UserError
from deepseek.evaluation import evaluate
from deepseek.generate import generate
from deepseek.layers import rope_tables
from deepseek.model import DeepSeekLM, MultiTokenPrediction
from deepseek.speculative import SpeculativeStats
from deepseek.train_config import TrainConfig
from deepseek.train_step import training_loss
from deepseek.trainer import Trainer, TrainOutputs

from conftest import randomized


def mtp_model(depth: int, seed: int = 0, **overrides) -> DeepSeekLM:
    torch.manual_seed(seed)
    return randomized(DeepSeekLM(ModelConfig.from_preset("tiny", mtp_depth=depth, **overrides)), seed)


def test_mtp_depth_0_leaves_the_model_bit_identical():
    """The modules are created last, so the main weights, logits and loss are those of a model without them."""
    ids = torch.randint(0, 65, (2, 33))
    models = []
    for depth in (0, 2):
        torch.manual_seed(0)
        models.append(DeepSeekLM(ModelConfig.from_preset("tiny", mtp_depth=depth)))
    without, with_mtp = models
    for name, tensor in without.state_dict().items():
        assert torch.equal(tensor, with_mtp.state_dict()[name]), name
    plain, ahead = without(ids[:, :-1], ids[:, 1:]), with_mtp(ids[:, :-1], ids[:, 1:])
    assert torch.equal(plain.logits, ahead.logits) and torch.equal(plain.loss, ahead.loss)
    assert plain.mtp_logits == [] and plain.mtp_losses.numel() == 0
    assert training_loss(plain, 0.3) is plain.loss  # nothing added, not even a zero
    assert not any(name.startswith("mtp.") for name in without.state_dict())


def reference_mtp_losses(model: DeepSeekLM, ids: torch.Tensor) -> list[float]:
    """Eqs. 21-24 written out one position at a time: h'_i = M_k[RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)],
    h^k = Block_k(h') through its own norm, L_k = mean over i of -log P^k_{i+k+1}[t_{i+k+1}]."""
    inputs, seq = ids[:, :-1], ids.shape[1] - 1
    previous = model(inputs).hidden  # h^0: the normed final state the head reads
    losses = []
    for k, module in enumerate(model.mtp, start=1):
        assert isinstance(module, MultiTokenPrediction)
        rows = []
        for i in range(seq - k):
            token = model.embed(inputs[:, i + k])
            rows.append(module.eh_proj(torch.cat((module.enorm(token), module.hnorm(previous[:, i])), dim=-1)))
        cos, sin = rope_tables(model.config.qk_rope_head_dim, k, seq, model.config.rope_theta, ids.device)
        hidden = module.head_norm(module.block(torch.stack(rows, dim=1), cos, sin, None)[0])
        nll = []
        for i in range(seq - k):
            log_probs = model.head(hidden[:, i]).log_softmax(dim=-1)
            nll.append(-log_probs.gather(1, ids[:, i + k + 1, None]))
        losses.append(torch.cat(nll).mean().item())
        previous = hidden
    return losses


def test_mtp_losses_equal_a_per_position_reference():
    model = mtp_model(2).eval()
    ids = torch.randint(0, 65, (3, 21))
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
        expected = reference_mtp_losses(model, ids)
    assert [len(logits[0]) for logits in out.mtp_logits] == [19, 18]  # depth k scores seq - k positions
    assert out.mtp_losses.tolist() == pytest.approx(expected, abs=1e-5)
    loss = training_loss(out, 0.3)
    assert loss.item() == pytest.approx(out.loss.item() + 0.3 * sum(expected) / 2, abs=1e-5)


def test_gradients_reach_the_modules_and_the_shared_head_and_embedding():
    model = mtp_model(1)
    ids = torch.randint(0, 65, (2, 17))
    grads = {}
    for weight in (0.0, 0.3):
        model.zero_grad()
        training_loss(model(ids[:, :-1], ids[:, 1:]), weight).backward()
        grads[weight] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    module_grads = {n: g for n, g in grads[0.3].items() if n.startswith("mtp.")}
    assert module_grads and all(g.abs().sum() > 0 for n, g in module_grads.items() if "expert_bias" not in n)
    assert not any(n.startswith("mtp.") and g.abs().sum() > 0 for n, g in grads[0.0].items())
    for shared in ("head.weight", "embed.weight"):  # the MTP loss trains the shared head and embedding too
        assert not torch.equal(grads[0.0][shared], grads[0.3][shared]), shared


def test_mtp_moe_layers_count_loads_and_get_bias_updates(tmp_path):
    model = DeepSeekLM(ModelConfig.from_preset("tiny", mtp_depth=1))
    assert len(model.moe_layers()) == 2  # the main model's one MoE layer, then the module's
    tokens = torch.randint(0, 65, (4000,)).numpy()
    config = TrainConfig(
        max_steps=3,
        micro_batch_size=2,
        grad_accum_steps=1,
        seq_len=16,
        log_interval=1,
        eval_interval=3,
        eval_batches=1,
        sample_interval=100,
        checkpoint_interval=100,
    )
    trainer = Trainer(model, config, 0, TrainOutputs(tmp_path / "ck", tmp_path / "reports" / "train_log.csv"))
    trainer.fit(tokens, tokens)
    assert model.moe_layers()[1].gate.expert_bias.abs().sum() > 0
    row = trainer.history.train[-1]
    assert row["mtp_loss_1"] > 0 and math.isfinite(row["mtp_loss_1"])
    assert "mtp_loss_1" in (tmp_path / "reports" / "train_log.csv").read_text().splitlines()[0]


def test_evaluation_reports_each_depth_accuracy_and_greedy_acceptance():
    model = mtp_model(2).eval()
    tokens = torch.randint(0, 65, (12 * 16 + 1,)).numpy()  # twelve whole windows of 16
    metrics = evaluate(model, tokens, seq_len=16, batch_size=4)
    inputs = torch.as_tensor(tokens[:-1][: 12 * 16]).view(12, 16)
    targets = torch.as_tensor(tokens[1:][: 12 * 16]).view(12, 16)
    with torch.no_grad():
        out = model(inputs, predict_ahead=True)
        # what the main model itself predicts for token i + 1, one prefix at a time
        main_choice = torch.stack([model(inputs[:, : i + 1]).logits[:, -1].argmax(-1) for i in range(16)], dim=1)
    drafts = [logits.argmax(-1) for logits in out.mtp_logits]  # depth k's guess of token i + k + 1 at index i
    accuracy = [(d == targets[:, k:]).float().mean().item() for k, d in enumerate(drafts, 1)]
    acceptance = [(d == main_choice[:, k:]).float().mean().item() for k, d in enumerate(drafts, 1)]
    assert metrics["mtp_accuracy"] == pytest.approx(accuracy)
    assert metrics["mtp_acceptance"] == pytest.approx(acceptance)
    assert accuracy != acceptance


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_greedy_with_rejections_and_window_rebuilds(depth):
    # A small vocabulary and large weights: drafts are often right and often wrong. 200 tokens pass a 48-token
    # window several times, so verifications stop at the cache's end and the cache is rebuilt.
    model = mtp_model(depth, vocab_size=6, max_seq_len=48, init_std=0.5).eval()
    totals = SpeculativeStats()
    for seed in range(4):
        prompt = torch.randint(0, 6, (1, 3 + 7 * seed), generator=torch.Generator().manual_seed(seed))
        stats = SpeculativeStats()
        expected = generate(model, prompt, 200, temperature=0)
        assert torch.equal(generate(model, prompt, 200, temperature=0, speculative=True, stats=stats), expected)
        totals.drafted += stats.drafted
        totals.accepted += stats.accepted
    assert 0 < totals.accepted < totals.drafted  # both accepted drafts and rollbacks happened


def test_speculative_sampling_follows_the_model_distribution():
    """Chi-square test of the first two sampled tokens against p(x1) p(x2 | x1) computed from the model alone."""
    model = mtp_model(2, vocab_size=4, init_std=0.5).eval()
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        first = model(prompt).logits[0, -1].softmax(-1)
        pairs = torch.stack(
            [first[x] * model(torch.tensor([[1, 2, 3, x]])).logits[0, -1].softmax(-1) for x in range(4)]
        ).flatten()
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    samples = 2000
    for _ in range(samples):
        tokens = generate(model, prompt, 3, temperature=1.0, generator=generator, speculative=True)[0, 3:5]
        counts[4 * tokens[0] + tokens[1]] += 1
    expected = samples * pairs
    chi2 = ((counts - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor(15 / 2), chi2 / 2).item()  # chi-square, 15 degrees of freedom
    assert p_value > 0.001, (p_value, counts.tolist(), expected.tolist())


def test_speculative_decoding_needs_the_modules():
    with pytest.raises(UserError, match="mtp_depth"):
        generate(mtp_model(0), torch.tensor([[1, 2]]), 5, speculative=True)
