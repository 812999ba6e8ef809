"""
BDH, the "Baby Dragon Hatchling" (Kosowski et al., 2025, arXiv 2509.26507), in its GPU form BDH-GPU,
as the reference code (pathwaycom/bdh) computes it. Spec: specs/bdh.md.

The idea. A network of n "neurons" (n = 2048 here, 32768 in the paper) talks through a low-rank
bottleneck of width D. Each layer lifts the D-dim token state into neuron space and applies ReLU:
a sparse, non-negative firing pattern x. Working memory is Hebbian: every past token s wrote the
outer product of its firing pattern and its D-dim state into a "synaptic" matrix, and the current
firing pattern reads it back. That is linear attention over the neuron axis (query = key = the
firing pattern, rotated by RoPE; no softmax). The read-out is lifted to neuron space again and
ReLU'd (y); a neuron passes its signal on only if it fires in both x and y (x * y), and the result
is compressed back to D dims and added residually. The same three big matrices serve every layer:
depth is the repeated application of one "brain", so n_layer changes compute, not parameters.

    x = LN(embedding[idx])                                   (B, T, D); LN has no parameters
    repeat n_layer times, with the same encoder / encoder_v / decoder:
        x_n = ReLU(x @ encoder[h])                           (B, H, T, N)  sparse neuron firing
        q   = RoPE(x_n)                                      keys are the same tensor as queries
        a   = LN( strictly_lower(q @ q^T) @ x )              (B, H, T, D)  linear attention, s < t only
        y_n = ReLU(a @ encoder_v[h])                         (B, H, T, N)
        m   = concat_heads(dropout(x_n * y_n)) @ decoder     (B, T, D)
        x   = LN(x + LN(m))
    logits = x @ lm_head                                     untied, no final norm (x is normalised)

Naming: this file uses the reference's names. The paper calls the neuron -> D matrix E "the
encoder" and the two D -> neuron matrices D_x, D_y "decoders"; the reference (and this file) calls
D -> neuron `encoder` (D_x) and `encoder_v` (D_y), and neuron -> D `decoder` (E).

Causality holds by construction: every operation but attention acts on one position, and
attention reads positions s < t only (the diagonal is excluded, so position 0 reads nothing and
its logits are a function of the first token alone). Masked scores are 0, not -inf: there is no
softmax to exclude them from.

Generation has an exact recurrent form (generate() below): per layer and head a state
S = sum_{s<t} RoPE_s(x_n,s) (outer) x_s of N x D numbers, read before it is written, so each new
token costs the same O(n*D) work and memory however long the text is, and needs no block_size crop.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 65                    # V; the reference reads raw bytes (256)
    block_size: int = 64                    # training context; the model itself has no position limit
    n_layer: int = 4                        # L: applications of the one shared layer
    n_embd: int = 128                       # D: the low-rank width of the residual stream
    n_head: int = 4                         # H: neuron groups with their own scores and RoPE
    mlp_internal_dim_multiplier: int = 16   # M: n = M*D neurons in all, N = n/H per head
    dropout: float = 0.1                    # on the gated product x_n * y_n only


PRESETS = {
    # the reference's default: 25.3M parameters, n = 32768 neurons, byte vocabulary
    "bdh-25m": dict(vocab_size=256, block_size=512, n_layer=6, n_embd=256, n_head=4,
                    mlp_internal_dim_multiplier=128, dropout=0.1),
}

ROPE_THETA = 2.0 ** 16  # the reference's RoPE base, over the neuron axis


def layer_norm(x):
    """LayerNorm over the last axis without gain or bias (the one normalisation BDH uses)."""
    return F.layer_norm(x, (x.size(-1),))


def rope_phases(positions, n_neurons):
    """e^(i t omega_k) of shape (T, N/2) for the interleaved pairs (2k, 2k+1), omega_k = theta^(-2k/N).

    The angle t * omega_k is computed as the fractional part of t * omega_k / 2pi (turns) in fp32,
    times 2pi, as the reference does: the phase stays accurate at large positions."""
    turns_per_position = ROPE_THETA ** (-torch.arange(0, n_neurons, 2, device=positions.device,
                                                      dtype=torch.float32) / n_neurons) / (2 * math.pi)
    angles = torch.frac(positions.float()[:, None] * turns_per_position) * (2 * math.pi)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x, phase):
    """Rotate each interleaved pair (u, v) of the last axis by its angle: as a complex number,
    (u + iv) * e^(i angle). At least fp32 (bf16 has no complex type; RoPE wants fp32 anyway)."""
    z = torch.view_as_complex(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * phase).flatten(-2)


class BDH(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, H, M = config.n_embd, config.n_head, config.mlp_internal_dim_multiplier
        if (M * D) % H or (M * D // H) % 2:
            raise ValueError(f"n_head ({H}) must divide the {M * D} neurons into groups of even size")
        self.config = config
        N = M * D // H
        self.embed = nn.Embedding(config.vocab_size, D)
        self.encoder = nn.Parameter(torch.empty(H, D, N))      # D_x: D -> neurons, gives x_n
        self.encoder_v = nn.Parameter(torch.empty(H, D, N))    # D_y: attention read-out -> neurons, gives y_n
        self.decoder = nn.Parameter(torch.empty(H * N, D))     # E: neurons -> D, rows head-major (h*N + i)
        self.lm_head = nn.Parameter(torch.empty(D, config.vocab_size))
        self.drop = nn.Dropout(config.dropout)
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)
        self.last = {}

    def layer(self, x, phase, mask):
        """One application of the shared layer to x (B, T, D), in the parallel (training) form.
        Neuron tensors are kept head-major, (H, B*T, N), so that every product is one batched
        matmul over heads with no transposes of the large activations."""
        B, T, D = x.shape
        H, _, N = self.encoder.shape
        x_n = F.relu(x.reshape(1, B * T, D).expand(H, -1, -1) @ self.encoder)  # (H, B*T, N) sparse firing
        q = rotate(x_n.view(H, B, T, N), phase).view(H * B, T, N)       # keys are the same tensor
        scores = (q @ q.transpose(1, 2)) * mask                         # (H*B, T, T), zero at s >= t
        a = layer_norm(scores.view(H, B, T, T) @ x)                     # (H, B, T, D): values are x itself
        y_n = F.relu(a.view(H, B * T, D) @ self.encoder_v)             # (H, B*T, N)
        g = x_n * y_n                                                   # fires only where both do ("AND")
        m = (self.drop(g) @ self.decoder.view(H, N, D)).sum(0)          # concat_heads(g) @ decoder: (B*T, D)
        return layer_norm(x + layer_norm(m.view(B, T, D))), x_n, y_n, g

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        phase = rope_phases(torch.arange(T, device=idx.device), self.encoder.size(-1))  # once for all layers
        mask = torch.ones(T, T, device=idx.device).tril(-1)             # s < t: the diagonal is excluded
        x = layer_norm(self.embed(idx))                                 # (B, T, D), shared by all heads
        density, fired = [], 0
        for _ in range(self.config.n_layer):
            x, x_n, y_n, g = self.layer(x, phase, mask)
            with torch.no_grad():  # activations are >= 0, so non-zero means firing
                density.append(torch.stack([t.sign().mean() for t in (x_n, y_n, g)]))
                fired = fired + x_n.amax(dim=1)                          # (H, N): > 0 if it fired anywhere
        self.last = {"density": torch.stack(density), "dead": (fired == 0).float().mean()}
        logits = x @ self.lm_head
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample with the exact recurrent form: per layer and head a state S (N x D), read then
        written for every token, so each token costs O(n*D) however long the text is and nothing
        is cropped. The prompt is fed through the same step."""
        B = idx.size(0)
        H, D, N = self.encoder.shape
        states = torch.zeros(self.config.n_layer, B, H, N, D, device=idx.device, dtype=self.decoder.dtype)
        for t in range(idx.size(1) - 1):  # the prompt, but for its last token, only writes the states
            self.step(idx[:, t], t, states)
        for t in range(idx.size(1) - 1, idx.size(1) - 1 + max_new_tokens):
            logits = self.step(idx[:, t], t, states) / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            idx = torch.cat((idx, torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)), dim=1)
        return idx

    def step(self, token, t, states):
        """Logits after token (B,) at absolute position t; updates states (L, B, H, N, D) in place."""
        phase = rope_phases(torch.tensor([t], device=token.device), self.encoder.size(-1))[0]
        x = layer_norm(self.embed(token))[:, None, :]                     # (B, 1, D)
        for S in states:
            x_n = F.relu(x[:, :, None, :] @ self.encoder).squeeze(2)      # (B, H, N)
            k = rotate(x_n, phase)
            a = layer_norm((k[:, :, None, :] @ S).squeeze(2))             # read: S^T k, (B, H, D)
            S += k[..., None] * x[:, :, None, :]                          # then write: k (outer) x
            y_n = F.relu(a[:, :, None, :] @ self.encoder_v).squeeze(2)    # (B, H, N)
            m = (x_n * y_n).reshape(x.size(0), 1, -1) @ self.decoder      # (B, 1, D)
            x = layer_norm(x + layer_norm(m))
        return x.squeeze(1) @ self.lm_head

    def stats(self):
        if not self.last:
            return {}
        density = self.last["density"].tolist()  # per layer: x_n, y_n, x_n * y_n
        out = {f"density_{name}": sum(d[i] for d in density) / len(density) for i, name in enumerate(("x", "y", "xy"))}
        out.update({f"density_xy_l{l}": d[2] for l, d in enumerate(density)})
        out["dead_neurons"] = self.last["dead"].item()  # never fired in x_n on the last batch, any layer
        return out

    def flops_per_token(self):
        # forward+backward = 3 x forward, 2 FLOPs per multiply-add. Per layer and token: the three
        # shared projections (3 n D), the full T x T score square the code computes (T n) and its
        # product with the values (T H D); plus the LM head. The weights are reused in every layer,
        # so this is about 4x the 6*params of a GPT with as many parameters (specs/bdh.md §7).
        c = self.config
        n, T = c.mlp_internal_dim_multiplier * c.n_embd, c.block_size
        return 6 * (c.n_layer * (3 * n * c.n_embd + T * n + T * c.n_head * c.n_embd) + c.n_embd * c.vocab_size)


Model = BDH
