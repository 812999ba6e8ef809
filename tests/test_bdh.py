"""BDH (model_bdh.py): the checks of specs/bdh.md section 9 beyond the generic contract tests."""
import math

import pytest
import torch

import model_bdh
from model_bdh import BDH, layer_norm, rope_phases, rotate


def build(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return BDH(model_bdh.Config(**{"dropout": 0.0, **kw})).to(dtype).eval()


def tokens(B=2, T=64, seed=1):
    return torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("L,H,M,D,V", [(4, 4, 16, 128, 65), (1, 4, 16, 128, 65), (6, 2, 16, 128, 65),
                                       (2, 4, 8, 64, 256), (3, 8, 4, 32, 50304)])
def test_parameter_count_is_3MD2_plus_2VD(L, H, M, D, V):
    with torch.device("meta"):
        model = BDH(model_bdh.Config(n_layer=L, n_head=H, mlp_internal_dim_multiplier=M, n_embd=D, vocab_size=V))
    assert sum(p.numel() for p in model.parameters()) == 3 * M * D * D + 2 * V * D
    if (L, H, M, D, V) == (4, 4, 16, 128, 65):
        assert 3 * M * D * D + 2 * V * D == 803_072  # the laptop config
    with torch.device("meta"):
        assert sum(p.numel() for p in BDH(model_bdh.Config(**model_bdh.PRESETS["bdh-25m"])).parameters()) == 25_296_896


def test_position_zero_is_a_function_of_the_first_token_only():
    model = build()
    x = tokens()
    with torch.no_grad():
        logits = model(x)[0]
        x0 = model.embed(x[:, 0])
        for _ in range(model.config.n_layer + 1):  # each layer adds LN(0) = 0 and normalises again
            x0 = layer_norm(x0)
        x2 = x.clone()
        x2[:, 1:] = tokens(seed=3)[:, 1:]
        assert torch.equal(model(x2)[0][:, 0], logits[:, 0])
    torch.testing.assert_close(logits[:, 0], x0 @ model.lm_head, atol=1e-5, rtol=0)


def test_gradient_causality():
    """d logits[t] / d (embedding of position s) is exactly 0 for s > t."""
    model = build()
    x = tokens(B=1, T=16)
    emb = model.embed(x).detach().requires_grad_(True)
    hook = model.embed.register_forward_hook(lambda module, args, out: emb)  # differentiate w.r.t. emb
    logits = model(x)[0]
    hook.remove()
    logits[0, 7].sum().backward()
    assert emb.grad[0, 8:].abs().max() == 0 and emb.grad[0, :7].abs().max() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_recurrent_form_equals_parallel_form(dtype, tol):
    model = build(dtype)
    x = tokens(B=2, T=48)
    H, D, N = model.encoder.shape
    with torch.no_grad():
        parallel = model(x)[0]
        states = torch.zeros(model.config.n_layer, 2, H, N, D, dtype=dtype)
        recurrent = torch.stack([model.step(x[:, t], t, states) for t in range(48)], dim=1)
    assert (parallel - recurrent).abs().max() <= tol


def test_greedy_generation_matches_the_parallel_forward():
    model = build()
    prompt = tokens(B=1, T=5)
    out = model.generate(prompt, 40, top_k=1)
    assert out.shape == (1, 45) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        parallel_next = model(out[:, :44])[0].argmax(-1)  # the argmax at t is the token at t + 1
    assert torch.equal(parallel_next[:, 4:], out[:, 5:])


def test_generation_runs_past_block_size_without_cropping():
    model = build(block_size=16)
    out = model.generate(tokens(B=1, T=3), 30, top_k=1)
    assert out.shape == (1, 33)


def test_rope_properties():
    N = 16
    t = torch.arange(50)
    phase = rope_phases(t, N)
    u, v = torch.randn(N), torch.randn(N)
    R = lambda vec, p: rotate(vec, phase[p])
    torch.testing.assert_close(R(u, 0), u)  # identity at t = 0
    torch.testing.assert_close(R(u, 17).norm(), u.norm())  # a rotation
    torch.testing.assert_close(R(u, 3) @ R(v, 10), R(u, 30) @ R(v, 37), atol=1e-5, rtol=1e-5)  # offset only
    e = torch.zeros(N)  # pair k turns at theta^(-2k/N), both members by the same angle
    e[2] = 1.0  # member 0 of pair 1
    rotated = R(e, 5)
    angle = 5 * (2.0 ** 16) ** (-2 / N)
    torch.testing.assert_close(rotated[2:4], torch.tensor([math.cos(angle), math.sin(angle)]))
    e = torch.zeros(N)
    e[3] = 1.0  # member 1 of the same pair
    torch.testing.assert_close(R(e, 5)[2:4], torch.tensor([-math.sin(angle), math.cos(angle)]))


def test_dropout_acts_only_in_training():
    model = build(dropout=0.5)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])
    model = build(dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])


def test_density_at_init_is_about_half_half_quarter():
    model = build()
    with torch.no_grad():
        model(tokens(B=4))
    stats = model.stats()
    assert abs(stats["density_x"] - 0.5) < 0.05 and abs(stats["density_y"] - 0.5) < 0.05
    assert abs(stats["density_xy"] - 0.25) < 0.05 and 0 <= stats["dead_neurons"] < 0.01


def test_activations_are_non_negative():
    model = build()
    x = layer_norm(model.embed(tokens()))
    phase = rope_phases(torch.arange(64), model.encoder.size(-1))
    with torch.no_grad():
        _, x_n, y_n, g = model.layer(x, phase, torch.ones(64, 64).tril(-1))
    assert (x_n >= 0).all() and (y_n >= 0).all() and (g >= 0).all()
