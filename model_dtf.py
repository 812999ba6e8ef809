"""
DTF: the surprise-routed Dynamic Transformer (the DTF report in the fredericowieser/Dynamic-Transformers
repository), causal in training and evaluation.

The idea, in predictive-coding words. Blocks come in pairs. The *decision* block runs on every
token and gives three views of it: its input h (the *original*: "nothing changes"), the block's
output (the *posterior*: what actually happened), and a cheap guess of that output made by a tiny
SwiGLU from h alone (the *prior*: "the change I could predict"). Two event tests compare them, as in
VPR (Zakharov et al., ICLR 2022):
    expected change   CE = D_st - D_ch + log o_ce     the prior explains the update better than "no change"
    unexpected change CU = D_st - m_cu * MA(D_st)     the update is bigger than its recent average
with D_st = mean_d (posterior - original)^2 and D_ch = mean_d (posterior - prior)^2. Each is squashed
by a sigmoid with a learned inverse temperature and the two are OR-ed: G = S_CE + S_CU - S_CE*S_CU.
The *dynamic* block then processes only the most surprising tokens (capacity gamma = 12.5%), adding
its update scaled by G; the rest skip it. Surprising tokens get a second block of compute.

    x = embedding[idx]
    for each pair:  h = x;  H_post = DecisionBlock(h);  H_prior = h + PriorFFN(RMSNorm(h))
                    G = gate(h, H_post, H_prior)              (B, T), fp32
                    routed_t = G_t >= tau, under a per-row cap; x = H_post + G * (DynamicBlock - H_post) at routed t
    logits = RMSNorm(x) @ embedding^T;   training loss = CE + 0.05 * mean over pairs of the prior's MSE

Causality. Which tokens are "the most surprising" is decided token by token against tau, set before
the forward from earlier training batches (buffers moved only by training forwards), never by
ranking a sequence, whose later tokens a sampler does not have. After training forward n, routed
with tau_n (update_threshold, copied from model_mod.py, whose docstring explains it):

    tau_{n+1} = c_n + b_{n+1},   b_{n+1} = b_n + kappa * max(sigma_n, |c_n - tau_n|) * (f_n - gamma) / gamma

c_n = the batch's top-k cut-off of G (mean over rows of the row's k-th largest G), f_n = the fraction
it routed, sigma_n = the std of its G. b integrates the routed fraction's error, so f averages gamma
even while G, nearly constant early in training, drifts by more than its own spread per step.
MA is the mean of the previous tokens' D_st in the same row. Routed tokens attend only to earlier
routed tokens of their own row.
So logits at t depend on tokens <= t of their own sequence only, in training and in evaluation.

What the reference leaked: it picks the top-k of each row in training and
in evaluation, packs the chosen tokens of all rows into one score-ordered sequence (a token sees
later tokens and other sequences), and its moving average is one global buffer filled with the
current batch (other rows, future positions) before it is read, in a Python loop.
Other deliberate differences: o_ce is stored as its log (the reference's raw o_ce under a log turns
NaN once it reaches 0), every Linear starts at N(0, 0.02) (the reference left its blocks at PyTorch's
default init), and the router's four scalars learn 10x faster (lr_mult; at the shared lr they barely move).

Incremental decoding (init_cache, forward_cached) gives exactly the full eval forward's logits:
each new token's G needs only its own decision-block output and prior plus the moving average of
the row's earlier D_st, which the cache keeps, so it decides on arrival by the forward's rule (G_t >=
tau, the cap counted over the row's earlier routed tokens). A dynamic block's KV cache holds only
its routed tokens, at most K a row, each row with its own count; a skipped token does no work
there. This is the inference saving of routing compute by token (Mixture-of-Depths, Raposo et al.,
2024, §3.5), which the reference's top-k over a whole sequence cannot deliver to a sampler.

Names: the report's symbols (D_st, D_ch, CE, CU, S_CE, S_CU, G, beta_ce, beta_cu, o_ce, m_cu, gamma,
tau) in code and comments; the blocks' modules are model_gpt's (Hugging Face Qwen2 names).

Reading order: the prior, the causal moving average, the pair (gate, routing, dynamic step), the
model DTF; then, in one section at the end, the pieces copied unchanged from model_mod.py (the
causal routing rule, the threshold update and the routed computation) and from model_gpt.py
(RMSNorm, RoPE, attention, MLP, Block, the caches).
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
    n_layer: int = 4                  # blocks, even: pairs of (decision, dynamic)
    n_head: int = 4                   # query heads H
    n_kv_head: int = 2                # key/value heads G (grouped-query attention)
    n_embd: int = 128                 # d
    intermediate_size: int = 384      # SwiGLU width I = 3d (model_gpt's laptop size)
    rope_theta: float = 1e6           # RoPE base theta (Qwen2.5)
    norm_eps: float = 1e-6            # RMSNorm epsilon
    qkv_bias: bool = True             # biases on q, k, v (Qwen2)
    dropout: float = 0.0              # Qwen2.5 uses none; kept as a knob
    init_std: float = 0.02            # N(0, init_std) for every Linear and the embedding
    dtf_capacity: float = 0.125       # gamma: target fraction of tokens a dynamic block processes
    capacity_factor: float = 2.0      # hard cap per row: K = ceil(capacity_factor * gamma * block_size)
    tau_gain: float = 1.0             # kappa: gain of the routed-fraction feedback on tau (update_threshold)
    beta_ce_init: float = -0.5        # beta_ce: raw inverse temperature of S_CE, used as softplus(beta)
    beta_cu_init: float = -0.8        # beta_cu: the same for S_CU
    o_ce_init: float = 1.025          # CE offset o_ce (stored as log o_ce)
    m_cu_init: float = 1.1            # CU multiplier of the moving average
    ma_window: int = 100              # W: tokens in the CU moving average
    prior_ffn_factor: float = 0.0625  # prior SwiGLU width d_i = f * d (rounded up to even)
    prior_loss_weight: float = 0.05   # lambda_prior: weight of the prior's MSE (training only)


# Qwen2.5's published shapes as blocks of pairs, gamma 12.5%. vocab_size comes from the data.
PRESETS = {
    "qwen2.5-0.5b": dict(block_size=1024, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864),
    "qwen2.5-1.5b": dict(block_size=1024, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, intermediate_size=8960),
    "qwen2.5-3b": dict(block_size=1024, n_layer=36, n_head=16, n_kv_head=2, n_embd=2048, intermediate_size=11008),
}


class PriorFFN(nn.Module):
    """The prior: a tiny SwiGLU guessing the decision block's update from its input alone."""

    def __init__(self, config):
        super().__init__()
        d_i = max(2, 2 * math.ceil(config.prior_ffn_factor * config.n_embd / 2))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.gate_proj = nn.Linear(config.n_embd, d_i, bias=False)
        self.up_proj = nn.Linear(config.n_embd, d_i, bias=False)
        self.down_proj = nn.Linear(d_i, config.n_embd, bias=False)

    def forward(self, h):
        u = self.norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u))


