"""
Doge: dynamic mask attention + cross-domain mixture of experts (SmallDoges, "Wonderful Matrices",
arXiv 2412.11834), as Hugging Face transformers' DogeForCausalLM computes it, without its leak.

Doge is a pre-norm decoder with two swaps and one twist:

    x = embedding[idx]                                    no position table: RoPE in attention
    repeat n_layer times:
        x = alpha1 * x + DMAttn(RMSNorm(x))               learnable per-channel scale of the carried stream
        x = alpha2 * x + MLP or CDMoE(RMSNorm(x))
    logits = RMSNorm(x) @ embedding^T                     tied

(a) Dynamic mask attention (sequence mixing). Causal softmax attention with QK-norm, RoPE
and grouped KV heads, plus a bias per *key*: delta_j = exp(A * softplus(dt_j)), with dt_j a
projection of key j's value vector (one per KV head, A = 0 at init so delta = 1). delta_j is added
(in linear space) to every query's score for key j, and once more than keep_window_size (kws) keys
are visible, each query keeps only the kws keys with the largest delta and masks the rest. The
authors read this as SSM-like selective forgetting without a decay.
(b) Cross-domain MoE (state mixing, is_moe=True): the dense SwiGLU MLP ("shared expert")
plus a weighted sum over k of E = K^2 single-neuron private experts, retrieved with product keys:
two sets of K half keys score the token, and the best pairs of halves name the experts, so scoring
E experts costs 2K dot products.

The deliberate fix. The reference splits the router's output (B, T, 2K) into its two
halves with a raw reshape across time and batch, so most tokens choose their experts (and weight
them) with scores computed from later tokens and from other sequences in the batch. Here each
token's 2K scores are split into its own two halves (CDMoE.route). Dynamic mask attention is causal
as the reference has it: delta_j depends only on token j, and row i ranks only keys 0..i.

Two choices of ours, both exact:
- Ties. Row i keeps the kws largest delta among keys 0..i, ties going to the more recent key. The
  reference calls topk over a (T, T) tensor, whose choice among equal delta (all of them at init,
  where A = 0) is arbitrary and device dependent; ours is then a sliding window. The kept set is
  computed by counting, for every key, the keys of each prefix that outrank it (dynamic_mask).
- The bias rides inside the attention matmul as one extra key coordinate (DMAttn.project) instead of
  a float mask, so SDPA keeps its fused kernel and no (B, H, T, T) tensor needs a gradient.

Incremental decoding (init_cache, forward_cached). Each layer keeps block_size positions of keys and
values as the attention reads them (bias channels included) and of delta; a new query rotates by its
absolute position and keeps the rows of the forward's own dynamic_mask over the cached delta, so the
kept keys and their tie-breaking are the forward's. There is no recurrent state despite the SSM
reading: the top-k only limits which cached keys a query reads. The one limit: keys whose delta tie
exactly (the same token in layer 0 once A != 0) are ranked by recency, but the last bit of a matmul
or softplus can depend on how many positions one call computes, so a cached step may order two such
keys the other way and, where they straddle the kws-th place, keep the other one. Distinct tokens
never tie, and at A = 0 every delta is exactly 1 in both.

The parts Doge shares with model_gpt.py (RMSNorm, RoPE, the SwiGLU MLP, check_heads) are copied
unchanged into the last section of this file; what differs from GPT's skeleton is marked "Adapted".

Names. The skeleton's names where Doge has GPT's parts (wte, blocks, attn_norm, mlp_norm, norm_f,
*_loss_weight); Hugging Face's names kept on purpose for what only Doge has (q_proj, k_proj, v_proj,
q_norm, k_norm, dt_proj, A, input_residual, post_attention_residual, router_gate, down_embed,
up_embed), so that HF weights load by a short name map (its input_layernorm, post_attention_layernorm,
norm are our attn_norm, mlp_norm, norm_f; model.embed_tokens is wte).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 65          # set by train.py from the dataset's tokenizer
    block_size: int = 64          # training context length
    n_layer: int = 4              # L
    n_head: int = 4               # query heads H (head size hd = n_embd / n_head)
    n_kv_head: int = 2            # key/value heads G; the dynamic mask has one delta per KV head
    n_embd: int = 128             # d
    intermediate_size: int = 256  # I, dense SwiGLU width (2d, as Doge-20M/60M)
    keep_window_size: int = 32    # kws: keys each query keeps once more are visible (< block_size here,
                                  # so the top-k actually runs; the recipes use kws = context: bias only)
    rope_theta: float = 1e4       # RoPE base
    norm_eps: float = 1e-6        # RMSNorm epsilon, also of the QK-norm
    dropout: float = 0.0          # on both residual branches (0 in every Doge config)
    init_std: float = 0.02        # N(0, init_std) for every Linear and embedding
    is_moe: bool = False          # CDMoE (dense MLP + product-key experts) instead of the dense MLP
    n_experts: int = 256          # E = K^2 private experts (a perfect square), K half keys per side
    n_experts_per_head: int = 8   # k experts per token
    balance_loss_weight: float = 0.0  # weight of the load-balance loss (off in every Doge recipe)


PRESETS = {  # the published shapes (vocab 32768 is Doge's own tokenizer; train.py sets vocab_size)
    "doge-20m": dict(block_size=2048, n_layer=8, n_head=2, n_kv_head=1, n_embd=256, intermediate_size=512,
                     keep_window_size=2048),
    "doge-60m": dict(block_size=2048, n_layer=16, n_head=4, n_kv_head=2, n_embd=512, intermediate_size=1024,
                     keep_window_size=2048),
    "doge-20m-moe": dict(block_size=2048, n_layer=8, n_head=2, n_kv_head=1, n_embd=256, intermediate_size=512,
                         keep_window_size=2048, is_moe=True, n_experts=1024, n_experts_per_head=16),
}


def dynamic_mask(delta, kws):
    """Which keys each query keeps (B, G, T, T) bool, from the per-key biases delta (B, G, T): key j
    is kept by query i when j <= i and j is among the kws largest delta of keys 0..i (ties: the later
    key ranks higher); None while T <= kws, where every row keeps all its keys (plain causal).

    Instead of the reference's top-k per row of a (T, T) tensor, rank every key within every prefix
    at once: key j survives in row i when fewer than kws keys of 0..i outrank it. "j' outranks j" is
    a (T, T) comparison and its cumulative sum down the rows counts the outranking keys of each
    prefix."""
    B, G, T = delta.shape
    if T <= kws:
        return None
    t = torch.arange(T, device=delta.device)
    d_row, d_col = delta[..., :, None], delta[..., None, :]
    outranks = (d_row > d_col) | ((d_row == d_col) & (t[:, None] > t[None, :]))  # [j', j]: j' above j
    return (t[None, :] <= t[:, None]) & (outranks.cumsum(dim=-2) < kws)           # [i, j]: < kws above j in 0..i


class DMAttn(nn.Module):
    """Dynamic mask attention: GQA softmax attention with QK-norm and RoPE, plus the
    value-derived per-key bias delta and the keep_window_size top-k over it."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = hd = config.n_embd // config.n_head
        self.kws = config.keep_window_size
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_kv_head * hd, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps)  # QK-norm: one gain over hd, shared by the heads
        self.k_norm = RMSNorm(hd, config.norm_eps)
        self.dt_proj = nn.Linear(config.n_kv_head * hd, config.n_kv_head, bias=False)  # values -> dt, per KV head
        self.A = nn.Parameter(torch.zeros(config.n_kv_head))  # 0: delta = 1, no bias at init
        self.o_proj = nn.Linear(config.n_head * hd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.last = {}  # detached tensors of the last forward, for stats()

    def project(self, x, cos, sin):
        """x (B, T, d) at the positions of cos and sin -> q (B, H, T, hd + 8), k and v (B, G, T, hd + 8)
        as SDPA reads them, and the per-key bias delta (B, G, T) in fp32."""
        B, T, _ = x.shape
        H, G, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, H, hd)).transpose(1, 2)   # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, G, hd)).transpose(1, 2)   # (B, G, T, hd)
        v = self.v_proj(x)                                                   # (B, T, G*hd), head-major
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # delta_j = exp(A * softplus(dt_j)) from key j's value alone: (B, G, T), in fp32
        delta = torch.exp(self.A.float() * F.softplus(self.dt_proj(v).float())).transpose(1, 2)
        # Adding delta_j to every score of key j is one more key channel delta_j * sqrt(hd) met by a
        # query channel 1 (SDPA scales scores by 1/sqrt(hd)): q.k/sqrt(hd) + delta_j, exactly the
        # reference's float mask, but the bias stays inside the fused attention kernel (a float mask
        # takes SDPA's slow path and materialises a (B, H, T, T) gradient). 8 channels instead of 1
        # (zeros after the first; v gets 8 zero channels too) keep q, k, v the same head size, a
        # multiple of 8, as the fused CPU and GPU kernels require.
        q = torch.cat([q, torch.ones_like(q[..., :1]), q.new_zeros(B, H, T, 7)], dim=-1)
        k = torch.cat([k, (delta * math.sqrt(hd)).unsqueeze(-1).to(k.dtype), k.new_zeros(B, G, T, 7)], dim=-1)
        v = F.pad(v.view(B, T, G, hd).transpose(1, 2), (0, 8))
        return q, k, v, delta

    def attend(self, q, k, v, keep):
        """Attention of q (B, H, T, hd + 8) over k, v (B, G, S, hd + 8) where keep (B, G, T, S) allows,
        causal when keep is None (a single query: every key), then the output projection: (B, T, d)."""
        B, H, T, _ = q.shape
        G, hd = self.n_kv_head, self.head_dim
        if keep is not None:
            keep = keep.repeat_interleave(H // G, dim=1)                   # kv group g serves its H/G query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=keep is None and T > 1,
                                           scale=hd ** -0.5, enable_gqa=G != H)
        return self.resid_dropout(self.o_proj(y[..., :hd].transpose(1, 2).reshape(B, T, H * hd)))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v, delta = self.project(x, cos, sin)
        keep = dynamic_mask(delta.detach(), self.kws)                       # (B, G, T, T) bool, or None
        self.last = {"delta": delta.detach(), "keep": keep}
        return self.attend(q, k, v, keep)

    def forward_cached(self, x, cos, sin, cache, t0):
        """Incremental decoding: x (B, T, d) holds positions t0..t0+T-1, cache this layer's buffers
        (Doge.init_cache) with t0 positions filled. Writes the T new keys, values and delta, then
        attends over all t0 + T."""
        B, T, _ = x.shape
        t1 = t0 + T
        q, k, v, delta = self.project(x, cos, sin)
        cache["k"][:, :, t0:t1], cache["v"][:, :, t0:t1], cache["delta"][:, :, t0:t1] = k, v, delta
        k, v, delta = cache["k"][:, :, :t1], cache["v"][:, :, :t1], cache["delta"][:, :, :t1]
        # Until more than kws keys are visible every row keeps all of them (dynamic_mask's None), so a
        # single new token attends to the whole cache unranked (a tenth of a step at Doge-20M, whose
        # kws is its whole context). Past kws, the forward's dynamic_mask rule for the new rows without
        # ranking the (t1, t1) mask again: the cache counts, for every key j, how many earlier keys
        # outrank it ("above"), so a new row compares the T new keys with all t1 keys, O(T t1) a step.
        # Key i outranks j when delta_i > delta_j, or when they tie and i is later, as in dynamic_mask.
        # The unranked steps leave "above" behind, so while t0 <= kws the rows are counted from key
        # r0 = 0 (a prompt or chunk, or the first step past kws), after that from r0 = t0.
        if T == 1 and t1 <= self.kws:
            return self.attend(q, k, v, None)
        r0 = t0 if t0 > self.kws else 0
        above, i, j = cache["above"], torch.arange(r0, t1, device=x.device), torch.arange(t1, device=x.device)
        d_new, d_all = delta[..., r0:, None], delta[..., None, :]                  # (B, G, t1-r0, 1), (B, G, 1, t1)
        outranks = (d_new > d_all) | ((d_new == d_all) & (i[:, None] > j[None, :]))  # new key i over key j
        above[..., r0:t1] = (delta[..., None, :r0] > d_new).sum(-1)               # earlier keys win ties never
        counts = above[..., None, :t1] + outranks.cumsum(dim=-2)                   # outranking keys in 0..i
        keep = (j[None, :] <= i[:, None]) & (counts < self.kws)                   # (B, G, t1-r0, t1)
        above[..., :t1] += outranks.sum(dim=-2)
        return self.attend(q, k, v, keep[..., t0 - r0:, :])


