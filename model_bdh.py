"""
BDH, the "Baby Dragon Hatchling" (Kosowski et al. 2025, arXiv:2509.26507), in its GPU form BDH-GPU,
computed as the reference code (pathwaycom/bdh) computes it.

The idea. A network of n "neurons" (2048 here, 32768 in the paper) talks through a low-rank
bottleneck of width D. Each layer lifts the D-dim token state into neuron space and applies ReLU:
a sparse, non-negative firing pattern xs. Working memory is Hebbian: every past token wrote the
outer product of its firing pattern and its D-dim state into a "synaptic" matrix, and the current
firing pattern reads it back. That is linear attention over the neuron axis (query = key = the
firing pattern turned by RoPE, values = the D-dim stream, no softmax). The read-out is lifted to
neuron space again and ReLU'd (ys); a neuron passes its signal on only if it fires in both
(xs * ys, an AND), and the result is compressed back to D dims and added residually. The same three
big matrices serve every layer: depth is one "brain" applied n_layer times, so n_layer changes the
compute, not the parameters (3*n*D + 2*V*D of them).

The equations (the reference's bdh.py) and where they are in the code; B batch, T time, D = n_embd, H heads,
N = M*D/H neurons per head, LN = LayerNorm without gain or bias:

    x  = LN(wte[idx])                                    (B, T, D)                 forward()
    repeat n_layer times, with the same encoder, encoder_v, decoder:                layer()
        xs = ReLU(x @ encoder[h])                        (H, B, T, N)  sparse, >= 0
        q  = RoPE_t(xs)                                  keys are this same tensor
        A  = q q^T, kept where s < t, else 0             (H, B, T, T)  no softmax, no scaling
        a  = LN(A @ x)                                   (H, B, T, D)  values: x itself, shared by heads
        ys = ReLU(a @ encoder_v[h])                      (H, B, T, N)
        g  = dropout(xs * ys)                            the only dropout in the model
        x  = LN(x + LN(concat_h(g) @ decoder))           back to D, post-norm residual
    logits = x @ lm_head                                 untied; x is already normalised

The paper's figure keeps the residual in neuron space and uses LN(E y) as the value; the reference,
and this file, keep the residual in D-space and recompute xs from x in every layer.

Read as a recurrence (the paper's state-space view; step()), each layer and head keeps a state S of N x D numbers,
S_t = sum_{s<t} RoPE_s(xs_s) (outer) x_s, and a_t = LN(S_t^T RoPE_t(xs_t)): the token reads S first and
writes itself into it afterwards. forward_cached() decodes this way: O(n*D) work and memory per
token at any position, where attention would read a cache that grows with the text.

Causality. The reference is strictly causal and so is this file: everything but the
attention acts on one position, and the attention reads positions s < t only. The diagonal is
excluded on purpose, so position 0 reads nothing: its read-out is LN(0) = 0 in every layer, x only
gets normalised again, and its logits are a function of the first token alone. Masked scores are 0,
not -inf (there is no softmax to remove them from). What we do differently from the reference is
speed only: the RoPE phases are computed once per forward rather than per layer, every head runs
in one batched matmul, the scores' gradient is one matmul (CausalScores), and generation uses the
recurrence instead of re-running the whole sequence for every new token.

Naming: this file keeps the reference's names on purpose, which are the paper's swapped. encoder
(D -> neurons) is the paper's D_x, encoder_v (D -> neurons, for the read-out) is D_y, and decoder
(neurons -> D) is the paper's "encoder" E. Only the token embedding takes the skeleton's name, wte
(the reference's embed).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 65                    # V; set by train.py from the tokenizer (the reference: 256 bytes)
    block_size: int = 64                    # training context T; the model itself has no position limit
    n_layer: int = 4                        # L: applications of the one shared layer (not L sets of weights)
    n_embd: int = 128                       # D: width of the low-rank residual stream
    n_head: int = 4                         # H: neuron groups, each with its own scores and RoPE
    mlp_internal_dim_multiplier: int = 16   # M: n = M*D neurons in all, N = n/H per head
    dropout: float = 0.1                    # p: dropout on the gated product xs * ys only


PRESETS = {
    # the reference's default: 25,296,896 parameters, n = 32768 neurons, byte vocabulary
    "bdh-25m": dict(vocab_size=256, block_size=512, n_layer=6, n_embd=256, n_head=4,
                    mlp_internal_dim_multiplier=128, dropout=0.1),
}

ROPE_THETA = 2.0 ** 16  # the reference's RoPE base; the pairs turn over the neuron axis


def layer_norm(x):
    """LN(z) = (z - mean z) / sqrt(var z + 1e-5) over the last axis, with no gain and no bias."""
    return F.layer_norm(x, (x.size(-1),))


def rope_angles(positions, N):
    """t * w_k for each position t and neuron pair k < N/2, w_k = theta^(-2k/N), reduced to [0, 2pi): (T, N/2).

    Formed as the reference forms it, in fp32, operation for operation: turns per position
    1 / theta^(2k/N) / 2pi (theta^(-2k/N) rounds differently, 1-2 ulp apart on some k), times t,
    fractional part, times 2pi. The frequencies are recomputed here rather than kept in a buffer, so
    .to(dtype) on the model can never round them."""
    k2 = torch.arange(0, N, 2, device=positions.device, dtype=torch.float32)  # 2k
    turns = 1.0 / ROPE_THETA ** (k2 / N) / (2 * math.pi)                         # w_k / 2pi per position
    return torch.frac(positions.float()[:, None] * turns) * (2 * math.pi)


def rope_phases(positions, N):
    """e^(i t w_k): complex (T, N/2). Built once per forward: every layer turns by the same angles."""
    angles = rope_angles(positions, N)
    return torch.complex(angles.cos(), angles.sin())


def rotate(v, phase):
    """RoPE on interleaved pairs (v_2k, v_2k+1) = (u, w) -> (u cos - w sin, w cos + u sin).

    That is the complex product (u + iw) * e^(i angle): one pass over v forward and one backward,
    about 3x faster on a CPU than the same rotation in real arithmetic (which needs a swapped copy
    of the pairs). Computed in at least fp32, cast back to v's dtype. torch.compile runs the complex
    product as a separate kernel, with a warning that it cannot generate code for it; same result."""
    z = torch.view_as_complex(v.to(torch.promote_types(v.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * phase).flatten(-2).to(v.dtype)


class CausalScores(torch.autograd.Function):
    """A = q q^T kept where s < t, else 0: the scores <q_t, q_s> of q (..., T, N) with every earlier position.

    The same tensor is query and key, so autograd would take q @ q.mT's gradient as two matmuls, one
    per operand, and add two (..., T, N) results. Written out it is one: with G = dL/dA masked the
    same way, dL/dq_t = sum_s G_ts q_s + sum_s G_st q_s, that is dL/dq = (G + G^T) q. Same values up
    to rounding; a training step on a CPU about 5% faster (the (T, N) tensors are the big ones)."""

    @staticmethod
    def forward(ctx, q):
        ctx.save_for_backward(q)
        return (q @ q.mT).tril(-1)

    @staticmethod
    def backward(ctx, grad_A):
        q, = ctx.saved_tensors
        G = grad_A.tril(-1)
        return (G + G.mT) @ q


class BDH(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, H, M = config.n_embd, config.n_head, config.mlp_internal_dim_multiplier
        if (M * D) % H or (M * D // H) % 2:
            raise ValueError(f"n_head ({H}) must split the M*D = {M * D} neurons into groups of even size "
                             "(RoPE turns pairs); change n_head or mlp_internal_dim_multiplier")
        self.config = config
        N = M * D // H
        self.wte = nn.Embedding(config.vocab_size, D)
        self.encoder = nn.Parameter(torch.empty(H, D, N))    # D_x: D -> neurons, gives xs
        self.encoder_v = nn.Parameter(torch.empty(H, D, N))  # D_y: attention read-out -> neurons, gives ys
        self.decoder = nn.Parameter(torch.empty(H * N, D))   # E: neurons -> D; row h*N + i is neuron i of head h
        self.lm_head = nn.Parameter(torch.empty(D, config.vocab_size))  # not tied to wte
        self.drop = nn.Dropout(config.dropout)
        for p in self.parameters():  # the reference: every tensor ~ N(0, 0.02^2), no biases anywhere
            nn.init.normal_(p, std=0.02)
        self.last = {}  # the last forward's activations (detached), which stats() reduces when asked

    def layer(self, x, phase):
        """One application of the shared layer to x (B, T, D), in the parallel (training) form.

        Neuron tensors are head-major, (H, B*T, N): every product is one matmul batched over heads,
        and x is broadcast over heads (expand, no copy) rather than the big activations transposed."""
        B, T, D = x.shape
        H, _, N = self.encoder.shape
        # ReLU in place (relu_): a matmul's backward needs its inputs, not its output, and not
        # allocating a second (H, B*T, N) tensor makes a CPU training step ~4% faster
        xs = F.relu_(x.view(1, B * T, D).expand(H, -1, -1) @ self.encoder)  # (H, B*T, N) neuron firing
        q = rotate(xs.view(H * B, T, N), phase)                             # the keys are the same tensor
        A = CausalScores.apply(q)                         # (H*B, T, T): <q_t, q_s> where s < t, 0 elsewhere
        a = layer_norm(A.view(H, B, T, T) @ x)            # (H, B, T, D): the read-out, values are x itself
        ys = F.relu_(a.view(H, B * T, D) @ self.encoder_v)                  # (H, B*T, N)
        g = xs * ys                                       # a neuron passes only if it fires in both
        m = (self.drop(g) @ self.decoder.view(H, N, D)).sum(0)  # concat_h(g) @ decoder: (B*T, D)
        return layer_norm(x + layer_norm(m.view(B, T, D))), xs, ys, g

    # Adapted from model_gpt.GPT.forward: one shared layer applied n_layer times, RoPE phases over the
    # neurons, no final norm (layer() ends in one); keeps the activations for stats()
    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        phase = rope_phases(torch.arange(T, device=idx.device), self.encoder.size(-1))  # once for all layers
        x = layer_norm(self.wte(idx))  # (B, T, D); one stream, read by every head
        # stats() reduces the last forward's activations only when asked: reducing them here costs
        # about a tenth of a training step. They are let go before this forward makes its own, so
        # holding them (they are kept for the backward pass anyway) adds to no peak but the backward's.
        self.last = {}
        activations = []
        for _ in range(self.config.n_layer):
            x, xs, ys, g = self.layer(x, phase)
            activations.append((xs.detach(), ys.detach(), g.detach()))
        self.last = {"activations": activations}
        logits = x @ self.lm_head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # --- the recurrent form: the same model, one token at a time -----------------------

    def initial_state(self, batch_size):
        """The synaptic states before any token: zeros, (L, H, B, N, D), one N x D matrix per layer,
        head and sequence. Their size does not grow with the text."""
        H, D, N = self.encoder.shape
        return torch.zeros(self.config.n_layer, H, batch_size, N, D, device=self.decoder.device,
                           dtype=self.decoder.dtype)

    def step(self, token, t, state):
        """Logits (B, V) after token (B,) at absolute position t; state (from initial_state, holding
        positions < t) is updated in place. Each layer reads its state before writing the token
        into it, which is what excludes the diagonal. There is no dropout here: this is the
        inference computation whatever the module's mode."""
        H, D, N = self.encoder.shape
        phase = rope_phases(torch.tensor([t], device=token.device), N)[0]  # (N/2,)
        x = layer_norm(self.wte(token))                                     # (B, D)
        for S in state:                                                     # S: (H, B, N, D)
            xs = F.relu(x.expand(H, -1, -1) @ self.encoder)                 # (H, B, N)
            k = rotate(xs, phase)                                           # query = key
            a = layer_norm((k.unsqueeze(-2) @ S).squeeze(-2))               # read: S^T k, (H, B, D)
            S.addcmul_(k.unsqueeze(-1), x.unsqueeze(-2))                    # then write: S += k (outer) x
            ys = F.relu(a @ self.encoder_v)                                 # (H, B, N)
            m = ((xs * ys) @ self.decoder.view(H, N, D)).sum(0)             # (B, D)
            x = layer_norm(x + layer_norm(m))
        return x @ self.lm_head

    def init_cache(self, batch_size):
        """What incremental decoding carries: the synaptic states and the number of tokens they hold."""
        return {"state": self.initial_state(batch_size), "t": 0}

    @torch.inference_mode()
    def forward_cached(self, idx, cache):
        """Logits (B, t, V) of the next t tokens idx (B, t) after the cache's, through step() one token
        at a time: exactly the parallel form's logits, at O(n*D) per token whatever the position.
        The recurrence itself has no window, but a model trained on block_size tokens writes worse
        text past them, so the cache holds at most block_size tokens like every other model's
        (sample.py then refills it from the last block_size/2 tokens)."""
        if cache["t"] + idx.size(1) > self.config.block_size:
            raise ValueError(f"the cache holds {cache['t']} tokens; {idx.size(1)} more exceed block_size "
                             f"{self.config.block_size}")
        logits = []
        for token in idx.unbind(1):
            logits.append(self.step(token, cache["t"], cache["state"]))
            cache["t"] += 1
        return torch.stack(logits, dim=1)

    def stats(self):
        """Activation density of the last forward: the fraction of nonzeros in xs, ys and
        g = xs * ys, averaged over layers, g's per layer, and the fraction of the n neurons that never
        fired (xs) at any token of the batch in any layer."""
        if not self.last:
            return {}
        acts = self.last["activations"]  # the activations are >= 0, so sign() is 1 where a neuron fires
        density = torch.stack([torch.stack([xs.sign().mean(), ys.sign().mean(), g.sign().mean()])
                               for xs, ys, g in acts]).tolist()  # (L, 3): xs, ys, g per layer
        fired = sum(xs.amax(dim=1) for xs, _, _ in acts)  # (H, N): > 0 where the neuron fired at some token
        out = {f"density_{name}": sum(row[i] for row in density) / len(density)
               for i, name in enumerate(("xs", "ys", "g"))}
        out.update({f"density_g_l{l}": row[2] for l, row in enumerate(density)})
        out["dead_frac"] = (fired == 0).float().mean().item()
        return out

    def flops_per_token(self):
        # Forward + backward = 3 x forward, 2 FLOPs per multiply-add, at T = block_size. Per layer and
        # token the code multiplies: the three shared projections, x @ encoder, a @ encoder_v and
        # g @ decoder (n*D each); the score row q_t . q_s over the full T x T square it computes
        # before masking (T*n); the read-out A @ x for every head (T*H*D). L layers reuse the same
        # weights, so this is L x the projections, not 6 x params. Plus the head (D*V); the embedding
        # lookup, RoPE, norms and elementwise products are not counted. These are model FLOPs (the
        # 3x rule, as MFU counts them): the scores' backward runs one matmul where the rule counts
        # two (CausalScores), so the code itself does 2*T*n fewer per layer and token.
        c = self.config
        n, D, T = c.mlp_internal_dim_multiplier * c.n_embd, c.n_embd, c.block_size
        return 6 * c.n_layer * (3 * n * D + T * n + T * c.n_head * D) + 6 * D * c.vocab_size


Model = BDH
