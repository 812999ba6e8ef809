"""Doge (model_doge.py): checks of dynamic mask attention and CDMoE beyond the generic contract tests.

Parity with Hugging Face's DogeForCausalLM needs `transformers`, which this repo does not
depend on; it is not tested here."""

import math

import pytest
import torch
import torch.nn.functional as F

import model_doge
from conftest import PROMPT_THEN_TOKENS, build, decode, tokens
from model_doge import CDMoE, DMAttn, Doge, dynamic_mask


def randomise(model, seed=0):
    """Move A, dt_proj, the residual scales and the norms off their init, so nothing is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.A.copy_(torch.randn(block.attn.A.shape, generator=g))
            block.attn.dt_proj.weight.normal_(0, 0.5, generator=g)
            for p in (block.input_residual, block.post_attention_residual, block.attn.q_norm.weight,
                      block.attn.k_norm.weight, block.attn_norm.weight):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def distinct_tokens(B=3, T=64, seed=1):
    """Rows of distinct ids, so that no two keys of a row tie on delta in layer 0 (ties rank by recency)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(65, generator=g)[:T] for _ in range(B)])


def reference_attention(attn, x, cos, sin, kws):
    """DMAttn as the reference writes it: the float mask M = delta_j where kept, -inf elsewhere, added to
    the scores, with kv heads repeated; the kept set by a per-row top-k loop."""
    B, T, _ = x.shape
    H, G, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(B, T, H, hd)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(B, T, G, hd)).transpose(1, 2)
    v = attn.v_proj(x)
    delta = torch.exp(attn.A * F.softplus(attn.dt_proj(v))).transpose(1, 2)        # (B, G, T)
    q, k = model_doge.apply_rope(q, cos, sin), model_doge.apply_rope(k, cos, sin)
    mask = torch.full((B, G, T, T), -math.inf)
    for i in range(T):
        kept = delta[..., :i + 1].topk(min(i + 1, kws), dim=-1).indices               # (B, G, n)
        mask[:, :, i].scatter_(-1, kept, delta[..., :i + 1].gather(-1, kept))
    r = H // G
    v = v.view(B, T, G, hd).transpose(1, 2)
    scores = q @ k.repeat_interleave(r, 1).transpose(-1, -2) / math.sqrt(hd) + mask.repeat_interleave(r, 1)
    y = scores.softmax(-1) @ v.repeat_interleave(r, 1)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


# --- shapes and parameters -----------------------------------------------------------------------

def formula_param_count(c):
    """Doge's parameters from its shapes: no biases, tied embedding."""
    d, H, G, I = c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size
    hd = d // H
    attn = d * H * hd + 2 * d * G * hd + H * hd * d + G * hd * G + G + 2 * hd
    block = attn + 3 * d * I + 4 * d
    if c.is_moe:
        K = math.isqrt(c.n_experts)
        block += 2 * K * d + 2 * c.n_experts * d
    return c.vocab_size * d + c.n_layer * block + d


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(build("doge")) == formula_param_count(model_doge.Config()) == 601_096
    assert count(build("doge", is_moe=True)) == formula_param_count(model_doge.Config(is_moe=True)) == 879_624
    for name, expected in (("doge-20m", 13_118_728), ("doge-60m", 54_571_552), ("doge-20m-moe", 17_444_104)):
        config = model_doge.Config(vocab_size=32768, **model_doge.PRESETS[name])
        with torch.device("meta"):
            assert count(Doge(config)) == formula_param_count(config) == expected, name


def test_experts_must_be_a_perfect_square():
    with pytest.raises(ValueError, match="perfect square"):
        build("doge", is_moe=True, n_experts=250)
    build("doge", n_experts=250)  # only checked when the experts exist


def test_flops_count_the_experts_a_token_reads():
    dense, moe = build("doge"), build("doge", is_moe=True)
    c = dense.config
    attention = 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head + 8) * c.block_size
    assert dense.flops_per_token() == 6 * 601_096 + attention
    # the MoE token adds the router (2K x d) and k rows of D and U per layer, not all E rows
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * c.n_layer * (2 * 16 * 128 + 2 * 8 * 128)


# --- causality ----------------------------------------------------------------------------------

