"""
Engram: conditional memory by hashed n-gram lookup, a per-layer extra on the residual
stream (layers named by --engram_layers).

Paper: Cheng et al. (PKU & DeepSeek-AI), "Conditional Memory via Scalable Lookup: A New
Axis of Sparsity for Large Language Models" (arXiv:2601.07372, 2026); as its demo code
defines it (deepseek-ai/Engram, engram_demo_v1.py). At position t of layer l, with token
ids x and the residual stream h_t (n_embd = C):

    suffix n-grams:  (x_t, x_{t-1}, ..., x_{t-n+1}) for n = 2..N (N = --engram_order, 3);
                     positions before the sequence start read PAD
    hash:            mix_n = (x_t m_0) XOR (x_{t-1} m_1) XOR ... XOR (x_{t-n+1} m_{n-1}), with odd
                     multipliers m_k = 2 r_k + 1, r_k drawn per layer from numpy's
                     default_rng(seed + 10007 l) below int64max / V / 2 (so products never overflow)
    heads:           idx_{n,j} = mix_n mod p_{l,n,j} for K heads j; the p are distinct primes
                     (across every layer, order and head) at or above the table size M
    memory:          e_t = concat_{n,j} E[offset_{n,j} + idx_{n,j}]      (one flat table; d/K dims per head)
    gate:            k = RMSNorm_w(W_K e_t), q = RMSNorm_w(h_t), s = q.k / sqrt(C),
                     g = sigmoid(sign(s) sqrt(max(|s|, 1e-6)))
    value:           u_t = g W_V e_t
    short conv:      o = u + SiLU(DepthwiseConv1d_causal(RMSNorm_w(u)))   kernel 4, dilation N, init 0
    residual:        h_t <- h_t + o_t, before the layer's mixer

Our choices, where the demo differs or says nothing: no tokenizer compression (the demo
first maps token ids to a normalized, lowercased vocabulary; for C++ that would merge
identifiers that differ by case, so ids are used as they are); no biases on W_K and W_V
(nanochat has none anywhere); under mHC the lookup, k and W_V e are computed once and every
stream gets its own gate and conv input, with all weights shared (the demo has a key
projection, norms and conv weights per stream); the tables start at N(0, 1) like wte and train with the embedding's AdamW group; PAD is the
id vocab_size (no real token has it). Sizes default to the notes' advice for d12-d20
models: M = vocab size rows per head, K = 4, d = 256 per n-gram order.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED = 0


def next_primes(start, count, used):
    """The first `count` primes >= start that are not in `used` (which they join)."""
    out, n = [], max(start, 2)
    while len(out) < count:
        if n not in used and all(n % d for d in range(2, int(math.isqrt(n)) + 1)):
            out.append(n)
            used.add(n)
        n += 1
    return out


def layer_hash_params(layers, order, heads, table, vocab):
    """{layer: (multipliers (order,), primes (order - 1, heads))}: per-layer odd multipliers
    and distinct primes for every layer, order and head (as the demo assigns them)."""
    used, params = set(), {}
    bound = np.iinfo(np.int64).max // (vocab + 1) // 2  # +1: the PAD id
    for layer in layers:
        rng = np.random.default_rng(SEED + 10007 * layer)
        mult = 2 * rng.integers(0, bound, size=order, dtype=np.int64) + 1
        primes = [next_primes(table, heads, used) for _ in range(order - 1)]
        params[layer] = (mult, np.array(primes, dtype=np.int64))
    return params


def ngram_hashes(ids, mult, primes, pad):
    """ids (B, T) int64 -> (B, T, (order - 1) * heads) table rows (before the offsets):
    idx_{n,j} = mix_n mod p_{n,j}, mix_n the XOR of ids shifted by k times m_k, k < n.
    mult (order,) and primes (order - 1, heads): int64 tensors on ids' device."""
    mix, out = None, []
    for k in range(mult.numel()):
        shifted = F.pad(ids, (k, 0), value=pad)[:, :ids.size(1)]  # x_{t-k}, PAD before the start
        term = shifted * mult[k]
        mix = term if mix is None else mix ^ term
        if k >= 1:  # n = k + 1 >= 2
            out.append(torch.remainder(mix[..., None], primes[k - 1]))
    return torch.cat(out, dim=-1)


