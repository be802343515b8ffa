"""
Attention of one decode step over the static KV cache (GPT.decode_step) as two Triton kernels,
after Flash-Decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context
inference"): the cache's keys are split into segments; a program takes one (row, key/value
head, segment), scores the head's G = n_head / n_kv_head queries against the segment's
visible keys and keeps an online softmax (Milakov & Gimelshein 2018):

    m = max_s x_s,  l = sum_s exp(x_s - m),  a = sum_s exp(x_s - m) v_s     x_s = q . k_s / sqrt(D)

then a second kernel merges the segments: out = sum_j e^(m_j - M) a_j / sum_j e^(m_j - M) l_j,
M = max_j m_j (with one segment, when the rows alone fill the GPU, the first writes a / l). What a key may be seen by is computed in the kernel from the row's position p
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


@triton.jit
def _segment(Q, K, V, POS, M, L, ACC, OUT, window, scale, H, Hkv, G,
             sqb, sqh, skb, skh, sks, svb, svh, svs,
             PER_ROW: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SEG: tl.constexpr, BS: tl.constexpr,
             PRECISION: tl.constexpr, ONE: tl.constexpr):
    pid, seg = tl.program_id(0), tl.program_id(1)
    b, hk = pid // Hkv, pid % Hkv
    # the row's keys and values from int64 offsets: b * skb passes 2^31 once a layer's cache holds 2^31
    # elements (4 GiB in bf16; e.g. 96 rows of 32K keys, 8 heads of 128), where int32 would wrap; the
    # offsets within a row stay int32 (int64 ones there cost registers: the kernel spilled)
    k_row = K + b.to(tl.int64) * skb + hk * skh
    v_row = V + b.to(tl.int64) * svb + hk * svh
    if PER_ROW:
        pos = tl.load(POS + b).to(tl.int32)
    else:
        pos = tl.load(POS).to(tl.int32)
    s0 = tl.maximum(seg * SEG, pos - window + 1)  # this program's visible keys: s0 .. s1 - 1
    s1 = tl.minimum(seg * SEG + SEG, pos + 1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = hk * G + g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m = tl.full((GP,), -1e30, tl.float32)  # finite: a segment with nothing visible gives l = 0, not NaN
    l = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    # a fixed trip count and no branch, so that Triton pipelines the loads; a tile with no
    # visible key loads nothing (its loads are masked off) and changes nothing (p = 0, alpha = 1)
    for i in tl.range(0, SEG // BS):
        cols = seg * SEG + i * BS + tl.arange(0, BS)
        seen = (cols >= s0) & (cols < s1)
        k = tl.load(k_row + cols[:, None] * sks + d[None, :], mask=seen[:, None], other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        x = tl.where(seen[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp(x - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_row + cols[:, None] * svs + d[None, :], mask=seen[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    if ONE:  # one segment (enough rows to fill the GPU): the output directly, no merge
        tl.store(OUT + (b * H + heads)[:, None] * D + d[None, :], (acc / l[:, None]).to(OUT.dtype.element_ty),
                 mask=(g < G)[:, None])
        return
    out = (b * H + heads) * tl.num_programs(1) + seg
    tl.store(M + out, m, mask=g < G)
    tl.store(L + out, l, mask=g < G)
    tl.store(ACC + out[:, None] * D + d[None, :], acc, mask=(g < G)[:, None])


@triton.jit
def _merge(M, L, ACC, OUT, NSEG, NP: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    j = tl.arange(0, NP)
    d = tl.arange(0, D)
    m = tl.load(M + bh * NSEG + j, mask=j < NSEG, other=-1e30)
    w = tl.exp(m - tl.max(m, 0))
    w = tl.where(j < NSEG, w, 0.0)
    l = tl.sum(w * tl.load(L + bh * NSEG + j, mask=j < NSEG, other=0.0), 0)
    a = tl.load(ACC + (bh * NSEG + j)[:, None] * D + d[None, :], mask=(j < NSEG)[:, None], other=0.0)
    tl.store(OUT + bh * D + d, (tl.sum(w[:, None] * a, 0) / l).to(OUT.dtype.element_ty))


def segments(programs, S, device):
    """How many segments to split S keys into: enough programs to fill the GPU twice over
    (a batch-1 step has only n_kv_head (row, head) pairs), at least BS keys each."""
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(S, BS), triton.cdiv(2 * _SMS[device], programs)))


def decode_attention(q, k, v, pos, window):
    """softmax(q kᵀ / sqrt(D)) v of one query per row, q (B, H, 1, D), over the cache k, v
    (B, Hkv, S, D) where row b sees keys max(0, p_b - window + 1) .. p_b: pos (B,) each row's
    position or a 0-dim tensor for all rows. Returns (B, H, 1, D) in q's dtype."""
    B, H, T, D = q.shape
    Hkv, S = k.size(1), k.size(2)
    if T != 1 or H % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"decode_attention: one query per row and a power-of-two head dim >= 16 (q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)})")
    return _decode_attention(q, k, v, pos, min(window, S + 1))


