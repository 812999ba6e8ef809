"""DTF (model_dtf.py): checks of the surprise gate and causal routing beyond the generic contract tests."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import model_dtf
import model_gpt
from model_dtf import DTF, DTFPair, causal_moving_average, route
from conftest import PROMPT_THEN_TOKENS, build, decode, tokens
from routing import (FixedMask, check_prefix_forward_equals_full_forward, routed_inputs, set_tau_to_median,
                     set_tau_to_quantile, stored_values)


def gates(model, x):
    """G of every pair on x in an eval forward (captured from the gate method's output)."""
    found = []
    original = DTFPair.gate

    def capture(self, *args):
        found.append(original(self, *args))
        return found[-1]

    DTFPair.gate = capture
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        DTFPair.gate = original
    return found


def test_parameter_count():
    assert sum(p.numel() for p in build("dtf").parameters()) == 803_336
    assert sum(p.numel() for p in build("dtf", prior_ffn_factor=0.5).parameters()) == 846_344
    with torch.device("meta"):
        big = DTF(model_dtf.Config(vocab_size=151_936, **model_dtf.PRESETS["qwen2.5-0.5b"]))
    assert sum(p.numel() for p in big.parameters()) == 495_849_904


def test_odd_layer_count_is_a_clear_error():
    with pytest.raises(ValueError, match="set an even n_layer"):
        build("dtf", n_layer=3)


def test_router_scalars_learn_faster():
    """train.py's optimizer moves the router's four scalars with 10x the learning rate. Adam's first
    step moves a parameter by exactly lr * |g| / (|g| + eps) per entry (m and v bias-corrected)."""
    from train_config import TrainConfig, configure_optimizer
    model = build("dtf")
    pair = model.blocks[0]
    scalars = (pair.beta_ce, pair.beta_cu, pair.log_o_ce, pair.m_cu)
    assert all(p.dim() == 0 for p in scalars)  # 0-D: no weight decay
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.0), torch.device("cpu"))
    lr = 1e-4
    for group in opt.param_groups:  # as train.py sets the learning rate every step
        group["lr"] = lr * group["lr_mult"]
    pair.tau.fill_(-float("inf"))  # route (up to the cap): G, and so the scalars, reach the loss
    checked = scalars + (pair.decision.attn_norm.weight,)
    before = [p.detach().clone() for p in checked]
    x = tokens()
    model.train()
    model(x, torch.roll(x, -1, dims=1))[1].backward()
    assert all(p.grad.abs().min() > 0 for p in checked)
    opt.step()
    for p, b, mult in zip(checked, before, (10, 10, 10, 10, 1)):
        g = p.grad.abs()
        torch.testing.assert_close((p.detach() - b).abs(), mult * lr * g / (g + 1e-8), rtol=1e-3, atol=0)


def test_dynamic_blocks_and_priors_start_at_normal_0_02():
    """GPT's init, N(0, 0.02), for every Linear (the reference left its DTF blocks at PyTorch's default)."""
    for pair in build("dtf").blocks:
        for name, p in [*pair.dynamic.named_parameters(), *pair.decision.named_parameters()]:
            if name.endswith("bias"):
                assert torch.equal(p, torch.zeros_like(p)), name
            elif p.dim() == 2:
                assert abs(p.std().item() - 0.02) < 0.001, name
        for name, p in pair.prior.named_parameters():
            if p.dim() == 2:
                assert abs(p.std().item() - 0.02) < 0.003, name  # d x 8 matrices: a noisier estimate