@pytest.mark.parametrize("is_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kws", [64, 16])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_causal_and_batch_independent(is_moe, kws, train):
    model = randomise(build("doge", is_moe=is_moe, keep_window_size=kws)).train(train)
    x = distinct_tokens()
    with torch.no_grad():
        base = model(x)[0]
        for p in (1, 20, 41):
            x2 = x.clone()
            x2[:, p:] = distinct_tokens(seed=7)[:, p:]
            out = model(x2)[0]
            assert torch.equal(out[:, :p], base[:, :p]), f"logits before {p} depend on later tokens"
            assert not torch.equal(out[:, p:], base[:, p:])
        x3 = x.clone()
        x3[1:] = distinct_tokens(seed=9)[1:]
        assert torch.equal(model(x3)[0][0], base[0]), "a row depends on the other rows"
        alone = model(x[:1])[0]
    torch.testing.assert_close(alone[0], base[0], atol=1e-5, rtol=0)  # B=1 vs in a batch


def test_router_split_is_per_token():
    """The routing fix (CDMoE.route): a token's experts and weights come from its own 2K router scores, so routing
    tokens one at a time gives the batch's routing (the reference's reshape would not)."""
    torch.manual_seed(0)
    moe = CDMoE(model_doge.Config(is_moe=True))
    u = torch.randn(3, 10, 128)
    experts, g, _ = moe.route(u)
    for b in range(3):
        for t in range(10):
            e1, g1, _ = moe.route(u[b, t])
            assert torch.equal(e1, experts[b, t])
            torch.testing.assert_close(g1, g[b, t])  # equal up to matmul rounding
    z = moe.router_gate(u[0, 0])
    assert set(experts[0, 0].tolist()) <= {a * 16 + c for a in z[:16].topk(8).indices.tolist()
                                           for c in z[16:].topk(8).indices.tolist()}


# --- dynamic mask attention ----------------------------------------------------------------------

def test_dynamic_mask_keeps_the_largest_delta_among_visible_keys():
    delta = torch.rand(2, 3, 40) + 0.1  # distinct with probability 1
    kws = 12
    keep = dynamic_mask(delta, kws)
    for b in range(2):
        for g in range(3):
            for i in range(40):
                kept = keep[b, g, i].nonzero().flatten()
                assert len(kept) == min(i + 1, kws)
                assert torch.equal(kept, delta[b, g, :i + 1].topk(min(i + 1, kws)).indices.sort().values)
    assert dynamic_mask(delta, 40) is None and dynamic_mask(delta, 100) is None  # fires only when T > kws


def test_dynamic_mask_ties_go_to_the_most_recent_keys():
    keep = dynamic_mask(torch.ones(1, 1, 10), 3)  # all delta equal (A = 0 at init): a sliding window
    for i in range(10):
        assert keep[0, 0, i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))


@pytest.mark.parametrize("kws", [64, 16, 1])
def test_attention_equals_the_float_mask_reference(kws):
    """The extra-channel form of the bias plus the boolean keep mask equals the reference's float mask
    (delta where kept by a per-row top-k, -inf elsewhere) added to the scores."""
    model = randomise(build("doge", keep_window_size=kws))
    attn = model.blocks[1].attn
    x = torch.randn(2, 64, 128)
    cos, sin = model.rope(torch.arange(64))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin, kws),
                                   atol=1e-5, rtol=0)


def test_zero_A_and_wide_window_is_plain_causal_attention_with_qk_norm():
    torch.manual_seed(0)
    config = model_doge.Config(keep_window_size=64)
    attn = DMAttn(config)
    rope = model_doge.RotaryEmbedding(32, config.rope_theta)
    x = torch.randn(2, 64, 128)
    cos, sin = rope(torch.arange(64))
    q = attn.q_norm(attn.q_proj(x).view(2, 64, 4, 32)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(2, 64, 2, 32)).transpose(1, 2)
    v = attn.v_proj(x).view(2, 64, 2, 32).transpose(1, 2)
    q, k = model_doge.apply_rope(q, cos, sin), model_doge.apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # delta = 1 shifts every score alike
    expected = attn.o_proj(y.transpose(1, 2).reshape(2, 64, 128))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=0)


def test_top_k_fires_only_when_more_than_kws_keys_are_visible():
    x = distinct_tokens(B=2)
    logits = {}
    for kws in (64, 1000, 63):
        model = randomise(build("doge", keep_window_size=kws)).eval()
        with torch.no_grad():
            logits[kws] = model(x)[0]
        assert (model.stats()["masked_frac"] > 0) == (kws < 64)
    assert torch.equal(logits[64], logits[1000])
    assert torch.equal(logits[63][:, :63], logits[64][:, :63])  # rows 0..62 see at most 63 keys
    assert not torch.allclose(logits[63][:, 63], logits[64][:, 63])


