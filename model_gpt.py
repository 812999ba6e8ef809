"""
GPT: the dense baseline every dynamic architecture in this repo is compared with.

A modern pre-norm decoder in the Qwen2.5 / Llama style:

    x = embedding[idx]                                  no position table: RoPE inside attention
    repeat n_layer times:
        x = x + Attention(RMSNorm(x))                   causal softmax attention, RoPE, grouped KV heads
        x = x + MLP(RMSNorm(x))                         SwiGLU
    logits = RMSNorm(x) @ embedding^T                   LM head tied to the embedding

RMSNorm, the rotary embedding, the attention and the SwiGLU MLP below are the pieces the other model
files copy (marked "# Copied from model_gpt.<Name>", kept identical by a test, gathered in one section
at the end of each file; what they change is marked "# Adapted from model_gpt.<Name>: ..."), so a
reader who understands this file can read the others as "GPT plus one idea".

Incremental decoding. init_cache(B) and forward_cached(idx, cache) give a sampler the same logits as
the full eval forward without recomputing the prefix: every layer keeps the keys and values of the
tokens seen so far in a KVCache preallocated for block_size positions, and the next tokens attend
over them, with RoPE at their true positions (the standard KV cache of autoregressive transformers,
e.g. Pope et al., "Efficiently Scaling Transformer Inference", 2022).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 65          # set by train.py from the dataset's tokenizer
    block_size: int = 64          # training context length (RoPE itself has no limit)
    n_layer: int = 4
    n_head: int = 4               # query heads H
    n_kv_head: int = 2            # key/value heads G; each serves H/G query heads (GQA)
    n_embd: int = 128             # d
    intermediate_size: int = 384  # SwiGLU width I = 3d at laptop size (Qwen2.5: ~5.4d)
    rope_theta: float = 1e6       # Qwen2.5's RoPE base
    norm_eps: float = 1e-6
    qkv_bias: bool = True         # Qwen2 puts biases on q, k, v (none on the output projection)
    dropout: float = 0.0
    init_std: float = 0.02


# Published shapes. vocab_size is left out on purpose: train.py takes it from the dataset
# (50304 = GPT-2's BPE padded to a multiple of 64; Qwen's own tokenizer has 151,936).
PRESETS = {
    # GPT-2 small's shape in this block. SwiGLU width 2048 = 8/3 d gives the MLP the parameters of
    # GPT-2's 4d GELU MLP; plain multi-head attention, RoPE base 1e4.
    "gpt2-124m": dict(block_size=1024, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                      intermediate_size=2048, rope_theta=1e4),
    # Qwen2.5-0.5B as published (it handles 32768 positions; 1024 is a sensible training context).
    "qwen2.5-0.5b": dict(block_size=1024, n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                         intermediate_size=4864, rope_theta=1e6),
}


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the gain."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


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


def apply_rope(x, cos, sin):
    """Rotate x (..., hd) by position: x*cos + rotate_half(x)*sin, rotate_half([a,b]) = [-b,a], with
    cos and sin shaped to broadcast over x's head axis (x (B, T, heads, hd): cos (T, 1, hd))."""
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-b, a], dim=-1) * sin.to(x.dtype)


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


def check_heads(config):
    """The attention shapes RoPE and grouped KV heads need, checked before any weight is made."""
    if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}) "
                         f"and n_head by n_kv_head ({config.n_kv_head})")
    if (config.n_embd // config.n_head) % 2:
        raise ValueError("the head size n_embd/n_head must be even for RoPE")


class Cache:
    """What incremental decoding carries from one forward_cached call to the next: the number of
    tokens every row has seen and each layer's state (a KVCache)."""

    def __init__(self, layers):
        self.length = 0
        self.layers = layers


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        check_heads(config)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rope = RotaryEmbedding(config.n_embd // config.n_head, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one V x d matrix reads tokens in and out
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # Qwen2's init (initializer_range 0.02): every Linear and the embedding ~ N(0, 0.02), biases 0
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope(torch.arange(T, device=idx.device))  # once per forward, shared by layers
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def init_cache(self, batch_size):
        """An empty cache for batch_size rows: a KVCache of block_size positions per layer."""
        return Cache([KVCache(self.config.block_size) for _ in self.blocks])

    @torch.inference_mode()
    def forward_cached(self, idx, cache):
        """idx (B, t): the next t >= 1 tokens of each row after those the cache holds. Returns logits
        (B, t, V) and updates the cache in place. Always the eval-mode computation, whatever
        self.training is: the same logits as the full eval forward, position by position.
        inference_mode rather than no_grad also skips autograd's per-tensor bookkeeping (version
        counters, view tracking), about a tenth of a step at the laptop size; the cache and logits
        it makes cannot be saved for a backward pass, which a sampler never needs."""
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
                x = block(x, cos, sin, cache=layer_cache)
            cache.length += t
            return self.lm_head(self.norm_f(x))
        finally:
            if was_training:
                self.train()

    def stats(self):
        return {}  # a dense model has no routing or sparsity to report

    def flops_per_token(self):
        # nanoGPT's accounting: 6 FLOPs per parameter per token for forward+backward (the tied
        # matrix counts once: the head is a matmul, the embedding lookup is free), plus attention
        # scores and read-out, 2 * 2 * d * T forward per layer, times 3 for forward+backward
        n_params = sum(p.numel() for p in self.parameters())
        c = self.config
        return 6 * n_params + 12 * c.n_layer * c.n_embd * c.block_size


Model = GPT
