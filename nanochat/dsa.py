"""
DeepSeek Sparse Attention (DSA), the mixer of the attention layers from
--dsa_start_layer on (with --dsa).

Paper: DeepSeek-AI, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek
Sparse Attention" (2025), and its inference code (deepseek-ai/DeepSeek-V3.2-Exp,
inference/model.py, class Indexer). A lightning indexer scores every earlier token s
for each query token t, and attention then reads only the top-k of them:

    q^I_{t,j} = W_q x_t (head j of H_I, d_I dims),  k^I_s = LayerNorm(W_k x_s)   one key for all heads
    rotary on the first d_I / 2 dims of q^I and k^I (the model's tables, their fastest pairs)
    w_{t,j}   = (W_w x_t)_j / sqrt(H_I d_I)
    I_{t,s}   = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s)                           s <= t
    S_t       = TopK_s(I_{t,:}, k)       one set per query token, shared by every head
    u_t       = Attn(q_t, {k_s, v_s : s in S_t})     the others masked out (boolean mask: -inf)

Training (the paper's two stages; base_train --dsa_warmup_steps):
  warm-up: dense attention; only the indexer trains, on
           L^I = sum_t KL(p_t || softmax(I_t)),  p_t = the attention probabilities of query t
           summed over heads and L1-normalised (detached);
  sparse:  top-k attention; the model trains on the LM loss and the indexer on L^I over
           S_t only. The indexer reads x.detach(), so the LM loss never reaches it (the
           selection is a boolean mask, not differentiable) and L^I reaches nothing else.

Our adaptation (nanochat has GQA, not MLA): the selection is per query token and shared
by all query and key/value heads, as DSA on MLA's MQA mode shares it; the indexer's
LayerNorm has no affine parameters; L^I is computed on KL_ROWS evenly spaced query rows
per sequence rather than all of them (the exact probabilities of a row cost a row of
QK^T per head); the attention itself is the exact reference form, a (T, S) boolean
mask into SDPA, O(T^2) memory: correct at any length, fast only at short ones (a sparse
kernel for long contexts is issue 19's item 2, not built). With top_k >= the keys a
query can see (top_k 2048 at a 2048 context) DSA is dense attention exactly.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import CausalSelfAttention, KVCache, apply_rotary_emb, sliding_window_mask

KL_ROWS = 256  # query rows per sequence that the indexer's KL loss uses


class Indexer(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, self.heads, self.dim = config.n_embd, config.dsa_heads, config.dsa_dim
        head_dim = config.n_embd // config.n_head
        if self.dim % 4 or self.dim // 2 > head_dim:
            raise ValueError(f"dsa_dim={self.dim}: must be a multiple of 4 and at most 2 x the head dim ({head_dim})")
        self.wq = nn.Linear(C, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(C, self.dim, bias=False)
        self.ww = nn.Linear(C, self.heads, bias=False)

    @torch.no_grad()
    def init_weights(self):
        bound = math.sqrt(3) / math.sqrt(self.wq.in_features)  # uniform, std 1/sqrt(n_embd)
        for lin in (self.wq, self.wk, self.ww):
            nn.init.uniform_(lin.weight, -bound, bound)

    def opt_tags(self):
        # its own AdamW group: the paper trains the indexer with AdamW at its own lr
        return {"wq.weight": "adamw_dsa", "wk.weight": "adamw_dsa", "ww.weight": "adamw_dsa"}

    def flops_per_token(self, keys):
        """6 per weight, plus the scores q^I . k^I for every key seen (forward and backward)."""
        return 6 * sum(p.numel() for p in self.parameters()) + 6 * self.heads * self.dim * keys

    def _rope(self, x, ctx):
        r = self.dim // 2  # rotary on the first half of the dims, with the tables' r/2 fastest pairs
        cos, sin = ctx.cos[..., :r // 2], ctx.sin[..., :r // 2]
        return torch.cat([apply_rotary_emb(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def keys(self, x, ctx):
        """k^I (B, T, d_I) of x (B, T, C)."""
        k = F.layer_norm(self.wk(x), (self.dim,))
        return self._rope(k.unsqueeze(2), ctx).squeeze(2)

    def scores(self, x, ctx, keys):
        """I (B, T, S) in fp32 of the queries x (B, T, C) against keys (B, S, d_I)."""
        B, T, _ = x.shape
        q = self._rope(self.wq(x).view(B, T, self.heads, self.dim), ctx)
        w = self.ww(x)
        with torch.autocast(x.device.type, enabled=False):  # fp32: the top-k and the KL read these
            s = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
            return torch.einsum("bths,bth->bts", s, w.float() / math.sqrt(self.heads * self.dim))


class SparseAttention(CausalSelfAttention):
    """Causal self-attention whose keys are chosen per query by the lightning indexer.
    ctx.dsa_stage: "warmup" (dense attention, only the indexer's loss) or "sparse"."""

    def __init__(self, config, layer_idx, spec):
        super().__init__(config, layer_idx, spec)
        self.indexer = Indexer(config)
        self.top_k = config.dsa_top_k
        if self.top_k < 1:
            raise ValueError(f"dsa_top_k={self.top_k}: must be a positive number of keys")

    def flops_per_token(self, T):
        keys = min(self.window, T)
        indexer = sum(p.numel() for p in self.indexer.parameters())
        return super().flops_per_token(T) - 6 * indexer + self.indexer.flops_per_token(keys)

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        xd = x.detach()  # the indexer learns from its own loss only, and the LM loss never reaches it
        ik = self.indexer.keys(xd, ctx)
        if cache is not None:
            ik = cache.write_index(ik, ctx)
        S = ik.size(1)
        visible = self.visible(T, S, ctx)                                  # (1, T, S) bool
        sparse = ctx.dsa_stage != "warmup" and self.top_k < min(S, self.window)  # else all visible keys
        train = self.training and cache is None  # the indexer's loss is a training-time loss
        scores = self.indexer.scores(xd, ctx, ik).masked_fill(~visible, float("-inf")) if sparse or train else None
        chosen = visible
        if sparse:
            # a stable sort, not topk: ties (ReLU makes many scores exactly 0) then go to the earlier
            # key whatever the row's length, so a cached decode chooses what the full forward does
            top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :self.top_k]
            # a row that sees fewer than k keys gets -inf (invisible) ones in its top-k: drop them
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & visible
        q, k, v = self.project(x, ctx)
        if cache is not None:
            k, v = self.cached(k, v, ctx, cache)
        if sparse:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=chosen.unsqueeze(1),
                                               enable_gqa=self.n_head != self.n_kv_head)
        else:
            y = self.attend(q, k, v, ctx)  # dense: the same kernels as plain attention
        if train:
            ctx.aux_losses.append(self.indexer_loss(q, k, scores, chosen))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def visible(self, T, S, ctx):
        """(1, T, S): the keys each query may see (causal, within the window)."""
        if ctx.decode_masks is not None:  # static decode: one query over the whole cache
            return ctx.decode_masks[self.window].view(1, 1, S)
        return sliding_window_mask(T, S, ctx.pos0, self.window, ctx.cos.device).unsqueeze(0)

    def indexer_loss(self, q, k, scores, allowed):
        """L^I: the mean over KL_ROWS evenly spaced query rows of KL(p_t || softmax(I_t)) over
        the allowed keys (warm-up: every visible key; sparse stage: the chosen ones)."""
        B, _, T, D = q.shape
        rows = torch.linspace(0, T - 1, min(KL_ROWS, T), device=q.device).round().long()
        allowed = allowed.expand(B, -1, -1)[:, rows]                       # (B, R, S)
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            kk = k.float().repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            logits = q[:, :, rows].float() @ kk.transpose(-1, -2) / math.sqrt(D)   # SDPA's scale
            p = logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1).sum(1)
            p = p / p.sum(-1, keepdim=True)
        log_q = scores[:, rows].masked_fill(~allowed, float("-inf")).log_softmax(-1)
        kl = torch.where(allowed, p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
        return kl.mean()

    def init_cache(self, batch_size, max_len, device, dtype):
        return DSACache(batch_size, self.n_kv_head, max_len, self.head_dim, self.indexer.dim, device, dtype)


class DSACache(KVCache):
    """The KV cache plus the indexer's keys k^I (B, max_len, d_I), position-indexed like k and v."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, index_dim, device, dtype):
        super().__init__(batch_size, n_kv_head, max_len, head_dim, device, dtype)
        self.ik = torch.zeros(batch_size, max_len, index_dim, device=device, dtype=dtype)

    def write_index(self, ik, ctx):
        if ctx.pos_t is not None:  # static decode: the whole cache, fixed shapes
            self.ik.index_copy_(1, ctx.pos_t.view(1), ik.to(self.ik.dtype))
            return self.ik.to(ik.dtype)
        end = ctx.pos0 + ik.size(1)
        if end > self.ik.size(1):
            raise ValueError(f"DSA index cache of {self.ik.size(1)} positions is full (need {end})")
        self.ik[:, ctx.pos0:end] = ik
        return self.ik[:, :end].to(ik.dtype)

    def repeat(self, n):
        super().repeat(n)
        self.ik = self.ik.repeat(n, 1, 1)
