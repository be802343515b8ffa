"""
Attention of one decode step over the static KV cache (GPT.decode_step) as one Triton kernel,
after Flash-Decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context
inference"): the cache's keys are split into segments; a program takes one (row, key/value
head, segment), scores the head's G = n_head / n_kv_head queries against the segment's
visible keys and keeps an online softmax (Milakov & Gimelshein 2018):

    m = max_s x_s,  l = sum_s exp(x_s - m),  a = sum_s exp(x_s - m) v_s     x_s = q . k_s / sqrt(D)

then the last program of a (row, head) to finish merges the segments: out = sum_j e^(m_j - M) a_j
/ sum_j e^(m_j - M) l_j, M = max_j m_j (Flash-Decoding's second kernel, folded in as split-K GEMMs
do their "last block reduces" fix-up: a count of finished programs per (row, head)). With one
segment, when the rows alone fill the GPU, the program writes a / l. What a key may be seen by
is computed in the kernel from the row's position p
(device-side, so one CUDA graph serves every step): keys max(0, p - window + 1) .. p, which is
what decode_masks' boolean mask says to SDPA. A program reads only the visible part of its
segment, so a row at position p reads p + 1 keys of the cache, not all max_len (SDPA with a
mask reads them all), and windowed layers read at most `window`.

Same inputs as SDPA with enable_gqa (query head h uses key/value head h // G); bf16 scores
accumulate in fp32 and the probabilities are rounded to v's dtype for the second product, as
flash attention does; fp32 inputs get IEEE fp32 dots (not TF32). Runs on the CPU under
TRITON_INTERPRET=1 (tests/test_decode_triton.py).
"""

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

BS = 64  # keys a step (K and V tiles of 64 x head_dim; 4 warps: ptxas 254 registers, no spills; not timed)
_SMS = {}  # device -> streaming multiprocessors
_PDL = {}  # device -> whether its kernels launch with programmatic dependent launch (pdl_on)


