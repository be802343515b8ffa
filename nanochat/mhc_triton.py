"""
Fused Triton kernels for mHC's Sinkhorn-Knopp (nanochat/mhc.py), forward and backward; the
CUDA implementation of the `nanochat::sinkhorn` op, with `mhc.sinkhorn_reference` (PyTorch)
as the exact reference.

Why: written as PyTorch, the 20 iterations unroll into ~80 tiny ops per sublayer, which
torch.compile traces (a d12 took 6 minutes to compile on the H200, against about one for the
baseline) and whose iterates the compiled backward keeps (~2.5 KiB per token per sublayer:
6.5 GiB at d20, batch 32 x 2048). The mHC paper does the same for the same reasons: one
kernel per direction, the backward recomputing the iterations instead of storing them.

Each program holds BLOCK tokens' n x n matrices in registers (n a power of two). Forward:
    S_0 = colnorm(softmax_row(L) + eps),   S_q = colnorm(rownorm(S_{q-1})),  q = 1 .. iters-1
with rownorm(m) = m / (m 1 + eps) and colnorm likewise over columns. Backward: the gradient
of y = m / (s + eps), s the sum along the normalised axis, is dm = (dy - sum(dy y)) / (s + eps)
along the same axis; the kernel walks q = iters-1 .. 1, recomputing S_{q-1} from S_0 each
time (O(iters^2) normalisations of 16 numbers per token: cheap, and nothing stored), then the
first colnorm and the softmax: dL = p (dm - sum_row(dm p)).
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
def _sinkhorn_bwd(L, G, DL, M, eps, ITERS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    x, offs, mask = _load(L, M, N, BLOCK)
    g, _, _ = _load(G, M, N, BLOCK)
    p, m0 = _softmax_eps(x, eps)
    s0 = _colnorm(m0, eps)
    for back in range(ITERS - 1):
        q = ITERS - 1 - back
        s = s0
        for r in range(ITERS - 2):  # S_{q-1} (a constant bound: Triton's interpreter needs one)
            if r < q - 1:
                s = _colnorm(_rownorm(s, eps), eps)
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


def sinkhorn_fwd(logits, iters, eps):
    """(..., n, n) fp32 logits (n a power of two) -> Sinkhorn-Knopp's matrices, fp32."""
    x = logits.float().contiguous()
    n, M = x.size(-1), x.numel() // (x.size(-1) ** 2)
    out = torch.empty_like(x)
    if M:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
            _sinkhorn_fwd[(triton.cdiv(M, BLOCK),)](x, out, M, eps, ITERS=iters, N=n, BLOCK=BLOCK)
    return out


def sinkhorn_bwd(grad, logits, iters, eps):
    """The gradient of sinkhorn_fwd's output (grad) carried back to its logits, fp32."""
    x, g = logits.float().contiguous(), grad.float().contiguous()
    n, M = x.size(-1), x.numel() // (x.size(-1) ** 2)
    dl = torch.empty_like(x)
    if M:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _sinkhorn_bwd[(triton.cdiv(M, BLOCK),)](x, g, dl, M, eps, ITERS=iters, N=n, BLOCK=BLOCK)
    return dl