# --- cross-domain MoE ----------------------------------------------------------------------------

def test_product_key_routing_equals_brute_force():
    torch.manual_seed(0)
    moe = CDMoE(model_doge.Config(is_moe=True))
    u = torch.randn(3, 10, 128)
    experts, g, _ = moe.route(u)
    z = moe.router_gate(u)
    K, k = 16, 8
    all_scores = (z[..., :K, None] + z[..., None, K:]).flatten(-2)  # score of e = a*K + b is zx_a + zy_b
    best = all_scores.topk(k, dim=-1)
    assert torch.equal(experts.sort(-1).values, best.indices.sort(-1).values)
    assert ((experts >= 0) & (experts < K * K)).all()
    torch.testing.assert_close(g, torch.softmax(best.values, dim=-1))
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 10))


def test_moe_is_the_dense_mlp_plus_the_expert_sum():
    torch.manual_seed(0)
    moe = CDMoE(model_doge.Config(is_moe=True))
    u = torch.randn(2, 5, 128)
    dense = moe.down_proj(F.silu(moe.gate_proj(u)) * moe.up_proj(u))
    experts, g, _ = moe.route(u)
    expert_sum = torch.zeros_like(u)
    for b in range(2):
        for t in range(5):
            for e, w in zip(experts[b, t], g[b, t]):
                expert_sum[b, t] += F.silu(moe.down_embed.weight[e] @ u[b, t]) * w * moe.up_embed.weight[e]
    torch.testing.assert_close(moe(u)[0], dense + expert_sum, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        moe.down_embed.weight.zero_()
        moe.up_embed.weight.zero_()
    assert torch.equal(moe(u)[0], dense)


def test_balance_loss_against_the_full_softmax_over_all_experts():
    torch.manual_seed(0)
    moe = CDMoE(model_doge.Config(is_moe=True))
    u = torch.randn(2, 7, 128)
    experts, _, z = moe.route(u)
    pair = (z[..., 0, :, None] + z[..., 1, None, :]).flatten(-2).view(14, 256)  # all K^2 pair sums
    P = pair.softmax(-1).mean(0)
    f = torch.bincount(experts.flatten(), minlength=256) / experts.numel()
    torch.testing.assert_close(moe.balance_loss(z, experts), 256 * (f * P).sum())


def test_aux_loss_only_in_training_and_only_when_asked():
    x = distinct_tokens(B=2)
    y = torch.roll(x, -1, dims=1)
    on, off = randomise(build("doge", is_moe=True, balance_loss_weight=0.1)), randomise(build("doge", is_moe=True))
    on.load_state_dict(off.state_dict())
    for train in (True, False):
        on.train(train), off.train(train)
        loss_on, loss_off = on(x, y)[1], off(x, y)[1]
        if train:
            aux = sum(block.mlp.balance_loss(block.mlp.last["router_logits"], block.mlp.last["experts"])
                      for block in on.blocks) / 4
            torch.testing.assert_close(loss_on - loss_off, 0.1 * aux)
            assert aux > 0.5
            loss_on.backward()
            assert on.blocks[0].mlp.router_gate.weight.grad.abs().sum() > 0
        else:
            assert torch.equal(loss_on, loss_off)


def test_stats_report_masking_deltas_and_expert_usage():
    model = randomise(build("doge", is_moe=True, keep_window_size=16))
    x = distinct_tokens()
    inputs = []  # each layer's attention input, to recompute delta independently
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.blocks]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    stats = model.stats()
    # row i keeps min(i + 1, 16) of its i + 1 visible keys
    visible = sum(i + 1 for i in range(64))
    kept = sum(min(i + 1, 16) for i in range(64))
    assert abs(stats["masked_frac"] - (1 - kept / visible)) < 1e-6
    with torch.no_grad():
        for l, (block, u) in enumerate(zip(model.blocks, inputs)):  # delta = exp(A * softplus(dt(v)))
            attn = block.attn
            delta = torch.exp(attn.A * F.softplus(attn.dt_proj(attn.v_proj(u))))
            assert abs(stats[f"delta_mean_l{l}"] - delta.mean().item()) < 1e-6
            assert abs(delta.mean().item() - 1) > 1e-3  # A is off 0: a stat stuck at delta = 1 would fail
    loads = [torch.bincount(block.mlp.last["experts"].flatten(), minlength=256).float() for block in model.blocks]
    assert model.blocks[2].mlp.expert_load(model.blocks[2].mlp.last["experts"]).tolist() == loads[2].tolist()
    used = sum((load > 0).float().mean().item() for load in loads) / 4
    max_load = sum((load.max() / load.mean()).item() for load in loads) / 4
    assert abs(stats["experts_used"] - used) < 1e-6 and 0 < used < 1  # 3*64*8 picks leave experts unused
    assert abs(stats["max_load"] - max_load) < 1e-5 and max_load > 1
    assert stats["balance_loss"] > 1  # E * sum f P: 1 only when both are uniform, which an untrained router is not
    assert len(stats) <= 12
    assert build("doge").eval().stats() == {}  # nothing before the first forward