@pytest.mark.parametrize("train", [False, True])
def test_full_capacity_with_gate_one_is_the_dense_model(train, monkeypatch):
    dtf = build("dtf", dtf_capacity=1.0, capacity_factor=1.0)
    for pair in dtf.blocks:
        pair.tau.fill_(-float("inf"))
    monkeypatch.setattr(DTFPair, "gate", lambda self, h, post, prior: torch.ones(h.shape[:2]))
    gpt = model_gpt.GPT(model_gpt.Config())
    state = {}
    for key, value in dtf.state_dict().items():
        for part, offset in (("decision", 0), ("dynamic", 1)):
            if f".{part}." in key:
                p = int(key.split(".")[1])
                state[key.replace(f"blocks.{p}.{part}.", f"blocks.{2 * p + offset}.")] = value
        if not key.startswith("blocks."):
            state[key] = value
    gpt.load_state_dict(state)
    x = tokens()
    dtf.train(train), gpt.train(train)
    torch.testing.assert_close(dtf(x)[0], gpt(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("capacity_factor, routed", [(2.0, (0.25, 0.25)), (4.0, (0.3, 0.55))],
                         ids=["cap-binds", "threshold-decides"])  # K = 16 or 32 of 64
def test_causal_and_row_independent_with_half_the_tokens_wanting(train, capacity_factor, routed):
    model = build("dtf", capacity_factor=capacity_factor)
    x = tokens()
    set_tau_to_median(model, x)
    state = copy.deepcopy(model.state_dict())

    def logits(inp):
        model.load_state_dict(state)
        model.train(train)
        with torch.no_grad():
            return model(inp)[0]

    base = logits(x)
    assert all(routed[0] <= pair.last["sel"].float().mean().item() <= routed[1] for pair in model.blocks)
    for p in (3, 21, 50):
        x2 = x.clone()
        x2[:, p:] = (x2[:, p:] + 11) % 65
        assert torch.equal(logits(x2)[:, :p], base[:, :p])
    x3 = x.clone()
    x3[1:] = tokens(seed=5)[1:]
    assert torch.equal(logits(x3)[0], base[0])


def test_prefix_forward_equals_full_forward_while_the_cap_binds():
    check_prefix_forward_equals_full_forward(build("dtf"), tokens(), (0, 7, 30, 63))


def test_pair_equals_masked_dense_oracle():
    model = build("dtf")
    pair = model.blocks[0].eval()
    h = torch.randn(3, 40, 128)
    cos, sin = model.rope(torch.arange(40))
    with torch.no_grad():
        post, prior = pair.decision(h, cos, sin), pair.prior(h)
        G = pair.gate(h, post, prior)
        pair.tau.fill_(G.median().item())
        out, _ = pair(h, cos, sin, model.rope)
        sel = route(G, pair.tau, 16)[0]  # K = ceil(2 * 0.125 * block_size 64)
        t = torch.arange(40)
        mask = (t[None, :] <= t[:, None]) & (sel[:, None, :] | torch.eye(40, dtype=torch.bool))
        y = pair.dynamic(post, cos, sin, FixedMask(mask[:, None]))
        oracle = torch.where(sel[..., None], post + G[..., None] * (y - post), post)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=0)
    assert torch.equal(out[~sel], post[~sel])


def test_moving_average_is_causal_and_matches_a_loop():
    d = torch.rand(2, 30)
    for window in (1, 4, 100):
        ma = causal_moving_average(d, window)
        for t in range(30):
            expected = d[:, 0] if t == 0 else d[:, max(0, t - window):t].mean(dim=1)
            torch.testing.assert_close(ma[:, t], expected)
        d2 = d.clone()
        d2[:, 10:] += 5.0
        assert torch.equal(causal_moving_average(d2, window)[:, :11], ma[:, :11])  # t reads only < t


def test_moving_average_is_detached_inside_the_gate():
    """G_t reads earlier positions only through MA(sg(D_st)): no gradient flows from G_t to them."""
    pair = build("dtf").blocks[0]
    h, prior = torch.randn(1, 12, 128), torch.randn(1, 12, 128)
    post = torch.randn(1, 12, 128, requires_grad=True)
    pair.gate(h, post, prior)[0, 11].backward()
    assert post.grad[0, :11].abs().sum() == 0 and post.grad[0, 11].abs().sum() > 0


def test_surprise_maths_on_hand_made_tensors():
    pair = build("dtf").blocks[0]
    pair.beta_ce.data.fill_(-2.0)  # negative raw parameters still give positive inverse temperatures
    h, post, prior = torch.zeros(1, 3, 4), torch.ones(1, 3, 4), torch.full((1, 3, 4), 0.5)
    post[0, 2] = 3.0
    G = pair.gate(h, post, prior)
    d_st = torch.tensor([[1.0, 1.0, 9.0]])
    d_ch = torch.tensor([[0.25, 0.25, 6.25]])
    ma = torch.tensor([[1.0, 1.0, 1.0]])  # MA_0 = d_0; MA_1 = d_0; MA_2 = mean(d_0, d_1)
    o_ce = math.exp(pair.log_o_ce.item())
    assert abs(o_ce - 1.025) < 1e-6
    s_ce = torch.sigmoid(math.log(1 + math.exp(-2.0)) * (d_st - d_ch + math.log(o_ce)))
    s_cu = torch.sigmoid(F.softplus(torch.tensor(-0.8)) * (d_st - 1.1 * ma))
    torch.testing.assert_close(G, s_ce + s_cu - s_ce * s_cu)
    assert (G > 0).all() and (G < 1).all()


def test_gradients_reach_the_router_scalars_priors_and_both_blocks():
    model = build("dtf")
    x = tokens()
    model.train()
    model(x, torch.roll(x, -1, 1))  # first step sets tau, so the second routes tokens
    model.zero_grad()
    model(x, torch.roll(x, -1, 1))[1].backward()
    for pair in model.blocks:
        assert pair.last["sel"].float().mean().item() > 0
        for p in (pair.beta_ce, pair.beta_cu, pair.log_o_ce, pair.m_cu):
            assert p.grad is not None and p.grad.abs() > 0
        for module in (pair.prior, pair.decision, pair.dynamic):
            assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0


def test_prior_loss_alone_does_not_train_the_decision_block():
    model = build("dtf")
    model.train()
    pair = model.blocks[0]
    h = torch.randn(2, 16, 128, requires_grad=True)
    cos, sin = model.rope(torch.arange(16))
    _, prior_loss = pair(h, cos, sin, model.rope)
    prior_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in pair.decision.parameters())
    assert sum(p.grad.abs().sum() for p in pair.prior.parameters()) > 0


