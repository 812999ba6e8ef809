"""BDH (model_bdh.py): checks of the BDH-GPU computation beyond the generic contract tests of test_models.py.

Every comparison is against an independent oracle: the original's own outputs (a fixture written by
tests/make_bdh_fixtures.py with pathwaycom/bdh's bdh.py), the parameter formula, a hand-built rotation
matrix, LN(embed) @ lm_head, the recurrent form against the parallel form, PyTorch's FLOP counter.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import model_bdh
from conftest import ROOT, build, tokens
from model_bdh import BDH, Config, rope_angles, rope_phases, rotate

SMALL = dict(n_layer=3, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, block_size=32)  # N = 128 per head


def eval_model(dtype=torch.float32, **fields):
    """BDH at the laptop config with `fields` (dropout off unless given), in dtype, in eval mode."""
    return build("bdh", **fields).to(dtype).eval()


def trained(dtype=torch.float32, steps=8, **fields):
    """A model after a few large AdamW steps at repeating the previous token (which needs the
    attention): weights off their init, logits of a few units."""
    model = eval_model(**fields).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        x = tokens(4, model.config.block_size, seed=10 + i)
        model(x, torch.roll(x, 1, dims=1))[1].backward()  # learn to repeat the previous token
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.to(dtype).eval()


def embedding_alone(model, idx):
    """The logits when no layer adds anything: x = LN(x + LN(0)) = LN(x) in every layer, so
    LN(embed[idx]) normalised n_layer more times, then the head. (LN is idempotent only up to
    eps / var: the embedding's variance at init is 4e-4, so LN(LN(z)) is 1.2% larger than LN(z).)"""
    x = model.wte.weight[idx]
    for _ in range(model.config.n_layer + 1):
        x = F.layer_norm(x, (model.config.n_embd,))
    return x @ model.lm_head


def n_params(**fields):
    with torch.device("meta"):
        return sum(p.numel() for p in BDH(Config(**fields)).parameters())


# --- against the original -------------------------------------------------------------------

REFERENCE = torch.load(os.path.join(ROOT, "tests", "fixtures", "bdh_tiny", "expected.pt"), weights_only=True)


def reference_model():
    """Our BDH with the weights of the original's fixture model (its embed is our wte)."""
    state = REFERENCE["state_dict"]
    model = BDH(Config(block_size=REFERENCE["idx"].size(1), **REFERENCE["config"]))
    model.load_state_dict({"wte.weight": state["embed.weight"],
                           **{k: state[k] for k in ("encoder", "encoder_v", "decoder", "lm_head")}})
    return model.eval()


def test_rope_angles_are_the_originals_bit_for_bit():
    """The original's angles, from its own fp32 frequency buffer (each pair's twice): t * freq, mod 1,
    times 2pi. Every step is an exactly rounded IEEE operation, so the angles must be equal on every
    machine. cos and sin are left out: they come from the machine's math library (on a CI machine the
    first cos of a process once differed by 2e-4 from a later one on the same angles); the logits test
    below checks the whole model, phases included, within a few ulp."""
    freqs = REFERENCE["freqs"][::2]
    T, N = REFERENCE["idx"].size(1), REFERENCE["freqs"].numel()
    angles = (torch.arange(T, dtype=torch.float32)[:, None] * freqs) % 1 * (2 * math.pi)
    assert torch.equal(rope_angles(torch.arange(T), N), angles)


def test_logits_equal_the_originals():
    """The whole model, phases included, against the original's logits. Formed as the original forms
    them, the parallel form gave them bit for bit (2-core CPU, torch 2.13), but once, in a full test
    run on a loaded 2-core machine, not within 5e-7 (1-2 ulp): kernels may split sums differently from
    run to run. The tolerance is therefore 1e-5, still below small mistakes (measured: LayerNorm's eps
    1e-6 for 1e-5 moves these logits by 4e-4, one encoder weight 1% off by 2e-5); the exact RoPE formation (theta^(-2k/N) in place of
    1 / theta^(2k/N) moved the logits by only 2.3e-6) is pinned by the angles test above."""
    model = reference_model()
    expected = REFERENCE["logits"]
    with torch.no_grad():
        logits = model(REFERENCE["idx"])[0]
        stepped = model.forward_cached(REFERENCE["idx"], model.init_cache(2))  # the recurrent form
    assert expected.abs().max() > 1  # trained logits, so the tolerance is a few ulp, not a few percent
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=0)


