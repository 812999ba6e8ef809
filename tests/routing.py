"""Helpers for the tests of the routed models, MoD (test_mod.py) and DTF (test_dtf.py): both route
token by token with route(score, tau, K) and run the routed tokens through routed_update, so one
set of helpers serves both (a routed layer = a MoDBlock or a DTFPair: a module with a tau buffer)."""
import json
import os
import sys

import torch

from conftest import make_text, run

BAND = (0.094, 0.156)  # 12.5% capacity, within 25%: what a 20-iteration mean of the routed fraction must stay in


def routed_layers(model):
    return [m for m in model.modules() if "tau" in m._buffers]


def routing_calls(model, x):
    """Per routed layer, in an eval forward of x: (score, x_in, block), where score is what the layer
    compared with tau (MoD: r; DTF: G), x_in the tensor its routed tokens were gathered from (MoD:
    the layer's input; DTF: H_post) and block the Block they ran through. Captured by wrapping the
    model file's route and routed_update, which the layers call by name."""
    module = sys.modules[type(model).__module__]
    route, routed_update = module.route, module.routed_update
    scores, inputs = [], []

    def capture_route(score, *args, **kwargs):
        scores.append(score)
        return route(score, *args, **kwargs)

    def capture_update(block, x_in, *args, **kwargs):
        inputs.append((x_in, block))
        return routed_update(block, x_in, *args, **kwargs)

    module.route, module.routed_update = capture_route, capture_update
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        module.route, module.routed_update = route, routed_update
    return [(score, x_in, block) for score, (x_in, block) in zip(scores, inputs)]


def set_tau_to_median(model, x):
    """tau of every routed layer at the median of its scores on x: about half the tokens want routing."""
    for layer, (score, _, _) in zip(routed_layers(model), routing_calls(model, x)):
        layer.tau.fill_(score.median().item())


def set_tau_to_quantile(model, x, q):
    for layer, (score, _, _) in zip(routed_layers(model), routing_calls(model, x)):
        layer.tau.fill_(score.quantile(q).item())


def routed_inputs(model, x):
    """Per routed layer, in an eval forward of x: (x_in, sel), the tensor its routed tokens come from
    and which tokens it routed."""
    module = sys.modules[type(model).__module__]
    return [(x_in, module.route(score, layer.tau, layer.cap())[0])
            for layer, (score, x_in, _) in zip(routed_layers(model), routing_calls(model, x))]


def stored_values(block, x_in, sel, b):
    """The values a routed layer's cache must hold for row b: V of the routed tokens, in position
    order, as `block` (the Block they run through) computes them."""
    attn, hd = block.attn, block.attn.head_dim
    v = attn.qkv_proj(block.attn_norm(x_in[b, sel[b]]))[:, -attn.n_kv_head * hd:]
    return v.view(-1, attn.n_kv_head, hd).transpose(0, 1)  # (G, n, hd)


class FixedMask:
    """Hands model_gpt's attention a given mask over its own keys, where a KV cache would hand it
    the cache's: the dense oracle of a routed block."""

    def __init__(self, mask):
        self.mask = mask

    def append(self, k, v):
        return k, v, self.mask


def check_prefix_forward_equals_full_forward(model, x, positions):
    """What a sampler computes (the prefix up to t) equals the full-window eval logits at t, with tau
    at the median so that every row hits the cap K = 16 (a cap computed from the current length T
    instead of block_size fails this)."""
    set_tau_to_median(model, x)
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
        assert all(layer.last["sel"].float().mean().item() == 16 / 64 for layer in routed_layers(model))
        for t in positions:
            torch.testing.assert_close(model(x[:, :t + 1])[0][:, -1], full[:, t], atol=1e-5, rtol=0)


def check_threshold_lifecycle(model, x, x2, k=8):
    """tau (with tau_bias) before training, after the first training forward and after a second one
    (update_threshold's equations, module docstring of model_mod.py), and that evaluation never moves
    them. x2: another batch, so that the second forward's cut-off and routed fraction differ from the
    first's."""
    module = sys.modules[type(model).__module__]
    layers = routed_layers(model)
    C = model.config.mod_capacity if hasattr(model.config, "mod_capacity") else model.config.dtf_capacity
    assert all(torch.isposinf(layer.tau) and layer.tau_bias == 0 for layer in layers)
    scores = [score for score, _, _ in routing_calls(model, x)]
    assert all(layer.last["sel"].float().mean().item() == 0.0 for layer in layers)  # nothing before training
    model.train()
    with torch.no_grad():
        model(x)
    for layer, score in zip(layers, scores):
        assert layer.last["sel"].float().mean().item() == 0.0  # this forward still decided with tau = +inf
        torch.testing.assert_close(layer.tau, score.topk(k, dim=1).values[:, -1].mean())  # the top-k cut-off
        assert layer.tau_bias == 0
    first = [layer.tau.clone() for layer in layers]
    scores = [score for score, _, _ in routing_calls(model, x2)]  # what the next training forward sees
    model.train()
    with torch.no_grad():
        model(x2)
    for layer, score, tau in zip(layers, scores, first):
        f = module.route(score, tau, layer.cap())[0].float().mean()
        assert torch.equal(layer.last["sel"].float().mean(), f)
        cutoff = score.topk(k, dim=1).values[:, -1].mean()
        bias = torch.maximum(score.std(correction=0), (cutoff - tau).abs()) * (f - C) / C
        assert bias != 0
        torch.testing.assert_close(layer.tau_bias, bias, rtol=1e-5, atol=0)
        torch.testing.assert_close(layer.tau, cutoff + bias, rtol=1e-6, atol=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    routing_calls(model, x)  # evaluation
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())  # a checkpoint keeps both buffers
    for a, b in zip(routed_layers(clone), layers):
        assert torch.equal(a.tau, b.tau) and torch.equal(a.tau_bias, b.tau_bias)


