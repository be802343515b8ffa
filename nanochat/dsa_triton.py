"""
DSA's long-context selection (nanochat/dsa.py, `select_packed`) in two Triton kernels, on
NVIDIA GPUs. masked_scores: the lightning indexer's scores

    I[t, s] = sum_j (w[t, j] / sqrt(H_I d_I)) ReLU(q[t, j] . k[s])    if key s is visible to query t
            = -inf                                                      otherwise (causal, window)

for a chunk of query rows against the keys they can see. The PyTorch form (dsa.index_scores,
then masked_fill) writes the (rows, H_I, S) per-head products in fp32, applies the ReLU in
another pass and sums the heads in a third, a batched matmul whose inner dimension is H_I = 4:
~17 passes of a (rows, S) fp32 matrix. Here each program holds a (BR, BS) tile of I in
registers, computes the H_I products with tensor-core dots, and writes I once (the visibility
mask included). Forward only: the selection takes no gradient.

The dots round as torch's fp32 matmuls do: TF32 under `torch.set_float32_matmul_precision("high")`
(training sets it, common.compute_init), IEEE fp32 under "highest" (the default; the GPU tests).
At TF32 the kernel and cuBLAS round differently, so a key can swap with one tied to ~1e-3
relative at the k-th place. select_packed uses these kernels only under TF32
(dsa.triton_kernels_on): IEEE dots run without tensor cores, and at 64K masked_scores then
took 789 ms against 10 ms at TF32 (H200, 2026-12-01).

chosen_bits: from the scores and torch.topk's k-th value per row, the chosen keys' bits
(dsa.pack_bits of dsa.top_k_chosen) in one pass: each program walks its rows' keys in order,
takes every key above the k-th value and the ties at it while the row has room (a running
count: the reference's stable sort prefers earlier keys), and ORs 32 choices into a word.
The PyTorch form compares, counts, checks on the host for rows with too many ties (a sync a
chunk), and packs: at 64K ~45 ms of kernels and gaps of a 131 ms selection; with this
kernel (12.6 ms) the selection took 59 ms (H200, 2026-12-01).
Both run on the CPU under TRITON_INTERPRET=1 (tests/test_dsa.py).
"""

import math

import torch
import triton
import triton.language as tl

BR, BS, WARPS = 64, 64, 8  # query rows and keys a program (ptxas: 184 registers, 255 at 4 warps; not timed)
SEL_BR, SEL_BW = 4, 16  # chosen_bits: rows a program, words (32 keys each) a step (not timed)


