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
QK^T per head). With top_k >= the keys a query can see (top_k 2048 at a 2048 context)
DSA is dense attention exactly.

Two paths, the same selection (ctx.dsa_kernel; base_train --dsa_kernel):
  "mask": the exact reference: I as a (T, S) matrix, a stable sort, a (T, S) boolean mask
          into SDPA. O(T^2) memory: 64K context would need 16 GiB per score matrix.
  "flex": the long-context path, never T x T. The indexer scores CHUNK query rows at a time
          against the keys they can see (O(chunk x S)); each chunk's top-k is the same set
          the stable sort picks (topk's k-th value, then the ties equal to it in key order)
          and is packed into a per-query bitmask, (B, T, S/32) int32 (512 MiB at
          T = S = 65,536). flex_attention
          (torch.nn.attention.flex_attention) reads it in a mask_mod and gets a BlockMask of
          the 128 x 128 blocks that hold any chosen key (blocks where every key is chosen
          skip the mask_mod). The KL loss scores only its KL_ROWS rows: O(rows x S).
  "auto" (default): "mask" below LONG_T query tokens, "flex" from LONG_T on (not on XLA,
          which has no flex_attention). Decoding with a cache takes the reference path.
Why flex_attention and not a Triton gather kernel over the k chosen keys: flex runs eagerly
(unfused, the same math) on the CPU, so its values and gradients are tested here against the
reference (eager flex reads only the mask_mod, not the BlockMask, so the tests check the
BlockMask against the bits on their own; compiled flex on the CPU needs setuptools and a C++
toolchain, not used); compiled on the GPU it is a fused tensor-core kernel that skips
untouched blocks.
A per-token gather is memory-bound in our GQA layout: each gathered key row serves only
n_head / n_kv_head heads (DSA on MLA shares one 576-dim key among 128 heads), so at d20
(10 kv heads, head_dim 128) one layer's forward gathers T * k * 10 * 128 * 2 (K and V) *
2 bytes = 687 GB at T = 65,536, k = 2048: ~140 ms at the H200's 4.8 TB/s, slower than
dense flash attention's forward. flex's cost is the blocks it touches instead, and that
depends on how the chosen keys cluster. A query block of 128 rows at position t sees ~t/128
key blocks; if each row's 2048 keys are spread uniformly over t = 65,536, a key block is
missed by one row with probability (1 - 2048/t)^128 ~ e^-4 and by all 128 rows ~ never,
so every visible block is touched: dense cost plus the mask_mod's. If the keys are local
(each row's 2048 most recent), the block touches ~17-18 key blocks: ~15x fewer than the
~256 of an average causal row at 64K. A trained indexer lies between; issue 19's 3x target
needs a query block to touch under ~1/4 of its visible blocks (flex on full causal ran 1.4x
slower than cuDNN SDPA at T = 2048 on an H100, docs/benchmarks.md), plus the indexer's own
cost (its scores, O(T^2 H_I d_I), and the top-k). Measured on an H200 (dev/dsa_bench.py,
docs/benchmarks.md): at 64K, flex is 6.5x faster than dense attention on clustered choices
and 5.9x slower on spread ones, and this selection (chunked scores + torch.topk) took 432 ms,
6.5x dense attention; 131 ms once each chunk scored only the keys it can see (half the work)
with the scores from one Triton kernel on NVIDIA GPUs under TF32 (nanochat/dsa_triton.py;
PyTorch's scores: 207 ms); 59 ms with the bits from the k-th value by a second kernel
(PyTorch's scores and bits: 188 ms in the same run), of which torch.topk ~31 ms. The selection is one custom op (nanochat::dsa_select):
torch.compile neither unrolls its loop nor breaks the graph at it, and gradient
checkpointing saves its bits instead of running it again (GPT.run_block).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import CausalSelfAttention, KVCache, apply_rotary_emb, flex_attention, sliding_window_mask

KL_ROWS = 256  # query rows per sequence that the indexer's KL loss uses
KERNELS = ("auto", "mask", "flex")  # --dsa_kernel (see the module docstring)
LONG_T = 8192  # "auto": the flex path from this many query tokens on
CHUNK = 2 ** 28  # flex path: indexer scores (rows x keys x heads) per query chunk, 1 GiB of fp32
BLOCK = 128  # flex_attention's block size


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

    def queries(self, x, ctx):
        """q^I (B, T, H_I, d_I) and the head weights w (B, T, H_I) of x (B, T, C)."""
        B, T, _ = x.shape
        return self._rope(self.wq(x).view(B, T, self.heads, self.dim), ctx), self.ww(x)

    def scores(self, q, w, keys):
        """I (B, T, S) in fp32 of the queries q, w (from queries(), any rows) against keys (B, S, d_I)."""
        return index_scores(q, w, keys)


def index_scores(q, w, keys):
    """I (B, T, S) in fp32 of q (B, T, H_I, d_I) and w (B, T, H_I) against keys (B, S, d_I)."""
    with torch.autocast(q.device.type, enabled=False):  # fp32: the top-k and the KL read these
        s = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
        return torch.einsum("bths,bth->bts", s, w.float() / math.sqrt(q.size(2) * q.size(3)))


def top_k_mask(scores, visible, k):
    """(B, t, S) bool: the k best visible keys of each row, ties to the earlier key; the set the
    reference's stable sort picks, without sorting: everything above the k-th value, then the
    keys equal to it in key order until k are chosen. (The long-context path calls it only for
    the rows that need the running count: top_k_chosen.)"""
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above, tie = scores > kth, scores == kth
    room = k - above.sum(-1, keepdim=True)
    return (above | (tie & (tie.cumsum(-1) <= room))) & visible


def top_k_chosen(scores, k):
    """top_k_mask(scores, scores > -inf, k) (invisible keys at -inf) in fewer passes over the
    scores: every key at or above the k-th value (a row that sees fewer than k keys: all it
    sees), then, in the rows with more ties at the k-th value than places, top_k_mask's
    earliest ties. (|above| < k, so a row chose more than k keys iff it has too many ties.)"""
    kth = scores.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    chosen = scores >= kth.clamp_min(torch.finfo(scores.dtype).min)
    over = (chosen.sum(-1) > k).flatten()
    if over.any():
        rows = over.nonzero().squeeze(1)
        s = scores.reshape(-1, scores.size(-1))[rows]
        chosen.view(-1, chosen.size(-1))[rows] = top_k_mask(s, s > float("-inf"), k)
    return chosen


def pack_bits(mask):
    """(..., S) bool -> (..., ceil(S / 32)) int32: bit j of word i says key 32 i + j. Built as
    bytes (one byte a key on the way, not an int32), read as little-endian int32 words."""
    mask = F.pad(mask, (0, -mask.size(-1) % 32))
    shift = torch.arange(8, dtype=torch.uint8, device=mask.device)
    packed = (mask.view(*mask.shape[:-1], -1, 8).to(torch.uint8) << shift).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int32)


def unpack_bits(words, S):
    """pack_bits' inverse: (..., W) int32 -> (..., S) bool."""
    shift = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shift) & 1).bool().flatten(-2)[..., :S]


def block_mask_of(bits, S, block=BLOCK):
    """flex_attention's BlockMask for the packed selection bits (B, T, W): a block of `block`
    queries x `block` keys (a multiple of 32) is computed iff it holds a chosen key, without the
    mask_mod iff all its keys are chosen for all its queries."""
    from torch.nn.attention.flex_attention import BlockMask
    B, T, W = bits.shape
    nq, nk, wpb = -(-T // block), -(-S // block), block // 32
    if (nq * block, nk * wpb) != (T, W):
        bits = F.pad(bits, (0, nk * wpb - W, 0, nq * block - T))
    words = bits.view(B, nq, block, nk, wpb)
    full = (words == -1).all(4).all(2)                    # (B, nq, nk); the padding is never -1
    partial = (words != 0).any(4).any(2) & ~full

    def listed(blocks):  # (B, 1, nq) counts and (B, 1, nq, nk) the block indices first
        return (blocks.sum(-1, dtype=torch.int32)[:, None],
                blocks.int().argsort(dim=-1, descending=True, stable=True).int()[:, None])

    def mask_mod(b, h, q, k):
        return ((bits[b, q, k // 32] >> (k % 32)) & 1) == 1
    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, S))


def flex_options(q):
    """flex_attention's forward blocks for the selection's mask: inductor's H100 default for
    16-bit head_dim 64 (128 x 128 keys, 3 stages) plus the mask's reads of the bits asks for
    240 KiB of shared memory, over the H200's 227 KiB ("No valid triton configs", 2026-11-30);
    128 x 64 is its default at head_dim 128, which fits."""
    return {"fwd_BLOCK_N": 64} if q.dtype != torch.float32 and q.size(-1) <= 64 else None


TRITON_DEVICES = {"cuda"}  # where select_packed scores with nanochat/dsa_triton.py (tests add "cpu": the interpreter)
TRITON_IEEE = False  # and under IEEE fp32 matmuls too (torch's default precision; tests set it)


def triton_kernels_on(device):
    """nanochat/dsa_triton.py (masked_scores, chosen_bits) where it runs (an NVIDIA GPU) and
    pays, else None (the PyTorch forms). It pays with TF32 dots, training's precision
    (common.compute_init): at 64K its scores took 10 ms against ~50 ms of cuBLAS and
    elementwise kernels; with IEEE fp32 dots (no tensor cores) 789 ms, 4x slower than
    PyTorch's whole selection (H200, 2026-12-01, dev/dsa_bench.py)."""
    tf32 = getattr(torch.backends.cuda.matmul, "fp32_precision", "") == "tf32"
    if device.type not in TRITON_DEVICES or torch.version.hip or not (tf32 or TRITON_IEEE):
        return None
    try:
        import nanochat.dsa_triton as kernels
    except ImportError:  # no Triton here
        return None
    return kernels


@torch.library.custom_op("nanochat::dsa_select", mutates_args=())
def select_packed(iq: torch.Tensor, iw: torch.Tensor, ik: torch.Tensor, top_k: int, window: int) -> torch.Tensor:
    """The top_k keys of every query within `window` as bits (B, T, ceil(S / 32)) int32, scored
    CHUNK // (S H_I) query rows at a time: the same sets as the reference's stable sort
    (queries at positions 0..T-1: no cache).
    A custom op, so that torch.compile sees one opaque node: no loop to unroll and no graph
    break (a break inside a checkpointed block runs the whole block eagerly)."""
    B, T, H = iw.shape
    S = ik.size(1)
    if S != T:
        raise ValueError(f"select_packed: {T} queries against {S} keys; it scores a whole sequence (no cache)")
    bits = torch.zeros(B, T, -(-S // 32), dtype=torch.int32, device=iq.device)
    kernels = triton_kernels_on(iq.device)
    step = max(1, CHUNK // (S * H))
    for a in range(0, T, step):
        b = min(T, a + step)
        # rows a..b-1 see keys lo..b-1 at most (causal, the window): score only those (half of
        # the T x S work at full context); lo on a word boundary, the bits left of it stay 0
        lo = max(0, a - window + 1) // 32 * 32
        out = bits[:, a:b, lo // 32:lo // 32 + -(-(b - lo) // 32)]
        if b - lo <= top_k:  # every visible key is chosen
            out.copy_(pack_bits(sliding_window_mask(b - a, b - lo, a - lo, window, iq.device)))
        elif kernels is not None:  # scores, then top-k (torch.topk) and bits: nanochat/dsa_triton.py
            kernels.chosen_bits(kernels.masked_scores(iq[:, a:b], iw[:, a:b], ik[:, lo:b], a, lo, window), top_k, out)
        else:
            visible = sliding_window_mask(b - a, b - lo, a - lo, window, iq.device)
            scores = index_scores(iq[:, a:b], iw[:, a:b], ik[:, lo:b]).masked_fill(~visible, float("-inf"))
            out.copy_(pack_bits(top_k_chosen(scores, top_k)))
    return bits


@select_packed.register_fake
def _(iq, iw, ik, top_k, window):
    return iq.new_empty(iq.size(0), iq.size(1), -(-ik.size(1) // 32), dtype=torch.int32)


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
        iq, iw = self.indexer.queries(xd, ctx)
        sparse = ctx.dsa_stage != "warmup" and self.top_k < min(S, self.window)  # else all visible keys
        train = self.training and cache is None  # the indexer's loss is a training-time loss
        rows = torch.linspace(0, T - 1, min(KL_ROWS, T), device=x.device).round().long() if train else None
        q, k, v = self.project(x, ctx)
        if cache is not None:
            k, v = self.cached(k, v, ctx, cache)
        gqa = self.n_head != self.n_kv_head
        auto = ctx.dsa_kernel == "auto" and T >= LONG_T and x.device.type != "xla"  # XLA has no flex_attention
        if cache is None and (ctx.dsa_kernel == "flex" or auto):
            # the long-context path: nothing T x T (see the module docstring)
            bits = self.select_packed(iq, iw, ik) if sparse else None
            y = flex_attention(q, k, v, block_mask_of(bits, S), gqa, flex_options(q)) if sparse else self.attend(q, k, v, ctx)
            if train:
                scores = self.indexer.scores(iq[:, rows], iw[:, rows], ik)
                allowed = unpack_bits(bits[:, rows], S) if sparse else self.visible_rows(rows, S)
        else:  # the exact reference: (T, S) scores and mask
            visible = self.visible(T, S, ctx)                              # (1, T, S) bool
            scores = self.indexer.scores(iq, iw, ik).masked_fill(~visible, float("-inf")) if sparse or train else None
            chosen = visible
            if sparse:
                # a stable sort, not topk: ties (ReLU makes many scores exactly 0) then go to the earlier
                # key whatever the row's length, so a cached decode chooses what the full forward does
                top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :self.top_k]
                # a row that sees fewer than k keys gets -inf (invisible) ones in its top-k: drop them
                chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & visible
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=chosen.unsqueeze(1), enable_gqa=gqa)
            else:
                y = self.attend(q, k, v, ctx, None if cache is None else cache.counts)  # dense: as plain attention
            if train:
                scores, allowed = scores[:, rows], chosen.expand(B, -1, -1)[:, rows]
        if train:
            ctx.aux_losses.append(self.indexer_loss(q, k, rows, scores, allowed))
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def select_packed(self, iq, iw, ik):
        """The chosen keys of every query as bits (B, T, ceil(S / 32)) int32 (select_packed below)."""
        return select_packed(iq.detach(), iw.detach(), ik.detach(), self.top_k, self.window)

    def visible(self, T, S, ctx):
        """(1, T, S): the keys each query may see (causal, within the window)."""
        if ctx.decode_masks is not None:  # static decode: one query over the whole cache
            return ctx.decode_masks[self.window].view(-1, 1, S)  # (1 or B, 1, S)
        return sliding_window_mask(T, S, ctx.pos0, self.window, ctx.cos.device).unsqueeze(0)

    def visible_rows(self, rows, S):
        """(1, R, S): visible() of the query rows `rows` alone (no cache)."""
        kpos = torch.arange(S, device=rows.device)
        return ((kpos <= rows[:, None]) & (rows[:, None] - kpos < self.window)).unsqueeze(0)

    def indexer_loss(self, q, k, rows, scores, allowed):
        """L^I: the mean over the query rows `rows` (KL_ROWS evenly spaced) of KL(p_t || softmax(I_t))
        over the allowed keys (warm-up: every visible key; sparse stage: the chosen ones).
        scores (B, R, S) and allowed (B or 1, R, S) are those rows'."""
        B, _, T, D = q.shape
        allowed = allowed.expand(B, -1, -1)
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            kk = k.float().repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            logits = q[:, :, rows].float() @ kk.transpose(-1, -2) / math.sqrt(D)   # SDPA's scale
            p = logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1).sum(1)
            p = p / p.sum(-1, keepdim=True)
        log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
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
        if ctx.pos_t is not None and ctx.pos_t.dim() == 1:  # static decode, each row at its own position
            self.ik[torch.arange(ik.size(0), device=ik.device), ctx.pos_t] = ik[:, 0].to(self.ik.dtype)
            return self.ik.to(ik.dtype)
        if ctx.pos_t is not None:  # static decode: the whole cache, fixed shapes
            self.ik.index_copy_(1, ctx.pos_t.view(1), ik.to(self.ik.dtype))
            return self.ik.to(ik.dtype)
        end = ctx.pos0 + ik.size(1)
        if end > self.ik.size(1):
            raise ValueError(f"DSA index cache of {self.ik.size(1)} positions is full (need {end})")
        self.ik[:, ctx.pos0:end] = ik
        return self.ik[:, :end].to(ik.dtype)

    def tensors(self):
        return super().tensors() + [self.ik]
