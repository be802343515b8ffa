"""
mHC: manifold-constrained hyper-connections, n residual streams instead of one (--mhc).

Papers: DeepSeek-AI, "mHC: Manifold-Constrained Hyper-Connections" (arXiv:2512.24880),
on Zhu et al., "Hyper-Connections" (arXiv:2409.19606, ICLR 2025); equations as in the
torch references of DeepSeek's TileKernels. The residual state of a token is X in R^{n x C}
(n = --mhc_streams, 4). Around each sublayer F (the mixer and the MLP of every block),
for each token on its own:

    r       = RMSNorm(vec(X))                                   (nC, no weight)
    m       = r Phi                                             Phi: nC -> n(n+2)
    m       = m * [s_pre 1_n, s_post 1_n, s_res 1_{n^2}] + base (3 scales, n(n+2) biases)
    H_pre   = sigmoid(m[:n]) + eps                              (n)
    H_post  = 2 sigmoid(m[n:2n])                                (n)
    H_res   = SinkhornKnopp(m[2n:] as a full n x n matrix)      (n x n, doubly stochastic)
    u       = sum_i H_pre[i] X[i]             -> RMSNorm -> F -> f   (C)
    X'[j]   = sum_i H_res[i, j] X[i] + H_post[j] f

Sinkhorn-Knopp (20 iterations, eps 1e-6): softmax over each row, then alternately divide
by the column sums and the row sums (ending on the columns). Doubly stochastic matrices
are closed under products and have spectral norm <= 1, so the mixing over depth can
neither blow up nor vanish: that constraint is mHC's point over plain HC. It runs as one
op (fused Triton kernels on CUDA, nanochat/mhc_triton.py; the backward recomputes the
iterates, as the paper's kernels do), not as ~80 small ops for torch.compile to trace.
The read-out u and the mix X' are ops with fused kernels on CUDA too (coefficients in fp32).

Every coefficient comes from the token's own residual: nothing pools over time, and
decoding needs no cache of its own. The model expands the embedding into n copies before
the first block and takes the mean of the streams before the final norm (gpt.py).

Init (ours; the paper's values are not published): Phi = 0, scales 0.01, base_res = 6 I,
base_pre = +6 on stream (2 layer + sublayer) mod n and -6 on the others, base_post = 0.
Then H_post = 1 on every stream, so f reaches every stream, and all streams stay equal
to today's single residual x. With equal streams the model is exactly the pre-norm
baseline up to rounding: u = (1 + 2 sigmoid(-6) + n eps) x, and the pre-norm removes the
scale; H_res's columns sum to 1, so the mix of equal streams is x again. The residual
"leak" (H_res's off-diagonal mass, about e^-6 = 0.25% per entry, and H_pre's sigmoid(-6)
on the other streams) only matters once the streams differ. The selected stream rotates
over the sublayers to break the symmetry between streams.
"""

import torch
import torch.nn as nn

SINKHORN_ITERS = 20
SINKHORN_EPS = 1e-6
PRE_EPS = 1e-6
INIT_LOGIT = 6.0   # base_res = 6 I, base_pre = +-6
INIT_SCALE = 0.01


def sinkhorn_reference(logits, iters=SINKHORN_ITERS, eps=SINKHORN_EPS):
    """(..., n, n) logits -> doubly stochastic matrices, in fp32 (fp64 stays fp64)."""
    m = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def _sinkhorn_backward_reference(grad, logits, iters, eps):
    """sinkhorn_reference's gradient, written out as the Triton kernel computes it (there by
    recomputing the iterates, here by keeping them): through y = m / (s + eps), s the sum
    along the normalised axis, dm = (dy - sum(dy y)) / (s + eps) along that axis."""
    p = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
    ms = [p + eps]  # the input of each normalisation, columns first, then rows and columns
    for k in range(2 * iters - 1):
        ms.append(ms[-1] / (ms[-1].sum(-2 if k % 2 == 0 else -1, keepdim=True) + eps))
    g = grad.to(p.dtype)
    for k in reversed(range(2 * iters - 1)):
        dim = -2 if k % 2 == 0 else -1
        s = ms[k].sum(dim, keepdim=True) + eps
        g = (g - (g * ms[k + 1]).sum(dim, keepdim=True)) / s
    return (p * (g - (g * p).sum(-1, keepdim=True))).to(logits.dtype)