def drifting_scores(kind, steps=400, B=12, T=64):
    """A stream of score batches (B, T) that move the way routing scores move in training, with no
    model: "gate", DTF's surprise gate early on, a spread that grows 100-fold from 1e-5 while the
    whole batch drifts down by 1.5 spreads a step, slowing to 0.5, and jitters by half a spread;
    "router", MoD's router score, a wide spread that halves while the centre drifts by 0.2 spreads a
    step. Rows differ by an offset of half a spread."""
    g = torch.Generator().manual_seed(0)
    centre = 0.75 if kind == "gate" else 0.0
    for n in range(steps):
        spread = 1e-5 * 10 ** (n / 200) if kind == "gate" else 0.5 * 2 ** (-n / steps)
        centre -= spread * ((1.5 - n / steps) if kind == "gate" else 0.2)
        jitter = torch.randn((), generator=g) * spread * (0.5 if kind == "gate" else 0.1)
        yield centre + jitter + spread * (torch.randn(B, T, generator=g) + 0.5 * torch.randn(B, 1, generator=g))


def window_means(fractions, start=50, width=20):
    """Means of `width` consecutive iterations, the first starting at iteration `start` (fractions[0]
    is iteration 1's)."""
    return [sum(fractions[i:i + width]) / width for i in range(start - 1, len(fractions) - width + 1)]


def routed_fractions_of_rule(module, scores, update, capacity=0.125, K=16):
    """The fraction route() sends through with the threshold `update` moves, batch by batch."""
    tau, tau_bias = torch.tensor(float("inf")), torch.tensor(0.0)
    fractions = []
    for score in scores:
        sel = module.route(score, tau, K)[0]
        fractions.append(sel.float().mean().item())
        update(tau, tau_bias, score, sel)
    return fractions


def check_threshold_rule_tracks_drifting_scores(module, kind):
    """update_threshold keeps every 20-batch mean of the routed fraction in BAND from batch 50 on, on
    a stream where an exponential moving average of the top-k cut-off (momentum 0.99, the rule
    update_threshold replaced) falls out of it."""
    def rule(tau, tau_bias, score, sel):
        module.update_threshold(tau, tau_bias, score, sel, 8, 0.125, 1.0)

    def moving_average(tau, tau_bias, score, sel):
        cutoff = score.topk(8, dim=1).values[:, -1].mean()
        tau.copy_(torch.where(torch.isposinf(tau), cutoff, 0.99 * tau + 0.01 * cutoff))

    means = window_means(routed_fractions_of_rule(module, drifting_scores(kind), rule))
    assert BAND[0] <= min(means) and max(means) <= BAND[1], (min(means), max(means))
    old = window_means(routed_fractions_of_rule(module, drifting_scores(kind), moving_average))
    assert min(old) < BAND[0]  # the stream is hard enough to fail the old rule


def routed_fractions_of_run(tmp_path, *options, tokenizer=()):
    """Train with train.py on a small generated text for the given options, logging every iteration;
    {stat name: [value at iteration 1, 2, ...]} of its frac_routed_* stats."""
    text = tmp_path / "text.txt"
    text.write_text(make_text(30000))
    data = str(tmp_path / "data")
    r = run("prepare_data.py", "shakespeare" if tokenizer else "shakespeare_char", *tokenizer, f"--input={text}",
            "--name=tiny", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    r = run("train.py", "--dataset=tiny", f"--data_dir={data}", f"--out_dir={out}", "--log_interval=1",
            "--eval_iters=1", "--device=cpu", "--compile=False", *options)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "log.jsonl") as f:
        rows = [row for row in map(json.loads, f) if "loss" in row]
    return {key: [row[key] for row in rows] for key in rows[0] if key.startswith("frac_routed")}


def check_capacity_from_iteration_50(fractions):
    """Every 20-iteration mean of every routed layer's fraction, from iteration 50 on, in BAND."""
    assert fractions
    for key, values in fractions.items():
        means = window_means(values)
        assert means and BAND[0] <= min(means) and max(means) <= BAND[1], (key, min(means), max(means))


def _train_one_rank(rank, name, port, queue):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    module = __import__(f"model_{name}")
    torch.manual_seed(0)
    model = module.Model(module.Config()).train()
    g = torch.Generator().manual_seed(100 + rank)  # each process its own data, as under DDP
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 65, (4, 64), generator=g))
    queue.put((rank, {key: value.tolist() for key, value in model.state_dict().items() if "tau" in key}))
    dist.destroy_process_group()


def check_processes_agree_on_tau(name):
    """Two processes in a gloo group, each training forwards on its own batches: their tau and
    tau_bias stay identical (update_threshold averages its statistics over the processes)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_train_one_rank, args=(name, port, queue), nprocs=2)
    states = dict([queue.get(), queue.get()])
    assert states[0] == states[1] and len(states[0]) >= 4, states
    assert all(torch.isfinite(torch.tensor(v)) for v in states[0].values())
