"""MoD (model_mod.py): checks of causal routing beyond the generic contract tests."""
import copy

import pytest
import torch

import model_gpt
import model_mod
from model_mod import MoD, MoDBlock, route, routed_update
from conftest import PROMPT_THEN_TOKENS, build, decode, tokens
from routing import (FixedMask, check_prefix_forward_equals_full_forward, routed_inputs, routing_calls,
                     set_tau_to_median, set_tau_to_quantile, stored_values)


def routed_blocks(model):
    return [b for b in model.blocks if isinstance(b, MoDBlock)]


def router_scores(model, x):
    """r of each routed block on x (eval forward)."""
    return [r for r, _, _ in routing_calls(model, x)]


def test_parameter_count():
    assert sum(p.numel() for p in build("mod").parameters()) == 797_184  # 796,928 + 2 routers of d
    with torch.device("meta"):
        big = MoD(model_mod.Config(vocab_size=151_936, **model_mod.PRESETS["qwen2.5-0.5b"]))
    assert sum(p.numel() for p in big.parameters()) == 494_043_520


def test_routed_blocks_and_routers_start_at_normal_0_02():
    """GPT's init, N(0, 0.02), for every block (the reference left its routed blocks at PyTorch's default)."""
    for block in routed_blocks(build("mod")):
        assert 0.015 < block.router.std().item() < 0.025
        for name, p in block.block.named_parameters():
            if name.endswith("bias"):
                assert torch.equal(p, torch.zeros_like(p)), name
            elif p.dim() == 2:
                assert abs(p.std().item() - 0.02) < 0.001, name


@pytest.mark.parametrize("train", [False, True])
def test_full_capacity_with_gate_one_is_the_dense_model(train, monkeypatch):
    mod = build("mod", mod_capacity=1.0, capacity_factor=1.0)
    for block in routed_blocks(mod):
        block.tau.fill_(-float("inf"))
    monkeypatch.setattr(MoDBlock, "gate", lambda self, r: torch.ones_like(r))
    gpt = model_gpt.GPT(model_gpt.Config())
    gpt.load_state_dict({k.replace(".block.", "."): v for k, v in mod.state_dict().items()
                         if "router" not in k and "tau" not in k})
    x = tokens()
    mod.train(train), gpt.train(train)
    torch.testing.assert_close(mod(x)[0], gpt(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_causal_and_row_independent_with_half_the_tokens_wanting(train):
    model = build("mod")
    x = tokens()
    set_tau_to_median(model, x)
    state = copy.deepcopy(model.state_dict())

    def logits(inp):
        model.load_state_dict(state)
        model.train(train)
        with torch.no_grad():
            return model(inp)[0]

    base = logits(x)
    assert all(0.2 <= b.last["sel"].float().mean().item() <= 0.25 for b in routed_blocks(model))  # the cap binds
    for p in (5, 20, 40):
        x2 = x.clone()
        x2[:, p:] = (x2[:, p:] + 7) % 65
        assert torch.equal(logits(x2)[:, :p], base[:, :p])
    x3 = x.clone()
    x3[1:] = tokens(seed=9)[1:]
    assert torch.equal(logits(x3)[0], base[0])


def test_prefix_forward_equals_full_forward_while_the_cap_binds():
    check_prefix_forward_equals_full_forward(build("mod"), tokens(), (0, 9, 20, 41, 63))


def test_packed_path_equals_masked_dense_oracle():
    torch.manual_seed(3)
    config = model_mod.Config()
    block = model_gpt.Block(config)
    rope = model_gpt.RotaryEmbedding(32, config.rope_theta)
    B, T, K = 3, 24, 8
    x = torch.randn(B, T, config.n_embd)
    score = torch.randn(B, T)
    gate = torch.rand(B, T)
    sel, pos, valid = route(score, 0.0, K)
    # slots: routed positions ascending, then padding; the cap keeps the first K wanting tokens
    want = score >= 0
    for b in range(B):
        wanted = want[b].nonzero().flatten()
        assert torch.equal(sel[b].nonzero().flatten(), wanted[:K])
        n = int(valid[b].sum())
        assert torch.equal(pos[b, :n], wanted[:K]) and n == min(K, len(wanted))
    out = routed_update(block, x, gate, pos, valid, rope)
    # the oracle: the block on all T tokens, each routed token seeing the routed tokens up to itself
    t = torch.arange(T)
    mask = (t[None, :] <= t[:, None]) & (sel[:, None, :] | torch.eye(T, dtype=torch.bool))
    cos, sin = rope(t)
    y = block(x, cos, sin, FixedMask(mask[:, None]))
    oracle = torch.where(sel[..., None], x + gate[..., None] * (y - x), x)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=0)
    assert torch.equal(out[~sel], x[~sel])  # unrouted tokens are untouched, bit for bit


def router_grads(aux_weight, detach_gate=False, monkeypatch=None):
    model = build("mod", router_loss_weight=aux_weight)
    if detach_gate:
        monkeypatch.setattr(MoDBlock, "gate", lambda self, r: torch.sigmoid(r).detach())
    x = tokens()
    model.train()
    model(x, torch.roll(x, -1, 1))  # first step: sets tau
    model.zero_grad()
    model(x, torch.roll(x, -1, 1))[1].backward()
    return [b.router.grad for b in routed_blocks(model)]


def test_gradients_reach_the_router_through_the_gate(monkeypatch):
    assert all(g.abs().sum() > 0 for g in router_grads(0.01))
    assert all(g.abs().sum() > 0 for g in router_grads(0.0))  # the LM loss alone, through sigma(r)
    assert all(g is None or g.abs().sum() == 0 for g in router_grads(0.0, detach_gate=True, monkeypatch=monkeypatch))


def test_paper_topk_rule_routes_exactly_k_in_training_only():
    model = build("mod", mod_routing="topk")
    x = tokens()
    model.train()
    with torch.no_grad():
        model(x)
    assert all(b.last["sel"].float().mean().item() == 8 / 64 for b in routed_blocks(model))
    scores = router_scores(model, x)  # evaluation uses the causal threshold the training forward set
    for block, r in zip(routed_blocks(model), scores):
        assert torch.equal(block.last["sel"], route(r, block.tau, 16)[0])
    with pytest.raises(ValueError, match="mod_routing"):
        build("mod", mod_routing="random")


def test_flops_count_only_routed_rows():
    model = build("mod")
    gpt = model_gpt.GPT(model_gpt.Config())
    ratio = model.flops_per_token() / gpt.flops_per_token()
    assert 0.6 < ratio < 0.7  # 0.63 at the laptop cap f = 2C = 0.25


# --- incremental decoding: a routed layer's cache holds its routed tokens only ------------------

def routed_caches(model, cache):
    return [c for blk, c in zip(model.blocks, cache.layers) if isinstance(blk, MoDBlock)]


def test_routed_cache_holds_exactly_the_routed_tokens():
    """Token by token, a routed layer's cache grows by one exactly when the forward routes the token
    (skipped tokens add nothing), and at the end holds the routed tokens' values, row by row."""
    model = build("mod")
    x = tokens(B=3)
    set_tau_to_quantile(model, x, 0.8)  # about 13 of 64 want: under the cap, rows differ
    routed = routed_inputs(model, x)
    counts = torch.stack([sel.sum(1) for _, sel in routed])
    assert (counts < 16).any() and len(set(counts.flatten().tolist())) > 1  # ragged, not all capped

    def check(cache, t):
        for c, (_, sel) in zip(routed_caches(model, cache), routed):
            assert torch.equal(c.n, sel[:, :t].sum(1)), f"after {t} tokens"

    logits, cache = decode(model, x, [1] * 64, check)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x)[0], atol=1e-4, rtol=1e-4)
        for block, c, (xin, sel) in zip(routed_blocks(model), routed_caches(model, cache), routed):
            assert c.k.shape[2] == 16  # compact: K slots a row, not block_size
            for b in range(3):
                torch.testing.assert_close(c.v[b, :, :c.n[b]], stored_values(block.block, xin, sel, b),
                                           atol=1e-5, rtol=0)


