"""DAWN (model_dawn.py): checks of the neuron-pool computation beyond the generic contract tests."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import model_dawn
from conftest import PROMPT_THEN_TOKENS, build, decode, tokens
from model_dawn import DAWN, POOLS, compose_feature, compose_restore, route


def formula(c):
    n_total = 2 * (c.n_qk + c.n_v + c.n_know)
    d = c.n_embd
    return (c.vocab_size * d + c.block_size * d + 2 * (c.n_qk + c.n_v) * d * c.rank
            + 2 * c.n_know * d * c.knowledge_rank + n_total * c.d_space + 8 * (d + 1) * c.d_space
            + c.n_layer * (d * d + 4 * d) + 2 * d)


def test_parameter_count():
    config = model_dawn.Config()
    assert sum(p.numel() for p in build("dawn").parameters()) == formula(config) == 816_000
    other = model_dawn.Config(n_layer=2, n_embd=64, rank=8, knowledge_rank=16, n_v=10, d_space=32)
    assert sum(p.numel() for p in DAWN(other).parameters()) == formula(other)
    with torch.device("meta"):
        assert sum(p.numel() for p in DAWN(model_dawn.Config(**model_dawn.PRESETS["dawn-39m"])).parameters()) == 38_730_240


def test_shapes_and_position_limit():
    model = build("dawn")
    logits, loss = model(tokens(B=3))
    assert logits.shape == (3, 64, 65) and loss is None
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_routing_weights():
    torch.manual_seed(0)
    z, keys = torch.randn(5, 7, 16), F.normalize(torch.randn(40, 16), dim=-1)
    w, p, indices = route(z, keys, 4)
    logits = z @ keys.T
    assert ((w > 0).sum(-1) == 4).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 7))
    top = logits.topk(4, dim=-1)
    assert torch.equal(indices.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(w.gather(-1, top.indices), torch.softmax(top.values, dim=-1))  # softmax over the k
    torch.testing.assert_close(p, torch.softmax(logits, dim=-1))


def test_fast_composition_equals_explicit_per_token_matrices():
    torch.manual_seed(0)
    model = build("dawn")
    u = torch.randn(2, 5, 128)
    w_f = route(torch.randn(2, 5, 1, 64), model.keys()["F_v"], 4)[0]
    w_r = route(torch.randn(2, 5, 1, 64), model.keys()["R_v"], 4)[0]
    fast = compose_restore(compose_feature(u, model.F_v, w_f), w_r, model.R_v)[..., 0, :]
    for b, t in itertools.product(range(2), range(5)):
        feature = torch.einsum("n,ndr->dr", w_f[b, t, 0], model.F_v)   # the token's own d x r matrix
        restore = torch.einsum("n,nrd->rd", w_r[b, t, 0], model.R_v)   # and r x d
        torch.testing.assert_close(fast[b, t], u[b, t] @ feature @ restore, atol=1e-5, rtol=1e-5)
    one_hot_f, one_hot_r = torch.zeros(1, 1, 1, 40), torch.zeros(1, 1, 1, 40)
    one_hot_f[..., 3], one_hot_r[..., 17] = 1.0, 1.0  # k = 1: exactly u F_i R_j
    single = compose_restore(compose_feature(u[:1, :1], model.F_v, one_hot_f), one_hot_r, model.R_v)
    torch.testing.assert_close(single[0, 0, 0], u[0, 0] @ model.F_v[3] @ model.R_v[17], atol=1e-5, rtol=1e-5)


def test_orthogonal_initialisation():
    model = build("dawn")
    for name in POOLS:
        W = getattr(model, name)
        gram = W.transpose(1, 2) @ W if name.startswith("F") else W @ W.transpose(1, 2)
        torch.testing.assert_close(gram, torch.eye(gram.size(-1)).expand_as(gram), atol=1e-5, rtol=0)
    assert model.orthogonality_loss().item() < 1e-6
    with torch.no_grad():
        model.F_v[0].mul_(2.0)
    assert model.orthogonality_loss().item() > 1e-3


def test_auxiliary_losses():
    model = build("dawn").train()
    x = tokens(B=3)
    model(x)
    assert model.stats()["lb_loss"] > 0
    with torch.no_grad():  # a zero router sends uniform probabilities: perfectly balanced
        model.router.weight.zero_()
        model.router.bias.zero_()
    model(x)
    assert model.stats()["lb_loss"] < 1e-10
    # diversity: the mean |cosine| between distinct knowledge neurons, by a direct loop
    expected = 0.0
    for W in (model.F_kn, model.R_kn):
        flat = W.flatten(1)
        pairs = [(i, j) for i in range(len(flat)) for j in range(len(flat)) if i != j]
        expected += 0.5 * sum(F.cosine_similarity(flat[i], flat[j], dim=0).abs() for i, j in pairs) / len(pairs)
    torch.testing.assert_close(model.diversity_loss(), expected, atol=1e-6, rtol=1e-5)


def test_eval_loss_is_pure_cross_entropy_and_training_adds_the_aux_terms():
    model = build("dawn")
    x, y = tokens(B=3), tokens(B=3, seed=2)
    model.eval()
    logits, loss = model(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 65), y.view(-1)))
    model.train()
    logits, loss = model(x, y)
    s = model.stats()
    expected = F.cross_entropy(logits.view(-1, 65), y.view(-1)) + 2e-5 * s["lb_loss"] + 0.01 * s["orth_loss"] + 0.1 * s["div_loss"]
    torch.testing.assert_close(loss.item(), expected.item(), atol=1e-6, rtol=1e-6)


def test_gradient_causality():
    model = build("dawn")
    x = tokens(B=1, T=24)
    emb = model.wte(x).detach().requires_grad_(True)
    hook = model.wte.register_forward_hook(lambda module, args, out: emb)
    logits = model(x)[0]
    hook.remove()
    logits[0, 9].sum().backward()
    assert emb.grad[0, 10:].abs().max() == 0 and emb.grad[0, :10].abs().max() > 0


def test_gradients_reach_the_router_and_skip_unselected_neurons():
    model = build("dawn", orth_loss_weight=0.0, div_loss_weight=0.0, lb_loss_weight=0.0)
    x = tokens(B=1, T=8)
    model.train()
    model(x, tokens(B=1, T=8, seed=4))[1].backward()
    assert model.router.weight.grad.abs().sum() > 0 and model.neuron_emb.grad.abs().sum() > 0
    selected = torch.cat([layer["F_v"].flatten() for layer in model.last["selected"]]).unique()
    unselected = [n for n in range(40) if n not in selected.tolist()]
    assert unselected  # 8 tokens x 4 layers x 4 picks leave some of the 40 V neurons unused
    for n in unselected:
        assert model.F_v.grad[n].abs().max() == 0
    for n in selected.tolist():
        assert model.F_v.grad[n].abs().max() > 0


def test_stats_from_a_known_routing():
    """stats() only formats what the forward recorded: for a routing written by hand, the exact values."""
    model = build("dawn")
    B, T, k = 2, 5, 4

    def picks(*groups):  # every token of every row picks the same neurons, one group per routing
        return torch.tensor(groups).expand(B, T, len(groups), k)

    def uniform(m, N):
        return torch.full((B, T, m, N), 1.0 / N)

    one_hot = torch.zeros(B, T, 1, 40)
    one_hot[..., 0] = 1.0
    layer = {"selected": {"F_qk": picks([0, 1, 2, 3], [0, 1, 2, 3]),  # Q and K the same: overlap 1
                          "R_qk": picks([0, 1, 2, 3], [4, 5, 6, 7]),  # disjoint: overlap 0
                          "F_v": picks([0, 1, 2, 3]), "R_v": picks([0, 1, 2, 3]),
                          "F_kn": picks([0, 1, 2, 3]), "R_kn": picks([0, 1, 2, 3])},
             "p": {"F_qk": uniform(2, 16), "R_qk": uniform(2, 16), "F_v": one_hot, "R_v": uniform(1, 40),
                   "F_kn": uniform(1, 24), "R_kn": uniform(1, 24)}}
    model.last = {"selected": [layer["selected"]] * 2, "p": [layer["p"]] * 2,
                  "aux": {"lb": torch.tensor(0.5), "orth": torch.tensor(0.25), "div": torch.tensor(0.125)}}
    stats = model.stats()
    expected = {"dead_F_qk": 12 / 16, "dead_R_qk": 8 / 16, "dead_F_v": 36 / 40, "dead_R_v": 36 / 40,
                "dead_F_kn": 20 / 24, "dead_R_kn": 20 / 24, "qk_overlap": 0.5,
                "route_entropy": 5 / 6,  # one of the six routings of a layer is one-hot: entropy 0
                "lb_loss": 0.5, "orth_loss": 0.25, "div_loss": 0.125}
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-6), key


def test_stats_and_routing_path():
    model = build("dawn")
    model.eval()
    with torch.no_grad():
        model(tokens(B=3))
    stats = model.stats()
    assert set(stats) == {f"dead_{pool}" for pool in POOLS} | {"qk_overlap", "route_entropy"}  # eval: no losses
    assert 0.9 < stats["route_entropy"] < 1  # at init the router's logits are small: p is close to uniform
    prompt = tokens(B=1, T=12)[0]
    path = model.routing_path(prompt)
    assert len(path) == 4 and set(path[0]) == {"fQ", "fK", "fV", "rQ", "rK", "rV", "fKn", "rKn"}
    assert path[0]["fV"].shape == (12, 4) and path[0]["fV"].max() < 40 and path[0]["fQ"].max() < 16
    again = model.routing_path(prompt.view(1, -1))
    assert all(torch.equal(a[name], b[name]) for a, b in zip(path, again) for name in a)


# --- incremental decoding ------------------------------------------------------------------------

def test_cached_decoding_routes_every_token_as_the_forward_does():
    """Routing reads each token's own state, so the cache needs no routing state; but that state at
    layer l > 0 comes from attention over the cached keys, and at layer 0 from the position table
    offset by the cache's length: every layer's selected neurons must be routing_path's."""
    model = build("dawn")
    x = tokens(B=1)
    path = model.routing_path(x[0])
    selected = []
    hooks = [layer.register_forward_hook(lambda module, args, out: selected.append(out[1])) for layer in model.blocks]
    decode(model, x, PROMPT_THEN_TOKENS)
    for hook in hooks:
        hook.remove()
    n_layer = len(model.blocks)
    for l, layer_path in enumerate(path):
        steps = selected[l::n_layer]  # the calls of layer l, in order
        for pool, names in model_dawn.ROUTINGS.items():
            for i, name in enumerate(names):
                cached = torch.cat([step[pool][2][0, :, i] for step in steps])  # (T, k)
                assert torch.equal(cached, layer_path[name]), f"layer {l} {name}"