class Engram(nn.Module):
    def __init__(self, config, layer_idx, hash_params):
        super().__init__()
        C = config.n_embd
        self.order, self.heads, self.dim = config.engram_order, config.engram_heads, config.engram_dim
        if self.order < 2 or self.dim % self.heads:
            raise ValueError(f"Engram: engram_order ({self.order}) must be >= 2 and engram_dim ({self.dim}) "
                             f"divide by engram_heads ({self.heads})")
        self.pad, self.kernel = config.vocab_size, 4
        mult, primes = hash_params
        sizes = primes.reshape(-1)
        # the hash constants as buffers (set again by init_weights: built on meta they hold nothing)
        self._host = (mult, primes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
        for name, value in zip(("mult", "primes", "offsets"), self._host):
            self.register_buffer(name, torch.empty(value.shape, dtype=torch.long), persistent=False)
        d_e = (self.order - 1) * self.dim
        self.table = nn.Embedding(int(sizes.sum()), self.dim // self.heads)
        self.w_k = nn.Linear(d_e, C, bias=False)
        self.w_v = nn.Linear(d_e, C, bias=False)
        self.k_norm = nn.Parameter(torch.empty(C))
        self.q_norm = nn.Parameter(torch.empty(C))
        self.u_norm = nn.Parameter(torch.empty(C))
        self.conv = nn.Parameter(torch.empty(C, 1, self.kernel))  # depthwise, dilation = order

    @torch.no_grad()
    def init_weights(self):
        """Tables N(0, 1) like wte; W_K and W_V uniform with std 1/sqrt(fan_in); norm weights 1;
        the conv zero, so o = u at first (the demo's identity-preserving init)."""
        nn.init.normal_(self.table.weight)
        for lin in (self.w_k, self.w_v):
            bound = math.sqrt(3) / math.sqrt(lin.in_features)
            nn.init.uniform_(lin.weight, -bound, bound)
        for w in (self.k_norm, self.q_norm, self.u_norm):
            nn.init.ones_(w)
        nn.init.zeros_(self.conv)
        for name, value in zip(("mult", "primes", "offsets"), self._host):
            getattr(self, name).copy_(torch.from_numpy(value))

    def opt_tags(self):
        return {"table.weight": "adamw_embedding", "w_k.weight": "muon", "w_v.weight": "muon",
                "k_norm": "adamw_ssm", "q_norm": "adamw_ssm", "u_norm": "adamw_ssm", "conv": "adamw_ssm"}

    def flops_per_token(self, streams=1):
        """6 per weight of W_K and W_V, and of the conv per mHC stream (the table is a lookup)."""
        return 6 * (self.w_k.weight.numel() + self.w_v.weight.numel() + streams * self.conv.numel())

    def init_cache(self, batch_size, device, dtype, streams=1):
        return EngramCache(batch_size, streams, self.order - 1, (self.kernel - 1) * self.order, self.u_norm.numel(),
                           self.pad, device, dtype)

    def forward(self, h, idx, cache=None):
        """h (B, T, C) the residual stream, idx (B, T) its token ids -> o (B, T, C)."""
        return self.mix(h, *self.lookup(idx, h.dtype, cache), cache)

    def lookup(self, idx, dtype, cache=None):
        """The part that depends only on the token ids: k = RMSNorm_w(W_K e) and W_V e, each
        (B, T, C). Under mHC it is computed once and shared by every stream."""
        T, C = idx.size(1), self.k_norm.numel()
        ids = idx if cache is None else torch.cat([cache.ids, idx], dim=1)
        rows = ngram_hashes(ids, self.mult, self.primes, self.pad)[:, -T:] + self.offsets
        e = self.table(rows).flatten(-2).to(dtype)                            # (B, T, d_e)
        if cache is not None:  # in place: the CUDA-graph decode step holds these tensors
            cache.ids.copy_(ids[:, -(self.order - 1):])
        return F.rms_norm(self.w_k(e), (C,), self.k_norm.to(dtype)), self.w_v(e)

    def mix(self, h, k, v, cache=None):
        """The part that depends on the stream h (B', T, C): gate, value, short conv. k and v
        have h's rows (B' = B * streams under mHC, streams repeated per batch row)."""
        B, T, C = h.shape
        q = F.rms_norm(h, (C,), self.q_norm.to(h.dtype))
        s = (q * k).sum(-1, keepdim=True).float() / math.sqrt(C)
        g = torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt()).to(h.dtype)
        u = g * v
        un = F.rms_norm(u, (C,), self.u_norm.to(u.dtype))
        reach = (self.kernel - 1) * self.order  # the conv sees this many earlier positions
        past = un.new_zeros(B, reach, C) if cache is None else cache.conv.to(un.dtype)
        full = torch.cat([past, un], dim=1).transpose(1, 2)                # (B', C, reach + T)
        conv = F.conv1d(full, self.conv.to(un.dtype), groups=C, dilation=self.order).transpose(1, 2)
        if cache is not None:
            cache.conv.copy_(torch.cat([past, un], dim=1)[:, -reach:])
        return u + F.silu(conv)


class EngramCache:
    """An Engram layer's decoding state: the last order-1 token ids (PAD before the start),
    one row per sequence, and the last (kernel-1)*order normed conv inputs, one row per
    sequence and mHC stream (b * streams + s). Not position-indexed: snapshot/restore copy it."""

    def __init__(self, batch_size, streams, n_ids, reach, C, pad, device, dtype):
        self.ids = torch.full((batch_size, n_ids), pad, dtype=torch.long, device=device)
        self.conv = torch.zeros(batch_size * streams, reach, C, device=device, dtype=dtype)

    def tensors(self):
        return [self.ids, self.conv]

    def snapshot(self):
        return self.ids.clone(), self.conv.clone()

    def restore(self, snap):
        self.ids.copy_(snap[0])
        self.conv.copy_(snap[1])