@triton.jit
def _tile(q, k, v, seen, m, l, acc, scale, PRECISION: tl.constexpr):
    """A tile of BS keys k and values v (zeros where not seen) into the online softmax (m, l, acc)."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    x = tl.where(seen[None, :], x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, 1))
    p = tl.exp(x - m_new[:, None])
    alpha = tl.exp(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _segment(Q, K, V, POS, M, L, ACC, OUT, COUNT, KN, VN, window, scale, H, Hkv,
             sqb, sqh, skb, skh, sks, svb, svh, svs, sknb, sknh, svnb, svnh,
             G: tl.constexpr, PER_ROW: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SEG: tl.constexpr, BS: tl.constexpr,
             NP: tl.constexpr, PRECISION: tl.constexpr, ONE: tl.constexpr, PDL: tl.constexpr, NEW: tl.constexpr):
    pid, seg, nseg = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, hk = pid // Hkv, pid % Hkv
    # the row's keys and values from int64 offsets: b * skb passes 2^31 once a layer's cache holds 2^31
    # elements (4 GiB in bf16; e.g. 96 rows of 32K keys, 8 heads of 128), where int32 would wrap; the
    # offsets within a row stay int32 (int64 ones there cost registers: the kernel spilled)
    k_row = K + b.to(tl.int64) * skb + hk * skh
    v_row = V + b.to(tl.int64) * svb + hk * svh
    if PER_ROW:  # (positions are set before the step, or at the end of the graph's previous replay)
        pos = tl.load(POS + b).to(tl.int32)
    else:
        pos = tl.load(POS).to(tl.int32)
    s0 = tl.maximum(seg * SEG, pos - window + 1)  # this program's visible keys: s0 .. s1 - 1
    s1 = tl.minimum(seg * SEG + SEG, pos + 1)
    d = tl.arange(0, D)
    # The first tile's keys before this step's (position pos: written by the kernel before this one,
    # or given, NEW) do not depend on that kernel: with programmatic dependent launch they are read
    # before waiting for it, the rest after (the values too: both tiles held across the wait
    # spilled registers at 4 warps, dev/triton_regs.py).
    cols = seg * SEG + tl.arange(0, BS)
    seen = (cols >= s0) & (cols < s1)
    k = tl.load(k_row + cols[:, None] * sks + d[None, :], mask=(seen & (cols < pos))[:, None], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    cdt = Q.dtype.element_ty  # (the cache may keep another dtype: the products run in q's)
    if NEW:  # this step's key and value from KN, VN, rounded to the cache's dtype; the program whose
        # segment holds position pos writes them there (the others take them from KN, VN, not the cache)
        kn = tl.load(KN + b * sknb + hk * sknh + d).to(K.dtype.element_ty)
        vn = tl.load(VN + b * svnb + hk * svnh + d).to(V.dtype.element_ty)
        if (pos >= seg * SEG) & (pos < seg * SEG + SEG):
            tl.store(k_row + pos * sks + d, kn)
            tl.store(v_row + pos * svs + d, vn)
        kn, vn = kn.to(cdt), vn.to(cdt)
        k = tl.where((cols == pos)[:, None], kn[None, :], k.to(cdt))
        v = tl.load(v_row + cols[:, None] * svs + d[None, :], mask=(seen & (cols < pos))[:, None], other=0.0)
        v = tl.where((cols == pos)[:, None], vn[None, :], v.to(cdt))
    else:
        new = seen & (cols == pos)
        k = tl.where(new[:, None], tl.load(k_row + cols[:, None] * sks + d[None, :], mask=new[:, None], other=0.0), k)
        v = tl.load(v_row + cols[:, None] * svs + d[None, :], mask=seen[:, None], other=0.0)
        k, v = k.to(cdt), v.to(cdt)
    g = tl.arange(0, GP)
    heads = hk * G + g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m = tl.full((GP,), -1e30, tl.float32)  # finite: a segment with nothing visible gives l = 0, not NaN
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    m, l, acc = _tile(q, k, v, seen, m, l, acc, scale, PRECISION)
    # the other tiles: a fixed trip count and no branch, so that Triton pipelines the loads; a tile
    # with no visible key loads nothing (its loads are masked off) and changes nothing (p = 0, alpha = 1)
    for i in tl.range(1, SEG // BS):
        cols = seg * SEG + i * BS + tl.arange(0, BS)
        seen = (cols >= s0) & (cols < s1)
        k = tl.load(k_row + cols[:, None] * sks + d[None, :], mask=seen[:, None], other=0.0).to(cdt)
        v = tl.load(v_row + cols[:, None] * svs + d[None, :], mask=seen[:, None], other=0.0).to(cdt)
        if NEW:
            k = tl.where((cols == pos)[:, None], kn[None, :], k)
            v = tl.where((cols == pos)[:, None], vn[None, :], v)
        m, l, acc = _tile(q, k, v, seen, m, l, acc, scale, PRECISION)
    if ONE:  # one segment (enough rows to fill the GPU): the output directly, no merge
        tl.store(OUT + (b * H + heads)[:, None] * D + d[None, :], (acc / l[:, None]).to(OUT.dtype.element_ty),
                 mask=(g < G)[:, None])
        return
    out = (b * H + heads) * nseg + seg
    tl.store(M + out, m, mask=g < G)
    tl.store(L + out, l, mask=g < G)
    tl.store(ACC + out[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])
    # The last of the (row, head)'s programs to finish merges every segment's (m, l, acc), no second
    # kernel (its launch cost as much as the merge): the block's stores, then a release/acquire count
    # of the finished segments; the last one sets the count back to 0 for the next call.
    tl.debug_barrier()
    done = tl.atomic_add(COUNT + pid, 1, sem="acq_rel", scope="gpu")
    if done == nseg - 1:
        tl.debug_barrier()
        j = tl.arange(0, NP)
        for h in tl.range(0, G):
            bh = b * H + hk * G + h
            ms = tl.load(M + bh * nseg + j, mask=j < nseg, other=-1e30, cache_modifier=".cg")
            w = tl.where(j < nseg, tl.exp(ms - tl.max(ms, 0)), 0.0)
            ls = tl.sum(w * tl.load(L + bh * nseg + j, mask=j < nseg, other=0.0, cache_modifier=".cg"), 0)
            a = tl.load(ACC + (bh * nseg + j)[:, None] * D + d[None, :], mask=(j < nseg)[:, None], other=0.0,
                        cache_modifier=".cg")
            tl.store(OUT + bh * D + d, (tl.sum(w[:, None] * a, 0) / ls).to(OUT.dtype.element_ty))
        tl.store(COUNT + pid, 0)


def segments(programs, S, device):
    """How many segments to split S keys into: enough programs to fill the GPU twice over
    (a batch-1 step has only n_kv_head (row, head) pairs), at least BS keys each."""
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(S, BS), triton.cdiv(2 * _SMS[device], programs)))


def writes_new(programs, S, device):
    """Whether a decode step should hand decode_attention its new k and v (k_new, v_new) for
    these shapes: where each program reads one tile of keys (batch 1 over a 2K cache: it
    saves the step's two cache-write kernels a layer). Where programs loop over more tiles,
    selecting the new key in each kept Triton from pipelining the loop's loads: at batch 128
    the step was 16% slower than with inductor's cache writes (docs/benchmarks.md)."""
    return triton.cdiv(S, segments(programs, S, device)) <= BS


def decode_attention(q, k, v, pos, window, counts=None, k_new=None, v_new=None):
    """softmax(q kᵀ / sqrt(D)) v of one query per row, q (B, H, 1, D), over the cache k, v
    (B, Hkv, S, D) where row b sees keys max(0, p_b - window + 1) .. p_b: pos (B,) each row's
    position or a 0-dim tensor for all rows, each below S (not checked: it is on the device).
    Returns (B, H, 1, D) in q's dtype. counts: B * Hkv
    int32 zeros the kernel counts finished segments in and leaves at zero (KVCache.counts: kept
    with the cache, so a CUDA graph of the step has no memset in it); None: made here.
    k_new, v_new (B, Hkv, 1, D): this step's key and value, written into the cache at each row's
    position by the kernel itself (no separate cache-write kernels; the cache's dtype may differ
    from q's; correct at any shape, faster where writes_new says); None: already there."""
    B, H, T, D = q.shape
    Hkv, S = k.size(1), k.size(2)
    if T != 1 or H % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"decode_attention: one query per row and a power-of-two head dim >= 16 (q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)})")
    if counts is None:
        counts = torch.zeros(B * Hkv, dtype=torch.int32, device=q.device)
    if counts.numel() < B * Hkv or counts.dtype != torch.int32:
        raise ValueError(f"decode_attention: counts must be {B * Hkv} int32 zeros (got {counts.numel()} {counts.dtype})")
    if (k_new is None) != (v_new is None):
        raise ValueError("decode_attention: give both k_new and v_new, or neither")
    if k_new is None:
        return _decode_attention(q, k, v, pos, min(window, S + 1), counts)
    if k_new.shape != (B, Hkv, 1, D) or v_new.shape != k_new.shape:
        raise ValueError(f"decode_attention: k_new and v_new must be {(B, Hkv, 1, D)} (got {tuple(k_new.shape)}, "
                         f"{tuple(v_new.shape)})")
    return _decode_attention_write(q, k, v, pos, min(window, S + 1), counts, k_new, v_new)