class CDMoE(nn.Module):
    """Cross-domain MoE: the dense SwiGLU MLP (the shared expert) plus k of E = K^2 private experts,
    each a single SiLU neuron (down vector D_e, up vector U_e), retrieved with product keys."""

    def __init__(self, config):
        super().__init__()
        # the shared expert: MLP's three projections under MLP's names, so that a dense Doge's MLP
        # weights load into it as they are
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.K = math.isqrt(config.n_experts)
        self.k = config.n_experts_per_head
        self.balance_loss_weight = config.balance_loss_weight
        self.router_gate = nn.Linear(config.n_embd, 2 * self.K, bias=False)  # rows: K x-half keys, K y-half keys
        self.down_embed = nn.Embedding(config.n_experts, config.n_embd)      # D
        self.up_embed = nn.Embedding(config.n_experts, config.n_embd)        # U
        self.last = {}  # the last forward's router logits (detached) and experts, for stats()

    def route(self, u):
        """Each token's k experts (ids in [0, K^2)), their weights g (softmax over the k) and the
        router logits (B, T, 2, K)."""
        K, k = self.K, self.k
        # THE FIX: each token's own 2K scores are split into its two halves, z.view(N, 2, K):
        # row r < K of router_gate is x-key r, row K + r is y-key r. The reference reshapes the whole
        # (B, T, 2K) output as (2, B*T, K), so a token's x and y halves come from other tokens, later
        # ones and other sequences in the batch: its experts would depend on the future and the batch.
        z = self.router_gate(u).float().unflatten(-1, (2, K))                 # (B, T, 2, K)
        top = z.topk(k, dim=-1)                                               # each half's best k keys
        (sx, sy), (ix, iy) = top.values.unbind(-2), top.indices.unbind(-2)
        # product keys: expert e = a*K + b scores zx_a + zy_b; the best k of all K^2 pairs lie among the
        # k*k pairs of the halves' own top k (a pair outside them is beaten by k pairs inside)
        pair_score = (sx[..., :, None] + sy[..., None, :]).flatten(-2)        # (B, T, k*k)
        pair_id = (ix[..., :, None] * K + iy[..., None, :]).flatten(-2)
        score, best = pair_score.topk(k, dim=-1)
        return pair_id.gather(-1, best), torch.softmax(score, dim=-1), z

    def forward(self, u):
        """(output, aux): aux is the balance loss in training when it is weighted, else 0."""
        experts, g, z = self.route(u)                                         # (B, T, k) each
        self.last = {"router_logits": z.detach(), "experts": experts}
        aux = self.balance_loss(z, experts) if self.training and self.balance_loss_weight > 0 else 0
        # a_m = silu(<D_e, u>) * g_m;  y = sum_m a_m U_e  (elementwise: k rows per token, no matmul)
        a = F.silu((self.down_embed(experts) * u[..., None, :]).sum(-1)) * g.to(u.dtype)
        sparse = (a[..., None] * self.up_embed(experts)).sum(-2)
        return self.dropout(self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u)) + sparse), aux

    def expert_load(self, experts):
        """How many of the N*k selections in experts (B, T, k) picked each expert: (E,)."""
        e = experts.flatten()
        return torch.zeros(self.K ** 2, device=e.device).index_add_(0, e, torch.ones(e.shape, device=e.device))

    def balance_loss(self, z, experts):
        """Switch-style load balance (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e, 1 when uniform.
        f_e: share of the N*k selections that picked e; P_e: mean over tokens of the router's
        probability of e = a*K + b over all K^2 pairs, softmax(zx)_a * softmax(zy)_b. Per layer (HF
        pools all layers' selections into one count, though their experts are unrelated); gradients
        reach the router through P."""
        px, py = z.softmax(dim=-1).flatten(0, -3).unbind(-2)                  # (N, K) each
        P = (px.T @ py).flatten() / px.shape[0]                               # (E,), index a*K + b
        f = self.expert_load(experts) / experts.numel()
        return self.K ** 2 * (f * P).sum()


