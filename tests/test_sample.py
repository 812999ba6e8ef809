"""sample.py's generate for every model: cached decoding samples what the full forward would, and
past block_size it follows its documented window rule (refill from the last block_size/2 tokens)."""
import pytest
import torch

from conftest import MODEL_NAMES, build, tokens
from sample import generate


def small(name):
    """A model with a short block, so that a short generation crosses block_size twice."""
    return build(name, block_size=16).eval()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cached_sampling_draws_what_the_full_forward_draws(name):
    """Within block_size: temperature and top-k through the cache give, draw for draw, the tokens of
    re-running the whole forward (crop=True), for a batch of different prompts."""
    model = small(name)
    x = tokens(3, 4, seed=7)
    torch.manual_seed(5)
    cached = generate(model, x, 12, temperature=0.8, top_k=10)
    torch.manual_seed(5)
    rerun = generate(model, x, 12, temperature=0.8, top_k=10, crop=True)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, rerun)
    assert not torch.equal(cached[0, 4:], cached[1, 4:])  # different prompts, different texts


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_past_block_size_the_cache_is_refilled_from_the_last_half_block(name):
    """Greedy tokens past block_size equal the argmax of a full forward over the window the rule
    names: the cache fills up to block_size tokens, then restarts from the last block_size/2."""
    model = small(name)
    T = model.config.block_size
    x = tokens(2, 5, seed=7)
    out = generate(model, x, 3 * T, top_k=1)
    assert out.shape == (2, 5 + 3 * T)
    start, refills = 0, 0
    for n in range(5, out.size(1)):  # token n is predicted from out[:, start:n]
        if n - start > T:  # the cache would need block_size + 1 tokens
            start, refills = n - T // 2, refills + 1
        with torch.no_grad():
            expected = model(out[:, start:n])[0][:, -1].argmax(-1)
        assert torch.equal(expected, out[:, n]), f"{name}: token {n} (window from {start})"
    assert refills >= 4  # the test crossed block_size several times


def test_crop_past_block_size_differs_from_the_refill_rule():
    """The two samplers are different rules past block_size (otherwise the tests above prove less)."""
    model = small("gpt")
    x = tokens(1, 5, seed=7)
    assert not torch.equal(generate(model, x, 40, top_k=1), generate(model, x, 40, top_k=1, crop=True))