# One op for torch.compile (the decode step is compiled): opaque, no graph break, no tracing
# of the launch code; a CUDA graph captures its kernel like any other. counts is written but left
# as it was found (zeros), hence not among the mutated arguments.
@torch.library.custom_op("nanochat::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int,
                      counts: torch.Tensor) -> torch.Tensor:
    return _launch(q, k, v, pos, window, counts, None, None)


@_decode_attention.register_fake
def _(q, k, v, pos, window, counts):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanochat::decode_attention_write", mutates_args=("k", "v"))
def _decode_attention_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int,
                            counts: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    return _launch(q, k, v, pos, window, counts, k_new, v_new)


@_decode_attention_write.register_fake
def _(q, k, v, pos, window, counts, k_new, v_new):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _launch(q, k, v, pos, window, counts, k_new, v_new):
    B, H, _, D = q.shape
    Hkv, S = k.size(1), k.size(2)
    G = H // Hkv
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        if k_new is not None:  # (written in place: a contiguous copy would lose the writes)
            raise ValueError("decode_attention: a cache written in place needs a contiguous last dim")
        k, v = k.contiguous(), v.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    nseg = segments(B * Hkv, S, q.device)
    seg = triton.cdiv(triton.cdiv(S, nseg), BS) * BS
    nseg = triton.cdiv(S, seg)
    f32 = dict(device=q.device, dtype=torch.float32)
    scratch = B * H * nseg if nseg > 1 else 0
    m, l, acc = torch.empty(scratch, **f32), torch.empty(scratch, **f32), torch.empty(scratch, D, **f32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    q3 = q[:, :, 0]
    kn, vn = (q3, q3) if k_new is None else (t[:, :, 0] if t.stride(-1) == 1 else t[:, :, 0].contiguous()
                                              for t in (k_new, v_new))
    pdl = pdl_on(q.device)
    _segment[(B * Hkv, nseg)](q3, k, v, pos, m, l, acc, out, counts, kn, vn, window, 1 / math.sqrt(D), H, Hkv,
                              q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2),
                              v.stride(0), v.stride(1), v.stride(2), kn.stride(0), kn.stride(1), vn.stride(0),
                              vn.stride(1), G=G, PER_ROW=pos.dim() == 1,
                              GP=max(16, triton.next_power_of_2(G)), D=D, SEG=seg, BS=BS, NP=triton.next_power_of_2(nseg),
                              PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # (fp32: as SDPA, no TF32)
                              ONE=nseg == 1, PDL=pdl, NEW=k_new is not None, num_warps=4,
                              **({"launch_pdl": True} if pdl else {}))
    return out