def test_flops_count_only_routed_rows():
    ratio = build("dtf").flops_per_token() / model_gpt.GPT(model_gpt.Config()).flops_per_token()
    assert 0.6 < ratio < 0.7  # 0.64 at the laptop cap f = 2 gamma = 0.25


# --- incremental decoding: a dynamic block's cache holds its routed tokens only -----------------

@pytest.mark.parametrize("ma_window", [100, 5], ids=["window-covers-block", "window-5"])
def test_dynamic_cache_holds_exactly_the_routed_tokens(ma_window):
    """Token by token, a dynamic block's cache grows by one exactly when the forward routes the
    token (skipped tokens add nothing) and ends holding the routed tokens' values, row by row; the
    decision block's cache holds every token. A window shorter than the sequence checks that the
    cache carries the moving average's state exactly."""
    model = build("dtf", ma_window=ma_window)
    x = tokens(B=3)
    set_tau_to_quantile(model, x, 0.8)  # about 13 of 64 want: under the cap, rows differ
    routed = routed_inputs(model, x)
    counts = torch.stack([sel.sum(1) for _, sel in routed])
    assert (counts < 16).any() and len(set(counts.flatten().tolist())) > 1  # ragged, not all capped

    def check(cache, t):
        for c, (_, sel) in zip(cache.layers, routed):
            assert torch.equal(c.dynamic.n, sel[:, :t].sum(1)), f"after {t} tokens"
            assert c.decision.filled == t

    logits, cache = decode(model, x, [1] * 64, check)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x)[0], atol=1e-4, rtol=1e-4)
        for pair, c, (post, sel) in zip(model.blocks, cache.layers, routed):
            assert c.dynamic.k.shape[2] == 16  # compact: K slots a row, not block_size
            for b in range(3):
                torch.testing.assert_close(c.dynamic.v[b, :, :c.dynamic.n[b]],
                                           stored_values(pair.dynamic, post, sel, b), atol=1e-5, rtol=0)


def test_dynamic_cache_respects_the_cap():
    """With half the tokens wanting, every row stops at K = 16 routed tokens: the cache holds the
    first 16 wanting ones, later wanting tokens skip, and the logits still equal the forward's."""
    model = build("dtf")
    x = tokens(B=3)
    set_tau_to_median(model, x)
    routed = routed_inputs(model, x)
    assert all((sel.sum(1) == 16).all() for _, sel in routed)
    calls = [0] * len(model.blocks)
    hooks = [pair.dynamic.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, pair in enumerate(model.blocks)]

    def check(cache, t):
        assert all((c.dynamic.n <= 16).all() for c in cache.layers)

    logits, cache = decode(model, x, PROMPT_THEN_TOKENS, check)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x)[0], atol=1e-4, rtol=1e-4)
    for pair, c, (post, sel) in zip(model.blocks, cache.layers, routed):
        assert c.dynamic.n.tolist() == [16, 16, 16]
        for b in range(3):
            torch.testing.assert_close(c.dynamic.v[b], stored_values(pair.dynamic, post, sel, b), atol=1e-5, rtol=0)
    # once every row is full, wanting tokens skip: the dynamic block ran for fewer than all 55 calls
    assert all(n < 55 for n in calls)
