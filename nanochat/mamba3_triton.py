"""
Triton kernels for Mamba-3's chunked form, two kinds:
- the steps of the default ("torch") path on an NVIDIA GPU, at the end of this file: turn_qk
  (the per-head biases and rotation of B and C, SISO), angles (the running sum of Δ θ) and
  `mamba3.ssd`'s steps: pass_states (the states' walk across chunks) and, for SISO, chunk_ssd
  (chunk_state, pass_states, chunk_out: each chunk's own state, the walk, each chunk's
  output, with the skip D x) as one op; gate_norm (the output's norm and gate, with or
  without the skip); PyTorch runs the projections and the rest;
- the fully fused chunked SSD, SISO (R = 1), forward and backward, described below; the
  opt-in "triton" path of nanochat/mamba3.py (`set_mamba3_kernel(model, "triton")`,
  --mamba3_kernel=triton);
`mamba3.ssd` and `mamba3.rotate` (PyTorch) are the exact references (tests/test_mamba3_triton.py).

Per batch row b and head h, one program walks the chunks of `chunk` tokens in order,
carrying the state H ∈ R^{P×N} in registers. Per chunk, with t, s the chunk's tokens and
a_cs the inclusive cumsum of a = A Δ within it (a_last its sum):

    k_s = rot(B_s + b_B[h], φ_s),  q_t = rot(C_t + b_C[h], φ_t)      B, C shared by the heads
    L[t, s]   = exp(a_cs[t] - a_cs[s]) (w_s + [s < t] w_next_s)       for s <= t, else 0
    Y_t       = Σ_s (q_t · k_s) L[t, s] x_s + exp(a_cs[t]) H q_t
    H        <- exp(a_last) H + Σ_s exp(a_last - a_cs[s]) (w_s + w_next_s) x_s k_sᵀ

which is `ssd(x, a, k, q, w, w_next, chunk, H0)` (w = λ Δ, w_next = the trapezoid's β-weight).
What is fused: the per-head bias and the rotation by φ of B and C (the (B, T, H, N) turned
k and q never reach HBM; B and C are read once per head as (B, T, N)), the within-chunk
scores, the chunk's state update, the state passing across chunks, the initial and final
state. The rotation turns pairs (0,1), (2,3), ... of the first N/2 dims, so the kernels
hold every (T, N) tile as its even and odd columns, (T, N/2) each: a pair is one column
of each, and q·k = q_e·k_e + q_o·k_o.

The backward walks the chunks in reverse carrying dH (the gradient of the state leaving
the chunk), from the entering states the forward saved ((B, H, c, P, N), fp32), and
recomputes k, q and L. Per chunk, with S = (q kᵀ) ∘ L, d_s = exp(a_last - a_cs[s]) (w_s +
w_next_s) and G = dY:
    dx_s  = Σ_t S[t, s] G_t + d_s dH k_s            dq_t = Σ_s (G_t·x_s) L[t,s] k_s + exp(a_cs[t]) G_t H
    dk_s  = Σ_t (G_t·x_s) L[t,s] q_t + d_s dHᵀ x_s   dH_entering = exp(a_last) dH + Σ_t exp(a_cs[t]) G_t q_tᵀ
and the scalars' gradients from L, d and exp(a_cs) (da by a reverse cumsum of d a_cs).
dk, dq leave turned back by -φ, with dφ = dk_o k_e - dk_e k_o (turned values) summed over
k and q, as per-head (B, T, H, N) tensors, summed over the heads in PyTorch for dB, dC
and the biases.

The official SISO kernels (state-spaces/mamba, mamba_ssm/ops/triton/mamba3/
mamba3_siso_fwd.py, _bwd.py) also run one program per (head, batch row) over the chunks
in order; these are our own, simpler (no autotuning, no varlen, no fused output gate
or D). Mamba-2's instead split the chunks over programs (ssd_chunk_state, ssd_state_passing,
ssd_chunk_scan in mamba_ssm/ops/triton/). Measured on an H200 (docs/benchmarks.md, "Mamba-3
hybrids"): as accurate as the PyTorch form, 24 GiB less memory at d20, but 29% slower, hence
opt-in. The kernels compute in fp32; the matmuls take their inputs in x's dtype (bf16 under
autocast, as the PyTorch path does; fp32 products are IEEE, not TF32).
Runs on the CPU under TRITON_INTERPRET=1 (tests/test_mamba3_triton.py).
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, dt: tl.constexpr):
    """a @ b with both in dt (the model's dtype), accumulated in fp32; an fp32 model gets
    full-precision products (Triton's default for fp32 is TF32: ~1e-3 relative error)."""
    if dt == tl.float32:
        return tl.dot(a.to(dt), b.to(dt), input_precision="ieee")
    return tl.dot(a.to(dt), b.to(dt))


@triton.jit
def _load_bc(ptr, bias_ptr, phi_ptr, b, t, h, T, H, N, A, offs_j, mask_t, mask_j):
    """(BT, BN2) even and odd columns of rot(B + bias[h], φ) for tokens t, and cos, sin."""
    base = (b * T + t[:, None]) * N + 2 * offs_j[None, :]
    m = mask_t[:, None] & mask_j[None, :]
    e = tl.load(ptr + base, mask=m, other=0.0).to(tl.float32)
    o = tl.load(ptr + base + 1, mask=m, other=0.0).to(tl.float32)
    e += tl.load(bias_ptr + h * N + 2 * offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    o += tl.load(bias_ptr + h * N + 2 * offs_j + 1, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    phi = tl.load(phi_ptr + ((b * T + t[:, None]) * H + h) * A + offs_j[None, :],
                  mask=mask_t[:, None] & (offs_j[None, :] < A), other=0.0)  # pairs past A: angle 0
    c, s = tl.cos(phi), tl.sin(phi)
    return e * c - o * s, e * s + o * c, e, o, c, s


@triton.jit
def _load_decay(AA, W, WN, b, t, h, T, H, mask_t):
    """A Δ's cumsum over the chunk's tokens t and its total, and the trapezoid's weights w, w_next."""
    off = (b * T + t) * H + h
    a = tl.load(AA + off, mask=mask_t, other=0.0)
    w = tl.load(W + off, mask=mask_t, other=0.0)
    wn = tl.load(WN + off, mask=mask_t, other=0.0)
    return tl.cumsum(a, 0), tl.sum(a, 0), w, wn


@triton.jit
def _fwd(X, Bm, Cm, bB, bC, PHI, AA, W, WN, S0, Y, SF, SCH, T, H, P, N, A, n_chunks,
         CHUNK: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN2: tl.constexpr):
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    dt = X.dtype.element_ty
    offs_t, offs_p, offs_j = tl.arange(0, BT), tl.arange(0, BP), tl.arange(0, BN2)
    mask_p, mask_j = offs_p < P, offs_j < N // 2
    sm = mask_p[:, None] & mask_j[None, :]
    s_off = offs_p[:, None] * N + 2 * offs_j[None, :]  # (P, N/2) even columns of a (P, N) state
    He = tl.load(S0 + pid * P * N + s_off, mask=sm, other=0.0)
    Ho = tl.load(S0 + pid * P * N + s_off + 1, mask=sm, other=0.0)
    causal = offs_t[:, None] >= offs_t[None, :]
    later = offs_t[:, None] > offs_t[None, :]
    ci = 0
    while ci < n_chunks:  # (a while loop: Triton 3.5's interpreter cannot range() over a runtime int with numpy 2.4)
        tl.store(SCH + (pid * n_chunks + ci) * P * N + s_off, He, mask=sm)
        tl.store(SCH + (pid * n_chunks + ci) * P * N + s_off + 1, Ho, mask=sm)
        t = ci * CHUNK + offs_t
        mask_t = (offs_t < CHUNK) & (t < T)
        a_cs, a_last, w, wn = _load_decay(AA, W, WN, b, t, h, T, H, mask_t)
        ke, ko, _, _, _, _ = _load_bc(Bm, bB, PHI, b, t, h, T, H, N, A, offs_j, mask_t, mask_j)
        qe, qo, _, _, _, _ = _load_bc(Cm, bC, PHI, b, t, h, T, H, N, A, offs_j, mask_t, mask_j)
        x_ptr = X + ((b * T + t[:, None]) * H + h) * P + offs_p[None, :]
        x = tl.load(x_ptr, mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        L = tl.exp(tl.where(causal, a_cs[:, None] - a_cs[None, :], float("-inf")))
        L = L * (w[None, :] + tl.where(later, wn[None, :], 0.0))
        scores = _dot(qe, tl.trans(ke), dt) + _dot(qo, tl.trans(ko), dt)
        y = _dot(scores * L, x, dt)
        y += tl.exp(a_cs)[:, None] * (_dot(qe, tl.trans(He), dt) + _dot(qo, tl.trans(Ho), dt))
        tl.store(Y + ((b * T + t[:, None]) * H + h) * P + offs_p[None, :], y, mask=mask_t[:, None] & mask_p[None, :])
        xd = (x * (tl.exp(a_last - a_cs) * (w + wn))[:, None]).to(dt)
        He = tl.exp(a_last) * He + _dot(tl.trans(xd), ke, dt)
        Ho = tl.exp(a_last) * Ho + _dot(tl.trans(xd), ko, dt)
        ci += 1
    tl.store(SF + pid * P * N + s_off, He, mask=sm)
    tl.store(SF + pid * P * N + s_off + 1, Ho, mask=sm)


@triton.jit
def _store_bc_grad(DK, b, t, h, T, H, N, A, offs_j, mask_t, mask_j, dke, dko, ke, ko, c, s, dphi):
    """dk of the turned k -> of the unturned (turn back by -φ), into DK (B, T, H, N); returns
    dφ plus this one's share: k_e' = e c - o s, k_o' = e s + o c, so d/dφ = (-k_o', k_e')."""
    base = ((b * T + t[:, None]) * H + h) * N + 2 * offs_j[None, :]
    m = mask_t[:, None] & mask_j[None, :]
    tl.store(DK + base, dke * c + dko * s, mask=m)
    tl.store(DK + base + 1, dko * c - dke * s, mask=m)
    return dphi + dko * ke - dke * ko


@triton.jit
def _bwd(X, Bm, Cm, bB, bC, PHI, AA, W, WN, SCH, DY, DSF,
         DX, DKB, DQB, DPHI, DA, DW, DWN, DS0, T, H, P, N, A, n_chunks,
         CHUNK: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN2: tl.constexpr):
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    dt = X.dtype.element_ty
    offs_t, offs_p, offs_j = tl.arange(0, BT), tl.arange(0, BP), tl.arange(0, BN2)
    mask_p, mask_j = offs_p < P, offs_j < N // 2
    sm = mask_p[:, None] & mask_j[None, :]
    s_off = offs_p[:, None] * N + 2 * offs_j[None, :]
    dHe = tl.load(DSF + pid * P * N + s_off, mask=sm, other=0.0)  # gradient of the state leaving the chunk
    dHo = tl.load(DSF + pid * P * N + s_off + 1, mask=sm, other=0.0)
    causal = offs_t[:, None] >= offs_t[None, :]
    later = offs_t[:, None] > offs_t[None, :]
    ci = n_chunks - 1
    while ci >= 0:
        He = tl.load(SCH + (pid * n_chunks + ci) * P * N + s_off, mask=sm, other=0.0)
        Ho = tl.load(SCH + (pid * n_chunks + ci) * P * N + s_off + 1, mask=sm, other=0.0)
        t = ci * CHUNK + offs_t
        mask_t = (offs_t < CHUNK) & (t < T)
        a_cs, a_last, w, wn = _load_decay(AA, W, WN, b, t, h, T, H, mask_t)
        ke, ko, _, _, kc, ks = _load_bc(Bm, bB, PHI, b, t, h, T, H, N, A, offs_j, mask_t, mask_j)
        qe, qo, _, _, qc, qs = _load_bc(Cm, bC, PHI, b, t, h, T, H, N, A, offs_j, mask_t, mask_j)
        tp_off = ((b * T + t[:, None]) * H + h) * P + offs_p[None, :]
        tp_mask = mask_t[:, None] & mask_p[None, :]
        x = tl.load(X + tp_off, mask=tp_mask, other=0.0).to(tl.float32)
        g = tl.load(DY + tp_off, mask=tp_mask, other=0.0).to(tl.float32)
        E = tl.exp(tl.where(causal, a_cs[:, None] - a_cs[None, :], float("-inf")))
        L = E * (w[None, :] + tl.where(later, wn[None, :], 0.0))
        qk = _dot(qe, tl.trans(ke), dt) + _dot(qo, tl.trans(ko), dt)
        dS = _dot(g, tl.trans(x), dt)             # (t, s): G_t · x_s
        dqk = (dS * L).to(dt)
        dL = dS * qk
        decay_end = tl.exp(a_last - a_cs)
        d = decay_end * (w + wn)
        eacs = tl.exp(a_cs)
        # x
        dx = _dot(tl.trans(qk * L), g, dt)
        dx += d[:, None] * (_dot(ke, tl.trans(dHe), dt) + _dot(ko, tl.trans(dHo), dt))
        tl.store(DX + tp_off, dx, mask=tp_mask)
        # q (turned), then k (turned)
        ge = (g * eacs[:, None]).to(dt)
        dqe = _dot(dqk, ke, dt) + _dot(ge, He, dt)
        dqo = _dot(dqk, ko, dt) + _dot(ge, Ho, dt)
        xdHe = _dot(x, dHe, dt)                    # (t, N/2): Σ_p x_p dH[p, :]
        xdHo = _dot(x, dHo, dt)
        dke = _dot(tl.trans(dqk), qe, dt) + d[:, None] * xdHe
        dko = _dot(tl.trans(dqk), qo, dt) + d[:, None] * xdHo
        dphi = tl.zeros((BT, BN2), dtype=tl.float32)
        dphi = _store_bc_grad(DQB, b, t, h, T, H, N, A, offs_j, mask_t, mask_j, dqe, dqo, qe, qo, qc, qs, dphi)
        dphi = _store_bc_grad(DKB, b, t, h, T, H, N, A, offs_j, mask_t, mask_j, dke, dko, ke, ko, kc, ks, dphi)
        tl.store(DPHI + ((b * T + t[:, None]) * H + h) * A + offs_j[None, :], dphi,
                 mask=mask_t[:, None] & (offs_j[None, :] < A))
        # the scalars: w, w_next through L and d; a_cs through L, d, exp(a_cs) and exp(a_last)
        dd = tl.sum(ke * xdHe + ko * xdHo, 1)                  # dLoss/dd_s
        dEL = dL * E
        dw = tl.sum(dEL, 0) + dd * decay_end
        dwn = tl.sum(tl.where(later, dEL, 0.0), 0) + dd * decay_end
        dLL = dL * L
        qH = _dot(qe, tl.trans(He), dt) + _dot(qo, tl.trans(Ho), dt)
        dacs = tl.sum(dLL, 1) - tl.sum(dLL, 0) + eacs * tl.sum(g * qH, 1) - dd * d
        dlast = tl.sum(dd * d, 0) + tl.exp(a_last) * tl.sum(tl.sum(He * dHe + Ho * dHo, 1), 0)
        da = tl.sum(dacs, 0) - tl.cumsum(dacs, 0) + dacs + dlast  # a_j enters a_cs[t] for t >= j, and a_last
        tl.store(DA + (b * T + t) * H + h, da, mask=mask_t)
        tl.store(DW + (b * T + t) * H + h, dw, mask=mask_t)
        tl.store(DWN + (b * T + t) * H + h, dwn, mask=mask_t)
        # the gradient of the state entering this chunk = leaving the previous one
        dHe = tl.exp(a_last) * dHe + _dot(tl.trans(ge), qe, dt)
        dHo = tl.exp(a_last) * dHo + _dot(tl.trans(ge), qo, dt)
        ci -= 1
    tl.store(DS0 + pid * P * N + s_off, dHe, mask=sm)
    tl.store(DS0 + pid * P * N + s_off + 1, dHo, mask=sm)


def _blocks(chunk, P, N):
    p2 = lambda n: max(16, triton.next_power_of_2(n))  # tl.dot wants every dim >= 16
    return dict(CHUNK=chunk, BT=p2(chunk), BP=p2(P), BN2=p2(N // 2))


@torch.library.custom_op("nanochat::mamba3_ssd_fwd", mutates_args=())
def _ssd_fwd(x: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, B_bias: torch.Tensor, C_bias: torch.Tensor,
             phi: torch.Tensor, a: torch.Tensor, w: torch.Tensor, w_next: torch.Tensor, state0: torch.Tensor,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the kernels index every tensor as contiguous; inside a compiled graph the caller's
    # .contiguous() can be traced away and inductor may hand over another layout
    x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, state0 = (
        t.contiguous() for t in (x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, state0))
    Bsz, T, H, P = x.shape
    N, A, c = Bm.size(-1), phi.size(-1), triton.cdiv(T, chunk)
    y = x.new_empty(x.shape)
    final = torch.empty(Bsz, H, P, N, device=x.device, dtype=torch.float32)
    states = torch.empty(Bsz, H, c, P, N, device=x.device, dtype=torch.float32)
    _fwd[(Bsz * H,)](x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, state0, y, final, states,
                     T, H, P, N, A, c, **_blocks(chunk, P, N))
    return y, final, states


@_ssd_fwd.register_fake
def _(x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, state0, chunk):
    Bsz, T, H, P = x.shape
    N, c = Bm.size(-1), -(-T // chunk)
    return (x.new_empty(x.shape), x.new_empty(Bsz, H, P, N, dtype=torch.float32),
            x.new_empty(Bsz, H, c, P, N, dtype=torch.float32))


@torch.library.custom_op("nanochat::mamba3_ssd_bwd", mutates_args=())
def _ssd_bwd(x: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, B_bias: torch.Tensor, C_bias: torch.Tensor,
             phi: torch.Tensor, a: torch.Tensor, w: torch.Tensor, w_next: torch.Tensor, states: torch.Tensor,
             dy: torch.Tensor, dfinal: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, states, dy, dfinal = (  # contiguous, as in _ssd_fwd
        t.contiguous() for t in (x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, states, dy, dfinal))
    Bsz, T, H, P = x.shape
    N, A, c = Bm.size(-1), phi.size(-1), states.size(2)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(Bsz, T, H, P, **f32)
    dkb, dqb = torch.empty(Bsz, T, H, N, **f32), torch.empty(Bsz, T, H, N, **f32)
    dphi = torch.empty(Bsz, T, H, A, **f32)
    da, dw, dwn = (torch.empty(Bsz, T, H, **f32) for _ in range(3))
    ds0 = torch.empty(Bsz, H, P, N, **f32)
    _bwd[(Bsz * H,)](x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, states, dy, dfinal,
                     dx, dkb, dqb, dphi, da, dw, dwn, ds0, T, H, P, N, A, c, **_blocks(chunk, P, N))
    return [dx, dkb, dqb, dphi, da, dw, dwn, ds0]


@_ssd_bwd.register_fake
def _(x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, states, dy, dfinal, chunk):
    Bsz, T, H, P = x.shape
    N, A = Bm.size(-1), phi.size(-1)
    f32 = lambda *s: x.new_empty(*s, dtype=torch.float32)
    return [f32(Bsz, T, H, P), f32(Bsz, T, H, N), f32(Bsz, T, H, N), f32(Bsz, T, H, A),
            f32(Bsz, T, H), f32(Bsz, T, H), f32(Bsz, T, H), f32(Bsz, H, P, N)]


def _setup(ctx, inputs, output):
    x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, state0, chunk = inputs
    ctx.save_for_backward(x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, output[2])
    ctx.chunk = chunk


def _backward(ctx, dy, dfinal, dstates):
    x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, states = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    dfinal = torch.zeros_like(states[:, :, 0]) if dfinal is None else dfinal
    dx, dkb, dqb, dphi, da, dw, dwn, ds0 = _ssd_bwd(x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, states,
                                                    dy, dfinal, ctx.chunk)
    # B and C are shared by the heads, the biases by the tokens: sum the per-head gradients
    return (dx.to(x.dtype), dkb.sum(2).to(Bm.dtype), dqb.sum(2).to(Cm.dtype), dkb.sum((0, 1)).to(B_bias.dtype),
            dqb.sum((0, 1)).to(C_bias.dtype), dphi, da, dw, dwn, ds0, None)


_ssd_fwd.register_autograd(_backward, setup_context=_setup)


def ssd_rotated(x, Bm, Cm, B_bias, C_bias, phi, a, w, w_next, state0, chunk):
    """The fused `ssd(x, a, rot(Bm + B_bias, φ), rot(Cm + C_bias, φ), w, w_next, chunk, state0)`
    for R = 1: x (B, T, H, P); Bm, Cm (B, T, N), shared by the heads; B_bias, C_bias (H, N);
    φ (B, T, H, A) fp32, turning the first A pairs; a, w, w_next (B, T, H) fp32; state0
    (B, H, P, N); a bias may be None. Returns y (B, T, H, P) in x's dtype and the final state (fp32)."""
    f32 = lambda t: t.float()  # (the op makes every input contiguous itself)
    if phi.size(-1) == 0:  # no rotation: one pair turned by 0 keeps the kernels free of empty tensors
        phi = phi.new_zeros(*phi.shape[:-1], 1)
    H, N = x.size(2), Bm.size(-1)
    B_bias = Bm.new_zeros(H, N) if B_bias is None else B_bias
    C_bias = Cm.new_zeros(H, N) if C_bias is None else C_bias
    y, final, _ = _ssd_fwd(x, Bm, Cm, B_bias, C_bias, f32(phi), f32(a), f32(w), f32(w_next), f32(state0), chunk)
    return y, final


# ---------------------------------------------------------------------------------------------
# The bias and rotation alone, for the default (PyTorch) chunked form on a GPU: k and q for
# every head, written head-major (B, H, T, N) as `ssd` folds them into chunks. In PyTorch the
# same step is a per-head broadcast, a rotation with its stack/cat, and a fold copy, each with
# fp32 intermediates of (B, T, H, N), and its backward a 2-D reduction over the heads; here one
# program per (row, block of tokens) reads B and C once, loops over the heads, and in the
# backward sums their gradients over the heads in registers (docs/benchmarks.md, "Mamba-3").

FAST_TRIG = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")  # inline PTX: not in the interpreter


@triton.jit
def _cos_sin(phi):
    """cos and sin by the GPU's approximate instructions (absolute error ~1e-6 on [-π, π],
    where φ in [0, 2π) is moved first; one MUFU op each), exact ones in the interpreter.
    libdevice's exact cos/sin need more registers than the rest of these kernels (their
    large-argument path)."""
    if FAST_TRIG:
        phi = tl.where(phi > 3.141592653589793, phi - 6.283185307179586, phi)  # into [-π, π], their documented range
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [phi], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [phi], dtype=tl.float32, is_pure=True, pack=1)
        return c, s
    return tl.cos(phi), tl.sin(phi)


@triton.jit
def _pairs(x, R: tl.constexpr, BN2: tl.constexpr):
    """(R, 2 BN2) values, read contiguously -> their even and odd columns, (R, BN2) each, fp32."""
    return tl.split(tl.reshape(x.to(tl.float32), (R, BN2, 2)))


@triton.jit
def _interleave(e, o, R: tl.constexpr, BN2: tl.constexpr):
    return tl.reshape(tl.join(e, o), (R, 2 * BN2))


@triton.jit
def _plus_bias(e, o, bias_ptr, h, N, cols, mask_c, BN2: tl.constexpr):
    be, bo = _pairs(tl.load(bias_ptr + h * N + cols, mask=mask_c, other=0.0)[None, :], 1, BN2)
    return e + be, o + bo


@triton.jit
def _turn_fwd(Bm, Cm, bB, bC, PHI, K, Q, T, H, N, A, HB,
              HAS_BIAS: tl.constexpr, BT: tl.constexpr, BN2: tl.constexpr):
    """Program (token block, row, head group): B and C read once, then per head of the group
    k and q turned and written head-major, whole rows of N at a time."""
    pid_t, b, hg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, cols, j = pid_t * BT + tl.arange(0, BT), tl.arange(0, 2 * BN2), tl.arange(0, BN2)
    mask_t, mask_c = t < T, cols < N
    m = mask_t[:, None] & mask_c[None, :]
    pm = mask_t[:, None] & (j[None, :] < A)  # pairs past A: angle 0
    src = (b * T + t[:, None]) * N + cols[None, :]
    be, bo = _pairs(tl.load(Bm + src, mask=m, other=0.0), BT, BN2)
    ce, co = _pairs(tl.load(Cm + src, mask=m, other=0.0), BT, BN2)
    h = hg * HB
    h_end = tl.minimum(h + HB, H)
    while h < h_end:  # (a while loop, see _fwd)
        ke, ko, qe, qo = be, bo, ce, co
        if HAS_BIAS:
            ke, ko = _plus_bias(ke, ko, bB, h, N, cols, mask_c, BN2)
            qe, qo = _plus_bias(qe, qo, bC, h, N, cols, mask_c, BN2)
        c, s = _cos_sin(tl.load(PHI + ((b * T + t[:, None]) * H + h) * A + j[None, :], mask=pm, other=0.0))
        dst = ((b * H + h) * T + t[:, None]) * N + cols[None, :]
        tl.store(K + dst, _interleave(ke * c - ko * s, ke * s + ko * c, BT, BN2).to(K.dtype.element_ty), mask=m)
        tl.store(Q + dst, _interleave(qe * c - qo * s, qe * s + qo * c, BT, BN2).to(Q.dtype.element_ty), mask=m)
        h += 1


@triton.jit
def _turn_bwd(Bm, Cm, bB, bC, PHI, DK, DQ, DB, DC, DBB, DBC, DPHI, T, H, N, A, HB,
              HAS_BIAS: tl.constexpr, BT: tl.constexpr, BN2: tl.constexpr):
    """With u the unturned value and u' = rot(u, φ): du = rot(du', -φ) and dφ = du'_o u'_e -
    du'_e u'_o per pair, summed over k and q. dB, dC: the head group's sum of du (DB, DC are
    (groups, B, T, N)); the biases' per-program partial sums go to DBB, DBC (programs, H, N)."""
    pid_t, b, hg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid = b * tl.num_programs(0) + pid_t
    t, cols, j = pid_t * BT + tl.arange(0, BT), tl.arange(0, 2 * BN2), tl.arange(0, BN2)
    mask_t, mask_c = t < T, cols < N
    m = mask_t[:, None] & mask_c[None, :]
    pm = mask_t[:, None] & (j[None, :] < A)
    src = (b * T + t[:, None]) * N + cols[None, :]
    be, bo = _pairs(tl.load(Bm + src, mask=m, other=0.0), BT, BN2)
    ce, co = _pairs(tl.load(Cm + src, mask=m, other=0.0), BT, BN2)
    dbe, dbo = tl.zeros((BT, BN2), tl.float32), tl.zeros((BT, BN2), tl.float32)
    dce, dco = tl.zeros((BT, BN2), tl.float32), tl.zeros((BT, BN2), tl.float32)
    h = hg * HB
    h_end = tl.minimum(h + HB, H)
    while h < h_end:
        ke, ko, qe, qo = be, bo, ce, co
        if HAS_BIAS:
            ke, ko = _plus_bias(ke, ko, bB, h, N, cols, mask_c, BN2)
            qe, qo = _plus_bias(qe, qo, bC, h, N, cols, mask_c, BN2)
        phi_off = ((b * T + t[:, None]) * H + h) * A + j[None, :]
        c, s = _cos_sin(tl.load(PHI + phi_off, mask=pm, other=0.0))
        dst = ((b * H + h) * T + t[:, None]) * N + cols[None, :]
        gke, gko = _pairs(tl.load(DK + dst, mask=m, other=0.0), BT, BN2)
        gqe, gqo = _pairs(tl.load(DQ + dst, mask=m, other=0.0), BT, BN2)
        dphi = gko * (ke * c - ko * s) - gke * (ke * s + ko * c) + gqo * (qe * c - qo * s) - gqe * (qe * s + qo * c)
        tl.store(DPHI + phi_off, dphi, mask=pm)
        uke, uko = gke * c + gko * s, gko * c - gke * s
        uqe, uqo = gqe * c + gqo * s, gqo * c - gqe * s
        dbe += uke
        dbo += uko
        dce += uqe
        dco += uqo
        if HAS_BIAS:
            part = (pid * H + h) * N + cols
            tl.store(DBB + part, tl.reshape(tl.join(tl.sum(uke, 0), tl.sum(uko, 0)), (2 * BN2,)), mask=mask_c)
            tl.store(DBC + part, tl.reshape(tl.join(tl.sum(uqe, 0), tl.sum(uqo, 0)), (2 * BN2,)), mask=mask_c)
        h += 1
    dst = ((hg * tl.num_programs(1) + b) * T + t[:, None]) * N + cols[None, :]
    tl.store(DB + dst, _interleave(dbe, dbo, BT, BN2), mask=m)
    tl.store(DC + dst, _interleave(dce, dco, BT, BN2), mask=m)


# tokens per program, heads per program (a group), warps: memory-bound kernels, so small
# tiles and many programs (registers: dev/triton_regs.py)
TURN_BT, TURN_HB, TURN_WARPS = 16, 8, 4


def _turn_launch(Bm, T, H):
    grid = (triton.cdiv(T, TURN_BT), Bm.size(0), triton.cdiv(H, TURN_HB))
    return grid, dict(BT=TURN_BT, BN2=triton.next_power_of_2(Bm.size(-1) // 2), num_warps=TURN_WARPS)


@torch.library.custom_op("nanochat::mamba3_turn_fwd", mutates_args=())
def _turn(Bm: torch.Tensor, Cm: torch.Tensor, B_bias: torch.Tensor, C_bias: torch.Tensor, phi: torch.Tensor,
          has_bias: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    Bm, Cm, B_bias, C_bias, phi = (t.contiguous() for t in (Bm, Cm, B_bias, C_bias, phi))  # as in _ssd_fwd
    Bsz, T, H, A = phi.shape
    k = torch.empty(Bsz, H, T, Bm.size(-1), device=Bm.device, dtype=dtype)
    q = torch.empty_like(k)
    grid, kw = _turn_launch(Bm, T, H)
    _turn_fwd[grid](Bm, Cm, B_bias, C_bias, phi, k, q, T, H, Bm.size(-1), A, TURN_HB, HAS_BIAS=has_bias, **kw)
    return k, q


@_turn.register_fake
def _(Bm, Cm, B_bias, C_bias, phi, has_bias, dtype):
    Bsz, T, H, _ = phi.shape
    k = Bm.new_empty(Bsz, H, T, Bm.size(-1), dtype=dtype)
    return k, torch.empty_like(k)


@torch.library.custom_op("nanochat::mamba3_turn_bwd", mutates_args=())
def _turn_grad(Bm: torch.Tensor, Cm: torch.Tensor, B_bias: torch.Tensor, C_bias: torch.Tensor, phi: torch.Tensor,
               dk: torch.Tensor, dq: torch.Tensor, has_bias: bool) -> list[torch.Tensor]:
    Bm, Cm, B_bias, C_bias, phi, dk, dq = (t.contiguous() for t in (Bm, Cm, B_bias, C_bias, phi, dk, dq))
    Bsz, T, H, A = phi.shape
    N = Bm.size(-1)
    grid, kw = _turn_launch(Bm, T, H)
    f32 = dict(device=Bm.device, dtype=torch.float32)
    dB, dC = torch.empty(grid[2], Bsz, T, N, **f32), torch.empty(grid[2], Bsz, T, N, **f32)  # per head group
    dphi = torch.empty(Bsz, T, H, A, **f32)
    parts = (grid[0] * grid[1], H, N) if has_bias else (1,)
    dbB, dbC = torch.empty(parts, **f32), torch.empty(parts, **f32)
    _turn_bwd[grid](Bm, Cm, B_bias, C_bias, phi, dk, dq, dB, dC, dbB, dbC, dphi, T, H, N, A, TURN_HB,
                    HAS_BIAS=has_bias, **kw)
    dB, dC = (dB[0], dC[0]) if grid[2] == 1 else (dB.sum(0), dC.sum(0))  # one head group: no sum
    if has_bias:
        dbB, dbC = dbB.sum(0), dbC.sum(0)
    return [dB, dC, dbB, dbC, dphi]


@_turn_grad.register_fake
def _(Bm, Cm, B_bias, C_bias, phi, dk, dq, has_bias):
    Bsz, T, H, A = phi.shape
    f32 = lambda *s: Bm.new_empty(*s, dtype=torch.float32)
    bias = (H, Bm.size(-1)) if has_bias else (1,)
    return [f32(*Bm.shape), f32(*Cm.shape), f32(*bias), f32(*bias), f32(Bsz, T, H, A)]


def _turn_setup(ctx, inputs, output):
    Bm, Cm, B_bias, C_bias, phi, has_bias, dtype = inputs
    ctx.save_for_backward(Bm, Cm, B_bias, C_bias, phi)
    ctx.has_bias = has_bias


def _turn_backward(ctx, dk, dq):
    Bm, Cm, B_bias, C_bias, phi = ctx.saved_tensors
    dk = torch.zeros(phi.size(0), phi.size(2), phi.size(1), Bm.size(-1), device=Bm.device) if dk is None else dk
    dq = torch.zeros_like(dk) if dq is None else dq
    dB, dC, dbB, dbC, dphi = _turn_grad(Bm, Cm, B_bias, C_bias, phi, dk, dq, ctx.has_bias)
    bias_grads = (dbB.to(B_bias.dtype), dbC.to(C_bias.dtype)) if ctx.has_bias else (None, None)
    return (dB.to(Bm.dtype), dC.to(Cm.dtype), *bias_grads, dphi, None, None)


_turn.register_autograd(_turn_backward, setup_context=_turn_setup)


def turn_qk(Bm, Cm, B_bias, C_bias, phi, dtype):
    """k = rot(Bm + B_bias[h], φ) and q = rot(Cm + C_bias[h], φ) for every head h, as
    `mamba3.rotate` turns them, written head-major: Bm, Cm (B, T, N) shared by the heads;
    biases (H, N) or None; φ (B, T, H, A) fp32, turning the first A pairs. Returns k, q
    (B, H, T, N) in dtype; computes in fp32 (the bias added in fp32, not in dtype). The
    kernels' offsets are int32 (int64 ones cost registers and spilled): B T H N < 2^31,
    i.e. up to ~420k tokens a call at d20 (mamba3 turns larger calls in PyTorch)."""
    has_bias = B_bias is not None
    if not has_bias:  # placeholders the kernels never read (HAS_BIAS=False)
        B_bias = C_bias = Bm.new_zeros(1)
    if phi.size(-1) == 0:  # no rotation: one pair turned by exactly 0 keeps the kernels free of empty tensors
        phi = phi.new_zeros(*phi.shape[:-1], 1)
    return _turn(Bm, Cm, B_bias, C_bias, phi.float(), has_bias, dtype)


# ---------------------------------------------------------------------------------------------
# The angles, for the default chunked form on a GPU: for every head h and pair a,
#     φ_t = (φ_0 + Σ_{s <= t} Δ_{s,h} θ_{s,a}) mod 2π,   (B, T, H, A)
# the products in fp32, the sum in fp64 (over long sequences fp32 would lose the angle),
# written fp32. PyTorch runs it as an fp64 scan over a (B, T, H, A) tensor and its backward
# as a reversed scan and two reductions, passes over tensors of that size; here one program
# per (row, group of heads) walks the tokens in blocks, carrying the sums in fp64 registers.
# Backward, with G_t = Σ_{s >= t} dφ_s (the reversed scan, fp64, used in fp32 as PyTorch's
# cast does):  dΔ_{t,h} = Σ_a G_{t,h,a} θ_{t,a},  dθ_{t,a} = Σ_h G_{t,h,a} Δ_{t,h} (each group
# its share, summed after).

@triton.jit
def _angle_tiles(DT, TH, b, h, t, T, H, A, BA: tl.constexpr):
    a = tl.arange(0, BA)
    mt, mh, ma = t < T, h < H, a < A
    dt = tl.load(DT + (b * T + t[:, None]) * H + h[None, :], mask=mt[:, None] & mh[None, :], other=0.0)
    th = tl.load(TH + (b * T + t[:, None]) * A + a[None, :], mask=mt[:, None] & ma[None, :], other=0.0)
    off = ((b * T + t[:, None, None]) * H + h[None, :, None]) * A + a[None, None, :]
    m = mt[:, None, None] & mh[None, :, None] & ma[None, None, :]
    return dt, th, off, m, a, mt, mh, ma


@triton.jit
def _angles_fwd(DT, TH, PHI0, PHI, T, H, A, BT: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr):
    b, hg = tl.program_id(0), tl.program_id(1)
    i, h, a0 = tl.arange(0, BT), hg * HB + tl.arange(0, HB), tl.arange(0, BA)
    carry = tl.load(PHI0 + (b * H + h[:, None]) * A + a0[None, :], mask=(h < H)[:, None] & (a0 < A)[None, :],
                    other=0.0).to(tl.float64)                                  # (HB, BA)
    two_pi = 6.283185307179586
    t0 = 0
    while t0 < T:  # (a while loop: the interpreter's range() cannot take a runtime bound)
        dt, th, off, m, a, mt, mh, ma = _angle_tiles(DT, TH, b, h, t0 + i, T, H, A, BA)
        d = (dt[:, :, None] * th[:, None, :]).to(tl.float64)                   # (BT, HB, BA)
        phi = tl.cumsum(d, 0) + carry[None, :, :]
        carry += tl.sum(d, 0)
        phi -= tl.floor(phi / two_pi) * two_pi                                 # torch.remainder's
        tl.store(PHI + off, phi.to(tl.float32), mask=m)
        t0 += BT


@triton.jit
def _angles_bwd(DPHI, DT, TH, DDT, DTH, T, H, A, BT: tl.constexpr, HB: tl.constexpr, BA: tl.constexpr):
    b, hg = tl.program_id(0), tl.program_id(1)
    i, h = tl.arange(0, BT), hg * HB + tl.arange(0, HB)
    carry = tl.zeros((HB, BA), dtype=tl.float64)
    t0 = (T - 1) // BT * BT
    while t0 >= 0:                                                             # walking back
        t = t0 + i
        dt, th, off, m, a, mt, mh, ma = _angle_tiles(DT, TH, b, h, t, T, H, A, BA)
        dphi = tl.load(DPHI + off, mask=m, other=0.0).to(tl.float64)
        g = (tl.cumsum(dphi, 0, reverse=True) + carry[None, :, :]).to(tl.float32)
        carry += tl.sum(dphi, 0)
        tl.store(DDT + (b * T + t[:, None]) * H + h[None, :], tl.sum(g * th[:, None, :], 2),
                 mask=mt[:, None] & mh[None, :])
        tl.store(DTH + ((hg * tl.num_programs(0) + b) * T + t[:, None]) * A + a[None, :],
                 tl.sum(g * dt[:, :, None], 1), mask=mt[:, None] & ma[None, :])
        t0 -= BT


ANGLES_BT, ANGLES_HB, ANGLES_WARPS = 16, 2, 2  # tokens a step, heads a program (swept on an H200)


def _angles_launch(dt, A):
    Bsz, T, H = dt.shape
    return (Bsz, triton.cdiv(H, ANGLES_HB)), dict(BT=ANGLES_BT, HB=ANGLES_HB, BA=triton.next_power_of_2(A),
                                                   num_warps=ANGLES_WARPS)


@torch.library.custom_op("nanochat::mamba3_angles_fwd", mutates_args=())
def _angles(dt: torch.Tensor, theta: torch.Tensor, phi0: torch.Tensor) -> torch.Tensor:
    dt, theta, phi0 = dt.contiguous(), theta.contiguous(), phi0.contiguous()
    (Bsz, T, H), A = dt.shape, theta.size(-1)
    phi = torch.empty(Bsz, T, H, A, device=dt.device, dtype=torch.float32)
    grid, kw = _angles_launch(dt, A)
    _angles_fwd[grid](dt, theta, phi0, phi, T, H, A, **kw)
    return phi


@_angles.register_fake
def _(dt, theta, phi0):
    return dt.new_empty(*dt.shape, theta.size(-1), dtype=torch.float32)


@torch.library.custom_op("nanochat::mamba3_angles_bwd", mutates_args=())
def _angles_grad(dphi: torch.Tensor, dt: torch.Tensor, theta: torch.Tensor) -> list[torch.Tensor]:
    dphi, dt, theta = dphi.contiguous(), dt.contiguous(), theta.contiguous()
    (Bsz, T, H), A = dt.shape, theta.size(-1)
    grid, kw = _angles_launch(dt, A)
    ddt = torch.empty(Bsz, T, H, device=dt.device, dtype=torch.float32)
    dth = torch.empty(grid[1], Bsz, T, A, device=dt.device, dtype=torch.float32)  # per head group
    _angles_bwd[grid](dphi, dt, theta, ddt, dth, T, H, A, **kw)
    return [ddt, dth[0] if grid[1] == 1 else dth.sum(0)]


@_angles_grad.register_fake
def _(dphi, dt, theta):
    return [dt.new_empty(dt.shape, dtype=torch.float32), theta.new_empty(theta.shape, dtype=torch.float32)]


def _angles_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _angles_backward(ctx, dphi):
    dt, theta = ctx.saved_tensors
    ddt, dth = _angles_grad(dphi, dt, theta)
    return ddt.to(dt.dtype), dth.to(theta.dtype), None


_angles.register_autograd(_angles_backward, setup_context=_angles_setup)


def angles(dt, theta, phi0=None):
    """φ (B, T, H, A) fp32 in [0, 2π): (φ0 + the running sum over T of Δ_{t,h} θ_{t,a}) mod 2π,
    summed in fp64, as `Mamba3.angles` computes it in PyTorch (the reference). dt (B, T, H),
    θ (B, T, A), φ0 (B, H, A) or None (zeros), fp32; no gradient reaches φ0. int32 offsets:
    B T H A < 2^31."""
    if phi0 is None:
        phi0 = dt.new_zeros(dt.size(0), dt.size(2), theta.size(-1), dtype=torch.float32)
    return _angles(dt.float(), theta.float(), phi0.float())


# ---------------------------------------------------------------------------------------------
# The state passing across chunks, for the default (PyTorch) chunked form on a GPU. With S_z
# the state after chunk z's own tokens (from zero) and a_z the chunk's total log decay:
#     E_0 = H0,   E_{z+1} = exp(a_z) E_z + S_z,   final = E_c
# E_z is the state entering chunk z. PyTorch runs it as one fp32 batched matmul with the
# (c+1) x (c+1) decay matrix (a SIMT sgemm, ~2 ms at d20); here one program per (row and
# head, block of the P x N state) walks the chunks in order in fp32 registers, reading S and
# writing E once. Backward, walking back with G_z = dL/dE_z (G_c = dfinal):
#     dS_z = G_{z+1},   da_z = exp(a_z) <G_{z+1}, E_z>,   G_z = dE_z + exp(a_z) G_{z+1}
# E_z is read back as stored (in the chunk states' dtype, bf16 under autocast).

@triton.jit
def _pass_fwd(S, A, H0, E, F, C, PN, BLOCK: tl.constexpr):
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: B H c P N > 2^31
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    state = tl.load(H0 + bh * PN + offs, mask=m, other=0.0).to(tl.float32)
    z = 0
    while z < C:  # (a while loop, see _fwd)
        tl.store(E + (bh * C + z) * PN + offs, state.to(E.dtype.element_ty), mask=m)
        decay = tl.exp(tl.load(A + bh * C + z))
        state = decay * state + tl.load(S + (bh * C + z) * PN + offs, mask=m, other=0.0).to(tl.float32)
        z += 1
    tl.store(F + bh * PN + offs, state, mask=m)


@triton.jit
def _pass_bwd(E, A, DE, DF, DS, DA, DH0, C, PN, BLOCK: tl.constexpr):
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: B H c P N > 2^31
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    g = tl.load(DF + bh * PN + offs, mask=m, other=0.0).to(tl.float32)  # G_{z+1}, from G_c = dfinal
    z = C - 1
    while z >= 0:
        off = (bh * C + z) * PN + offs
        tl.store(DS + off, g.to(DS.dtype.element_ty), mask=m)
        decay = tl.exp(tl.load(A + bh * C + z))
        entering = tl.load(E + off, mask=m, other=0.0).to(tl.float32)
        tl.store(DA + (bh * tl.num_programs(1) + blk) * C + z, decay * tl.sum(g * entering, 0))  # this block's share
        g = tl.load(DE + off, mask=m, other=0.0).to(tl.float32) + decay * g
        z -= 1
    tl.store(DH0 + bh * PN + offs, g, mask=m)


PASS_BLOCK, PASS_WARPS = 2048, 8  # state elements per program, warps (memory-bound; sess sweep on an H200)


@torch.library.custom_op("nanochat::mamba3_pass_fwd", mutates_args=())
def _pass(S: torch.Tensor, a: torch.Tensor, H0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    S, a, H0 = S.contiguous(), a.contiguous(), H0.contiguous()  # as in _ssd_fwd
    Bsz, H, C, P, N = S.shape
    E = S.new_empty(S.shape)
    F = torch.empty(Bsz, H, P, N, device=S.device, dtype=torch.float32)
    _pass_fwd[(Bsz * H, triton.cdiv(P * N, PASS_BLOCK))](S, a, H0, E, F, C, P * N, BLOCK=PASS_BLOCK,
                                                         num_warps=PASS_WARPS)
    return E, F


@_pass.register_fake
def _(S, a, H0):
    Bsz, H, C, P, N = S.shape
    return S.new_empty(S.shape), S.new_empty(Bsz, H, P, N, dtype=torch.float32)


@torch.library.custom_op("nanochat::mamba3_pass_bwd", mutates_args=())
def _pass_grad(E: torch.Tensor, a: torch.Tensor, dE: torch.Tensor, dF: torch.Tensor) -> list[torch.Tensor]:
    E, a, dE, dF = E.contiguous(), a.contiguous(), dE.contiguous(), dF.contiguous()
    Bsz, H, C, P, N = E.shape
    blocks = triton.cdiv(P * N, PASS_BLOCK)
    dS = E.new_empty(E.shape)
    da = torch.empty(Bsz, H, blocks, C, device=E.device, dtype=torch.float32)
    dH0 = torch.empty(Bsz, H, P, N, device=E.device, dtype=torch.float32)
    _pass_bwd[(Bsz * H, blocks)](E, a, dE, dF, dS, da, dH0, C, P * N, BLOCK=PASS_BLOCK, num_warps=PASS_WARPS)
    return [dS, da.sum(2), dH0]


@_pass_grad.register_fake
def _(E, a, dE, dF):
    Bsz, H, C, P, N = E.shape
    return [E.new_empty(E.shape), E.new_empty(Bsz, H, C, dtype=torch.float32), E.new_empty(Bsz, H, P, N, dtype=torch.float32)]


def _pass_setup(ctx, inputs, output):
    S, a, H0 = inputs
    ctx.save_for_backward(output[0], a)
    ctx.h0_dtype = H0.dtype


def _pass_backward(ctx, dE, dF):
    E, a = ctx.saved_tensors
    dE = torch.zeros_like(E) if dE is None else dE
    dF = E.new_zeros(E.size(0), E.size(1), E.size(3), E.size(4), dtype=torch.float32) if dF is None else dF
    dS, da, dH0 = _pass_grad(E, a, dE, dF)
    return dS, da.to(a.dtype), dH0.to(ctx.h0_dtype)


_pass.register_autograd(_pass_backward, setup_context=_pass_setup)


def pass_states(S, a, H0):
    """The states entering each chunk and the final one: S (B, H, c, P, N) each chunk's own
    state, a (B, H, c) its total log decay, H0 (B, H, P, N) the initial state. Returns E
    (B, H, c, P, N) in S's dtype (E_0 = H0) and the final state (B, H, P, N) in fp32; the walk
    across chunks in fp32. `mamba3.ssd`'s fp32 matmul with the decay matrix is the reference."""
    return _pass(S, a.float(), H0.float())


# ---------------------------------------------------------------------------------------------
# Within each chunk, the output (steps 3 and 4 of `mamba3.ssd`), for SISO, from the turned
# k, q (turn_qk's head-major layout) and the entering states (pass_states): one program per
# (row and head, chunk), like one block of flash attention over the chunk's Q tokens:
#     S = q kᵀ,  L[t, s] = exp(a_cs[t] - a_cs[s]) (w_s + [s < t] w_next_s) for s <= t,
#     y = (S ∘ L) x + exp(a_cs) ∘ (q Eᵀ)
# read and written in x's own (B, T, H, P) layout (no fold or unfold copies); S and L never
# reach memory. Backward (M = S ∘ L, G = dy):
#     dx = Mᵀ G,  dM = G xᵀ,  dS = dM ∘ L,  dq = dS k + exp(a_cs) ∘ (G E),  dk = dSᵀ q,
#     dE = (exp(a_cs) ∘ G)ᵀ q,  dL = dM ∘ S,
#     da_cs[i] = Σ_s (dL ∘ L)[i, s] - Σ_t (dL ∘ L)[t, i] + Σ_p G[i, p] (exp(a_cs) ∘ q Eᵀ)[i, p],
#     dw[s] = Σ_t dL[t, s] exp(a_cs[t] - a_cs[s]),  dw_next[s] = the same over t > s.

@triton.jit
def _chunk_kx(Kp, X, bh, z, T, H, P, N, CHUNK: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Chunk z of row and head bh: its tokens' k (head-major) and x ((B, T, H, P)), offsets, masks."""
    b, h = bh // H, bh % H
    i, p, n = tl.arange(0, BT), tl.arange(0, BP), tl.arange(0, BN)
    t = z * CHUNK + i
    mt, mp, mn = (i < CHUNK) & (t < T), p < P, n < N
    k_off = (bh * T + t[:, None]) * N + n[None, :]
    k = tl.load(Kp + k_off, mask=mt[:, None] & mn[None, :], other=0.0)
    x_off = ((b * T + t[:, None]) * H + h) * P + p[None, :]
    x = tl.load(X + x_off, mask=mt[:, None] & mp[None, :], other=0.0)
    return i, p, n, mt, mp, mn, k, k_off, x, x_off


@triton.jit
def _to_end(ACS, W, WN, acs, bh, z, sc, mt, C, CHUNK: tl.constexpr):
    """Chunk z's weights of its tokens in its own state: exp(a_cs[last] - a_cs) and
    d = exp(a_cs[last] - a_cs) (w + w_next) (chunk_state's forward and backward)."""
    to_end = tl.exp(tl.load(ACS + (bh * C + z) * CHUNK + CHUNK - 1) - acs)
    return to_end, to_end * (tl.load(W + sc, mask=mt, other=0.0) + tl.load(WN + sc, mask=mt, other=0.0))


@triton.jit
def _cout_tiles(Qp, Kp, X, E, ACS, W, WN, bh, z, T, H, P, N, C, CHUNK: tl.constexpr, BT: tl.constexpr,
                BP: tl.constexpr, BN: tl.constexpr):
    i, p, n, mt, mp, mn, k, qk_off, x, x_off = _chunk_kx(Kp, X, bh, z, T, H, P, N, CHUNK, BT, BP, BN)
    q = tl.load(Qp + qk_off, mask=mt[:, None] & mn[None, :], other=0.0)
    e = tl.load(E + ((bh * C + z) * P + p[:, None]) * N + n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
    sc = (bh * C + z) * CHUNK + i
    acs = tl.load(ACS + sc, mask=mt, other=0.0)
    w = tl.load(W + sc, mask=mt, other=0.0)
    wn = tl.load(WN + sc, mask=mt, other=0.0)
    later = i[:, None] > i[None, :]
    decay = tl.exp(tl.where(i[:, None] >= i[None, :], acs[:, None] - acs[None, :], float("-inf")))
    L = decay * (w[None, :] + tl.where(later, wn[None, :], 0.0))
    return q, k, x, e, acs, decay, L, later, x_off, qk_off, sc, mt, mp, mn


@triton.jit
def _cout_fwd(Qp, Kp, X, E, ACS, W, WN, Dp, Y, T, H, P, N, C, CHUNK: tl.constexpr, BT: tl.constexpr,
              BP: tl.constexpr, BN: tl.constexpr):
    bh, z = tl.program_id(0), tl.program_id(1)
    dt = X.dtype.element_ty
    q, k, x, e, acs, decay, L, later, x_off, qk_off, sc, mt, mp, mn = _cout_tiles(
        Qp, Kp, X, E, ACS, W, WN, bh, z, T, H, P, N, C, CHUNK, BT, BP, BN)
    y = _dot((_dot(q, tl.trans(k), dt) * L).to(dt), x, dt) + tl.exp(acs)[:, None] * _dot(q, tl.trans(e), dt)
    y += tl.load(Dp + bh % H) * x.to(tl.float32)  # the skip D_h x
    tl.store(Y + x_off, y.to(Y.dtype.element_ty), mask=mt[:, None] & mp[None, :])


@triton.jit
def _cout_bwd(Qp, Kp, X, E, ACS, W, WN, Dp, DY, DST, DQ, DK, DX, DE, DACS, DW, DWN, DDP, T, H, P, N, C,
              CHUNK: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PART: tl.constexpr):
    """PART 1: dE and the scalars' gradients; PART 2: dx, dk and dq, with chunk_state's
    backward for the chunk states' gradients DST (B, H, c, P, N) inside (its shares of dx, dk,
    and of the scalars' gradients, added into DACS, DW, DWN), and the skip's D_h dy in dx;
    PART 1 also the skip's share of dD, the program's Σ dy ∘ x, into DDP (B H c). Two
    launches that each recompute S and dM: one program holding every tile spilled
    (dev/triton_regs.py)."""
    bh, z = tl.program_id(0), tl.program_id(1)
    dt = X.dtype.element_ty
    q, k, x, e, acs, decay, L, later, x_off, qk_off, sc, mt, mp, mn = _cout_tiles(
        Qp, Kp, X, E, ACS, W, WN, bh, z, T, H, P, N, C, CHUNK, BT, BP, BN)
    g = tl.load(DY + x_off, mask=mt[:, None] & mp[None, :], other=0.0)
    s = _dot(q, tl.trans(k), dt)
    dM = _dot(g, tl.trans(x), dt)
    dS = (dM * L).to(dt)
    qn = mt[:, None] & mn[None, :]
    ge = g.to(tl.float32) * tl.exp(acs)[:, None]
    if PART == 1:
        p, n = tl.arange(0, BP), tl.arange(0, BN)
        tl.store(DE + ((bh * C + z) * P + p[:, None]) * N + n[None, :],
                 _dot(tl.trans(ge).to(dt), q, dt).to(DE.dtype.element_ty), mask=mp[:, None] & mn[None, :])
        inter = tl.sum(ge * _dot(q, tl.trans(e), dt), 1)
        dL = dM * s
        G = dL * L
        tl.store(DACS + sc, tl.sum(G, 1) - tl.sum(G, 0) + inter, mask=mt)
        dd = dL * decay
        tl.store(DW + sc, tl.sum(dd, 0), mask=mt)
        tl.store(DWN + sc, tl.sum(tl.where(later, dd, 0.0), 0), mask=mt)
        tl.store(DDP + bh * C + z, tl.sum(tl.sum(g.to(tl.float32) * x.to(tl.float32), 1), 0))  # the skip's dD
    else:
        # chunk_state's share: S_z = (d ∘ x)ᵀ k with d_s = exp(a_cs[last] - a_cs[s]) (w_s + w_next_s)
        p, n, i = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
        gs = tl.load(DST + ((bh * C + z) * P + p[:, None]) * N + n[None, :], mask=mp[:, None] & mn[None, :],
                     other=0.0)
        to_end, d = _to_end(ACS, W, WN, acs, bh, z, sc, mt, C, CHUNK)
        kd = _dot(k, tl.trans(gs), dt)                                         # (BT, BP)
        dd = tl.sum(x.to(tl.float32) * kd, 1)
        tl.store(DW + sc, tl.load(DW + sc, mask=mt, other=0.0) + dd * to_end, mask=mt)
        tl.store(DWN + sc, tl.load(DWN + sc, mask=mt, other=0.0) + dd * to_end, mask=mt)
        tl.store(DACS + sc, tl.load(DACS + sc, mask=mt, other=0.0) - dd * d
                 + tl.where(i == CHUNK - 1, tl.sum(dd * d, 0), 0.0), mask=mt)
        skip = tl.load(Dp + bh % H) * g.to(tl.float32)
        tl.store(DX + x_off, (_dot(tl.trans(s * L).to(dt), g, dt) + d[:, None] * kd + skip).to(DX.dtype.element_ty),
                 mask=mt[:, None] & mp[None, :])
        tl.store(DK + qk_off, (_dot(tl.trans(dS), q, dt) + _dot((x.to(tl.float32) * d[:, None]).to(dt), gs, dt)
                               ).to(DK.dtype.element_ty), mask=qn)
        tl.store(DQ + qk_off, (_dot(dS, k, dt) + _dot(ge.to(dt), e, dt)).to(DQ.dtype.element_ty), mask=qn)


CHUNK_WARPS = 4  # chunk_out's forward and backward part 1, chunk_state's: they spill (dev/triton_regs.py), yet beat 8 warps on an H200


def _chunk_blocks(chunk, P, N):
    p2 = lambda n: max(16, triton.next_power_of_2(n))  # tl.dot wants every dim >= 16
    return dict(CHUNK=chunk, BT=p2(chunk), BP=p2(P), BN=p2(N), num_warps=CHUNK_WARPS)


def _cout(q, k, x, E, acs, w, wn, D, chunk):
    """chunk_out's forward (contiguous inputs): y (B, T, H, P) in x's dtype, the skip D_h x included."""
    Bsz, T, H, P = x.shape
    C, N = E.size(2), E.size(-1)
    y = torch.empty_like(x)
    _cout_fwd[(Bsz * H, C)](q, k, x, E, acs, w, wn, D, y, T, H, P, N, C, **_chunk_blocks(chunk, P, N))
    return y


# Each chunk's own state (step 1 of `mamba3.ssd`) for SISO, read in the same layouts as
# chunk_out (k head-major, x as (B, T, H, P): no fold copy of x), one program per (row and
# head, chunk), with d_s = exp(a_cs[last] - a_cs[s]) (w_s + w_next_s):
#     S = (d ∘ x)ᵀ k;   backward (inside _cout_bwd's part 2): dx = d ∘ (k dSᵀ),  dk = (d ∘ x) dS,  dd = rowsum(x ∘ k dSᵀ),
#     dw = dw_next = dd exp(a_cs[last] - a_cs),  da_cs = -dd d (+ Σ dd d at the last token).

@triton.jit
def _cstate_fwd(Kp, X, ACS, W, WN, S, T, H, P, N, C, CHUNK: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                BN: tl.constexpr):
    bh, z = tl.program_id(0), tl.program_id(1)
    dt = X.dtype.element_ty
    i, p, n, mt, mp, mn, k, k_off, x, x_off = _chunk_kx(Kp, X, bh, z, T, H, P, N, CHUNK, BT, BP, BN)
    sc = (bh * C + z) * CHUNK + i
    _, d = _to_end(ACS, W, WN, tl.load(ACS + sc, mask=mt, other=0.0), bh, z, sc, mt, C, CHUNK)
    s = _dot(tl.trans((x.to(tl.float32) * d[:, None]).to(dt)), k, dt)
    tl.store(S + ((bh * C + z) * P + p[:, None]) * N + n[None, :], s.to(S.dtype.element_ty),
             mask=mp[:, None] & mn[None, :])


def _cstate(k, x, acs, w, wn, chunk):
    """chunk_state's forward (contiguous inputs): S (B, H, c, P, N) in x's dtype."""
    Bsz, T, H, P = x.shape
    C, N = acs.size(2), k.size(-1)
    S = torch.empty(Bsz, H, C, P, N, device=x.device, dtype=x.dtype)
    _cstate_fwd[(Bsz * H, C)](k, x, acs, w, wn, S, T, H, P, N, C, **_chunk_blocks(chunk, P, N))
    return S


# Steps 1-4 of `mamba3.ssd` (SISO) as one op, so that its backward can run chunk_state's
# backward inside chunk_out's second part: the order is chunk_out part 1 (dE) -> the walk back
# across chunks (dS) -> part 2 with dS (dx, dk once, no sums of two ops' outputs, and no
# chunk_state backward launch of its own). The layer's skip D x rides along (y += D x,
# dx += D dy, dD = Σ dy ∘ x): x has no second consumer (gate_norm) whose dx autograd adds.

CSSD_WARPS = 4  # part 2 with the chunk states' share (spills at 4 warps, yet 8 were slower on an H200)


@torch.library.custom_op("nanochat::mamba3_chunk_ssd_fwd", mutates_args=())
def _cssd(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, acs: torch.Tensor, w: torch.Tensor, wn: torch.Tensor,
          H0: torch.Tensor, D: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, x, acs, w, wn, D = (t.contiguous() for t in (q, k, x, acs, w, wn, D))  # (the compiled layer's are views)
    S = _cstate(k, x, acs, w, wn, chunk)
    E, final = _pass(S, acs[..., -1].contiguous(), H0)
    return _cout(q, k, x, E, acs, w, wn, D, chunk), final, E


@_cssd.register_fake
def _(q, k, x, acs, w, wn, H0, D, chunk):
    Bsz, T, H, P = x.shape
    return (x.new_empty(x.shape), x.new_empty(Bsz, H, P, k.size(-1), dtype=torch.float32),
            x.new_empty(Bsz, H, acs.size(2), P, k.size(-1)))


@torch.library.custom_op("nanochat::mamba3_chunk_ssd_bwd", mutates_args=())
def _cssd_grad(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, E: torch.Tensor, acs: torch.Tensor,
               w: torch.Tensor, wn: torch.Tensor, D: torch.Tensor, dy: torch.Tensor, dF: torch.Tensor,
               chunk: int) -> list[torch.Tensor]:
    q, k, x, E, acs, w, wn, D, dy, dF = (t.contiguous() for t in (q, k, x, E, acs, w, wn, D, dy, dF))
    Bsz, T, H, P = x.shape
    C, N = E.size(2), E.size(-1)
    dq, dk, dx, dE = torch.empty_like(q), torch.empty_like(k), torch.empty_like(x), torch.empty_like(E)
    dacs, dw, dwn = torch.empty_like(acs), torch.empty_like(w), torch.empty_like(wn)
    dDp = torch.empty(Bsz, H, C, device=x.device, dtype=torch.float32)  # per program
    launch = lambda part, dS, warps: _cout_bwd[(Bsz * H, C)](q, k, x, E, acs, w, wn, D, dy, dS, dq, dk, dx, dE, dacs,
                                                             dw, dwn, dDp, T, H, P, N, C, PART=part,
                                                             **dict(_chunk_blocks(chunk, P, N), num_warps=warps))
    launch(1, dy, CHUNK_WARPS)                      # dE and the output's scalar gradients (dy: unread)
    dS, da, dH0 = _pass_grad(E, acs[..., -1].contiguous(), dE, dF)
    launch(2, dS, CSSD_WARPS)                       # dx, dk, dq, the chunk states' share, the skip's
    dacs[..., -1] += da                             # each chunk's total decay is its last a_cs
    return [dq, dk, dx, dacs, dw, dwn, dH0, dDp.sum((0, 2))]


@_cssd_grad.register_fake
def _(q, k, x, E, acs, w, wn, D, dy, dF, chunk):
    return ([t.new_empty(t.shape) for t in (q, k, x, acs, w, wn)] + [x.new_empty(dF.shape, dtype=torch.float32)]
            + [D.new_empty(D.shape, dtype=torch.float32)])


def _cssd_setup(ctx, inputs, output):
    q, k, x, acs, w, wn, H0, D, chunk = inputs
    ctx.save_for_backward(q, k, x, output[2], acs, w, wn, D)
    ctx.mark_non_differentiable(output[2])  # (E: returned only to be saved)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
    ctx.chunk, ctx.h0_dtype = chunk, H0.dtype


def _cssd_backward(ctx, dy, dF, dE_unused):  # (E is returned only to be saved: chunk_ssd drops it)
    q, k, x, E, acs, w, wn, D = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    dF = E.new_zeros(E.size(0), E.size(1), E.size(3), E.size(4), dtype=torch.float32) if dF is None else dF
    dq, dk, dx, dacs, dw, dwn, dH0, dD = _cssd_grad(q, k, x, E, acs, w, wn, D, dy, dF.float(), ctx.chunk)
    return dq, dk, dx, dacs, dw, dwn, dH0.to(ctx.h0_dtype), dD, None


_cssd.register_autograd(_cssd_backward, setup_context=_cssd_setup)


def chunk_ssd(q, k, x, a_cs, w, w_next, H0, chunk, D=None):
    """Steps 1-4 of `mamba3.ssd` for R = 1 (chunk_state, pass_states, chunk_out), one op:
    q, k (B, H, T, N) turned, head-major; x (B, T, H, P); a_cs, w, w_next (B, H, c, chunk)
    fp32; H0 (B, H, P, N); T a multiple of chunk; D (H,) or None: the skip D_h x added to y
    (in the kernel: autograd then has no sum of two ops' dx to run). Returns y (B, T, H, P)
    in x's dtype and the final state (B, H, P, N) fp32. int32 offsets inside the chunk
    kernels: < 2^31 elements."""
    D = x.new_zeros(x.size(2), dtype=torch.float32) if D is None else D
    y, final, _ = _cssd(q, k, x, a_cs.float(), w.float(), w_next.float(), H0.float(), D.float(), chunk)
    return y, final


# ---------------------------------------------------------------------------------------------
# A SISO layer's output before c_proj (Mamba3._output with the output norm on), per token and
# head, with y the state's readout:
#     u = y + D_h x,   n = u / rms(u) (over the head's P dims, eps 1e-5),   o = n ⊙ w_h ⊙ silu(z)
# Inductor runs it as three kernels: the forward, the backward, and the gradients of w and D
# reduced over the tokens, which reads the inputs once more (a profile of d20 on an H200: ~1.3
# ms a layer at 65,536 tokens). Here one kernel each way, one program per (block of tokens,
# head); the backward also writes each program's partial sums of dw and dD (summed after):
#     g = do ⊙ w ⊙ silu(z),   du = (g - n mean_P(g ⊙ n)) / rms(u),   dy = du,   dx = D du,
#     dD = Σ du ⊙ x,   dw = Σ do ⊙ n ⊙ silu(z),   dz = do ⊙ n ⊙ w ⊙ σ(z) (1 + z (1 - σ(z)))
# Without the skip (SKIP=False: chunk_ssd added D x already), u = y and x, D are not read.

@triton.jit
def _gate_tiles(Y, X, Z, Dp, Wn, r0, h, M, H, P, BT: tl.constexpr, BP: tl.constexpr, SKIP: tl.constexpr):
    """The program's (BT, BP) tiles: their offsets and mask, u, n, 1/rms(u), w, σ(z), z and x (fp32)."""
    r, p = r0 + tl.arange(0, BT), tl.arange(0, BP)
    mp = p < P
    m = (r < M)[:, None] & mp[None, :]
    off = (r[:, None] * H + h) * P + p[None, :]
    z = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
    u = tl.load(Y + off, mask=m, other=0.0).to(tl.float32)
    if SKIP:
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        u += tl.load(Dp + h).to(tl.float32) * x
    else:
        x = u  # (unused)
    inv = 1.0 / tl.sqrt(tl.sum(u * u, 1) / P + 1e-5)                          # (BT,)
    w = tl.load(Wn + h * P + p, mask=mp, other=0.0).to(tl.float32)
    return off, m, u * inv[:, None], inv, w, tl.sigmoid(z), z, x


@triton.jit
def _gate_fwd(Y, X, Z, Dp, Wn, O, M, H, P, BT: tl.constexpr, BP: tl.constexpr, SKIP: tl.constexpr):
    r0, h = tl.program_id(0) * BT, tl.program_id(1)
    off, m, n, inv, w, s, z, x = _gate_tiles(Y, X, Z, Dp, Wn, r0, h, M, H, P, BT, BP, SKIP)
    tl.store(O + off, (n * w[None, :] * z * s).to(O.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd(Y, X, Z, Dp, Wn, DO, DY, DX, DZ, DWp, DDp, M, H, P, BT: tl.constexpr, BP: tl.constexpr,
              SKIP: tl.constexpr):
    blk, h = tl.program_id(0), tl.program_id(1)
    off, m, n, inv, w, s, z, x = _gate_tiles(Y, X, Z, Dp, Wn, blk * BT, h, M, H, P, BT, BP, SKIP)
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    g = do * w[None, :] * z * s
    du = (g - n * (tl.sum(g * n, 1) / P)[:, None]) * inv[:, None]
    tl.store(DY + off, du.to(DY.dtype.element_ty), mask=m)
    tl.store(DZ + off, (do * n * w[None, :] * s * (1 + z * (1 - s))).to(DZ.dtype.element_ty), mask=m)
    p = tl.arange(0, BP)
    tl.store(DWp + (blk * H + h) * P + p, tl.sum(do * n * z * s, 0), mask=p < P)
    if SKIP:
        tl.store(DX + off, (tl.load(Dp + h).to(tl.float32) * du).to(DX.dtype.element_ty), mask=m)
        tl.store(DDp + blk * H + h, tl.sum(tl.sum(du * x, 1), 0))


GATE_BT, GATE_WARPS = 32, 4  # tokens a program: best of dev/mamba3_bench.py --sweep on an H200 (docs/benchmarks.md)


def _gate_launch(x):
    M, H, P = x.numel() // (x.size(-2) * x.size(-1)), x.size(-2), x.size(-1)
    return M, H, P, (triton.cdiv(M, GATE_BT), H), dict(BT=GATE_BT, BP=triton.next_power_of_2(P), num_warps=GATE_WARPS)


@torch.library.custom_op("nanochat::mamba3_gate_fwd", mutates_args=())
def _gate(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor, w: torch.Tensor,
          skip: bool) -> torch.Tensor:
    y, x, z, D, w = (t.contiguous() for t in (y, x, z, D, w))
    M, H, P, grid, kw = _gate_launch(y)
    o = torch.empty_like(y)
    _gate_fwd[grid](y, x, z, D, w, o, M, H, P, SKIP=skip, **kw)
    return o


@_gate.register_fake
def _(y, x, z, D, w, skip):
    return y.new_empty(y.shape)


@torch.library.custom_op("nanochat::mamba3_gate_bwd", mutates_args=())
def _gate_grad(do: torch.Tensor, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor,
               w: torch.Tensor, skip: bool) -> list[torch.Tensor]:
    do, y, x, z, D, w = (t.contiguous() for t in (do, y, x, z, D, w))
    M, H, P, grid, kw = _gate_launch(y)
    dy, dz = torch.empty_like(y), torch.empty_like(z)
    dx = torch.empty_like(x) if skip else x.new_empty(0)
    dwp = torch.empty(grid[0], H, P, device=y.device, dtype=torch.float32)  # per block of tokens
    ddp = torch.empty(grid[0], H, device=y.device, dtype=torch.float32)
    _gate_bwd[grid](y, x, z, D, w, do, dy, dx, dz, dwp, ddp, M, H, P, SKIP=skip, **kw)
    return [dy, dx, dz, ddp.sum(0) if skip else D.new_empty(0, dtype=torch.float32), dwp.sum(0)]


@_gate_grad.register_fake
def _(do, y, x, z, D, w, skip):
    return [y.new_empty(y.shape), x.new_empty(x.shape if skip else (0,)), z.new_empty(z.shape),
            D.new_empty(D.shape if skip else (0,), dtype=torch.float32), w.new_empty(w.shape, dtype=torch.float32)]


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.skip = inputs[5]


def _gate_backward(ctx, do):
    y, x, z, D, w = ctx.saved_tensors
    dy, dx, dz, dD, dw = _gate_grad(do, y, x, z, D, w, ctx.skip)
    if not ctx.skip:  # (x and D were placeholders)
        return dy, None, dz, None, dw.to(w.dtype), None
    return dy, dx, dz, dD.to(D.dtype), dw.to(w.dtype), None


_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


def gate_norm(y, x, z, D, w):
    """RMSNorm_w(y + D x) ⊙ silu(z) per head, SISO (Mamba3._output with the output norm, its
    reference): y, x, z (..., H, P) (y's dtype out), D (H,), w (H, P); x and D None: y holds
    the skip already (chunk_ssd's D), RMSNorm_w(y) ⊙ silu(z). int32 offsets: < 2^31 elements."""
    if x is None:  # placeholders the kernels never read (SKIP=False)
        return _gate(y, y, z, w, w, False)
    return _gate(y, x, z, D, w, True)