def causal_moving_average(d, window):
    """MA_t = mean of d over the previous `window` positions of the same row (t-window .. t-1);
    MA_0 = d_0. From a cumulative sum: no loop, and position t reads nothing at or after t."""
    B, T = d.shape
    c = F.pad(d.cumsum(dim=1), (1, 0))                        # c[t] = sum of d[0 .. t-1]
    t = torch.arange(T, device=d.device)
    total = c[:, t] - c[:, (t - window).clamp(min=0)]
    ma = total / t.clamp(min=1, max=window)
    return torch.where(t == 0, d[:, :1], ma)


class DTFPair(nn.Module):
    """A decision block on every token, the prior, the surprise gate G, and a dynamic block on the
    tokens whose G clears the routing threshold tau (the report's eqs. 3.1-3.13)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.decision = Block(config)
        self.prior = PriorFFN(config)
        self.dynamic = Block(config)
        # the router's scalars (0-D: no weight decay); they learn 10x faster than the blocks
        self.beta_ce = nn.Parameter(torch.tensor(config.beta_ce_init))
        self.beta_cu = nn.Parameter(torch.tensor(config.beta_cu_init))
        self.log_o_ce = nn.Parameter(torch.tensor(math.log(config.o_ce_init)))
        self.m_cu = nn.Parameter(torch.tensor(config.m_cu_init))
        for p in (self.beta_ce, self.beta_cu, self.log_o_ce, self.m_cu):
            p.lr_mult = 10.0
        self.register_buffer("tau", torch.tensor(float("inf")))  # route nothing before training
        self.register_buffer("tau_bias", torch.tensor(0.0))      # b: the feedback's running correction
        self.last = {}  # detached tensors of the last forward, for stats()

    def cap(self):
        # K, the hard per-row cap, from block_size rather than T: a sampler's shorter prefixes make
        # exactly the full window's decisions (at most t+1 tokens can precede t anyway)
        c = self.config
        return min(c.block_size, math.ceil(c.capacity_factor * c.dtf_capacity * c.block_size))

    def gate(self, h, h_post, h_prior, history=None):
        """G in (0, 1) per token, from the static and change surprises (fp32 even under autocast:
        at init G varies by ~1e-3 across tokens, which bf16 would round into ties).
        history: in incremental decoding, the cache's D_st of the row's tokens so far, these T last;
        they are written into it here, and the moving average reads the earlier ones."""
        T = h.size(1)
        d_st = (h_post.float() - h.float()).pow(2).mean(-1)          # static surprise  (B, T)
        d_ch = (h_post.float() - h_prior.float()).pow(2).mean(-1)    # change surprise  (B, T)
        ce = d_st - d_ch + self.log_o_ce                              # expected change
        if history is None:  # a forward: the sequence itself is the history
            history = d_st.detach()
        else:  # incremental decoding: these tokens' D_st join the row's earlier ones in the cache
            history[:, -T:] = d_st
        # unexpected change; the moving average is a detached baseline over earlier tokens only
        cu = d_st - self.m_cu * causal_moving_average(history, self.config.ma_window)[:, -T:]
        s_ce = torch.sigmoid(F.softplus(self.beta_ce) * ce)
        s_cu = torch.sigmoid(F.softplus(self.beta_cu) * cu)
        self.last.update(s_ce=s_ce.detach(), s_cu=s_cu.detach())     # for stats()
        return s_ce + s_cu - s_ce * s_cu                              # probabilistic OR

    def forward(self, h, cos, sin, rope):
        B, T, _ = h.shape
        self.last = {}
        h_post = self.decision(h, cos, sin)
        h_prior = self.prior(h)
        G = self.gate(h, h_post, h_prior)
        k = max(1, int(self.config.dtf_capacity * T))
        K = min(T, self.cap())
        sel, pos, valid = route(G, self.tau, K)
        out = routed_update(self.dynamic, h_post, G, pos, valid, rope)
        self.last.update(sel=sel, G=G.detach())  # for stats(), which reduces them only when asked
        prior_loss = 0
        if self.training:
            # the prior learns to predict the posterior; its target is detached, so this loss does
            # not pull the decision block towards being predictable
            prior_loss = (h_prior.float() - h_post.detach().float()).pow(2).mean()
            self.last.update(prior_loss=prior_loss.detach())
            update_threshold(self.tau, self.tau_bias, G.detach(), sel, k, self.config.dtf_capacity,
                             self.config.tau_gain)  # after deciding with the old tau
        return out, prior_loss

    def init_cache(self, batch_size, device):
        return PairCache(batch_size, self.config.block_size, self.cap(), device)

    def forward_cached(self, h, start, cos, sin, cache, rope):
        """Incremental decoding of h (B, t, d), the next t tokens after `start` earlier ones: the
        decision block and the prior run on every token, G decides on arrival by the forward's rule
        (the row's earlier routed tokens counted against the cap), and only routed tokens run the
        dynamic block and enter its cache."""
        h_post = self.decision(h, cos, sin, cache=cache.decision)
        h_prior = self.prior(h)
        G = self.gate(h, h_post, h_prior, cache.d_st[:, :start + h.size(1)])
        if not (G >= self.tau).any():
            return h_post  # no token clears tau: the dynamic block does no work
        sel, pos, valid = route(G, self.tau, self.cap(), cache.dynamic.n[:, None])
        if not sel.any():
            return h_post  # the rows that wanted more are at their cap K
        return routed_update(self.dynamic, h_post, G, pos, valid, rope, cache.dynamic, start)


class PairCache:
    """One pair's incremental-decoding state: the decision block's K/V of every token, the dynamic
    block's of routed tokens only (at most K a row), and every token's D_st, which the CU moving
    average of later tokens reads (the MA's window may reach back to the first token)."""

    def __init__(self, B, block_size, K, device):
        self.decision = KVCache(block_size)
        self.dynamic = RoutedKVCache(B, K, device)
        self.d_st = torch.zeros(B, block_size, device=device)


class DTF(nn.Module):
    # Adapted from model_gpt.GPT.__init__: n_layer blocks as n_layer/2 DTFPairs; odd n_layer is refused
    def __init__(self, config):
        super().__init__()
        if config.n_layer % 2:
            raise ValueError(f"n_layer={config.n_layer} is odd: DTF needs pairs of (decision, dynamic) blocks; "
                             "set an even n_layer")
        check_heads(config)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rope = RotaryEmbedding(config.n_embd // config.n_head, config.rope_theta)
        self.blocks = nn.ModuleList(DTFPair(config) for _ in range(config.n_layer // 2))  # block p: layers 2p, 2p+1
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        # every Linear and the embedding ~ N(0, 0.02), dynamic blocks and priors included (the reference
        # left them at PyTorch's default init: an unfair comparison with its dense baseline)
        self.apply(self._init_weights)

    # Copied from model_gpt.GPT._init_weights
    def _init_weights(self, module):
        # Qwen2's init (initializer_range 0.02): every Linear and the embedding ~ N(0, 0.02), biases 0
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # Adapted from model_gpt.GPT.forward: every pair also returns its prior's loss, whose mean over
    # pairs joins the training loss
    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope(torch.arange(T, device=idx.device))
        x = self.drop(self.wte(idx))
        prior_losses = []
        for pair in self.blocks:
            x, prior_loss = pair(x, cos, sin, self.rope)  # prior_loss: the prior's MSE in training, else 0
            prior_losses.append(prior_loss)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if self.training:  # evaluation reports pure CE
                loss = loss + self.config.prior_loss_weight * torch.stack(prior_losses).mean()
        return logits, loss

    # Adapted from model_gpt.GPT.init_cache: each pair makes its own cache
    def init_cache(self, batch_size):
        """An empty cache for batch_size rows: one PairCache per pair."""
        return Cache([pair.init_cache(batch_size, self.wte.weight.device) for pair in self.blocks])

    # Adapted from model_gpt.GPT.forward_cached: each pair decodes through its own forward_cached
    @torch.inference_mode()
    def forward_cached(self, idx, cache):
        """idx (B, t): the next t >= 1 tokens of each row after those the cache holds. Returns logits
        (B, t, V) and updates the cache in place. Always the eval-mode computation, whatever
        self.training is (no dropout, no tau update, no prior loss): the full eval forward's logits."""
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
            for pair, pair_cache in zip(self.blocks, cache.layers):
                x = pair.forward_cached(x, start, cos, sin, pair_cache, self.rope)
            cache.length += t
            return self.lm_head(self.norm_f(x))
        finally:
            if was_training:
                self.train()

    def stats(self):
        # the realised routed fraction per pair (target gamma), the rest averaged over pairs.
        # G_std < 1e-2 flags a nearly constant gate (at init G lies in [0.749, 0.757]): routing then
        # follows tiny differences in D_st rather than real surprise
        if not self.blocks[0].last:
            return {}
        out = {f"frac_routed_p{p}": pair.last["sel"].float().mean().item() for p, pair in enumerate(self.blocks)}

        def mean(values):
            return torch.stack(list(values)).mean().item()

        out["G_mean"] = mean(pair.last["G"].mean() for pair in self.blocks)
        out["G_std"] = mean(pair.last["G"].std() for pair in self.blocks)
        out["s_ce"] = mean(pair.last["s_ce"].mean() for pair in self.blocks)
        out["s_cu"] = mean(pair.last["s_cu"].mean() for pair in self.blocks)
        if "prior_loss" in self.blocks[0].last:  # training forwards only
            out["prior_loss"] = mean(pair.last["prior_loss"] for pair in self.blocks)
        out["beta_ce"] = mean(F.softplus(pair.beta_ce.detach()) for pair in self.blocks)  # inverse temperatures
        out["beta_cu"] = mean(F.softplus(pair.beta_cu.detach()) for pair in self.blocks)
        out["tau"] = mean(pair.tau for pair in self.blocks)
        return out

    # Adapted from model_gpt.GPT.flops_per_token: a dynamic block counts only the rows it computes
    def flops_per_token(self):
        # nanoGPT's accounting with each dynamic block computing f = K/T of the rows, and its attention
        # f*T keys for each of them; the router's 4 scalars count as parameters of every token
        c = self.config
        T, P = c.block_size, c.n_layer // 2
        f = min(T, math.ceil(c.capacity_factor * c.dtf_capacity * T)) / T
        n_block = sum(p.numel() for p in self.blocks[0].decision.parameters())
        n_prior = sum(p.numel() for p in self.blocks[0].prior.parameters())
        return (6 * (P * (n_block + n_prior + 4) + P * f * n_block + c.vocab_size * c.n_embd)
                + 12 * c.n_embd * T * P * (1 + f * f))


Model = DTF


# ---- Copied unchanged: model_mod's causal routing, then model_gpt's standard Qwen2 block --------
# (kept identical to their sources by tests/test_models.py, so that this file stands alone)


# Copied from model_mod.route
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


# Copied from model_mod.update_threshold
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


# Copied from model_mod.routed_update
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


# Copied from model_mod.RoutedKeys
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


# Copied from model_mod.RoutedKVCache
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
