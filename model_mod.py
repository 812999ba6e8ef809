"""
MoD: Mixture-of-Depths (Raposo et al., 2024, arXiv 2404.02258), causal in training and evaluation.

The idea. A transformer spends the same compute on every token. A MoD block has a budget instead:
only about C*T tokens of a sequence (capacity C = 12.5%) go through its attention and MLP; the rest
skip it along the residual stream. A linear router gives every token a scalar score r, and a
routed token adds the block's update multiplied by sigma(r), so the language-model loss itself
teaches the router which tokens deserve the compute. Every other block is routed, as in the paper.

    x = embedding[idx]
    for l in 0..n_layer-1:  x = Block(x) if l is even else MoDBlock(x)     (Block: model_gpt's)
    logits = RMSNorm(x) @ embedding^T

    MoDBlock(x):  r_t = <x_t, w_r>                  one score per token (fp32)
                  routed_t = r_t >= tau             tau: set before the forward from earlier batches
                            and fewer than K earlier tokens of the row are routed (hard cap)
                  routed tokens, gathered in position order, attend only to earlier routed tokens
                  of their own row; x_t += sigma(r_t) * (Block(x)_t - x_t) for routed t only

Why not the paper's top-k. The paper routes the k tokens of a sequence with the largest r. Whether
token t is among them depends on the scores of the tokens after t, so in training the model sees
the future, and a sampler (which does not have those tokens) cannot reproduce the computation. Here
one per-token rule serves training and evaluation: compare r_t with a threshold tau that tracks
where the top-k cut lies ("expert threshold" routing, arXiv 2603.11535). tau is running state like
BatchNorm's running mean: buffers updated only by training forwards. The top-k is still computed in
training, but only as a target: for the auxiliary loss (a BCE teaching r to predict top-k
membership, as in the paper) and for the tau update. mod_routing="topk" restores the paper's
training rule for comparison (not causal in training; evaluation still uses the threshold).

How tau is set (update_threshold). Training forward n routes with tau_n, fixed before it; then

    c_n       = mean over the batch's rows of the row's k-th largest r      this batch's top-k cut-off
    f_n       = fraction of the batch's tokens routed with tau_n             (target C)
    s_n       = max(std of the batch's r, |c_n - tau_n|)
    b_{n+1}   = b_n + kappa * s_n * (f_n - C) / C                          b_0 = 0 (buffer tau_bias)
    tau_{n+1} = c_n + b_{n+1}                                              tau_0 = +inf: route nothing

c_n follows the scores one step behind. b integrates what still keeps the realised fraction off C
(the scores' drift over that step, the per-row cap, a mean of row cut-offs not being a batch
quantile) and rests only where f averages C: the load feedback of DeepSeek-V3's auxiliary-loss-free
balancing (arXiv 2412.19437: an expert's routing bias is moved against its observed load). Its step
is in the scores' own units, so one kappa (1) serves any score scale: their spread, or how far this
batch's cut-off landed from tau when that is more. The second matters where the whole batch moves
by more than its spread in one step, as DTF's gate does early in training (spread 1e-5..1e-4): a
step of one spread would fall behind, a step of the miss keeps up. An exponential moving average of
c_n (momentum 0.99, the earlier rule here) trailed the drifting scores and routed 4-11% of MoD's
tokens and 0-4% of DTF's through the first 400 laptop iterations.

What the reference implementation (fredericowieser/Dynamic-Transformers) got wrong: it ranks with top-k over the
whole row in training *and* in evaluation, and packs the selected tokens of all rows into one
score-ordered sequence under a causal mask, so a token attends to later tokens of its row and to
every selected token of the other rows. Its reported MoD losses are not reachable by a sampler.

sigma(r) instead of the paper's raw r as the gate (as the reference does): bounded, and 0.5 at r = 0,
so a routed token's update is never flipped in sign or blown up by an unconstrained score.

Incremental decoding (init_cache, forward_cached) delivers the inference saving the paper promises
for sampling (Raposo et al., 2024, §3.5; the abstract's "upwards of 50% faster to step"). Each new token decides on arrival,
by the forward's own rule (r_t >= tau and the cap counted over the row's earlier routed tokens), so
cached decoding gives exactly the full eval forward's logits. A routed layer's KV cache holds only
its routed tokens, at most K a row (rows route differently, so each keeps its own count), and a
skipped token costs that layer one dot product: no attention, no MLP.

Names: the paper's symbols (r, w_r, tau, C, k, K) in code and comments; the block's modules are
model_gpt's (Hugging Face Qwen2 names: qkv_proj, o_proj, gate_proj, up_proj, down_proj).

Reading order: the routing rule (route, update_threshold), the routed computation (routed_update,
RoutedKeys, RoutedKVCache), MoDBlock, the model MoD; then, in one section at the end, the pieces
copied unchanged from model_gpt.py (RMSNorm, RoPE, attention, MLP, Block, the caches) and
DenseBlock, model_gpt's Block behind MoDBlock's interface.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 65              # set by train.py from the dataset's tokenizer
    block_size: int = 64              # training context length
    n_layer: int = 4                  # L blocks; the odd ones (1, 3, ...) are routed
    n_head: int = 4                   # query heads H
    n_kv_head: int = 2                # key/value heads G (grouped-query attention)
    n_embd: int = 128                 # d
    intermediate_size: int = 384      # SwiGLU width I = 3d (model_gpt's laptop size)
    rope_theta: float = 1e6           # RoPE base theta (Qwen2.5)
    norm_eps: float = 1e-6            # RMSNorm epsilon
    qkv_bias: bool = True             # biases on q, k, v (Qwen2)
    dropout: float = 0.0              # Qwen2.5 uses none; kept as a knob
    init_std: float = 0.02            # N(0, init_std) for every Linear, embedding and router
    mod_capacity: float = 0.125       # C: target fraction of tokens a routed block processes
    capacity_factor: float = 2.0      # hard cap per row: K = ceil(capacity_factor * C * block_size) tokens
    tau_gain: float = 1.0             # kappa: gain of the routed-fraction feedback on tau (update_threshold)
    router_loss_weight: float = 0.01  # lambda: weight of the router's top-k membership BCE
    mod_routing: str = "threshold"    # "threshold" (causal, both modes) or "topk" (paper, training only)


# Qwen2.5's published shapes, routed every other layer at C = 12.5%. vocab_size comes from the data.
PRESETS = {
    "qwen2.5-0.5b": dict(block_size=1024, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864),
    "qwen2.5-1.5b": dict(block_size=1024, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, intermediate_size=8960),
    "qwen2.5-3b": dict(block_size=1024, n_layer=36, n_head=16, n_kv_head=2, n_embd=2048, intermediate_size=11008),
}


def route(score, tau, K, n_routed=0):
    """Which tokens a routed block processes, decided token by token: score_t >= tau, and fewer than
    K earlier tokens of the row already routed (the cap keeps shapes static and compute bounded).

    score: (B, T) fp32; n_routed: in incremental decoding, (B, 1) tokens each row routed before these
    (they count against the cap). Returns sel (B, T) bool; pos (B, min(T, K)): the routed positions
    in ascending order, then unrouted positions as padding; valid: which slots hold routed tokens.
    sel_t depends only on score_<=t and the constant tau, so routing never looks ahead."""
    B, T = score.shape
    want = score >= tau
    sel = want & (n_routed + want.cumsum(dim=1) <= K)
    t = torch.arange(T, device=score.device)
    pos = torch.argsort(torch.where(sel, t, T + t), dim=1)[:, :K]  # routed first, each group by position
    valid = torch.arange(pos.size(1), device=score.device) < sel.sum(dim=1, keepdim=True)
    return sel, pos, valid


def update_threshold(tau, tau_bias, score, sel, k, capacity, gain):
    """The threshold for the next forward, from this training batch, which was routed with tau:

        c        = mean over rows of the row's k-th largest score     this batch's top-k cut-off
        f        = mean(sel)                                          the fraction it routed
        s        = max(standard deviation of the batch's scores, |c - tau|)
        tau_bias <- tau_bias + gain * s * (f - capacity) / capacity
        tau      <- c + tau_bias

    The first update (tau not finite: nothing, or everything, was routed by design) sets tau = c and
    leaves tau_bias as it is. Under DDP, c, f and the deviation are averaged over the processes
    first (as SyncBatchNorm does its batch statistics), so every process holds the same tau. Tensor
    ops only: no device sync."""
    with torch.no_grad():
        stats = torch.stack([score.topk(k, dim=1).values[:, -1].mean(), sel.float().mean(),
                             score.std(correction=0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        cutoff, routed, sigma = stats
        known = torch.isfinite(tau)
        step = torch.maximum(sigma, (cutoff - torch.where(known, tau, cutoff)).abs())
        tau_bias.add_(torch.where(known, gain * step * (routed - capacity) / capacity, 0.0))
        tau.copy_(cutoff + tau_bias)


def routed_update(block, x, gate, pos, valid, rope, cache=None, start=0):
    """x plus gate * (block(x) - x) at the routed positions; every other token keeps x exactly.

    The K gathered tokens of a row run through the block as a short sequence of their own: a routed
    token attends to the routed tokens at earlier positions of the same row (and itself), with RoPE
    at the true positions, so relative distances stay real (RoutedKeys). Padding slots' updates are
    zeroed. In incremental decoding x holds the next tokens after `start` earlier ones and cache is
    the layer's RoutedKVCache: the routed tokens also attend to the row's earlier routed tokens,
    whose keys and values are all it holds, and only theirs are added to it."""
    B, K = pos.shape
    index = pos[..., None].expand(B, K, x.size(-1))
    xs = x.gather(1, index)                                                    # (B, K, d)
    cos, sin = rope(start + pos)                                               # (B, K, hd)
    delta = block(xs, cos, sin, RoutedKeys(valid, cache)) - xs                 # attention + MLP updates
    weight = (gate.gather(1, pos) * valid).unsqueeze(-1).to(delta.dtype)
    return x.scatter_add(1, index, weight * delta)


class RoutedKeys:
    """What the attention of a routed block reads its keys through, in the place of model_gpt's KV
    cache argument, so that Attention and Block stay model_gpt's. append(k, v) of the K gathered
    tokens of each row returns the keys and values they attend over and the mask that lets a routed
    token see only the routed tokens at earlier positions of its row (and itself): in a forward the
    K tokens themselves; in incremental decoding the layer's RoutedKVCache, which stores those that
    valid marks."""

    def __init__(self, valid, cache=None):
        self.valid = valid  # (B, K): which slots hold routed tokens (the rest are padding)
        self.cache = cache

    def append(self, k, v):
        if self.cache is not None:
            return self.cache.append(k, v, self.valid)
        K = self.valid.size(1)
        slot = torch.arange(K, device=k.device)
        mask = (slot[None, :] <= slot[:, None]) & self.valid[:, None, :]          # (B, K, K)
        # padding slots are masked as keys; attending to themselves keeps their softmax rows finite
        mask = mask | torch.eye(K, dtype=torch.bool, device=k.device)
        return k, v, mask[:, None]


class RoutedKVCache:
    """A routed layer's keys and values for incremental decoding: buffers of `size` entries a row
    holding only the row's routed tokens, so each row fills at its own pace; n (B,) = the entries
    each row holds, and the mask hides the slots a row has not filled."""

    def __init__(self, B, size, device):
        self.size = size
        self.k = self.v = None  # (B, G, size, hd), allocated by the first append in attention's dtype
        self.n = torch.zeros(B, dtype=torch.long, device=device)

    def append(self, k, v, keep):
        """Store those of the new keys and values k, v (B, G, t, hd) that keep (B, t) marks (the
        routed tokens, which come first in each row) after each row's earlier entries. Returns keys
        and values over the filled part of the buffers and the boolean mask (B, 1, t, S) of the new
        queries."""
        B, G, t, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, G, self.size, hd)  # zeros: an unfilled slot holds finite numbers
            self.v = v.new_zeros(B, G, self.size, hd)
        own = self.n[:, None] + torch.arange(t, device=k.device)  # (B, t): the slot of each stored token
        b, i = keep.nonzero(as_tuple=True)
        self.k[b, :, own[b, i]] = k[b, :, i]
        self.v[b, :, own[b, i]] = v[b, :, i]
        self.n += keep.sum(dim=1)
        S = int(self.n.max())
        slot = torch.arange(S, device=k.device)
        # a new token sees its row's stored entries up to its own slot. A token that is not stored
        # (padding of a routed layer) may have nothing to see; slot 0 keeps its discarded output finite
        mask = (slot <= own[..., None]) & (slot < self.n[:, None, None]) | (slot == 0)
        return self.k[:, :, :S], self.v[:, :, :S], mask[:, None]


class MoDBlock(nn.Module):
    """A standard block that processes only the tokens its router sends through it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.block = Block(config)
        self.router = nn.Parameter(torch.zeros(config.n_embd))         # w_r, one score per token
        self.register_buffer("tau", torch.tensor(float("inf")))          # route nothing before training
        self.register_buffer("tau_bias", torch.tensor(0.0))              # b: the feedback's running correction
        self.last = {}  # detached tensors of the last forward, for stats()

    def gate(self, r):
        # the routed update's weight, the path by which the LM loss trains the router. The paper
        # multiplies by r itself; sigma(r) (as the reference) is bounded in (0, 1) and 0.5 at r = 0,
        # so an unconstrained score can neither flip the update's sign nor blow it up
        return torch.sigmoid(r)

    def cap(self):
        # K, the hard per-row cap, from block_size rather than T: a sampler's shorter prefixes then
        # make exactly the same decisions as the full window (at most t+1 tokens can precede t anyway)
        c = self.config
        return min(c.block_size, math.ceil(c.capacity_factor * c.mod_capacity * c.block_size))

    def score(self, x):
        return (x.float() * self.router.float()).sum(-1)                    # r (B, T), fp32 under autocast

    def forward(self, x, cos, sin, rope):
        """x (B, T, d) -> (x with the routed tokens' gated updates, the router's BCE in training or None).
        cos and sin are the dense layers' RoPE tables, unused here: the routed tokens, gathered out of
        their sequence, are rotated at their own positions by rope."""
        B, T, _ = x.shape
        k = max(1, int(self.config.mod_capacity * T))                       # top-k target count
        K = min(T, self.cap())
        r = self.score(x)
        aux = None
        if self.training:
            top_k = torch.zeros_like(r).scatter_(1, r.topk(k, dim=1).indices, 1.0)  # a target, no gradient
            aux = F.binary_cross_entropy_with_logits(r, top_k)
        if self.training and self.config.mod_routing == "topk":
            sel, pos, valid = route(top_k, 0.5, K)  # the paper's training rule: exactly the row's top-k
        else:
            sel, pos, valid = route(r, self.tau, K)
        out = routed_update(self.block, x, self.gate(r), pos, valid, rope)
        self.last = {"sel": sel}  # for stats(), which reduces them only when asked
        if self.training:
            self.last.update(r=r.detach(), top_k=top_k, tau=self.tau.clone(), aux=aux.detach())
            # the feedback measures what the threshold routes (under "topk", what it would have routed)
            routed = sel if self.config.mod_routing == "threshold" else route(r, self.tau, K)[0]
            update_threshold(self.tau, self.tau_bias, r.detach(), routed, k, self.config.mod_capacity,
                             self.config.tau_gain)  # after deciding with the old tau
        return out, aux

    def init_cache(self, batch_size, device):
        return RoutedKVCache(batch_size, self.cap(), device)  # K slots a row: the most a row can route here

    def forward_cached(self, x, start, cos, sin, cache, rope):
        """Incremental decoding of x (B, t, d), the next t tokens after `start` earlier ones: each
        token decides on arrival by the forward's rule, the row's earlier routed tokens (cache.n)
        counted against the cap, and only routed tokens run the block and enter the cache."""
        r = self.score(x)
        if not (r >= self.tau).any():
            return x  # no token clears tau: this layer cost these tokens one dot product each
        sel, pos, valid = route(r, self.tau, self.cap(), cache.n[:, None])
        if not sel.any():
            return x  # the rows that wanted more are at their cap K
        return routed_update(self.block, x, self.gate(r), pos, valid, rope, cache, start)


class MoD(nn.Module):
    # Adapted from model_gpt.GPT.__init__: the odd layers are MoDBlocks, their routers drawn from N(0, 0.02) too
    def __init__(self, config):
        super().__init__()
        check_heads(config)
        if config.mod_routing not in ("threshold", "topk"):
            raise ValueError(f"mod_routing must be 'threshold' or 'topk', not {config.mod_routing!r}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rope = RotaryEmbedding(config.n_embd // config.n_head, config.rope_theta)
        self.blocks = nn.ModuleList(MoDBlock(config) if l % 2 == 1 else DenseBlock(config)
                                    for l in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        # every Linear and the embedding ~ N(0, 0.02), routed blocks and routers included (the reference
        # left its routed blocks at PyTorch's default init: an unfair comparison with its dense baseline)
        self.apply(self._init_weights)
        for block in self.blocks[1::2]:  # the routed layers
            nn.init.normal_(block.router, std=config.init_std)

    # Copied from model_gpt.GPT._init_weights
    def _init_weights(self, module):
        # Qwen2's init (initializer_range 0.02): every Linear and the embedding ~ N(0, 0.02), biases 0
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # Adapted from model_gpt.GPT.forward: every layer also returns an auxiliary loss (a routed block's
    # router BCE in training, else None), whose mean over routed layers joins the training loss
    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope(torch.arange(T, device=idx.device))
        x = self.drop(self.wte(idx))
        aux_losses = []
        for block in self.blocks:
            x, aux = block(x, cos, sin, self.rope)  # aux: a routed block's router BCE in training, else None
            if aux is not None:
                aux_losses.append(aux)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if aux_losses:  # training: the paper's auxiliary loss; evaluation reports pure CE
                loss = loss + self.config.router_loss_weight * torch.stack(aux_losses).mean()
        return logits, loss

    # Adapted from model_gpt.GPT.init_cache: each layer makes its own cache
    def init_cache(self, batch_size):
        """An empty cache for batch_size rows: per dense layer a KVCache of block_size positions, per
        routed layer one of K, the most tokens a row can route there."""
        return Cache([block.init_cache(batch_size, self.wte.weight.device) for block in self.blocks])

    # Adapted from model_gpt.GPT.forward_cached: each layer decodes through its own forward_cached
    @torch.inference_mode()
    def forward_cached(self, idx, cache):
        """idx (B, t): the next t >= 1 tokens of each row after those the cache holds. Returns logits
        (B, t, V) and updates the cache in place. Always the eval-mode computation, whatever
        self.training is (no dropout, no tau update, no aux loss): the full eval forward's logits."""
        B, t = idx.shape
        start = cache.length
        if start + t > self.config.block_size:
            raise ValueError(f"the cache would hold {start + t} tokens, more than block_size {self.config.block_size}")
        was_training = self.training
        if was_training:
            self.eval()  # dropout off (only when on: eval() walks every module, a cost per token)
        try:
            cos, sin = self.rope(torch.arange(start, start + t, device=idx.device))  # true positions
            x = self.wte(idx)
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block.forward_cached(x, start, cos, sin, layer_cache, self.rope)
            cache.length += t
            return self.lm_head(self.norm_f(x))
        finally:
            if was_training:
                self.train()

    def stats(self):
        # the realised routed fraction per routed layer (target C; a collapsing layer shows here),
        # the rest averaged over routed layers so that a 24-layer model still prints one short line
        routed = {l: self.blocks[l] for l in range(1, self.config.n_layer, 2) if self.blocks[l].last}
        if not routed:
            return {}
        out = {f"frac_routed_l{l}": block.last["sel"].float().mean().item() for l, block in routed.items()}
        out["tau"] = torch.stack([block.tau for block in routed.values()]).mean().item()
        trained = [block.last for block in routed.values() if "aux" in block.last]  # training forwards only
        if trained:  # how often the causal rule (with the tau it used) agrees with the top-k it stands in for
            out["agreement"] = torch.stack([((last["r"] >= last["tau"]) == (last["top_k"] > 0)).float().mean()
                                            for last in trained]).mean().item()
            out["aux_bce"] = torch.stack([last["aux"] for last in trained]).mean().item()
        return out

    # Adapted from model_gpt.GPT.flops_per_token: a routed block counts only the rows it computes
    def flops_per_token(self):
        # nanoGPT's accounting (6 per parameter and token, 12*d*T per layer for attention) with a
        # routed block computing f = K/T of the rows, and its attention f*T keys for each of them
        c = self.config
        T = c.block_size
        f = min(T, math.ceil(c.capacity_factor * c.mod_capacity * T)) / T
        n_block = sum(p.numel() for p in Block(c).parameters())
        R = c.n_layer // 2
        dense = c.n_layer - R
        return (6 * (dense * n_block + R * f * n_block + R * c.n_embd + c.vocab_size * c.n_embd)
                + 12 * c.n_embd * T * (dense + R * f * f))


Model = MoD


# ---- Copied from model_gpt: the standard Qwen2 block and its pieces -------------------------
# (kept identical to model_gpt.py by tests/test_models.py, so that this file stands alone)


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


# Copied from model_gpt.KVCache
class KVCache:
    """Keys and values of one attention layer for B rows, for incremental decoding: buffers of `size`
    positions a row, allocated once (the batch size and dtype come with the first keys) and written
    in place; filled = the positions written so far (a Python int: slicing by it needs no device sync)."""

    def __init__(self, size):
        self.size = size
        self.k = self.v = None  # (B, G, size, hd), allocated by the first append in attention's dtype
        self.filled = 0

    def append(self, k, v):
        """Store the new keys and values k, v (B, G, t, hd) after the earlier ones. Returns keys and
        values over the filled part of the buffers and the boolean mask (t, S) of the new queries,
        or None where none is needed: on the first call plain causal attention is exact, and a
        single new token may see every stored key."""
        B, G, t, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, G, self.size, hd)
            self.v = v.new_zeros(B, G, self.size, hd)
        s0, S = self.filled, self.filled + t
        self.k[:, :, s0:S], self.v[:, :, s0:S] = k, v
        self.filled = S
        if s0 == 0 or t == 1:
            return self.k[:, :, :S], self.v[:, :, :S], None
        mask = torch.arange(S, device=k.device) <= s0 + torch.arange(t, device=k.device)[:, None]  # (t, S)
        return self.k[:, :, :S], self.v[:, :, :S], mask


# Copied from model_gpt.Attention
class Attention(nn.Module):
    """Causal multi-head attention with grouped KV heads, QKV bias and RoPE.

    forward(x, cos, sin, cache=None): plain causal attention over x, rotated by cos and sin. In
    incremental decoding x holds the next t tokens and cache is the layer's KVCache: their keys and
    values join it, and they attend over all of it with the boolean mask it returns (True = may attend;
    None: causal, or no mask at all for a single query, which may see every key it is given)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * self.head_dim
        self.qkv_proj = nn.Linear(config.n_embd, qkv_dim, bias=config.qkv_bias)  # W_q, W_k, W_v stacked
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        H, G, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * G, hd)       # the H query, G key, G value heads
        qk = apply_rope(qkv[:, :, :H + G], cos.unsqueeze(-2), sin.unsqueeze(-2))  # q and k in one rotation
        q = qk[:, :, :H].transpose(1, 2)                      # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)                      # (B, G, T, hd)
        v = qkv[:, :, H + G:].transpose(1, 2)
        mask = None
        if cache is not None:
            k, v, mask = cache.append(k, v)
        # enable_gqa: kv head g serves query heads g*H/G .. (g+1)*H/G - 1, without copying k and v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=G != H, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.resid_dropout(self.o_proj(y))


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


# Copied from model_gpt.Block
class Block(nn.Module):
    """Pre-norm decoder block: x + Attn(RMSNorm(x)), then + MLP(RMSNorm(.))."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


# Copied from model_gpt.check_heads
def check_heads(config):
    """The attention shapes RoPE and grouped KV heads need, checked before any weight is made."""
    if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}) "
                         f"and n_head by n_kv_head ({config.n_kv_head})")
    if (config.n_embd // config.n_head) % 2:
        raise ValueError("the head size n_embd/n_head must be even for RoPE")


# Copied from model_gpt.Cache
class Cache:
    """What incremental decoding carries from one forward_cached call to the next: the number of
    tokens every row has seen and each layer's state (a KVCache)."""

    def __init__(self, layers):
        self.length = 0
        self.layers = layers


class DenseBlock(Block):
    """An unrouted layer: model_gpt's Block behind the routed block's interface, so that MoD calls
    every layer alike. A subclass rather than a wrapper, so its weights keep Block's names (Qwen2
    weights and checkpoints map onto them as onto GPT's); defined here, after the Block it extends."""

    def __init__(self, config):
        super().__init__(config)
        self.block_size = config.block_size

    def forward(self, x, cos, sin, rope):
        return super().forward(x, cos, sin), None  # no router, so no auxiliary loss

    def init_cache(self, batch_size, device):
        return KVCache(self.block_size)

    def forward_cached(self, x, start, cos, sin, cache, rope):
        return super().forward(x, cos, sin, cache)