def pdl_on(device):
    """Whether this device's kernels here launch with programmatic dependent launch: Hopper or
    later, NVIDIA (ROCm reports its own capabilities through the same call)."""
    if device not in _PDL:
        _PDL[device] = (device.type == "cuda" and torch.version.hip is None
                        and torch.cuda.get_device_capability(device)[0] >= 9)
    return _PDL[device]


# ---------------------------------------------------------------------------------------------
# A linear layer of a batch-1 decode step: y = x Wᵀ for one row x (K,) and W (N, K). cuBLAS's
# kernels for this shape keep few of an H200's SMs busy (d12's 768 x 3072 MLP projection: 7.2
# us, 656 GB/s); here each program reads BN whole rows of W, BK columns at a time, so N / BN
# programs stream W at once (these tiles, before PDL: 4.4 us, 1,081 GB/s; docs/benchmarks.md,
# where they were picked). On Hopper, with programmatic dependent launch, a program reads its
# first tile of W before it waits for the kernel before it (the weights do not depend on that
# kernel, x does) and lets the next kernel launch once it has x.
#
# What a transformer block does around its linears rides along, so that a batch-1 step is
# fewer kernels (GPT._trunk's row path, Block.decode_row): before the product, the per-layer
# lambdas x := r x + a x0 (MIX) and the parameter-free RMSNorm x / sqrt(mean(x²) + eps) (NORM;
# every program sums the row's squares itself: K elements from L2, against its BN x K of W);
# after it, relu(y)² (RELU2, the MLP's activation) and the residual add y + R (RES). The mixed
# row, the normed row and the output are rounded to the row's dtype once each, from fp32 (as
# inductor's fused kernels do; eager PyTorch also rounds y before adding the residual, and each
# lambda's product before the sum).