@triton.jit
def _scores(Q, W, K, OUT, R, S, q_pos0, k_pos0, window, norm,
            sqb, sqr, sqh, swb, swr, skb, sks, sob, sor,
            H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr,
            PRECISION: tl.constexpr):
    # the batch row in int64: a chunk's scores are B x 2^26 floats at most (dsa.CHUNK per row), past
    # 2^31 from 33 rows on (e.g. 8K tokens at device batch 64), where int32 offsets would wrap
    pr, ps, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pr * BR + tl.arange(0, BR)
    cols = ps * BS + tl.arange(0, BS)
    d = tl.arange(0, BD)  # (BD: D rounded up to a power of two, at least 16, as tl.dot needs)
    qpos, kpos = q_pos0 + rows, k_pos0 + cols
    inside = (rows[:, None] < R) & (cols[None, :] < S)
    visible = inside & (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < window)
    acc = tl.zeros((BR, BS), tl.float32)
    if k_pos0 + ps * BS <= q_pos0 + pr * BR + BR - 1:  # else every key of the tile is in the future
        k = tl.load(K + b * skb + cols[:, None] * sks + d[None, :], mask=(cols[:, None] < S) & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        for j in tl.static_range(H):
            q = tl.load(Q + b * sqb + rows[:, None] * sqr + j * sqh + d[None, :],
                        mask=(rows[:, None] < R) & (d[None, :] < D), other=0.0).to(tl.float32)
            w = tl.load(W + b * swb + rows * swr + j, mask=rows < R, other=0.0).to(tl.float32) / norm
            acc += w[:, None] * tl.maximum(tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)
    out = tl.where(visible, acc, float("-inf"))
    tl.store(OUT + b * sob + rows[:, None] * sor + cols[None, :], out, mask=inside)


def masked_scores(q, w, keys, q_pos0, k_pos0, window):
    """I (B, R, S) fp32 of q (B, R, H_I, d_I), w (B, R, H_I) against keys (B, S, d_I): dsa.index_scores
    with -inf where query r (at position q_pos0 + r) may not see key s (at k_pos0 + s)."""
    B, R, H, D = q.shape
    S = keys.size(1)
    if q.stride(-1) != 1 or w.stride(-1) != 1 or keys.stride(-1) != 1:
        q, w, keys = q.contiguous(), w.contiguous(), keys.contiguous()
    out = torch.empty(B, R, S, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(R, BR), triton.cdiv(S, BS), B)
    _scores[grid](q, w, keys, out, R, S, q_pos0, k_pos0, window, math.sqrt(H * D),
                  q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), keys.stride(0), keys.stride(1),
                  out.stride(0), out.stride(1), H=H, D=D, BD=max(16, triton.next_power_of_2(D)), BR=BR, BS=BS, num_warps=WARPS,
                  PRECISION="tf32" if getattr(torch.backends.cuda.matmul, "fp32_precision", "") == "tf32" else "ieee")
    return out


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _chosen_bits(SC, KTH, ROOM, OUT, R, S, W, ssb, ssr, sob, sor,
                 BR: tl.constexpr, BW: tl.constexpr):
    pr, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # (int64: as in _scores)
    rows = pr * BR + tl.arange(0, BR)
    live = rows < R
    kth = tl.load(KTH + b * R + rows, mask=live, other=float("inf"))
    room = tl.load(ROOM + b * R + rows, mask=live, other=0)  # ties at kth still to take, in key order
    word = tl.arange(0, BW)
    bit = tl.arange(0, 32)
    w0 = 0
    while w0 < W:  # the row's keys in order, for the running count of ties (a while: the
        # interpreter cannot loop over range() of a runtime bound)
        cols = tl.reshape((w0 + word)[:, None] * 32 + bit[None, :], (BW * 32,))
        s = tl.load(SC + b * ssb + rows[:, None] * ssr + cols[None, :], mask=live[:, None] & (cols[None, :] < S),
                    other=float("-inf"))
        tie = (s == kth[:, None]).to(tl.int32)
        take = (s > kth[:, None]) | ((tie == 1) & (tl.cumsum(tie, axis=1) <= room[:, None]))
        room -= tl.sum(tie, axis=1)
        bits = tl.reshape(take.to(tl.int32), (BR, BW, 32)) << bit[None, None, :]
        words = tl.reduce(bits, 2, _or)
        tl.store(OUT + b * sob + rows[:, None] * sor + (w0 + word)[None, :], words,
                 mask=live[:, None] & ((w0 + word)[None, :] < W))
        w0 += BW


def chosen_bits(scores, k, out):
    """dsa.pack_bits(dsa.top_k_chosen(scores, k)) written into out (B, R, ceil(S / 32)) int32
    (a view: the bits' columns of this chunk), for scores (B, R, S) fp32 with -inf at invisible
    keys: the keys above the k-th value, then those equal to it in key order until k are
    chosen (top_k_mask's set), in one pass over the scores and without a host sync (the
    PyTorch form compares, counts, checks the count on the host, then packs: ~5 passes)."""
    B, R, S = scores.shape
    vals = scores.topk(k, dim=-1, sorted=False).values
    kth = vals.amin(-1).clamp_min(torch.finfo(scores.dtype).min)  # a row that sees < k keys: all it sees
    room = (k - (vals > kth[..., None]).sum(-1)).to(torch.int32)
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    W = out.size(-1)
    assert out.shape == (B, R, W) and W == -(-S // 32) and out.stride(-1) == 1, (out.shape, scores.shape)
    grid = (triton.cdiv(R, SEL_BR), B)
    _chosen_bits[grid](scores, kth.contiguous(), room.contiguous(), out, R, S, W, scores.stride(0), scores.stride(1),
                       out.stride(0), out.stride(1), BR=SEL_BR, BW=SEL_BW, num_warps=4)
    return out
