"""
DAWN: Dynamic Subspace Composition over shared neuron pools (Seungho Choi, "DAWN: Dynamic Subspace
Composition for Structural Interpretability", Zenodo 10.5281/zenodo.18060421), the 39M-paper model
with per-token routing, as the reference (madst0614/DAWN, models/model_v17_1.py) computes it.

The idea. A transformer block has fixed matrices W_Q, W_K, W_V and a fixed FFN. DAWN keeps six
pools of small matrices ("neurons") shared by every layer instead, and builds each token's
projections on the fly: a router scores every neuron of a pool, keeps the top k, and the token's
matrix is the weighted sum of the k chosen neurons. Every projection is a *feature* step (d -> r,
into a rank-r subspace) followed by a *restore* step (r -> d), each composed from its own pool:

    q_t = u_t (sum_n w^fQ_tn F_qk[n]) (sum_n w^rQ_tn R_qk[n])      Q and K: the same pools, own routing
    k_t = u_t (sum_n w^fK_tn F_qk[n]) (sum_n w^rK_tn R_qk[n])
    v_t = u_t (sum_n w^fV_tn F_v[n])  (sum_n w^rV_tn R_v[n])
    FFN -> "knowledge": y_t = u'_t (sum_n w^fKn_tn F_kn[n]) (sum_n w^rKn_tn R_kn[n])   (no activation)

Attention itself (causal softmax, heads, output projection W_O) is standard, positions are a
learned table, and the head is tied. So every token travels a traceable path of named neurons
(which neurons built its Q, K, V and knowledge in each layer): routing_path() returns it.

    x = wte[idx] + wpe[t]
    per layer:  u = LN1(x);  route 6 queries of u;  q, k, v as above;  x += W_O attention(q, k, v)
                u' = LN2(x); route 2 queries of u';  x += knowledge(u')
    logits = LN_f(x) @ wte^T

Computed without ever forming a token's d x r matrix (everything is linear in the weights w):
feature  h = sum_n w_n (u F_n):  u @ [F_1 .. F_N] once per pool and layer (Q and K share it), then
a weighted sum over n; restore  sum_n w_n (h R_n) = [w_1 h, .., w_N h] @ [R_1; ..; R_N], one matmul.
This is dense over the N neurons of a pool (unselected ones multiply by zero): top-k buys
interpretability here, not FLOPs.

Incremental decoding (init_cache, forward_cached). Routing is per token, from the token's own state,
so a new token routes exactly as in the full forward and only attention looks back: the cache holds
each layer's keys and values for block_size positions, nothing for the router. The learned position
table has block_size rows, so a cache can never hold more tokens than that.

Causality. The earlier DAWN-24M result (perplexity 8.4) came from *sequence-level* routing: one
neuron mixture per sequence, chosen from importance scores over all positions (computed from the
last position's state), so every position used information from the whole window, future included;
trained that way, the model reads the future through its routing weights.
This file routes each token from that token's own normalised state only: no pooling over positions,
no batch statistics, no state; top-k runs over neurons, never over time.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 65         # set by train.py from the dataset's tokenizer
    block_size: int = 64         # rows of the learned position table
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128            # d
    dropout: float = 0.0         # embedding, attention probabilities, after W_O, after knowledge
    rank: int = 32               # r: the Q/K/V subspace (feature d -> r, restore r -> d)
    knowledge_rank: int = 32     # r_k: the knowledge subspace
    d_space: int = 64            # s: router space; one embedding of size s per neuron
    n_qk: int = 16               # neurons in each of the Q/K feature and restore pools
    n_v: int = 40                # ... V pools
    n_know: int = 24             # ... knowledge pools
    top_k_qk: int = 4            # neurons each token composes, per routing
    top_k_v: int = 4
    top_k_know: int = 4
    router_dropout: float = 0.0  # on the routing queries
    orth_loss_weight: float = 0.01  # training loss weights of the auxiliary terms (reference values)
    div_loss_weight: float = 0.1
    lb_loss_weight: float = 2e-5


PRESETS = {  # the paper's 39M model (BERT-uncased vocabulary; 38,730,240 parameters without its unused SSM)
    "dawn-39m": dict(vocab_size=30522, block_size=512, n_layer=12, n_head=6, n_embd=384, rank=64,
                     knowledge_rank=64, d_space=256, n_qk=64, n_v=264, n_know=160, top_k_qk=12,
                     top_k_v=12, top_k_know=12, dropout=0.1, router_dropout=0.1),
}

# The eight routing queries of a layer, grouped by the pool they compose from: the first six read
# LN1(x) (attention), the last two LN2(x) (knowledge). Q and K share their pools, with own queries.
ROUTINGS = {"F_qk": ("fQ", "fK"), "F_v": ("fV",), "R_qk": ("rQ", "rK"), "R_v": ("rV",),
            "F_kn": ("fKn",), "R_kn": ("rKn",)}
POOLS = list(ROUTINGS)


def route(z, keys, k):
    """Routing weights (..., N) with exactly k non-zeros summing to 1, the soft probabilities p and
    the k selected neurons.

    z (..., s): routing queries; keys (N, s): the pool's unit-length neuron embeddings (only their
    direction counts). p = softmax over the pool of z . e_n; keep the top k and renormalise over
    them (equal to a softmax over the k selected logits). fp32: bf16 would turn near-ties into
    ties and flip selections."""
    p = torch.softmax(z.float() @ keys.T, dim=-1)
    top = p.topk(k, dim=-1)
    w = torch.zeros_like(p).scatter(-1, top.indices, top.values / (top.values.sum(-1, keepdim=True) + 1e-8))
    return w, p, top.indices


def compose_feature(u, F_pool, w):
    """h = sum_n w_n (u F_n) for m routings at once: u (B, T, d), F_pool (N, d, r), w (B, T, m, N)
    -> (B, T, m, r). u @ [F_1 .. F_N] is computed once and shared by the m routings (Q and K)."""
    projected = (u @ F_pool.transpose(0, 1).flatten(1)).unflatten(-1, F_pool.shape[::2])  # (B, T, N, r)
    return w.to(projected.dtype) @ projected


def compose_restore(h, w, R_pool):
    """sum_n w_n (h R_n) as one matmul: [w_1 h, .., w_N h] (B, T, m, N*r) @ R (N*r, d) -> (B, T, m, d)."""
    return (w.unsqueeze(-1).to(h.dtype) * h.unsqueeze(-2)).flatten(-2) @ R_pool.flatten(0, 1)


class DAWNBlock(nn.Module):
    """The per-layer parts: two LayerNorms and the attention output projection. The pools and the
    router belong to the model and are passed in: every layer composes from the same neurons.
    The knowledge step stands where GPT's MLP is, so its LayerNorm keeps GPT's name, mlp_norm."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.attn_norm = nn.LayerNorm(config.n_embd)
        self.W_O = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.mlp_norm = nn.LayerNorm(config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, dawn, keys, cache=None, t0=0):
        """x (B, T, d) -> (x, routings). With a cache (incremental decoding: this layer's buffers of
        DAWN.init_cache, t0 positions filled) x holds positions t0..t0+T-1 and attends over the cached
        keys and values too."""
        c = self.config
        B, T, d = x.shape
        # attention: six routings of u = LN1(x); Q/K/V composed from the pools; causal softmax attention
        u = self.attn_norm(x)
        z = dawn.router_queries(u, 0, 6)                                   # fQ fK fV rQ rK rV
        routings = {"F_qk": route(z[..., 0:2, :], keys["F_qk"], c.top_k_qk),
                    "F_v": route(z[..., 2:3, :], keys["F_v"], c.top_k_v),
                    "R_qk": route(z[..., 3:5, :], keys["R_qk"], c.top_k_qk),
                    "R_v": route(z[..., 5:6, :], keys["R_v"], c.top_k_v)}
        q, k = compose_restore(compose_feature(u, dawn.F_qk, routings["F_qk"][0]),
                               routings["R_qk"][0], dawn.R_qk).unbind(-2)  # Q and K side by side
        v = compose_restore(compose_feature(u, dawn.F_v, routings["F_v"][0]), routings["R_v"][0], dawn.R_v)
        heads = lambda t: t.reshape(B, T, c.n_head, d // c.n_head).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=c.dropout if self.training else 0.0)
        else:  # decoding: the new keys and values join the cached ones, and query t0 + i sees keys
            # 0..t0 + i (an explicit mask: SDPA's is_causal would align the first new query with key 0)
            t1 = t0 + T
            cache["k"][:, :, t0:t1], cache["v"][:, :, t0:t1] = k, v
            pos = torch.arange(t1, device=x.device)
            a = F.scaled_dot_product_attention(q, cache["k"][:, :, :t1], cache["v"][:, :, :t1],
                                               attn_mask=pos[None, :] <= pos[t0:, None])
        x = x + self.drop(self.W_O(a.transpose(1, 2).reshape(B, T, d)))
        # knowledge: two routings of u' = LN2(x), feature d -> r_k, restore r_k -> d, no activation
        u = self.mlp_norm(x)
        z = dawn.router_queries(u, 6, 8)                                   # fKn rKn
        routings["F_kn"] = route(z[..., 0:1, :], keys["F_kn"], c.top_k_know)
        routings["R_kn"] = route(z[..., 1:2, :], keys["R_kn"], c.top_k_know)
        y = compose_restore(compose_feature(u, dawn.F_kn, routings["F_kn"][0]), routings["R_kn"][0], dawn.R_kn)
        return x + self.drop(y.squeeze(-2)), routings


class DAWN(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        if config.top_k_qk > config.n_qk or config.top_k_v > config.n_v or config.top_k_know > config.n_know:
            raise ValueError("each top_k must be at most its pool size (n_qk, n_v, n_know)")
        self.config = config
        d, r, rk, s = config.n_embd, config.rank, config.knowledge_rank, config.d_space
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.drop = nn.Dropout(config.dropout)
        # the six neuron pools, shared by every layer
        self.F_qk = nn.Parameter(torch.empty(config.n_qk, d, r))        # feature neurons d -> r
        self.F_v = nn.Parameter(torch.empty(config.n_v, d, r))
        self.R_qk = nn.Parameter(torch.empty(config.n_qk, r, d))        # restore neurons r -> d
        self.R_v = nn.Parameter(torch.empty(config.n_v, r, d))
        self.F_kn = nn.Parameter(torch.empty(config.n_know, d, rk))
        self.R_kn = nn.Parameter(torch.empty(config.n_know, rk, d))
        # the router: eight routing queries per token, and one embedding per neuron of every pool
        self.router = nn.Linear(d, 8 * s)
        self.router_drop = nn.Dropout(config.router_dropout)
        self.pool_sizes = {name: getattr(self, name).shape[0] for name in POOLS}
        self.neuron_emb = nn.Parameter(torch.empty(sum(self.pool_sizes.values()), s))
        self.blocks = nn.ModuleList(DAWNBlock(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self._init_weights()
        self.last = {}

    def _init_weights(self):
        for p in (self.wte.weight, self.wpe.weight, self.router.weight, self.neuron_emb):
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.router.bias)
        for block in self.blocks:
            nn.init.normal_(block.W_O.weight, std=0.02)
        for name in POOLS:  # each neuron orthogonal on its own: F_n^T F_n = I, R_n R_n^T = I
            for neuron in getattr(self, name).data:
                nn.init.orthogonal_(neuron)

    def keys(self):
        """Each pool's neuron embeddings at unit length, in fp32 (rows of neuron_emb in POOLS order)."""
        unit = F.normalize(self.neuron_emb.float(), dim=-1)
        return dict(zip(POOLS, unit.split([self.pool_sizes[pool] for pool in POOLS])))

    def router_queries(self, u, first, last):
        """Routing queries first..last-1 of u: (B, T, last - first, s)."""
        s = self.config.d_space
        z = F.linear(u, self.router.weight[first * s:last * s], self.router.bias[first * s:last * s])
        return self.router_drop(z).unflatten(-1, (last - first, s))

    # Adapted from model_gpt.GPT.forward: learned positions wpe; blocks return (x, routings), which the
    # auxiliary losses (training) and stats() read
    def forward(self, idx, targets=None):
        c = self.config
        B, T = idx.shape
        if T > c.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {c.block_size} (DAWN has learned positions)")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        keys = self.keys()
        all_routings = []
        for block in self.blocks:
            x, routings = block(x, self, keys)
            all_routings.append(routings)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        aux = None
        if self.training:
            aux = {"lb": self.load_balance_loss(all_routings), "orth": self.orthogonality_loss(),
                   "div": self.diversity_loss()}
            if loss is not None:  # evaluation reports pure cross-entropy
                loss = (loss + c.lb_loss_weight * aux["lb"] + c.orth_loss_weight * aux["orth"]
                        + c.div_loss_weight * aux["div"])
        self.remember(all_routings, aux)
        return logits, loss

    # --- incremental decoding -------------------------------------------------------------------

    def init_cache(self, batch_size):
        """An empty cache for batch_size rows: per layer, keys and values (B, n_head, block_size, head
        size) and t, the positions filled. Routing needs nothing: each token routes from its own state."""
        c = self.config
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        w = self.wte.weight
        return {"t": 0, "layers": [{"k": w.new_zeros(shape), "v": w.new_zeros(shape)} for _ in self.blocks]}

    # Adapted from model_gpt.GPT.forward_cached: learned positions; the cache is init_cache's dict
    @torch.inference_mode()
    def forward_cached(self, idx, cache):
        """Logits (B, T, V) of the next T tokens idx (B, T) after the cache's t, equal to the eval
        forward's at those positions; writes their keys and values into the cache. Always the eval
        computation (no dropout), whatever self.training says; stats() keeps the last forward's."""
        t0, T = cache["t"], idx.size(1)
        if t0 + T > self.config.block_size:  # the position table ends there
            raise ValueError(f"the cache holds {t0} tokens; {T} more would exceed block_size "
                             f"{self.config.block_size} (DAWN has learned positions)")
        was_training = self.training
        if was_training:
            self.eval()  # dropout off (only when on: eval() walks every module, a cost per token)
        try:
            x = self.wte(idx) + self.wpe(torch.arange(t0, t0 + T, device=idx.device))
            keys = self.keys()
            for block, layer_cache in zip(self.blocks, cache["layers"]):
                x, _ = block(x, self, keys, layer_cache, t0)
            logits = self.lm_head(self.norm_f(x))
        finally:
            if was_training:
                self.train()
        cache["t"] = t0 + T
        return logits

    # --- auxiliary losses (training mode, reference weights) ---------------------------------

    def load_balance_loss(self, all_routings):
        """Sum over layers and the six attention routings of N * sum_n (mean soft p_n - 1/N)^2
        (the knowledge routings are not balanced, as in the reference)."""
        total = 0.0
        for routings in all_routings:
            for pool in ("F_qk", "F_v", "R_qk", "R_v"):
                p = routings[pool][1]                                       # (B, T, m, N)
                N = p.size(-1)
                total = total + N * (p.mean(dim=(0, 1)) - 1.0 / N).pow(2).sum()
        return total

    def orthogonality_loss(self):
        """Mean over the six pools of mean (F_n^T F_n - I)^2 (R_n R_n^T for restore pools)."""
        terms = []
        for name in POOLS:
            W = getattr(self, name)
            gram = W.transpose(1, 2) @ W if name.startswith("F") else W @ W.transpose(1, 2)
            terms.append((gram - torch.eye(gram.size(-1), device=W.device)).pow(2).mean())
        return torch.stack(terms).mean()

    def diversity_loss(self):
        """Half the sum over the two knowledge pools of the mean |cosine| between distinct neurons."""
        terms = []
        for W in (self.F_kn, self.R_kn):
            flat = F.normalize(W.flatten(1), dim=-1)
            cos = flat @ flat.T
            n = cos.size(0)
            terms.append((cos.abs().sum() - cos.diagonal().abs().sum()) / (n * (n - 1)))
        return 0.5 * (terms[0] + terms[1])

    # --- diagnostics ----------------------------------------------------------------------------

    def remember(self, all_routings, aux):
        """What stats() and routing_path() need of the last forward, detached: per layer and pool the
        selected neurons and the soft probabilities p (stats() reduces them only when asked), and
        the auxiliary losses."""
        self.last = {"selected": [{pool: r[2] for pool, r in routings.items()} for routings in all_routings],
                     "p": [{pool: r[1].detach() for pool, r in routings.items()} for routings in all_routings]}
        if aux is not None:
            self.last["aux"] = {key: value.detach() for key, value in aux.items()}

    def stats(self):
        if not self.last:
            return {}
        out = {}
        for pool in POOLS:  # a neuron is dead when under 1% of the routings select it (uniform: k/N)
            selected = torch.cat([layer[pool].flatten() for layer in self.last["selected"]])
            routings_made = selected.numel() / self.last["selected"][0][pool].size(-1)  # k picks per routing
            usage = torch.bincount(selected, minlength=self.pool_sizes[pool]) / routings_made
            out[f"dead_{pool}"] = (usage < 0.01).float().mean().item()
        # routing entropy of the soft p, as a fraction of log N, averaged over layers and routings
        out["route_entropy"] = torch.stack([(-(p * p.clamp_min(1e-12).log()).sum(-1)).mean() / math.log(p.size(-1))
                                            for layer in self.last["p"] for p in layer.values()]).mean().item()
        overlap = [(layer[pool][..., 0, :, None] == layer[pool][..., 1, None, :]).sum((-1, -2)).float().mean()
                   / self.config.top_k_qk for layer in self.last["selected"] for pool in ("F_qk", "R_qk")]
        out["qk_overlap"] = (sum(overlap) / len(overlap)).item()  # share of a token's Q neurons also in its K
        for key, value in self.last.get("aux", {}).items():
            out[f"{key}_loss"] = value.item()
        return out

    @torch.no_grad()
    def routing_path(self, idx):
        """For one prompt idx (T,) or (1, T): per layer {routing name: (T, k) neuron indices in its
        pool}, routing names as in ROUTINGS (fQ, fK, fV, rQ, rK, rV, fKn, rKn)."""
        was_training = self.training
        self.eval()
        self(idx.view(1, -1))
        self.train(was_training)
        return [{name: layer[pool][0, :, i] for pool, names in ROUTINGS.items() for i, name in enumerate(names)}
                for layer in self.last["selected"]]

    def flops_per_token(self):
        # what the code multiplies (dense over every neuron of a pool), forward+backward = 6 per MAC
        c = self.config
        d, r, rk, s = c.n_embd, c.rank, c.knowledge_rank, c.d_space
        n_total = 2 * (c.n_qk + c.n_v + c.n_know)
        per_layer = (8 * d * s + n_total * s + (c.n_qk + c.n_v) * d * r + (2 * c.n_qk + c.n_v) * r * d
                     + 2 * c.n_know * d * rk + d * d
                     + 2 * c.n_qk * s                            # K's routing logits over Q's two pools
                     + 2 * c.n_qk * r + c.n_v * r + c.n_know * rk)  # mixtures w @ (u F_n), one per routing
        return 6 * (c.n_layer * per_layer + d * c.vocab_size) + 12 * c.n_layer * d * c.block_size


Model = DAWN
