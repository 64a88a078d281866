import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepseek.balance import balance_report, max_violation
from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from deepseek.train_step import global_expert_loads


def skewed_model(rate: float = 1e-3, rule: str = "sign") -> DeepSeekLM:
    """A model whose routers strongly prefer experts 0 and 1 for every token.

    Every embedding shares one direction u, which dominates the small-init residual stream, and the
    routers of experts 0 and 1 point along u.
    """
    config = ModelConfig.from_preset(
        "tiny", num_routed_experts=8, num_experts_per_tok=2, bias_update_rate=rate, bias_update_rule=rule
    )
    model = DeepSeekLM(config)
    u = torch.nn.functional.normalize(torch.randn(config.hidden_size), dim=0)
    with torch.no_grad():
        model.embed.weight += 0.1 * u
        for moe in model.moe_layers():
            moe.gate.weight[:2] += 0.5 * u
    return model


def test_max_violation():
    assert max_violation(torch.tensor([5.0, 5.0, 5.0, 5.0])) == 0
    assert max_violation(torch.tensor([[10.0, 0.0, 5.0, 5.0]])).item() == 1.0
    report = balance_report(torch.tensor([[2.0, 2.0], [3.0, 1.0]]))
    assert report["max_vio_global"] == 0.25
    assert report["layers"][1]["load_fractions"] == [0.75, 0.25]


def test_repeated_bias_updates_drive_a_skewed_router_to_balance():
    model = skewed_model(rate=0.003).train()
    held_out = torch.randint(0, model.config.vocab_size, (8, 32))
    with torch.no_grad():
        start = max_violation(model.eval()(held_out).expert_counts).mean()
        model.train()
        for _ in range(100):
            model(torch.randint(0, model.config.vocab_size, (8, 32)))
            model.update_expert_bias()
        end = max_violation(model.eval()(held_out).expert_counts).mean()
    assert start > 2.5  # nearly every token picks experts 0 and 1
    assert end < 0.6, end


def test_update_uses_every_micro_batch_of_the_step():
    model = skewed_model(rate=0.5).train()
    gen = torch.Generator().manual_seed(1)
    micro_batches = [torch.randint(0, 65, (2, 16), generator=gen) for _ in range(3)]
    counts = sum(model(ids).expert_counts for ids in micro_batches)
    bias_before = torch.stack([moe.gate.expert_bias.clone() for moe in model.moe_layers()])
    used = model.update_expert_bias()
    torch.testing.assert_close(used, counts)
    bias_after = torch.stack([moe.gate.expert_bias for moe in model.moe_layers()])
    expected_step = 0.5 * torch.sign(counts.mean(-1, keepdim=True) - counts)
    torch.testing.assert_close(bias_after - bias_before, expected_step)
    assert all(moe.pending_load.sum() == 0 for moe in model.moe_layers())


def test_the_error_rule_moves_each_bias_by_its_relative_under_load():
    """Wang et al.'s alternative to the sign: b_i += rate * e_i, e_i = (mean load - load_i) / mean load."""
    model = skewed_model(rate=0.5, rule="error")
    loads = torch.tensor([[4.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]).repeat(len(model.moe_layers()), 1)
    model.update_expert_bias(loads)
    expected = 0.5 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # mean load 2: +100% and -100%
    for moe in model.moe_layers():
        torch.testing.assert_close(moe.gate.expert_bias, expected)


def test_nothing_is_updated_in_eval_mode():
    model = skewed_model(rate=0.5).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 65, (4, 16)))
    assert out.expert_counts.sum() > 0  # statistics are still reported
    model.update_expert_bias()
    assert all(moe.gate.expert_bias.abs().sum() == 0 for moe in model.moe_layers())


def test_optimizer_never_touches_the_bias():
    model = skewed_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.moe_layers()[0].gate.expert_bias.fill_(0.25)
    model(torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))).loss.backward()
    optimizer.step()
    assert torch.all(model.moe_layers()[0].gate.expert_bias == 0.25)


def _distributed_update(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = skewed_model(rate=0.5).train()
    for moe in model.moe_layers():  # each rank saw different tokens
        moe.pending_load.copy_(torch.arange(8.0) * (rank + 1) if rank == 0 else torch.arange(8.0).flip(0) * 3)
    model.update_expert_bias(global_expert_loads(model))  # what Trainer.train_step does
    results[rank] = torch.stack([moe.gate.expert_bias for moe in model.moe_layers()])
    dist.destroy_process_group()


def test_loads_are_summed_across_processes():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_distributed_update, args=(2, port, results), nprocs=2)
    total = torch.arange(8.0) + torch.arange(8.0).flip(0) * 3
    expected = 0.5 * torch.sign(total.mean() - total)
    for rank in range(2):
        assert torch.equal(results[rank][0], expected)
    assert torch.equal(results[0], results[1])