@triton.jit
def _gemv(X, W, Y, N, swn, R, X0, LR, LA, XN, XM, eps, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          PDL: tl.constexpr, RELU2: tl.constexpr, RES: tl.constexpr, NORM: tl.constexpr, MIX: tl.constexpr,
          STORE: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    mn = n < N
    rows = W + n[:, None].to(tl.int64) * swn  # (int64: N x K may pass 2^31)
    kb = tl.arange(0, BK)
    w_first = tl.load(rows + kb[None, :], mask=mn[:, None] & (kb < K)[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    dt = X.dtype.element_ty
    if MIX:  # the lambdas as the PyTorch step rounds them: to the row's dtype
        r = tl.load(LR).to(dt).to(tl.float32)
        a = tl.load(LA).to(dt).to(tl.float32)
    scale = 1.0
    if NORM:
        ss = tl.zeros((BK,), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            k = k0 + kb
            mk = k < K
            x = tl.load(X + k, mask=mk, other=0.0).to(tl.float32)
            if MIX:
                x = (r * x + a * tl.load(X0 + k, mask=mk, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            if STORE:  # the block's residual row (program 0 writes it)
                tl.store(XM + k, x.to(dt), mask=mk & (pid == 0))
            ss += x * x
        scale = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        k = k0 + kb
        mk = k < K
        if k0 == 0:
            w = w_first
        else:
            w = tl.load(rows + k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        x = tl.load(X + k, mask=mk, other=0.0).to(tl.float32)
        if MIX:
            x = (r * x + a * tl.load(X0 + k, mask=mk, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        if NORM:
            x = (x * scale).to(dt).to(tl.float32)
            if STORE:  # the normed row, for what else reads it (the value-embedding gate)
                tl.store(XN + k, x.to(dt), mask=mk & (pid == 0))
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if RES:
        acc += tl.load(R + n, mask=mn, other=0.0).to(tl.float32)
    tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=mn)


# rows and columns of W a program reads at a time, and its warps: 2 x 1,024 was the best of a sweep
# on an H200 without PDL; with PDL a program's first tile is read before the wait, and a tile of
# 4,096 columns (all of d12's K, 768 to 3,072) reads all of its rows early: batch 1, d12, 0.252 ->
# 0.242 ms a step (docs/benchmarks.md)
GEMV_BN, GEMV_BK, GEMV_WARPS = 2, 4096, 4
NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for fp32, bf16 and fp16 rows (its opmath type's)


def gemv(x, w, relu2=False, norm=False, residual=None):
    """x Wᵀ for a single row x (..., K) and w (N, K) -> (..., N) in w's dtype (x is cast to it):
    with norm, of x's RMSNorm (attention.norm); with relu2, relu(·)²; with residual (..., N),
    plus it. What attention.linear and the blocks' row path run in a batch-1 decode step with
    the Triton decode kernels. int64 row offsets; K is a compile-time constant (one kernel per
    shape)."""
    _check_row(x, w)
    if residual is not None and residual.numel() != w.size(0):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} for {w.size(0)} outputs")
    return _gemv_op(x.to(w.dtype), w, relu2, norm, None if residual is None else residual.to(w.dtype))


def gemv_norm(x, w, mix=None):
    """The first linear of a block in a batch-1 decode step: (norm(x') Wᵀ, norm(x'), x') with
    x' = r x + a x0 for mix = (r, a, x0) (GPT's per-layer lambdas, r and a 0-dim), else x' = x.
    One kernel; the block carries on with x' as its residual."""
    _check_row(x, w)
    r, a, x0 = mix if mix is not None else (None, None, None)
    return _gemv_norm_op(x.to(w.dtype), w, None if x0 is None else x0.to(w.dtype), r, a)


def _check_row(x, w):
    if x.numel() != x.size(-1) or w.dim() != 2 or w.size(1) != x.size(-1):
        raise ValueError(f"gemv: one row times (N, K) (x {tuple(x.shape)}, w {tuple(w.shape)})")


def _launch_gemv(x, w, y, relu2=False, norm=False, residual=None, x0=None, r=None, a=None, xn=None, xm=None):
    N, K = w.shape
    w = w if w.stride(1) == 1 else w.contiguous()
    pdl = pdl_on(x.device)
    c = lambda t: t if t is None else t.contiguous()  # noqa: E731 (one row each: no copy in the decode step)
    _gemv[(triton.cdiv(N, GEMV_BN),)](c(x), w, y, N, w.stride(0), c(residual), c(x0), r, a, xn, xm, NORM_EPS, K=K,
                                       BN=GEMV_BN, BK=min(GEMV_BK, triton.next_power_of_2(K)), PDL=pdl, RELU2=relu2,
                                       RES=residual is not None, NORM=norm, MIX=x0 is not None, STORE=xn is not None,
                                       num_warps=GEMV_WARPS, **({"launch_pdl": True} if pdl else {}))
    return y


@torch.library.custom_op("nanochat::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, relu2: bool = False, norm: bool = False,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.empty(*x.shape[:-1], w.size(0), device=x.device, dtype=w.dtype)
    return _launch_gemv(x, w, y, relu2, norm, residual)


@_gemv_op.register_fake
def _(x, w, relu2=False, norm=False, residual=None):
    return x.new_empty(*x.shape[:-1], w.size(0), dtype=w.dtype)


@torch.library.custom_op("nanochat::gemv_norm", mutates_args=())
def _gemv_norm_op(x: torch.Tensor, w: torch.Tensor, x0: torch.Tensor | None = None, r: torch.Tensor | None = None,
                  a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if (x0 is None) != (r is None) or (r is None) != (a is None):
        raise ValueError("gemv_norm: mix is (r, a, x0), all three or none")
    y = torch.empty(*x.shape[:-1], w.size(0), device=x.device, dtype=w.dtype)
    xn, xm = torch.empty_like(x), torch.empty_like(x)
    _launch_gemv(x, w, y, norm=True, x0=x0, r=r, a=a, xn=xn, xm=xm)
    return y, xn, xm


@_gemv_norm_op.register_fake
def _(x, w, x0=None, r=None, a=None):
    return x.new_empty(*x.shape[:-1], w.size(0), dtype=w.dtype), torch.empty_like(x), torch.empty_like(x)