# --- parameters and FLOPs ---------------------------------------------------------------------

@pytest.mark.parametrize("M,D,V", [(16, 128, 65), (8, 64, 256), (4, 32, 50304), (128, 256, 256)])
def test_parameter_count_is_3MD2_plus_2VD_for_any_depth_and_heads(M, D, V):
    for L in (1, 4, 6):
        for H in (1, 2, 4):  # shared weights: neither depth nor head count adds parameters
            assert n_params(n_layer=L, n_head=H, mlp_internal_dim_multiplier=M, n_embd=D,
                            vocab_size=V) == 3 * M * D * D + 2 * V * D


def test_parameter_counts_of_laptop_and_reference_configs():
    assert n_params() == 803_072  # the laptop config
    assert n_params(**model_bdh.PRESETS["bdh-25m"]) == 25_296_896  # pathwaycom/bdh's default config


def test_flops_per_token_counts_the_matmuls_the_code_runs():
    model = eval_model()
    T = model.config.block_size
    with FlopCounterMode(display=False) as counter:
        model(tokens(1, T), tokens(1, T, seed=2))[1].backward()
    c = model.config
    n = c.mlp_internal_dim_multiplier * c.n_embd  # CausalScores' backward: one (T, T) x (T, n) matmul, not two
    assert counter.get_total_flops() == (model.flops_per_token() - 2 * c.n_layer * T * n) * T
    assert abs(model.flops_per_token() / 22.8e6 - 1) < 0.01  # ~22.8 MFLOP/token at the laptop config, ~4x GPT's


def test_invalid_config_and_too_long_input_raise_value_errors():
    with pytest.raises(ValueError, match="n_head"):
        BDH(Config(n_head=3))  # 2048 neurons do not split into 3 heads
    with pytest.raises(ValueError, match="n_head"):
        BDH(Config(n_embd=8, mlp_internal_dim_multiplier=1, n_head=8))  # N = 1 is odd: no RoPE pairs
    with pytest.raises(ValueError, match="block_size"):
        eval_model(**SMALL)(tokens(1, 33))


# --- causality and the diagonal ---------------------------------------------------------------

def test_position_zero_is_a_function_of_the_first_token_alone():
    model = trained()
    x = tokens(3, 64)
    x2 = x.clone()
    x2[:, 1:] = tokens(3, 63, seed=7)
    with torch.no_grad():
        logits, logits2 = model(x)[0], model(x2)[0]
        oracle = embedding_alone(model, x[:, 0])  # the read-out at t = 0 is empty: LN(0) = 0
    assert torch.equal(logits[:, 0], logits2[:, 0]) and not torch.equal(logits[:, 1:], logits2[:, 1:])
    assert logits[:, 0].abs().max() > 1  # the trained head gives the check something to miss
    torch.testing.assert_close(logits[:, 0], oracle, atol=1e-5, rtol=0)


def test_gradients_never_flow_from_later_tokens():
    """d logits[t] / d (embedding at position s) is exactly 0 for s > t and not for s <= t."""
    model = eval_model(**SMALL)
    x = tokens(1, 32)
    emb = model.wte(x).detach().requires_grad_(True)
    hook = model.wte.register_forward_hook(lambda module, args, out: emb)  # differentiate w.r.t. emb
    logits = model(x)[0]
    hook.remove()
    for t in (0, 9, 30):
        grad, = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
        size = grad[0].abs().sum(-1)
        assert torch.all(size[t + 1:] == 0) and torch.all(size[:t + 1] > 0), t


# --- the recurrent form -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol,fields", [(torch.float64, 1e-10, SMALL), (torch.float32, 1e-4, {})],
                         ids=["fp64-small", "fp32-laptop"])
def test_recurrent_form_equals_parallel_form(dtype, tol, fields):
    model = trained(dtype, **fields)
    T = model.config.block_size
    x = tokens(2, T)
    with torch.no_grad():
        parallel = model(x)[0]
        state = model.initial_state(2)
        recurrent = torch.stack([model.step(x[:, t], t, state) for t in range(T)], dim=1)
    assert parallel.abs().max() > 0.5  # logits off their init (~0.2), so the tolerances mean something
    assert (parallel - recurrent).abs().max() <= tol
    assert state.shape == (model.config.n_layer, model.config.n_head, 2, model.encoder.size(-1),
                           model.config.n_embd)  # N x D per layer, head and sequence, whatever T


