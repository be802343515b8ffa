"""
Fused Triton kernels for mHC (nanochat/mhc.py), forward and backward: Sinkhorn-Knopp (the
CUDA implementation of the `nanochat::sinkhorn` op, with `mhc.sinkhorn_reference` as the exact
reference), and below it the read-out and the stream mix (`nanochat::hc_collapse`,
`nanochat::hc_expand`; references `mhc.collapse_reference`, `mhc.expand_reference`).

Why: written as PyTorch, the 20 iterations unroll into ~80 tiny ops per sublayer, which
torch.compile traces (a d12 took 6 minutes to compile on the H200, against about one for the
baseline) and whose iterates the compiled backward keeps (~2.5 KiB per token per sublayer:
6.5 GiB at d20, batch 32 x 2048). The mHC paper does the same for the same reasons: one
kernel per direction, the backward recomputing the iterations instead of storing them.

Each program holds BLOCK tokens' n x n matrices in registers (n a power of two). Forward:
    S_0 = colnorm(softmax_row(L) + eps),   S_q = colnorm(rownorm(S_{q-1})),  q = 1 .. iters-1
with rownorm(m) = m / (m 1 + eps) and colnorm likewise over columns. Backward: the gradient
of y = m / (s + eps), s the sum along the normalised axis, is dm = (dy - sum(dy y)) / (s + eps)
along the same axis; the kernel first runs the iterations again, writing S_0 .. S_{iters-2}
to a scratch slice of its own (64 bytes a token per iterate for n = 4, read back at once, so
it stays in L2; nothing is kept between the passes), then walks q = iters-1 .. 1 reading
S_{q-1}, then the first colnorm and the softmax: dL = p (dm - sum_row(dm p)). (Its first
form recomputed S_{q-1} from S_0 at every step, O(iters^2) normalisations: 0.34 ms a call
at d20, 27 ms of a training step; this one 0.12 ms on an H200.)
Runs on the CPU under TRITON_INTERPRET=1 (tests/test_mhc.py).
"""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _rownorm(m, eps):
    return m / (tl.sum(m, 2, keep_dims=True) + eps)


@triton.jit
def _colnorm(m, eps):
    return m / (tl.sum(m, 1, keep_dims=True) + eps)


@triton.jit
def _load(ptr, M, N: tl.constexpr, BLOCK: tl.constexpr):
    tok = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i, j = tl.arange(0, N), tl.arange(0, N)
    offs = tok[:, None, None] * (N * N) + i[None, :, None] * N + j[None, None, :]
    mask = offs < M * N * N  # whole tokens only: a token's entries are contiguous
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@triton.jit
def _softmax_eps(x, eps):
    e = tl.exp(x - tl.max(x, 2, keep_dims=True))
    p = e / tl.sum(e, 2, keep_dims=True)
    return p, p + eps