def _triton_ok(x):
    n = x.size(-1)
    return x.is_cuda and x.dtype != torch.float64 and n & (n - 1) == 0


# Sinkhorn as one op to torch.compile, fused Triton kernels on CUDA (nanochat/mhc_triton.py):
# traced as ~80 small ops per sublayer it made compiling take minutes and the backward keep
# every iterate. The CPU runs the PyTorch reference inside the same op.
@torch.library.custom_op("nanochat::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    if _triton_ok(logits):
        from nanochat.mhc_triton import sinkhorn_fwd
        return sinkhorn_fwd(logits, iters, eps)
    return sinkhorn_reference(logits, iters, eps)


@_sinkhorn_op.register_fake
def _(logits, iters, eps):
    return logits.new_empty(logits.shape, dtype=torch.promote_types(logits.dtype, torch.float32))


@torch.library.custom_op("nanochat::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    if _triton_ok(logits):
        from nanochat.mhc_triton import sinkhorn_bwd
        return sinkhorn_bwd(grad, logits, iters, eps).to(logits.dtype)
    return _sinkhorn_backward_reference(grad, logits, iters, eps)


@_sinkhorn_backward_op.register_fake
def _(grad, logits, iters, eps):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, ctx.iters, ctx.eps = inputs
    ctx.save_for_backward(logits)  # only the logits: the backward recomputes the iterates


def _backward(ctx, grad):
    return _sinkhorn_backward_op(grad, ctx.saved_tensors[0], ctx.iters, ctx.eps), None, None


_sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)


def collapse_reference(x, pre):
    """u = sum_i H_pre[i] X[i]: x (..., n, C), pre (..., n) -> (..., C), in x's dtype."""
    return (pre.to(x.dtype).unsqueeze(-1) * x).sum(-2)


def expand_reference(x, f, res, post):
    """X'[j] = sum_i H_res[i, j] X[i] + H_post[j] f: x (..., n, C), f (..., C), res (..., n, n),
    post (..., n) -> (..., n, C), in x's dtype. As n broadcast products, which the compiler
    fuses into one elementwise pass (an einsum would be a batched matmul of 4 x 4 matrices)."""
    res = res.to(x.dtype)
    mixed = post.to(x.dtype).unsqueeze(-1) * f.unsqueeze(-2)
    for i in range(x.size(-2)):
        mixed = mixed + res[..., i, :, None] * x[..., i, None, :]
    return mixed


# The read-out and the mix as ops with fused Triton kernels on CUDA (nanochat/mhc_triton.py),
# forward and backward: compiled from PyTorch, their backward (n^2 + 2n reductions over C
# per token) took several passes over the n-wide stream. The kernels keep the coefficients
# in fp32 (the PyTorch form rounds them to the stream's dtype first). Other devices use the
# PyTorch form directly (HyperConnection.kernel = "torch").
@torch.library.custom_op("nanochat::hc_collapse", mutates_args=())
def _collapse_op(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    from nanochat.mhc_triton import collapse_fwd
    return collapse_fwd(x, pre)


@_collapse_op.register_fake
def _(x, pre):
    return x.new_empty(x.shape[:-2] + x.shape[-1:])


@torch.library.custom_op("nanochat::hc_collapse_backward", mutates_args=())
def _collapse_backward_op(du: torch.Tensor, x: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from nanochat.mhc_triton import collapse_bwd
    return collapse_bwd(du, x, pre)


@_collapse_backward_op.register_fake
def _(du, x, pre):
    return x.new_empty(x.shape), pre.new_empty(pre.shape, dtype=torch.float32)


@torch.library.custom_op("nanochat::hc_expand", mutates_args=())
def _expand_op(x: torch.Tensor, f: torch.Tensor, res: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    from nanochat.mhc_triton import expand_fwd
    return expand_fwd(x, f, res, post)


@_expand_op.register_fake
def _(x, f, res, post):
    return x.new_empty(x.shape)  # contiguous, as the kernel's output (empty_like would keep x's strides)


@torch.library.custom_op("nanochat::hc_expand_backward", mutates_args=())
def _expand_backward_op(dy: torch.Tensor, x: torch.Tensor, f: torch.Tensor, res: torch.Tensor,
                        post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from nanochat.mhc_triton import expand_bwd
    return expand_bwd(dy, x, f, res, post)


@_expand_backward_op.register_fake
def _(dy, x, f, res, post):
    return (x.new_empty(x.shape), f.new_empty(f.shape), res.new_empty(res.shape, dtype=torch.float32),
            post.new_empty(post.shape, dtype=torch.float32))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _collapse_backward(ctx, du):
    x, pre = ctx.saved_tensors
    dx, dpre = _collapse_backward_op(du, x, pre)
    return dx, dpre.to(pre.dtype)


def _expand_backward(ctx, dy):
    x, f, res, post = ctx.saved_tensors
    dx, df, dres, dpost = _expand_backward_op(dy, x, f, res, post)
    return dx, df, dres.to(res.dtype), dpost.to(post.dtype)


_collapse_op.register_autograd(_collapse_backward, setup_context=_save_inputs)
_expand_op.register_autograd(_expand_backward, setup_context=_save_inputs)

KERNELS = ("triton", "torch")


def set_mhc_kernel(model, kernel):
    """The read-out and the mix of every hyper-connection of model: "triton" (the fused
    kernels, on CUDA with n a power of two; elsewhere the PyTorch form) or "torch" (the
    PyTorch form, compiled with the model). A runtime switch; Sinkhorn is always its op."""
    if kernel not in KERNELS:
        raise ValueError(f"mhc kernel {kernel!r}: use one of {KERNELS}")
    for m in model.modules():
        if isinstance(m, HyperConnection):
            m.kernel = kernel


def sinkhorn(logits, iters=SINKHORN_ITERS, eps=SINKHORN_EPS):
    """(..., n, n) logits -> doubly stochastic matrices, computed in fp32: sinkhorn_reference's
    values, as one op (fused kernels on CUDA); other devices (XLA) trace the reference."""
    if logits.device.type in ("cuda", "cpu"):
        return _sinkhorn_op(logits, iters, eps)
    return sinkhorn_reference(logits, iters, eps)


class HyperConnection(nn.Module):
    """The mHC wrapper of one sublayer: X (B, T, n, C) -> X' (B, T, n, C)."""

    def __init__(self, config, layer_idx, sublayer):
        super().__init__()
        n, C = config.mhc_streams, config.n_embd
        self.n = n
        self.phi = nn.Linear(n * C, n * (n + 2), bias=False)
        self.scale = nn.Parameter(torch.empty(3))
        self.base = nn.Parameter(torch.empty(n * (n + 2)))
        self.stream = (2 * layer_idx + sublayer) % n  # the stream H_pre reads at init
        self.kernel = "triton"  # set_mhc_kernel

    @torch.no_grad()
    def init_weights(self):
        n = self.n
        nn.init.zeros_(self.phi.weight)
        nn.init.constant_(self.scale, INIT_SCALE)
        pre = torch.full((n,), -INIT_LOGIT)
        pre[self.stream] = INIT_LOGIT
        post = torch.zeros(n)
        res = INIT_LOGIT * torch.eye(n)
        self.base.copy_(torch.cat([pre, post, res.flatten()]))

    def opt_tags(self):
        return {"phi.weight": "adamw_mhc", "scale": "adamw_mhc", "base": "adamw_mhc"}

    def flops_per_token(self):
        return 6 * self.phi.weight.numel()  # the stream mixing itself is elementwise-sized (n^2 C)

    def coefficients(self, x):
        """H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n), all fp32."""
        n = self.n
        # RMSNorm(vec X) Φ = (vec X Φ) / rms(vec X): the norm applied after the projection (the
        # paper's kernels do the same), so the normed nC-wide copy of X is never made or kept
        xf = x.flatten(-2)
        inv_rms = torch.rsqrt(xf.float().square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        s = self.scale.float()
        scale = torch.cat([s[0].expand(n), s[1].expand(n), s[2].expand(n * n)])
        m = self.phi(xf).float() * inv_rms * scale + self.base.float()
        pre = torch.sigmoid(m[..., :n]) + PRE_EPS
        post = 2 * torch.sigmoid(m[..., n:2 * n])
        res = sinkhorn(m[..., 2 * n:].unflatten(-1, (n, n)))
        return pre, post, res

    def forward(self, x, sublayer):
        """x (B, T, n, C); sublayer: u (B, T, C) -> f (B, T, C), the norm and F."""
        pre, post, res = self.coefficients(x)
        if self.kernel == "triton" and _triton_ok(res):
            return _expand_op(x, sublayer(_collapse_op(x, pre)), res, post)
        return expand_reference(x, sublayer(collapse_reference(x, pre)), res, post)
