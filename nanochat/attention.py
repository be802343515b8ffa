"""
Causal self-attention, the default sequence mixer, with its masks and KV cache.

- rotary position embeddings (RoPE) on queries and keys, no learned positions;
- QK-norm: RMSNorm on q and k after RoPE, which keeps attention logits bounded
  (optionally times config.qk_scale);
- value embeddings (config.value_embeds, the layers layer_plan marks "value_embed");
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads;
- sliding windows: each layer attends to at most `window` tokens back (the layer spec
  says how many; see gpt.layer_plan).

Kernels (--kernel): "current" = SDPA (flash / cuDNN) for full-context layers and
flex_attention for windowed ones on CUDA training; "flex" = flex_attention for every
layer on CUDA training; "sdpa" = SDPA everywhere, windows as an explicit boolean mask
(no flex, more memory). CPU and decoding always use SDPA with a mask.

Every mixer module (this one, and later Mamba-3, DSA) follows one contract:
    __init__(config, layer_idx, spec)       spec: this layer's gpt.LayerSpec
    forward(x, ctx, cache=None) -> (B, T, C)  ctx: the Context shared by all layers
    init_weights()                           initialise ALL own parameters (1-D too)
    opt_tags() -> {param name: group}        optimizer group of each own parameter
    init_cache(batch_size, max_len, device, dtype) -> an object with .tensors() (its state,
                                             batch first), .snapshot() and .restore(snapshot)
    flops_per_token(T)                       training FLOPs per token (fwd + bwd)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = ("current", "flex", "sdpa")
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of x (reference nanochat)


def norm(x):
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


ROW_GEMV = True  # linear's one-row decode products through decode_triton.gemv (engine_bench --gemv=0: not)


def linear(x, layer, ctx=None, relu2=False):
    """layer(x) for an nn.Linear (F.linear for a weight tensor), relu(·)² of it with relu2 (the
    MLP's activation, fused into the kernel below where it runs), except in a batch-1 decode
    step with the Triton decode kernels (ctx from GPT.decode_step with decode_kernel
    "triton", one row, no autograd): there decode_triton.gemv, faster than cuBLAS for one row
    (docs/benchmarks.md). Called with the module, not its weight, so that what swaps a
    layer's forward (nanochat/fp8.py) still runs everywhere else."""
    w = layer if isinstance(layer, torch.Tensor) else layer.weight
    if (ROW_GEMV and ctx is not None and ctx.decode_kernel == "triton" and x.numel() == x.size(-1)
            and not torch.is_grad_enabled()):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if w.dtype == dtype:  # (x in the dtype F.linear would compute in; other weights: F.linear casts them)
            from nanochat.decode_triton import gemv
            return gemv(x, w, relu2)
    y = F.linear(x, w) if isinstance(layer, torch.Tensor) else layer(x)
    return F.relu(y).square() if relu2 else y


def rotary_tables(length, head_dim, base=10000.0, device=None):
    """cos and sin of position * frequency, each (1, length, 1, head_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def rope_base_enough(base, context, head_dim):
    """Whether a rotary base suits a context length by the criterion of Men et al. 2024
    ("Base of RoPE Bounds Context Length", arXiv:2405.14591), as we read it: attention can
    favour a key similar to the query over a random one at distance m only while
    sum_i cos(m theta_i) >= 0 (theta_i = base^(-2i/d)), so that must hold at every distance
    up to the context. Computed exactly for the given head dim; not monotone in the base
    near the bound, hence suggest_rope_base."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    for start in range(0, context, 65536):  # in slices: a 1M context would be 512 MB at once
        m = torch.arange(start, min(start + 65536, context), dtype=torch.float64)[:, None]
        if (torch.cos(m * theta).sum(1) < 0).any():
            return False
    return True


ROPE_BASES = [c * 10.0 ** e for e in range(4, 10) for c in (1, 2, 5)]


def suggest_rope_base(context, head_dim):
    """The smallest of 1e4, 2e4, 5e4, 1e5, ... 5e9 that suits the context, as does every larger
    one. Head dim 128: 2e4 for 2K tokens, 5e4 for 4K, 2e5 for 8K, 5e5 for 16K, 2e6 for 32K,
    5e6 for 64K (the recipe's 1e5 suits up to 4K)."""
    ok = [rope_base_enough(b, context, head_dim) for b in ROPE_BASES]
    for i, b in enumerate(ROPE_BASES):
        if all(ok[i:]):
            return b
    return None


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x1, x2) = (first half, second half) of each head by position angles."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Context:
    """What one forward pass shares across layers: rotary tables for its positions, the
    position offset (pos0 > 0 when decoding with a cache), and cached attention masks.
    For the static decode step (GPT.decode_step, decode_hidden) the first position is a
    device tensor instead, and decode_masks hold each window's mask over the whole cache.
    idx: the token ids, for mixers that look something up per token."""

    def __init__(self, cos, sin, pos0, T, block_masks, pos_t=None, decode_masks=None, idx=None, dsa_stage="sparse",
                 flash=None, dsa_kernel="auto", decode_kernel="sdpa"):
        self.cos, self.sin, self.pos0, self.T = cos, sin, pos0, T
        self.idx = idx  # (B, T) token ids of this forward, for per-layer lookups (value embeddings)
        self.block_masks = block_masks  # {window: flex_attention BlockMask}, CUDA training only
        self.pos_t, self.decode_masks = pos_t, decode_masks
        self.decode_kernel = decode_kernel  # static decode, one token a row: "sdpa" (the masks) or "triton"
        self.dsa_stage = dsa_stage  # DSA layers (nanochat/dsa.py): "warmup" (dense) or "sparse"
        self.dsa_kernel = dsa_kernel  # DSA layers: one of dsa.KERNELS ("mask" = the T x T reference)
        self.aux_losses = []  # training losses that mixers add (DSA's indexer loss)
        # (q, k, v) -> causal attention of full-context layers from position 0: XLA flash
        # (nanochat/tpu.py), or prefill_attention in inference prefills on CUDA
        self.flash = flash

    def losses_out(self, block):
        """u -> (block(u), *the losses it adds), block run with a copy of this context whose
        aux_losses list is its own: a checkpointed block returns its losses (DSA's indexer
        loss) instead of appending to a list outside it, which neither torch.compile traces
        there nor a reentrant checkpoint (its forward runs without grad) keeps in the graph."""
        def run(u):  # (a new Context, not copy.copy: torch.compile breaks the graph at copy.copy)
            inner = Context(self.cos, self.sin, self.pos0, self.T, self.block_masks, self.pos_t, self.decode_masks,
                            self.idx, self.dsa_stage, self.flash, self.dsa_kernel, self.decode_kernel)
            return (block(u, inner), *inner.aux_losses)
        return run