def test_skipped_tokens_do_no_block_work():
    """A routed block runs once per routed token when decoding one row token by token, never for
    a skipped one."""
    model = build("mod")
    x = tokens(B=1)
    set_tau_to_quantile(model, x, 0.8)
    routed = routed_inputs(model, x)
    calls = [0] * len(routed)
    hooks = [b.block.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + args[0].size(1)))
             for i, b in enumerate(routed_blocks(model))]
    decode(model, x, [1] * 64)
    for h in hooks:
        h.remove()
    assert calls == [int(sel.sum()) for _, sel in routed] and 0 < sum(calls) < 2 * 64


def test_routed_cache_respects_the_cap():
    """With half the tokens wanting, every row stops at K = 16 routed tokens: the cache holds the
    first 16 wanting ones, later wanting tokens skip, and the logits still equal the forward's."""
    model = build("mod")
    x = tokens(B=3)
    set_tau_to_median(model, x)
    routed = routed_inputs(model, x)
    wanting = [(b.score(xin) >= b.tau).sum(1) for b, (xin, _) in zip(routed_blocks(model), routed)]
    assert all((w > 20).all() for w in wanting)  # well over the cap

    def check(cache, t):
        assert all((c.n <= 16).all() for c in routed_caches(model, cache))

    logits, cache = decode(model, x, PROMPT_THEN_TOKENS, check)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x)[0], atol=1e-4, rtol=1e-4)
    for block, c, (xin, sel) in zip(routed_blocks(model), routed_caches(model, cache), routed):
        assert c.n.tolist() == [16, 16, 16]
        for b in range(3):
            torch.testing.assert_close(c.v[b], stored_values(block.block, xin, sel, b), atol=1e-5, rtol=0)


def test_cached_decoding_is_the_eval_computation_in_training_mode():
    """With dropout on and the model in training mode, forward_cached still gives the eval forward's
    logits (no dropout, no tau update) and leaves the model in training mode."""
    model = build("mod", dropout=0.2)
    x = tokens(B=2)
    set_tau_to_median(model, x)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        full = model.eval()(x)[0]
    model.train()
    logits, _ = decode(model, x, [9] + [1] * 55)
    assert model.training
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
