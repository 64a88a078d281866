import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.generate import generate
from deepseek.model import DeepSeekLM
from deepseek.sampling import sample_next

from conftest import randomized


@pytest.fixture
def model():
    return randomized(DeepSeekLM(ModelConfig.from_preset("tiny", max_seq_len=48)))


def test_greedy_with_cache_equals_recomputing_everything(model):
    prompt = torch.randint(0, 65, (2, 5))
    cached = generate(model, prompt, max_new_tokens=30, temperature=0)
    uncached = generate(model, prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


def windowed_greedy(model: DeepSeekLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with generate's rule for long contexts, by full forwards and no cache: the context is
    at most the last max_seq_len tokens, and when a full window has been read it restarts from the most
    recent half window."""
    window, tokens = model.config.max_seq_len, prompt
    start = max(0, prompt.shape[1] - window)
    with torch.no_grad():
        for step in range(new_tokens):
            if tokens.shape[1] - 1 - start == window and step > 0:  # the cache would be full: rebuild it
                start = tokens.shape[1] - window // 2
            next_token = model(tokens[:, start:]).logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat((tokens, next_token), dim=1)
    return tokens


@pytest.mark.parametrize("prompt_len", [5, 40, 60])
def test_generation_past_the_context_window_rebuilds_the_cache_from_the_last_half_window(model, prompt_len):
    model.eval()
    prompt = torch.randint(0, 65, (1, prompt_len))
    out = generate(model, prompt, max_new_tokens=70, temperature=0)
    assert out.shape == (1, prompt_len + 70)  # past max_seq_len (48), twice
    assert torch.equal(out, windowed_greedy(model, prompt, 70))


def test_sampling_is_reproducible_with_a_seeded_generator(model):
    prompt = torch.randint(0, 65, (1, 4))
    runs = [
        generate(model, prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_generate_restores_training_mode_and_leaves_balancing_alone(model):
    model.train()
    generate(model, torch.randint(0, 65, (1, 4)), 5)
    assert model.training
    assert all(moe.pending_load.sum() == 0 for moe in model.moe_layers())


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    top_k = {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {sample_next(logits, 1.0, top_p=0.7, generator=gen).item() for _ in range(200)}
    assert top_p == {0, 1}  # 0.5 alone is below 0.7, 0.5 + 0.3 covers it
    assert sample_next(logits, 0).item() == 0


def test_last_logits_only_is_the_last_row_of_the_full_logits(model):
    ids = torch.randint(0, 65, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_logits_only=True).logits, model(ids).logits[:, -1:])