@pytest.mark.parametrize("dtype,fields", [(torch.float64, SMALL), (torch.float32, dict(block_size=32))],
                         ids=["fp64-small", "fp32-laptop"])
def test_greedy_cached_decoding_equals_the_parallel_argmax(dtype, fields):
    """sample.py's generate through the recurrent cache: greedy tokens equal the parallel forward's
    argmax at every position up to block_size. At init, where greedy text still wanders instead of
    repeating one token."""
    from sample import generate
    model = eval_model(dtype, **fields)
    prompt = tokens(2, 5)
    T = model.config.block_size
    out = generate(model, prompt, T - 5, top_k=1)
    assert out.shape == (2, T) and torch.equal(out[:, :5], prompt)
    assert len(out[:, 5:].unique()) > 5
    with torch.no_grad():
        parallel_next = model(out[:, :-1])[0].argmax(-1)  # the argmax at t is the token at t + 1
    assert torch.equal(parallel_next[:, 4:], out[:, 5:])


def test_cached_decoding_under_bf16_autocast():
    """sample.py generates under autocast on CUDA; bf16 read-outs must mix with the fp32 state."""
    from sample import generate
    model = trained(**SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, tokens(1, 4), 10, temperature=0.8, top_k=5)
    assert out.shape == (1, 14) and out.dtype == torch.long


# --- RoPE -------------------------------------------------------------------------------------

def test_rope_is_a_rotation_of_interleaved_pairs_at_theta_2_16():
    N, t = 16, 5
    out = rotate(torch.eye(N), rope_phases(torch.tensor([t]), N)[0])  # row j = R e_j
    blocks = []
    for k in range(N // 2):  # pair (2k, 2k+1): both members turn by the same angle t * theta^(-2k/N)
        c, s = math.cos(t * 65536 ** (-2 * k / N)), math.sin(t * 65536 ** (-2 * k / N))
        blocks.append(torch.tensor([[c, s], [-s, c]]))  # R e_2k = (c, s), R e_2k+1 = (-s, c)
    torch.testing.assert_close(out, torch.block_diag(*blocks), atol=1e-6, rtol=0)


def test_rope_preserves_norms_depends_on_offsets_only_and_is_the_identity_at_zero():
    N = 64
    phase = rope_phases(torch.arange(300), N)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(N, generator=g), torch.randn(N, generator=g)
    assert torch.equal(rotate(u, phase[0]), u)
    torch.testing.assert_close(rotate(u, phase[123]).norm(), u.norm())
    ref = rotate(u, phase[3]) @ rotate(v, phase[10])
    for shift in (1, 50, 280):
        torch.testing.assert_close(rotate(u, phase[3 + shift]) @ rotate(v, phase[10 + shift]), ref,
                                   atol=1e-5, rtol=1e-5)
    assert abs(rotate(u, phase[3]) @ rotate(v, phase[40]) - ref) > 1e-2  # another offset differs


# --- activations, density, dropout ------------------------------------------------------------

def test_activations_are_non_negative_and_about_half_half_quarter_dense_at_init():
    model = eval_model()
    x = F.layer_norm(model.wte(tokens(4, 64)), (model.config.n_embd,))
    with torch.no_grad():
        _, xs, ys, g = model.layer(x, rope_phases(torch.arange(64), model.encoder.size(-1)))
        model(tokens(4, 64))
    assert (xs >= 0).all() and (ys >= 0).all() and (g >= 0).all()
    stats = model.stats()
    assert abs(stats["density_xs"] - 0.5) < 0.05 and abs(stats["density_ys"] - 0.5) < 0.05
    assert abs(stats["density_g"] - 0.25) < 0.05 and stats["dead_frac"] == 0
    assert len(stats) == 3 + model.config.n_layer + 1


def test_dropout_acts_in_training_only_and_on_the_gated_product_only():
    x = tokens(2, 64)
    model = eval_model(dropout=0.5)
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])  # eval: deterministic
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])
        model.drop.p = 1.0  # every xs * ys dropped: no layer adds anything, x stays LN(embed)
        torch.testing.assert_close(model(x)[0], embedding_alone(model, x), atol=1e-5, rtol=0)
    model = eval_model(dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(model(x)[0], model(x)[0])
