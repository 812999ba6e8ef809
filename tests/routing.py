"""Helpers for the tests of the routed models, MoD (test_mod.py) and DTF (test_dtf.py): both route
token by token with route(score, tau, K) and run the routed tokens through routed_update, so one
set of helpers serves both (a routed layer = a MoDBlock or a DTFPair: a module with a tau buffer)."""
import sys

import torch


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