# One op for torch.compile (the decode step is compiled): opaque, no graph break, no tracing
# of the launch code; a CUDA graph captures its two kernels like any other.
@torch.library.custom_op("nanochat::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
    B, H, _, D = q.shape
    Hkv, S = k.size(1), k.size(2)
    G = H // Hkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    nseg = segments(B * Hkv, S, q.device)
    seg = triton.cdiv(triton.cdiv(S, nseg), BS) * BS
    nseg = triton.cdiv(S, seg)
    f32 = dict(device=q.device, dtype=torch.float32)
    scratch = B * H * nseg if nseg > 1 else 0
    m, l, acc = torch.empty(scratch, **f32), torch.empty(scratch, **f32), torch.empty(scratch, D, **f32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    q3 = q[:, :, 0]
    _segment[(B * Hkv, nseg)](q3, k, v, pos, m, l, acc, out, window, 1 / math.sqrt(D), H, Hkv, G,
                              q3.stride(0), q3.stride(1), k.stride(0), k.stride(1), k.stride(2),
                              v.stride(0), v.stride(1), v.stride(2), PER_ROW=pos.dim() == 1,
                              GP=max(16, triton.next_power_of_2(G)), D=D, SEG=seg, BS=BS, num_warps=4,
                              PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # (fp32: as SDPA, no TF32)
                              ONE=nseg == 1)
    if nseg > 1:
        _merge[(B * H,)](m, l, acc, out, nseg, NP=triton.next_power_of_2(nseg), D=D, num_warps=4)
    return out


@_decode_attention.register_fake
def _(q, k, v, pos, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# A linear layer of a batch-1 decode step: y = x Wᵀ for one row x (K,) and W (N, K). cuBLAS's
# kernels for this shape keep few of an H200's SMs busy (d12's 768 x 3072 MLP projection: 7.2
# us, 656 GB/s); here each program reads BN whole rows of W, BK columns at a time, so N / BN
# programs stream W at once (these tiles, before PDL: 4.4 us, 1,081 GB/s; docs/benchmarks.md,
# where they were picked). On Hopper, with programmatic dependent launch, a program reads its
# first tile of W before it waits for the kernel before it (the weights do not depend on that
# kernel, x does) and lets the next kernel launch once it has x. relu2: the MLP's relu(y)² on
# the way out (one kernel less a layer; rounded once, from fp32).

@triton.jit
def _gemv(X, W, Y, N, swn, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
          RELU2: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = n < N
    rows = W + n[:, None].to(tl.int64) * swn  # (int64: N x K may pass 2^31)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < K
        w = tl.load(rows + k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        if PDL and k0 == 0:
            gdc_wait()
            gdc_launch_dependents()
        x = tl.load(X + k, mask=mk, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=mn)


GEMV_BN, GEMV_BK = 2, 1024  # rows and columns of W a program reads at a time (best of a sweep on an H200)
_PDL = {}  # device -> whether its kernels launch with programmatic dependent launch


def gemv(x, w, relu2=False):
    """x Wᵀ for a single row (relu2: relu(x Wᵀ)²): x (..., K) holding one row, w (N, K) ->
    (..., N) in w's dtype (x is cast to it). What attention.linear runs in a batch-1 decode
    step with the Triton decode kernels. int64 row offsets; K is a compile-time constant (one
    kernel per shape)."""
    if x.numel() != x.size(-1) or w.dim() != 2 or w.size(1) != x.size(-1):
        raise ValueError(f"gemv: one row times (N, K) (x {tuple(x.shape)}, w {tuple(w.shape)})")
    return _gemv_op(x.to(w.dtype), w, relu2)


@torch.library.custom_op("nanochat::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, relu2: bool = False) -> torch.Tensor:
    N, K = w.shape
    x = x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    if x.device not in _PDL:  # Hopper or later, NVIDIA (ROCm reports its own capabilities through the same call)
        _PDL[x.device] = (x.device.type == "cuda" and torch.version.hip is None
                          and torch.cuda.get_device_capability(x.device)[0] >= 9)
    pdl = _PDL[x.device]
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=w.dtype)
    _gemv[(triton.cdiv(N, GEMV_BN),)](x, w, y, N, w.stride(0), K=K, BN=GEMV_BN,
                                       BK=min(GEMV_BK, triton.next_power_of_2(K)), PDL=pdl, RELU2=relu2, num_warps=4,
                                       **({"launch_pdl": True} if pdl else {}))
    return y


@_gemv_op.register_fake
def _(x, w, relu2=False):
    return x.new_empty(*x.shape[:-1], w.size(0), dtype=w.dtype)