# --- incremental decoding ------------------------------------------------------------------------

@pytest.mark.parametrize("is_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("kws", [16, 3])
def test_cached_decoding_with_the_mask_active_equals_the_forward(is_moe, kws):
    """With more visible keys than kws, each cached query must mask the keys the forward masks. Random
    A and dt make delta differ from key to key; distinct tokens avoid exact ties between keys (see
    model_doge's docstring on incremental decoding). In training mode, with dropout and the aux loss
    on, the cached path is the eval computation all the same."""
    model = randomise(build("doge", is_moe=is_moe, keep_window_size=kws, dropout=0.1, balance_loss_weight=0.1))
    x = distinct_tokens()
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
    assert model.stats()["masked_frac"] > 0.5
    wide = randomise(build("doge", is_moe=is_moe, keep_window_size=64)).eval()
    with torch.no_grad():  # the mask matters: past kws keys, attending to all of them changes every row
        assert (wide(x)[0] - full)[:, kws:].abs().amax(-1).min() > 1e-3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for chunks in (PROMPT_THEN_TOKENS, [64]):
        torch.testing.assert_close(decode(model, x, chunks)[0], full, atol=1e-4, rtol=1e-4)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_cached_decoding_breaks_delta_ties_like_the_forward():
    """At A = 0 every delta is exactly 1: the forward keeps the kws most recent keys (a sliding
    window), and so must the cache, not whichever equal keys a top-k happens to return."""
    model = build("doge", keep_window_size=8).eval()
    x = tokens(B=2, seed=3)
    with torch.no_grad():
        full = model(x)[0]
    assert model.stats()["masked_frac"] > 0.5
    torch.testing.assert_close(decode(model, x, PROMPT_THEN_TOKENS)[0], full, atol=1e-4, rtol=1e-4)


def nan_cache(model, B):
    """init_cache's buffers hold whatever memory they got (torch.empty): filled with NaN here, any
    position read before it is written shows in the logits."""
    cache = model.init_cache(B)
    for layer in cache["layers"]:
        for name in ("k", "v", "delta"):
            layer[name].fill_(float("nan"))
    return cache


def test_decoding_never_reads_an_unwritten_cache_position():
    """init_cache leaves its buffers uninitialised: filled with NaN, a prompt then single tokens past
    keep_window_size (where new rows are ranked against the cached keys) still give the forward's logits."""
    model = randomise(build("doge", keep_window_size=16)).eval()
    x = distinct_tokens(B=2, T=24)
    cache = nan_cache(model, 2)
    got = [model.forward_cached(x[:, :6], cache)] + [model.forward_cached(x[:, t:t + 1], cache) for t in range(6, 24)]
    with torch.no_grad():
        full = model(x)[0]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_holds_keys_values_and_delta_of_every_position():
    model = randomise(build("doge", keep_window_size=16)).eval()
    x = distinct_tokens(B=2)
    cache = nan_cache(model, 2)
    assert cache["t"] == 0 and cache["layers"][0]["delta"].shape == (2, 2, 64)
    model.forward_cached(x[:, :10], cache)
    model.forward_cached(x[:, 10:11], cache)
    assert cache["t"] == 11
    attn = model.blocks[0].attn
    cos, sin = model.rope(torch.arange(11))
    with torch.no_grad():
        _, k, v, delta = attn.project(model.blocks[0].attn_norm(model.wte(x[:, :11])), cos, sin)
    layer = cache["layers"][0]
    torch.testing.assert_close(layer["delta"][:, :, :11], delta)
    torch.testing.assert_close(layer["k"][:, :, :11], k)
    torch.testing.assert_close(layer["v"][:, :, :11], v)
    assert layer["delta"][:, :, 11:].isnan().all()  # nothing written past the tokens held
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(distinct_tokens(B=2)[:, :54], cache)
    assert cache["t"] == 11