def test_cached_decoding_is_the_eval_computation_and_leaves_stats_alone():
    model = build("dawn", dropout=0.1, router_dropout=0.1)
    x = tokens(B=3)
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
    last = model.last
    model.train()
    torch.testing.assert_close(decode(model, x, PROMPT_THEN_TOKENS)[0], full, atol=1e-4, rtol=1e-4)
    assert model.training and model.last is last


def test_cache_stops_at_the_position_table():
    model = build("dawn").eval()
    x = tokens(B=2)
    cache = model.init_cache(2)
    model.forward_cached(x[:, :60], cache)
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(x[:, :5], cache)  # positions 60..64: the table has 64 rows
    assert cache["t"] == 60  # refused before writing anything: decoding goes on
    with torch.no_grad():
        full = model(x)[0]
    torch.testing.assert_close(model.forward_cached(x[:, 60:], cache), full[:, 60:], atol=1e-4, rtol=1e-4)


def test_flops_per_token_counts_the_matmuls_the_code_runs():
    """DAWN's flops_per_token against PyTorch's FLOP counter on one forward+backward of block_size
    tokens in eval mode (the math SDPA backend, so attention runs as matmuls the counter sees).
    The formula counts, per layer, the router's logits for every routing (K's over the two pools it
    shares with Q too), the pool products u @ F and [w h] @ R dense over every neuron, the mixtures
    w @ (u F_n), W_O and attention over the full T x T square, plus the head. The auxiliary losses of
    training (orthogonality and diversity: a cost per step, not per token) are not in either: eval
    mode does not compute them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = build("dawn").eval()
    c = model.config
    T = c.block_size
    x = tokens(B=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    assert counter.get_total_flops() == T * model.flops_per_token()
