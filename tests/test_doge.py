"""Doge (model_doge.py): the checks of specs/doge.md section 9 beyond the generic contract tests."""

import pytest
import torch
import torch.nn.functional as F

import model_doge
from model_doge import CDMoE, DMAttn, Doge, dynamic_mask


def build(**kw):
    torch.manual_seed(0)
    return Doge(model_doge.Config(**kw))


def randomise(model, seed=0):
    """Move A, dt_proj, the residual scales and the norms off their init, so nothing is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.A.copy_(torch.randn(block.attn.A.shape, generator=g))
            block.attn.dt_proj.weight.normal_(0, 0.5, generator=g)
            for p in (block.input_residual, block.post_attention_residual, block.attn.q_norm.weight,
                      block.input_layernorm.weight):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def distinct_tokens(B=3, T=64, seed=1):
    """Rows of distinct ids, so that no two keys of a row tie on delta in layer 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(65, generator=g)[:T] for _ in range(B)])


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(build()) == 601_096
    assert count(build(is_moe=True)) == 879_624
    for name, expected in (("doge-20m", 13_118_728), ("doge-60m", 54_571_552), ("doge-20m-moe", 17_444_104)):
        with torch.device("meta"):
            assert count(Doge(model_doge.Config(vocab_size=32768, **model_doge.PRESETS[name]))) == expected


def test_experts_must_be_a_perfect_square():
    with pytest.raises(ValueError, match="perfect square"):
        build(is_moe=True, n_experts=250)


@pytest.mark.parametrize("is_moe", [False, True])
@pytest.mark.parametrize("kws", [64, 16])
@pytest.mark.parametrize("train", [False, True])
def test_causal_and_batch_independent(is_moe, kws, train):
    model = randomise(build(is_moe=is_moe, keep_window_size=kws)).train(train)
    x = distinct_tokens()
    with torch.no_grad():
        base = model(x)[0]
        for p in (1, 20, 41):
            x2 = x.clone()
            x2[:, p:] = distinct_tokens(seed=7)[:, p:]
            assert torch.equal(model(x2)[0][:, :p], base[:, :p])
        x3 = x.clone()
        x3[1:] = distinct_tokens(seed=9)[1:]
        assert torch.equal(model(x3)[0][0], base[0])
        alone = model(x[:1])[0]
    torch.testing.assert_close(alone[0], base[0], atol=1e-5, rtol=0)  # B=1 vs in a batch


def test_dynamic_mask_keeps_the_largest_delta_among_visible_keys():
    delta = torch.rand(2, 3, 40) + 0.1
    kws = 12
    keep = dynamic_mask(delta, kws)
    for b in range(2):
        for g in range(3):
            for i in range(40):
                kept = keep[b, g, i].nonzero().flatten()
                assert len(kept) == min(i + 1, kws)
                assert torch.equal(kept, delta[b, g, :i + 1].topk(min(i + 1, kws)).indices.sort().values)
    assert dynamic_mask(delta, 40) is None  # the top-k only fires when more than kws keys exist


def test_dynamic_mask_ties_go_to_the_most_recent_keys():
    keep = dynamic_mask(torch.ones(1, 1, 10), 3)  # all delta equal (A = 0 at init): a sliding window
    for i in range(10):
        assert keep[0, 0, i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))


def test_delta_is_added_to_the_scores_of_its_key():
    """The augmented-coordinate form equals the reference's float mask (delta where kept, -inf else)."""
    model = randomise(build(keep_window_size=16))
    attn = model.blocks[1].attn
    x = torch.randn(2, 64, 128)
    cos, sin = model.rope(torch.arange(64))
    B, T, H, G, hd = 2, 64, 4, 2, 32
    q = attn.q_norm(attn.q_proj(x).view(B, T, H, hd)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(x).view(B, T, G, hd)).transpose(1, 2)
    v = attn.v_proj(x)
    delta = torch.exp(attn.A * F.softplus(attn.dt_proj(v))).transpose(1, 2)
    q, k = model_doge.apply_rope(q, cos, sin), model_doge.apply_rope(k, cos, sin)
    keep = dynamic_mask(delta, 16)
    mask = torch.where(keep, delta[..., None, :], -float("inf")).repeat_interleave(2, dim=1)
    v = v.view(B, T, G, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=0)


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
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attn.o_proj(y.transpose(1, 2).reshape(2, 64, 128))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=0)


def test_product_key_routing_equals_brute_force():
    torch.manual_seed(0)
    moe = CDMoE(model_doge.Config(is_moe=True))
    u = torch.randn(3, 10, 128)
    experts, weight = moe.route(u)
    z = moe.router_gate(u)
    K, k = 16, 8
    all_scores = (z[..., :K, None] + z[..., None, K:]).flatten(-2)  # score of e = a*K + b is zx_a + zy_b
    best = all_scores.topk(k, dim=-1)
    assert torch.equal(experts.sort(-1).values, best.indices.sort(-1).values)
    assert ((experts >= 0) & (experts < K * K)).all()
    torch.testing.assert_close(weight, torch.softmax(best.values, dim=-1))
    torch.testing.assert_close(weight.sum(-1), torch.ones(3, 10))


def test_moe_is_the_dense_mlp_plus_the_expert_sum():
    torch.manual_seed(0)
    moe = CDMoE(model_doge.Config(is_moe=True))
    u = torch.randn(2, 5, 128)
    dense = moe.down_proj(F.silu(moe.gate_proj(u)) * moe.up_proj(u))
    experts, weight = moe.route(u)
    expert_sum = torch.zeros_like(u)
    for b in range(2):
        for t in range(5):
            for e, g in zip(experts[b, t], weight[b, t]):
                expert_sum[b, t] += F.silu(moe.down_embed.weight[e] @ u[b, t]) * g * moe.up_embed.weight[e]
    torch.testing.assert_close(moe(u), dense + expert_sum, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        moe.down_embed.weight.zero_()
        moe.up_embed.weight.zero_()
    assert torch.equal(moe(u), dense)


def test_stats_report_masking_deltas_and_expert_usage():
    model = randomise(build(is_moe=True, keep_window_size=16))
    with torch.no_grad():
        model(distinct_tokens())
    stats = model.stats()
    # rows 16..63 keep 16 of i+1 keys: 1 - 64*16 - ... fraction of visible keys masked
    visible = sum(i + 1 for i in range(64))
    kept = sum(min(i + 1, 16) for i in range(64))
    assert abs(stats["masked_frac"] - (1 - kept / visible)) < 1e-6
    assert 0 < stats["experts_used"] <= 1 and stats["max_load"] >= 1
    assert all(stats[f"delta_mean_l{l}"] > 0 for l in range(4))
