"""
Fused Triton kernels for Mamba-3's chunked SSD, SISO (R = 1), forward and backward; the
opt-in "triton" path of nanochat/mamba3.py (`set_mamba3_kernel(model, "triton")`,
--mamba3_kernel=triton), with `mamba3.ssd` (PyTorch) as the exact reference.

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