@triton.jit
def _sinkhorn_fwd(L, OUT, M, eps, ITERS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    x, offs, mask = _load(L, M, N, BLOCK)
    _, m = _softmax_eps(x, eps)
    m = _colnorm(m, eps)
    for _ in range(ITERS - 1):
        m = _colnorm(_rownorm(m, eps), eps)
    tl.store(OUT + offs, m, mask=mask)


@triton.jit
def _sinkhorn_bwd(L, G, DL, SCR, M, eps, ITERS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    x, offs, mask = _load(L, M, N, BLOCK)
    g, _, _ = _load(G, M, N, BLOCK)
    p, m0 = _softmax_eps(x, eps)
    s0 = _colnorm(m0, eps)
    # the iterates S_0 .. S_{iters-2}, each the input of one step of the walk back, into this
    # program's own slice of the scratch (iters-1 blocks of BLOCK tokens: it stays in L2)
    scr = SCR + tl.program_id(0).to(tl.int64) * ((ITERS - 1) * BLOCK * N * N) + (offs - tl.program_id(0) * BLOCK * N * N)
    s = s0
    for q in range(ITERS - 1):
        tl.store(scr + q * (BLOCK * N * N), s, mask=mask)
        s = _colnorm(_rownorm(s, eps), eps)
    tl.debug_barrier()
    for back in range(ITERS - 1):
        q = ITERS - 1 - back
        s = tl.load(scr + (q - 1) * (BLOCK * N * N), mask=mask, other=0.0)  # S_{q-1}
        rs = tl.sum(s, 2, keep_dims=True) + eps
        a = s / rs
        cs = tl.sum(a, 1, keep_dims=True) + eps
        g = (g - tl.sum(g * (a / cs), 1, keep_dims=True)) / cs   # through colnorm
        g = (g - tl.sum(g * a, 2, keep_dims=True)) / rs          # through rownorm
    c0 = tl.sum(m0, 1, keep_dims=True) + eps
    g = (g - tl.sum(g * s0, 1, keep_dims=True)) / c0
    dl = p * (g - tl.sum(g * p, 2, keep_dims=True))
    tl.store(DL + offs, dl, mask=mask)


BLOCK = 64


def _device(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()  # Triton launches on the current GPU


def sinkhorn_fwd(logits, iters, eps):
    """(..., n, n) fp32 logits (n a power of two) -> Sinkhorn-Knopp's matrices, fp32."""
    x = logits.float().contiguous()
    n, M = x.size(-1), x.numel() // (x.size(-1) ** 2)
    out = torch.empty_like(x)
    if M:
        with _device(x):
            _sinkhorn_fwd[(triton.cdiv(M, BLOCK),)](x, out, M, eps, ITERS=iters, N=n, BLOCK=BLOCK)
    return out


def sinkhorn_bwd(grad, logits, iters, eps):
    """The gradient of sinkhorn_fwd's output (grad) carried back to its logits, fp32."""
    x, g = logits.float().contiguous(), grad.float().contiguous()
    n, M = x.size(-1), x.numel() // (x.size(-1) ** 2)
    dl = torch.empty_like(x)
    if M:
        grid = triton.cdiv(M, BLOCK)
        scratch = torch.empty(grid * max(iters - 1, 1) * BLOCK * n * n, device=x.device, dtype=torch.float32)
        with _device(x):
            _sinkhorn_bwd[(grid,)](x, g, dl, scratch, M, eps, ITERS=iters, N=n, BLOCK=BLOCK)
    return dl


# The stream mix X'[j] = sum_i H_res[i, j] X[i] + H_post[j] f (mhc.expand_reference), forward
# and backward. Compiled from PyTorch, the backward's n^2 + n reductions over C per token
# (dH_res[i, j] = <X[i], dX'[j]>, dH_post[j] = <f, dX'[j]>) became several passes over the
# n-wide stream; here one program keeps BM tokens' n x n sums in registers while it walks C
# once, reading X, f and dX' once and writing dX and df once.
@triton.jit
def _expand_fwd(X, F, RES, POST, Y, M, C, N: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # offsets past 2^31 at long contexts
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    s = tl.arange(0, N)
    rm, cm = rows < M, cols < C
    m2 = rm[:, None] & cm[None, :]
    x = tl.load(X + rows[:, None, None] * (N * C) + s[None, :, None] * C + cols[None, None, :],
                mask=rm[:, None, None] & cm[None, None, :], other=0.0).to(tl.float32)  # (BM, i, c)
    f = tl.load(F + rows[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    for j in tl.static_range(N):
        res_j = tl.load(RES + rows[:, None] * (N * N) + s[None, :] * N + j, mask=rm[:, None], other=0.0)  # H_res[:, j]
        post_j = tl.load(POST + rows * N + j, mask=rm, other=0.0)
        y = tl.sum(res_j[:, :, None] * x, 1) + post_j[:, None] * f
        tl.store(Y + rows[:, None] * (N * C) + j * C + cols[None, :], y.to(Y.dtype.element_ty), mask=m2)


@triton.jit
def _expand_bwd(X, F, RES, POST, DY, DX, DF, DRES, DPOST, M, C: tl.constexpr,
                N: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # offsets past 2^31 at long contexts
    s = tl.arange(0, N)
    rm = rows < M
    dres = tl.zeros((BM, N, N), dtype=tl.float32)
    dpost = tl.zeros((BM, N), dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < C
        m2, m3 = rm[:, None] & cm[None, :], rm[:, None, None] & cm[None, None, :]
        o3 = rows[:, None, None] * (N * C) + s[None, :, None] * C + cols[None, None, :]
        x = tl.load(X + o3, mask=m3, other=0.0).to(tl.float32)  # (BM, i, c)
        f = tl.load(F + rows[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dx = tl.zeros((BM, N, BC), dtype=tl.float32)
        df = tl.zeros((BM, BC), dtype=tl.float32)
        for j in tl.static_range(N):
            dy = tl.load(DY + rows[:, None] * (N * C) + j * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            res_j = tl.load(RES + rows[:, None] * (N * N) + s[None, :] * N + j, mask=rm[:, None], other=0.0)
            post_j = tl.load(POST + rows * N + j, mask=rm, other=0.0)
            dx += res_j[:, :, None] * dy[:, None, :]  # dX[i] = sum_j H_res[i, j] dX'[j]
            df += post_j[:, None] * dy                # df = sum_j H_post[j] dX'[j]
            dres += tl.where(s[None, None, :] == j, tl.sum(x * dy[:, None, :], 2)[:, :, None], 0.0)
            dpost += tl.where(s[None, :] == j, tl.sum(f * dy, 1)[:, None], 0.0)
        tl.store(DX + o3, dx.to(DX.dtype.element_ty), mask=m3)
        tl.store(DF + rows[:, None] * C + cols[None, :], df.to(DF.dtype.element_ty), mask=m2)
    tl.store(DRES + rows[:, None, None] * (N * N) + s[None, :, None] * N + s[None, None, :], dres,
             mask=rm[:, None, None])
    tl.store(DPOST + rows[:, None] * N + s[None, :], dpost, mask=rm[:, None])


# The read-out u = sum_i H_pre[i] X[i] (mhc.collapse_reference): its backward, dX[i] = H_pre[i] du
# and dH_pre[i] = <X[i], du>, in one pass over X as well.
@triton.jit
def _collapse_fwd(X, PRE, U, M, C, N: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # offsets past 2^31 at long contexts
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    s = tl.arange(0, N)
    rm, cm = rows < M, cols < C
    x = tl.load(X + rows[:, None, None] * (N * C) + s[None, :, None] * C + cols[None, None, :],
                mask=rm[:, None, None] & cm[None, None, :], other=0.0).to(tl.float32)
    pre = tl.load(PRE + rows[:, None] * N + s[None, :], mask=rm[:, None], other=0.0)
    u = tl.sum(pre[:, :, None] * x, 1)
    tl.store(U + rows[:, None] * C + cols[None, :], u.to(U.dtype.element_ty), mask=rm[:, None] & cm[None, :])


@triton.jit
def _collapse_bwd(X, PRE, DU, DX, DPRE, M, C: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # offsets past 2^31 at long contexts
    s = tl.arange(0, N)
    rm = rows < M
    pre = tl.load(PRE + rows[:, None] * N + s[None, :], mask=rm[:, None], other=0.0)
    dpre = tl.zeros((BM, N), dtype=tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < C
        m3 = rm[:, None, None] & cm[None, None, :]
        o3 = rows[:, None, None] * (N * C) + s[None, :, None] * C + cols[None, None, :]
        x = tl.load(X + o3, mask=m3, other=0.0).to(tl.float32)
        du = tl.load(DU + rows[:, None] * C + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        tl.store(DX + o3, (pre[:, :, None] * du[:, None, :]).to(DX.dtype.element_ty), mask=m3)
        dpre += tl.sum(x * du[:, None, :], 2)
    tl.store(DPRE + rows[:, None] * N + s[None, :], dpre, mask=rm[:, None])


EXPAND_BM, EXPAND_BC = 8, 128


def _launch(kernel, x, args, over_c):
    """kernel(*args, M, C, ...) over x's M tokens of n x C: a program per EXPAND_BM tokens, and
    per EXPAND_BC channels with over_c (else each program walks all of C)."""
    n, C = x.shape[-2:]
    M = x.numel() // (n * C)
    if M:
        grid = (triton.cdiv(M, EXPAND_BM),) + ((triton.cdiv(C, EXPAND_BC),) if over_c else ())
        with _device(x):
            kernel[grid](*args, M, C, N=n, BM=EXPAND_BM, BC=EXPAND_BC)


def expand_fwd(x, f, res, post):
    """x (..., n, C), f (..., C), res (..., n, n) and post (..., n) fp32 -> X' like x."""
    x, f, res, post = x.contiguous(), f.contiguous(), res.float().contiguous(), post.float().contiguous()
    y = torch.empty_like(x)
    _launch(_expand_fwd, x, (x, f, res, post, y), over_c=True)
    return y


def expand_bwd(dy, x, f, res, post):
    """expand_fwd's gradients: dx, df (their inputs' dtypes), dres, dpost (fp32)."""
    dy, x, f = dy.contiguous(), x.contiguous(), f.contiguous()
    res, post = res.float().contiguous(), post.float().contiguous()
    dx, df = torch.empty_like(x), torch.empty_like(f)
    dres, dpost = torch.empty_like(res), torch.empty_like(post)
    _launch(_expand_bwd, x, (x, f, res, post, dy, dx, df, dres, dpost), over_c=False)
    return dx, df, dres, dpost


def collapse_fwd(x, pre):
    """x (..., n, C), pre (..., n) fp32 -> u (..., C) in x's dtype."""
    x, pre = x.contiguous(), pre.float().contiguous()
    u = x.new_empty(x.shape[:-2] + x.shape[-1:])
    _launch(_collapse_fwd, x, (x, pre, u), over_c=True)
    return u


def collapse_bwd(du, x, pre):
    """collapse_fwd's gradients: dx (x's dtype), dpre (fp32)."""
    du, x, pre = du.contiguous(), x.contiguous(), pre.float().contiguous()
    dx, dpre = torch.empty_like(x), torch.empty_like(pre)
    _launch(_collapse_bwd, x, (x, pre, du, dx, dpre), over_c=False)
    return dx, dpre