# Adapted from model_gpt.Block: DMAttn, MLP or CDMoE, scales alpha on the carried stream, returns (x, aux)
class DogeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = DMAttn(config)
        self.input_residual = nn.Parameter(torch.ones(config.n_embd))            # alpha1
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = CDMoE(config) if config.is_moe else MLP(config)
        self.post_attention_residual = nn.Parameter(torch.ones(config.n_embd))   # alpha2

    def forward(self, x, cos, sin, cache=None, t0=0):
        """(x, aux): aux is the CDMoE's balance loss, or 0. The scale multiplies the carried stream,
        not the branch (as HF's DogeDecoderLayer). With a cache (decoding) x holds positions t0..
        and the attention also reads the cached keys."""
        u = self.attn_norm(x)
        a = self.attn(u, cos, sin) if cache is None else self.attn.forward_cached(u, cos, sin, cache, t0)
        x = self.input_residual * x + a
        carried = self.post_attention_residual * x  # first: fixes the order backward sums x's gradients in
        u = self.mlp_norm(x)
        y, aux = self.mlp(u) if isinstance(self.mlp, CDMoE) else (self.mlp(u), 0)
        return carried + y, aux


class Doge(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_heads(config)
        if config.is_moe and math.isqrt(config.n_experts) ** 2 != config.n_experts:
            raise ValueError(f"n_experts={config.n_experts} must be a perfect square (E = K^2 product keys), "
                             f"e.g. {math.isqrt(config.n_experts) ** 2} or {(math.isqrt(config.n_experts) + 1) ** 2}")
        if config.is_moe and not 0 < config.n_experts_per_head <= math.isqrt(config.n_experts):
            raise ValueError("n_experts_per_head must be between 1 and sqrt(n_experts)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rope = RotaryEmbedding(config.n_embd // config.n_head, config.rope_theta)
        self.blocks = nn.ModuleList(DogeBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)

    # Adapted from model_gpt.GPT._init_weights: no biases to zero (Doge has none)
    def _init_weights(self, module):
        # HF's init (DogePreTrainedModel._init_weights): Linear weights and all embeddings (tokens,
        # expert tables) ~ N(0, 0.02); norms and residual scales 1, A 0 (set where they are created)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # Adapted from model_gpt.GPT.forward: no embedding dropout; blocks return (x, aux), the CDMoE's
    # balance loss, which training adds
    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope(torch.arange(T, device=idx.device))
        x = self.wte(idx)
        aux_losses = []
        for block in self.blocks:
            x, aux = block(x, cos, sin)
            aux_losses.append(aux)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if self.training and self.config.is_moe and self.config.balance_loss_weight > 0:
                loss = loss + self.config.balance_loss_weight * (sum(aux_losses) / len(self.blocks))
        return logits, loss

    def init_cache(self, batch_size):
        """An empty cache for incremental decoding of batch_size rows: per layer, block_size positions of
        keys and values as SDPA reads them (the bias channels included), of delta in fp32, which the
        dynamic mask ranks, and of "above", how many earlier keys outrank each key; t counts the
        positions filled."""
        c, w = self.config, self.wte.weight
        shape = (batch_size, c.n_kv_head, c.block_size)
        hd = c.n_embd // c.n_head + 8
        # empty, not zeros: forward_cached writes every position before it reads it, and zeroing would
        # write all of it up front (Doge-20M, batch 8: 140 MB for every generate call)
        return {"t": 0, "layers": [{"k": w.new_empty(*shape, hd), "v": w.new_empty(*shape, hd),
                                    "delta": w.new_empty(shape, dtype=torch.float32),
                                    "above": torch.zeros(shape, dtype=torch.long, device=w.device)}
                                   for _ in self.blocks]}

    # Adapted from model_gpt.GPT.forward_cached: the cache is init_cache's dict, blocks return (x, aux)
    @torch.inference_mode()
    def forward_cached(self, idx, cache):
        """Logits (B, T, V) of the next T tokens idx (B, T) after the cache's t, equal to the eval
        forward's at those positions; writes their keys into the cache. Always the eval computation
        (no dropout, no aux loss), whatever self.training says."""
        t0, T = cache["t"], idx.size(1)
        if t0 + T > self.config.block_size:
            raise ValueError(f"the cache holds {t0} tokens; {T} more would exceed block_size "
                             f"{self.config.block_size}")
        was_training = self.training
        if was_training:
            self.eval()  # dropout off (only when on: eval() walks every module, a cost per token)
        try:
            cos, sin = self.rope(torch.arange(t0, t0 + T, device=idx.device))
            x = self.wte(idx)
            for block, layer_cache in zip(self.blocks, cache["layers"]):
                x, _ = block(x, cos, sin, layer_cache, t0)
            logits = self.lm_head(self.norm_f(x))
        finally:
            if was_training:
                self.train()
        cache["t"] = t0 + T
        return logits

    def stats(self):
        if not self.blocks[0].attn.last:
            return {}
        lasts = [block.attn.last for block in self.blocks]
        out = {f"delta_mean_l{l}": float(last["delta"].mean()) for l, last in enumerate(lasts)}

        def masked_frac(keep):  # of the visible keys, T (T + 1) / 2 per row and KV head
            B, G, T, _ = keep.shape
            return 1 - keep.sum() / (B * G * T * (T + 1) / 2)

        out["masked_frac"] = sum(0.0 if last["keep"] is None else float(masked_frac(last["keep"]))
                                 for last in lasts) / len(lasts)
        if self.config.is_moe:  # expert usage in the last batch, averaged over layers
            with torch.no_grad():
                moes = [block.mlp for block in self.blocks]
                loads = [moe.expert_load(moe.last["experts"]) for moe in moes]
                out["experts_used"] = sum(float((load > 0).float().mean()) for load in loads) / len(loads)
                out["max_load"] = sum(float(load.max() / load.mean()) for load in loads) / len(loads)
                out["balance_loss"] = sum(float(moe.balance_loss(moe.last["router_logits"], moe.last["experts"]))
                                          for moe in moes) / len(moes)
        return out

    # Adapted from model_gpt.GPT.flops_per_token: unread expert rows and the bias channels
    def flops_per_token(self):
        # nanoGPT's accounting, 6 per parameter a token uses (all but the expert tables, of which it
        # reads k rows of D and U per layer), plus attention's 2 * 2 * T * (head channels) per layer
        # forward, times 3 for the backward; the head channels include the 8 of the bias (DMAttn)
        c = self.config
        n_params = sum(p.numel() for p in self.parameters())
        if c.is_moe:
            n_params -= c.n_layer * 2 * (c.n_experts - c.n_experts_per_head) * c.n_embd
        return 6 * n_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head + 8) * c.block_size


Model = Doge


# ---- Copied from model_gpt: the pieces Doge shares with the baseline, unchanged ----------------
# (each marked and checked by tests/test_models.py; read model_gpt.py for them)

# Copied from model_gpt.RMSNorm
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the gain."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


# Copied from model_gpt.RotaryEmbedding
class RotaryEmbedding(nn.Module):
    """RoPE tables, rotate-half layout: channel i and i + hd/2 form a pair turning at theta^(-2i/hd).

    Called once per forward with the token positions pos (T,), or any shape of positions; returns
    cos and sin of shape (*pos.shape, hd) in fp32 for apply_rope."""

    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, pos):
        # the frequencies are recomputed here rather than kept in a buffer, so that .half() or
        # .to(dtype) on the model can never round them
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, device=pos.device,
                                                dtype=torch.float32) / self.head_dim)
        angles = pos.float()[..., None] * inv_freq           # (..., hd/2)
        angles = torch.cat([angles, angles], dim=-1)           # (..., hd): both halves of a pair
        return angles.cos(), angles.sin()


# Copied from model_gpt.apply_rope
def apply_rope(x, cos, sin):
    """Rotate x (..., hd) by position: x*cos + rotate_half(x)*sin, rotate_half([a,b]) = [-b,a], with
    cos and sin shaped to broadcast over x's head axis (x (B, T, heads, hd): cos (T, 1, hd))."""
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-b, a], dim=-1) * sin.to(x.dtype)


# Copied from model_gpt.MLP
class MLP(nn.Module):
    """SwiGLU: W_down(silu(W_gate u) * W_up u), no biases."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, u):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u)))


# Copied from model_gpt.check_heads
def check_heads(config):
    """The attention shapes RoPE and grouped KV heads need, checked before any weight is made."""
    if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}) "
                         f"and n_head by n_kv_head ({config.n_kv_head})")
    if (config.n_embd // config.n_head) % 2:
        raise ValueError("the head size n_embd/n_head must be even for RoPE")