# Causal SDPA in an inference prefill (a forward with a cache) on CUDA: any backend but cuDNN.
# cuDNN's attention builds an execution plan for each new shape (PyTorch keeps one per shape),
# and a server prefills a new (rows, prompt length) with most requests: on an H200 a prefill
# of a shape not seen before took 56-80 ms, the same shape again 16-21 ms, most likely that
# (docs/benchmarks.md, "Continuous batching", round four). Training keeps SDPA's choice
# (cuDNN: fixed shapes, and 1.6x flash's speed there).
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_attention(q, k, v):
    """Full causal attention for the Context's `flash` slot in inference prefills. The
    backend choice is process-wide state in PyTorch: threads prefilling at once may each run
    a layer with the other's choice (another kernel: speed and bf16 rounding, nothing more)."""
    with sdpa_kernel(PREFILL_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))


def sliding_window_mask(q_len, k_len, pos0, window, device):
    """Boolean (q_len, k_len) mask: query at absolute position pos0+i sees key j
    iff j <= pos0+i and pos0+i-j < window."""
    qpos = torch.arange(pos0, pos0 + q_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    return (kpos <= qpos) & (qpos - kpos < window)


def masked_attention(q, k, v, mask):
    """softmax(q kᵀ / sqrt(D) + mask) v written out, q (B, H, T, D), k and v (B, Hkv, S, D), for
    a few queries over a long cache. SDPA hands T = 2 on an H200 to a cuDNN flash kernel that
    took 44 us a layer against 6 us for T = 1 (it splits the work by queries, not keys); two
    batched matmuls and a softmax take a few, and T = 1 keeps SDPA. A key/value head's g query
    heads and T queries are one matrix's g*T rows, so GQA needs no copy of the cache."""
    B, H, T, D = q.shape
    Hkv, S = k.size(1), k.size(2)
    g = H // Hkv  # query head h reads key/value head h // g, as SDPA's enable_gqa
    qr, kt = q.reshape(B * Hkv, g * T, D), k.reshape(B * Hkv, S, D).transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        s = torch.bmm(qr, kt, out_dtype=torch.float32)  # 16-bit tensor cores, fp32 scores as SDPA's kernels
    else:  # the CPU has no bmm out_dtype: upcast (an fp32 copy of the cache; fp64 stays fp64)
        dt = torch.promote_types(q.dtype, torch.float32)
        s = torch.bmm(qr.to(dt), kt.to(dt))
    s = s.view(B, Hkv, g, T, S) * D ** -0.5
    p = s.masked_fill(~mask.view(1, 1, 1, T, S), float("-inf")).softmax(-1).to(v.dtype)
    return torch.bmm(p.view(B * Hkv, g * T, S), v.reshape(B * Hkv, S, D)).view(B, H, T, D)


def decode_masks(windows, max_len, pos):
    """{window: (R, 1, T, max_len) mask} for T queries at the device positions pos over a whole
    cache: pos (T,) shared by every row (R = 1), or (B, T) each row's own (continuous batching)."""
    kpos = torch.arange(max_len, device=pos.device)
    qpos = pos.view(-1, pos.size(-1), 1)  # (R, T, 1)
    return {w: ((kpos <= qpos) & (qpos - kpos < w)).unsqueeze(1) for w in windows}


def block_masks(windows, T, kernel, device, cache):
    """{window: flex BlockMask} for the layers that flex_attention serves in CUDA training:
    windows shorter than T under "current", every window under "flex", none under "sdpa".
    `cache` is a dict kept by the model, so masks are built once per shape."""
    masks = {}
    if device.type != "cuda" or kernel == "sdpa":
        return masks
    for w in windows:
        if w < T or kernel == "flex":
            key = (T, w, str(device))
            if key not in cache:
                from torch.nn.attention.flex_attention import create_block_mask

                def mask_mod(b, h, q, k, w=w):
                    return (k <= q) & (q - k < w)
                cache[key] = create_block_mask(mask_mod, None, None, T, T, device=device)
            masks[w] = cache[key]
    return masks


_compiled_flex = None


def flex_attention(q, k, v, block_mask, enable_gqa, kernel_options=None):
    """torch's flex_attention, compiled on GPUs even when called eagerly (e.g. inside a block that
    gradient checkpointing runs outside torch.compile): eager flex writes out the (B, H, T, S)
    scores, 160 GiB at T = S = 65,536 and 10 heads. The CPU keeps eager flex (tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as _flex
    if q.is_cuda and not torch.compiler.is_compiling():
        _compiled_flex = _compiled_flex or torch.compile(_flex, dynamic=False)
        _flex = _compiled_flex
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, kernel_options=kernel_options)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, spec):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window, self.layer_idx = spec.window, layer_idx
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head}: "
                             "n_embd must divide by n_head and n_head by n_kv_head")
        C, D = config.n_embd, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(self.n_head * D, C, bias=False)
        self.qk_scale = config.qk_scale
        # value embeddings (ResFormer, Zhou et al. 2024; as in modded-nanogpt and the reference
        # nanochat): a per-layer token table added to v under a per-kv-head gate in (0, 3)
        self.has_ve = "value_embed" in spec.extras
        if self.has_ve:
            from nanochat.gpt import padded_vocab
            self.ve = nn.Embedding(padded_vocab(config), self.n_kv_head * D)
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)
        self.w_qkv = None  # serving: c_q, c_k, c_v's weights as views of one tensor (stack_projections)

    @torch.no_grad()
    def init_weights(self):
        """q, k, v uniform with std 1/sqrt(n_embd); the output projection zero, so the
        layer starts by adding nothing to the residual stream. Value embeddings like c_v;
        their gate weights small and positive, so gates start just above 3 * sigmoid(0)."""
        bound = math.sqrt(3) / math.sqrt(self.c_q.in_features)
        for lin in (self.c_q, self.c_k, self.c_v):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(self.c_proj.weight)
        if self.has_ve:
            nn.init.uniform_(self.ve.weight, -bound, bound)
            nn.init.uniform_(self.ve_gate.weight, 0.0, 0.02)

    def opt_tags(self):
        tags = {f"{name}.weight": "muon" for name in ("c_q", "c_k", "c_v", "c_proj")}
        if self.has_ve:  # the gate is a (tiny) block matrix, Muon's as in the reference
            tags.update({"ve.weight": "adamw_value_embed", "ve_gate.weight": "muon"})
        return tags

    def flops_per_token(self, T):
        """6 per weight (2 forward, 4 backward) plus scores and values: 12 * heads *
        head_dim * keys seen (the window capped at T). Like nanochat (and PaLM's MFU),
        without the causal half-saving. The value-embedding table is a lookup: not counted."""
        weights = sum(p.numel() for n, p in self.named_parameters() if n != "ve.weight")
        return 6 * weights + 12 * self.n_head * self.head_dim * min(self.window, T)

    def forward(self, x, ctx, cache=None):
        return linear(self.heads(*self.project(x, ctx), ctx, cache), self.c_proj, ctx)

    def decode_row(self, x, ctx, cache, mix=None):
        """x' + forward(norm(x')) with x' = r x + a x0 for mix = (r, a, x0) (GPT's lambdas), else
        x' = x, for the one row of a batch-1 decode step with the Triton kernels and
        stacked projections (Block.decode_row): the lambdas and the norm inside the q, k, v gemv,
        the residual add inside c_proj's."""
        from nanochat.decode_triton import gemv, gemv_norm
        qkv, h, x = gemv_norm(x, self.w_qkv, mix)
        y = self.heads(*self.project(h, ctx, qkv), ctx, cache)
        return gemv(y, self.c_proj.weight, residual=x)

    def heads(self, q, k, v, ctx, cache):
        """Attention of q over k and v (and the cache's) -> (B, T, n_head * head_dim)."""
        B, _, T, _ = q.shape
        y = None
        if cache is not None and T == 1 and ctx.decode_masks is not None and ctx.decode_kernel == "triton":
            from nanochat import decode_triton
            if decode_triton.writes_new(B * self.n_kv_head, cache.k.size(2), q.device):
                # a static decode step: the Triton kernel writes this step's k and v into the cache itself
                y = decode_triton.decode_attention(q, cache.k, cache.v, ctx.pos_t, self.window, cache.counts, k, v)
        if y is None:
            if cache is not None:
                k, v = self.cached(k, v, ctx, cache)
            y = self.attend(q, k, v, ctx, None if cache is None else cache.counts)
        return y.transpose(1, 2).reshape(B, T, -1)

    @torch.no_grad()
    def stack_projections(self):
        """For serving: c_q, c_k and c_v's weights become views of one stacked tensor, w_qkv,
        which forwards without autograd multiply by once (one matmul, not three: a decode step
        at batch 1 is bound by its kernel launches). No copy is kept, so the three weights and
        w_qkv are the same numbers whatever changes them in place; assigning a new tensor to a
        weight unlinks them (GPT.linears_to stacks again). Training never uses w_qkv."""
        lins = (self.c_q, self.c_k, self.c_v)
        self.w_qkv = torch.cat([lin.weight for lin in lins])
        for lin, part in zip(lins, self.w_qkv.split([lin.out_features for lin in lins])):
            lin.weight.data = part

    def project(self, x, ctx, qkv=None):
        """q (B, n_head, T, D), k and v (B, n_kv_head, T, D) of x (B, T, C): rotary, QK-norm,
        the value embedding (qkv: x's stacked projections, computed already)."""
        B, T, _ = x.shape
        if qkv is not None:
            q, k, v = qkv.split([self.c_q.out_features, self.c_k.out_features, self.c_v.out_features], dim=-1)
        elif self.w_qkv is not None and not torch.is_grad_enabled():
            q, k, v = linear(x, self.w_qkv, ctx).split([self.c_q.out_features, self.c_k.out_features,
                                                        self.c_v.out_features], dim=-1)
        else:
            q, k, v = linear(x, self.c_q, ctx), linear(x, self.c_k, ctx), linear(x, self.c_v, ctx)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.has_ve:
            ve = self.ve(ctx.idx).view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1).to(v.dtype) * ve
        q, k = apply_rotary_emb(q, ctx.cos, ctx.sin), apply_rotary_emb(k, ctx.cos, ctx.sin)
        q, k = norm(q), norm(k)
        if self.qk_scale != 1.0:  # sharper attention than QK-norm's unit rms (reference nanochat: 1.2)
            q, k = q * self.qk_scale, k * self.qk_scale
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

    @staticmethod
    def cached(k, v, ctx, cache):
        """This forward's k and v written into the cache; all the cached ones back."""
        if ctx.pos_t is not None:  # static decode: write at a device-side position, read the whole cache
            k2, v2 = cache.write(k, v, ctx.pos_t)
        else:
            k2, v2 = cache.update(k, v, ctx.pos0)
        return k2.to(k.dtype), v2.to(v.dtype)  # the cache may keep another dtype than autocast's

    def attend(self, q, k, v, ctx, counts=None):
        """Attention of q over k and v (the cache's, with one) as ctx says; counts: the cache's
        scratch for the Triton decode kernel (KVCache.counts)."""
        gqa = self.n_head != self.n_kv_head
        T, S = q.size(2), k.size(2)
        if ctx.decode_masks is not None:
            if T > 1:  # speculative decoding's verify: a few queries over the whole cache
                return masked_attention(q, k, v, ctx.decode_masks[self.window])
            if ctx.decode_kernel == "triton":  # flash-decoding, the visible keys only (nanochat/decode_triton.py)
                from nanochat.decode_triton import decode_attention
                return decode_attention(q, k, v, ctx.pos_t, self.window, counts)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.decode_masks[self.window], enable_gqa=gqa)
        if self.window in ctx.block_masks and T == S:
            # GPU training through flex_attention: it skips the masked-out blocks
            return flex_attention(q, k, v, block_mask=ctx.block_masks[self.window], enable_gqa=gqa)
        if T == S and ctx.pos0 == 0 and self.window >= T:
            if ctx.flash is not None:  # TPU's Pallas flash kernel (no windows: only here), or prefill_attention
                return ctx.flash(q, k, v)
            # full causal attention: SDPA picks flash / cuDNN on GPU
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # CPU, the "sdpa" kernel, or decoding with a cache: an explicit boolean mask
        mask = sliding_window_mask(T, S, ctx.pos0, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def init_cache(self, batch_size, max_len, device, dtype):
        return KVCache(batch_size, self.n_kv_head, max_len, self.head_dim, device, dtype)


class KVCache:
    """Keys and values of one attention layer, preallocated to max_len positions."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        # the Triton decode kernel's count of finished segments per (row, head), zeros between calls
        # (decode_triton.decode_attention); not state: never copied or loaded
        self.counts = torch.zeros(batch_size * n_kv_head, device=device, dtype=torch.int32)

    def update(self, k, v, pos0):
        T = k.size(2)
        if pos0 + T > self.k.size(2):
            raise ValueError(f"KV cache of {self.k.size(2)} positions is full (need {pos0 + T})")
        self.k[:, :, pos0:pos0 + T] = k
        self.v[:, :, pos0:pos0 + T] = v
        return self.k[:, :, :pos0 + T], self.v[:, :, :pos0 + T]

    def write(self, k, v, pos_t):
        """T positions from pos_t, a device tensor: same shapes every step (CUDA graphs). pos_t
        0-dim: the same positions in every row; (B,): one token at each row's own position."""
        if pos_t.dim() == 1:
            rows = torch.arange(k.size(0), device=pos_t.device)
            self.k[rows, :, pos_t] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, pos_t] = v[:, :, 0].to(self.v.dtype)
            return self.k, self.v
        pos = pos_t + torch.arange(k.size(2), device=pos_t.device)
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v

    def tensors(self):  # the state, batch first (ModelCache.load)
        return [self.k, self.v]

    def snapshot(self):
        return None  # position-indexed: a dummy step's entries are overwritten before they are read

    def restore(self, snap):
        pass
