"""
Mamba-3, the sequence mixer of the 'M' layers in a hybrid pattern such as "AAM".

Paper: Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu, "Mamba-3: Improved Sequence
Modeling using State Space Principles" (arXiv:2603.15569, ICLR 2026), built on the SSD
form of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"). Equations as the official
module and step references define them (state-spaces/mamba, mamba_ssm/modules/mamba3.py,
mamba3_siso_step_ref / mamba3_MIMO_step_ref). Per token t and head h, with P = head
dim, N = d_state, R = MIMO rank (1 = SISO) and projections of the normed input u_t:

    z, x, B, C, dd_dt, dd_A, trap, angle = projections of u_t      (no conv1d)
    A_t = -max(softplus(dd_A), 1e-4)       data-dependent decay rate, one per head
    Δ_t = softplus(dd_dt + dt_bias)        step size, one per head
    λ_t = sigmoid(trap)                    trapezoid weight           (--mamba3_trapezoidal; else 1)
    θ_t = π tanh(angle)                    rotation speeds, N/4 pairs (--mamba3_complex_rope; else none)
    φ_t = φ_{t-1} + Δ_t θ_t                accumulated angle, per head
    k_t = rot(RMSNorm_w(B_t) + b_B[h], φ_t)   (norm: --mamba3_qknorm, bias init 1: --mamba3_bias)
    q_t = rot(RMSNorm_w(C_t) + b_C[h], φ_t)   rot turns pairs (0,1), (2,3), ... of the first N/2 dims
    v_{t,r} = x_t ⊙ mimo_x[h, r]           (SISO: v_t = x_t)
    α_t = exp(A_t Δ_t),  β_t = (1 - λ_t) Δ_t α_t,  γ_t = λ_t Δ_t
    H_t = α_t H_{t-1} + β_t Σ_r v_{t-1,r} k_{t-1,r}ᵀ + γ_t Σ_r v_{t,r} k_{t,r}ᵀ     H ∈ R^{P×N}
    y_{t,r} = norm_w(H_t q_{t,r} + D_h v_{t,r}) ⊙ silu(z_t ⊙ mimo_z[h, r])         (SISO: silu(z_t))
    y_t = Σ_r y_{t,r} ⊙ mimo_o[h, r];   out = c_proj(y)
    norm_w: RMSNorm per head with a learned weight (--mamba3_outproj_norm, the official
    is_outproj_norm option; on by default here, see below), else the identity

The trapezoid (exponential-trapezoidal discretization) mixes the previous and the current
input into the state; λ ≡ 1 is Euler, i.e. Mamba-2. The rotation is a complex-valued
(data-dependent RoPE) state. With every toggle off this is Mamba-2's SSD without its
conv1d, with Mamba-3's data-dependent A_t (always on).

Training and prefill use the chunked (matmul) form, which equals the recurrence exactly:
token s reaches a later token t with weight exp(a_{s+1} + ... + a_t) (λ_s Δ_s + [s < t]
(1 - λ_{s+1}) Δ_{s+1}) (the β-term of step s+1 folded into token s, counted only for
t > s, so causality holds bit for bit), computed as SSD (X = v, a = A Δ, B = k, C = q)
over chunks of `mamba3_chunk` tokens. Decoding runs the recurrence. Under bf16 autocast
the matmuls within a chunk run in bf16; the states passed between chunks, the angles
and the decode step stay fp32.
A segment continued from a cache starts from H + (1 - λ_0) Δ_0 Σ_r v_prev k_prevᵀ (the
β-term that the previous segment could not add yet) and from its angle φ.

Our choices where the official module differs: the input projection is four matrices
(z, x, B/C, the per-head controls) rather than one, so Muon orthogonalizes like with like;
the output projection is named c_proj and starts at zero (nanochat's block-as-identity
init); the output norm is on by default (official default: off), because Muon's
fixed-size updates of c_proj assume inputs of unit scale while H_t q_t grows with
N (q·k is about N with the biases at 1); the per-head controls train with AdamW; MIMO rotates interleaved pairs as SISO does (the official MIMO kernel pairs i
with i + N/2, a fixed permutation of the B/C dims); A_t uses the softplus of the first
release (later official code has a heavier-tailed f); the SSD runs in PyTorch (matmuls,
torch.compile'd with the model), not the official Triton/TileLang kernels; on an NVIDIA GPU
its steps run as Triton kernels of ours (nanochat/mamba3_triton.py): angles (the fp64
running sum of Δ θ), turn_qk (the biases and rotation of B and C for every head) and
chunk_ssd, one op of three kernels: chunk_state (each chunk's own state), pass_states (the
walk of the state across chunks) and chunk_out (each chunk's output, flash-style), and
gate_norm (the output's norm and gate, _output); all but angles and pass_states SISO only
(MIMO keeps the chunk matmuls). Our own fully fused Triton
SSD (SISO, one program walking all chunks) is opt-in: set_mamba3_kernel(model, "triton").
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import linear

A_FLOOR = 1e-4
KERNELS = ("torch", "triton")  # the chunked form: `ssd` below, or nanochat/mamba3_triton.py (SISO)
_told = set()
_ssd_rotated = None  # nanochat.mamba3_triton.ssd_rotated once imported (only when asked for: it needs Triton)


def set_mamba3_kernel(model, kernel):
    """The chunked form's kernel for every Mamba-3 layer of model (a runtime switch, like
    model.kernel for attention; checkpoints do not change). Decided here, for the layer's
    device, dtype and rank, not per call, so the compiled forward reads a plain attribute;
    set it again after moving the model."""
    if kernel not in KERNELS:
        raise ValueError(f"mamba3 kernel {kernel!r}: use one of {KERNELS}")
    for m in model.modules():
        if isinstance(m, Mamba3):
            usable = kernel == "triton" and not triton_unusable(m.D.device, m.D.dtype, m.R)
            m.kernel = "triton" if usable else "torch"


def triton_unusable(device, dtype, R):
    """Why the Triton kernels cannot run (None if they can), told once per reason."""
    global _ssd_rotated
    reason = None
    if R > 1:
        reason = "MIMO (mamba3_mimo_rank > 1): the fused kernels are SISO only"
    elif dtype == torch.float64:
        reason = "an fp64 model: the fused kernels compute in fp32"
    elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"{device.type} tensors need a CUDA GPU or TRITON_INTERPRET=1"
    else:
        try:
            from nanochat.mamba3_triton import ssd_rotated as _ssd_rotated
        except ImportError as e:
            reason = f"Triton is not importable ({e})"
    if reason and reason not in _told:
        _told.add(reason)
        print(f"Mamba-3: the PyTorch chunked form instead of the Triton kernels: {reason}")
    return reason


FUSED_DEVICES = {"cuda"}  # where the PyTorch chunked form runs its steps as Triton kernels (below)
_fused = None  # (turn_qk, pass_states, chunk_ssd, angles, gate_norm) from nanochat.mamba3_triton once imported


def fused_ok(device, dtype):
    """Whether the chunked form runs its steps as Triton kernels (mamba3_triton: turn_qk and
    chunk_ssd for SISO; angles, and pass_states for MIMO): fp32/bf16 models on an NVIDIA
    GPU (tests add "cpu": Triton's interpreter); else all in PyTorch."""
    global _fused
    if dtype == torch.float64 or device.type not in FUSED_DEVICES or torch.version.hip:  # (inline PTX: NVIDIA only)
        return False
    if _fused is None:
        try:
            from nanochat.mamba3_triton import angles, chunk_ssd, gate_norm, pass_states, turn_qk
            _fused = (turn_qk, pass_states, chunk_ssd, angles, gate_norm)
        except ImportError as e:
            FUSED_DEVICES.clear()
            print(f"Mamba-3: the chunked form all in PyTorch: Triton is not importable ({e})")
            return False
    return True


def at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def segsum_exp(a_cs):
    """(..., Q) inclusive cumsums -> (..., Q, Q): exp(a[s+1] + ... + a[l]) for l >= s, 0 above
    the diagonal (the decay from s to l), as a difference of cumsums like the fused kernels."""
    Q = a_cs.size(-1)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a_cs.device))
    return torch.exp((a_cs[..., :, None] - a_cs[..., None, :]).masked_fill(~causal, float("-inf")))


class MatmulNT(torch.autograd.Function):
    """a @ bᵀ whose gradients leave in the plain layout: autograd's own backward returns b's
    as the transpose of (aᵀ g), which the next fused kernel then reads across its rows."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b.transpose(-1, -2)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g @ b, g.transpose(-1, -2) @ a


class MatmulTN(torch.autograd.Function):
    """aᵀ @ b, likewise (autograd returns a's gradient as the transpose of b gᵀ)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a.transpose(-1, -2) @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return b @ g.transpose(-1, -2), a @ g


def ssd(X, a, K, Qm, w, w_next, chunk, initial_state, D=None):
    """Chunked SSD (Mamba-2's, with MIMO ranks and the trapezoid's two input weights):
        H_t = exp(a_t) H_{t-1} + w_t Σ_u X_{t,u} K_{t,u}ᵀ + exp(a_t) w_next_{t-1} Σ_u X_{t-1,u} K_{t-1,u}ᵀ
        Y_{t,r} = H_t Qm_{t,r}
    so token s reaches a later t with weight exp(a_{s+1} + ... + a_t) (w_s + [s < t] w_next_s).
    X (B, T, R, H, P); a, w, w_next (B, T, H), fp32; K and Qm head-major (B, H, T, R, N),
    as the rotation kernel writes them (folding them into chunks is then a view);
    initial_state (B, H, P, N); D (H,) or None: the skip D_h X added to Y (inside the fused
    kernels, where it saves autograd a sum of two dX). Returns Y (B, T, R, H, P) and the
    state after the last token, without its w_next term (the next segment adds it). w_next_s
    may depend on token s+1: it only ever reaches outputs at t > s, so causality holds bit
    for bit."""
    Bsz, T, R, H, P = X.shape
    pad = (-T) % chunk
    if pad:  # zero inputs with zero decay after the end: outputs before it and the final state unchanged
        X = F.pad(X, (0, 0, 0, 0, 0, 0, 0, pad))
        K, Qm = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (K, Qm))
        a, w, w_next = (F.pad(t, (0, 0, 0, pad)) for t in (a, w, w_next))
    c = X.size(1) // chunk
    per_head = lambda t: at_least_fp32(t.view(Bsz, c, chunk, H).permute(0, 3, 1, 2))  # (B, H, c, chunk)
    a, w, w_next = per_head(a), per_head(w), per_head(w_next)
    a_cs = torch.cumsum(a, dim=-1)
    if R == 1 and fused_ok(X.device, a.dtype) and max(K.numel(), X.numel(), Bsz * H * c * P * K.size(-1)) < 2 ** 31:
        # steps 1-4 below as one op of Triton kernels (mamba3_triton.chunk_ssd; int32 offsets)
        Y, final = _fused[2](Qm.squeeze(3), K.squeeze(3), X.squeeze(2), a_cs, w, w_next, initial_state, chunk, D)
        return Y.unsqueeze(2)[:, :T], final
    # (B, H, c, chunk*R, dim): the rank axis folded into the chunk's time axis
    Xf = X.view(Bsz, c, chunk, R, H, -1).permute(0, 4, 1, 2, 3, 5).reshape(Bsz, H, c, chunk * R, -1)
    Kf, Qf = (t.reshape(Bsz, H, c, chunk * R, -1) for t in (K, Qm))
    rep = lambda t: t.repeat_interleave(R, dim=-1) if R > 1 else t
    # 1. each chunk's own state after its last token (w_next of the last one included: it
    #    only reaches the next chunks)
    decay_to_end = rep(torch.exp(a_cs[..., -1:] - a_cs) * (w + w_next)).to(Xf.dtype)  # (B, H, c, chunk*R)
    states = MatmulTN.apply(Xf * decay_to_end[..., None], Kf)       # (B, H, c, P, N)
    # 2. across chunks: the state entering each chunk (the initial state first), in fp32
    if fused_ok(X.device, a.dtype):  # a walk over the chunks in one Triton kernel
        entering, final = _fused[1](states, a_cs[..., -1], initial_state)
        entering = entering.to(Qf.dtype)
    else:  # one matmul with the decay from each chunk's end to each later chunk's start
        with torch.autocast(X.device.type, enabled=False):
            states = torch.cat([at_least_fp32(initial_state)[:, :, None], at_least_fp32(states)], dim=2)
            decay_chunks = segsum_exp(torch.cumsum(F.pad(a_cs[..., -1], (1, 0)), dim=-1))  # (B, H, c+1, c+1)
            states = torch.einsum("bhzc,bhcpn->bhzpn", decay_chunks.to(states.dtype), states)
        entering, final = states[:, :, :-1].to(Qf.dtype), states[:, :, -1]
    # 3. within each chunk: a causal, decay-weighted "attention" of Q over K
    later = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=a.device), diagonal=-1)
    L = segsum_exp(a_cs) * (w[..., None, :] + w_next[..., None, :] * later)  # (B, H, c, chunk, chunk)
    if R > 1:
        L = L.repeat_interleave(R, dim=-1).repeat_interleave(R, dim=-2)
    scores = MatmulNT.apply(Qf, Kf) * L.to(Qf.dtype)
    Y = scores @ Xf                                                  # (B, H, c, chunk*R, P)
    # 4. what the entering state adds to each position, decayed to it
    Y = Y + MatmulNT.apply(Qf, entering) * rep(torch.exp(a_cs)).to(Y.dtype)[..., None]
    Y = Y.view(Bsz, H, c, chunk, R, P).permute(0, 2, 3, 4, 1, 5).reshape(Bsz, c * chunk, R, H, P)
    if D is not None:
        Y = Y + D.to(Y.dtype)[:, None] * X
    return Y[:, :T], final


def rotate(v, phi):
    """Turn pairs (0,1), (2,3), ... of v's first 2A dims by the angles phi (..., A)."""
    A = phi.size(-1)
    if A == 0:
        return v
    cos, sin = torch.cos(phi), torch.sin(phi)  # products in the angle's precision (fp32), as the kernels do
    v1, v2 = v[..., 0:2 * A:2], v[..., 1:2 * A:2]
    turned = torch.stack([v1 * cos - v2 * sin, v1 * sin + v2 * cos], dim=-1).flatten(-2)
    return torch.cat([turned.to(v.dtype), v[..., 2 * A:]], dim=-1)


class Mamba3(nn.Module):
    def __init__(self, config, layer_idx, spec):
        super().__init__()
        C = config.n_embd
        self.P, self.N, self.R = config.mamba3_headdim, config.mamba3_d_state, config.mamba3_mimo_rank
        self.d_inner = config.mamba3_expand * C
        if self.d_inner % self.P or self.N % 4 or self.R < 1:
            raise ValueError(f"Mamba-3: expand * n_embd ({self.d_inner}) must divide by mamba3_headdim ({self.P}), "
                             f"mamba3_d_state ({self.N}) by 4, and mamba3_mimo_rank ({self.R}) must be >= 1")
        self.H = self.d_inner // self.P
        self.chunk = config.mamba3_chunk
        self.kernel = "torch"  # the chunked form's kernel, one of KERNELS (set_mamba3_kernel)
        self.qknorm, self.bias, self.trapezoidal = config.mamba3_qknorm, config.mamba3_bias, config.mamba3_trapezoidal
        self.outproj_norm = config.mamba3_outproj_norm
        self.n_angles = self.N // 4 if config.mamba3_complex_rope else 0  # rope_fraction 0.5: pairs of N/2 dims
        self.z_proj = nn.Linear(C, self.d_inner, bias=False)
        self.x_proj = nn.Linear(C, self.d_inner, bias=False)
        self.bc_proj = nn.Linear(C, 2 * self.R * self.N, bias=False)
        # per head: dd_dt, dd_A (and trap); then the angles shared by the heads
        self.ctrl_proj = nn.Linear(C, (3 if self.trapezoidal else 2) * self.H + self.n_angles, bias=False)
        self.c_proj = nn.Linear(self.d_inner, C, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        if self.qknorm:
            self.B_norm = nn.Parameter(torch.empty(self.N))
            self.C_norm = nn.Parameter(torch.empty(self.N))
        if self.bias:
            self.B_bias = nn.Parameter(torch.empty(self.H, self.R, self.N))
            self.C_bias = nn.Parameter(torch.empty(self.H, self.R, self.N))
        if self.outproj_norm:
            self.out_norm = nn.Parameter(torch.empty(self.H, self.P))
        if self.R > 1:
            self.mimo_x = nn.Parameter(torch.empty(self.H, self.R, self.P))
            self.mimo_z = nn.Parameter(torch.empty(self.H, self.R, self.P))
            self.mimo_o = nn.Parameter(torch.empty(self.H, self.R, self.P))

    @torch.no_grad()
    def init_weights(self):
        """Projections uniform with std 1/sqrt(n_embd), c_proj zero (the block starts as the
        identity); the rest as the official module: Δ log-uniform in [1e-3, 0.1] (floor 1e-4)
        stored as softplus⁻¹ in dt_bias, D = 1, norm weights 1, B/C biases 1, mimo_x and
        mimo_o 1/R, mimo_z 1."""
        bound = math.sqrt(3) / math.sqrt(self.z_proj.in_features)
        for lin in (self.z_proj, self.x_proj, self.bc_proj, self.ctrl_proj):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(self.c_proj.weight)
        dt = torch.exp(torch.rand(self.H, device=self.D.device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        nn.init.ones_(self.D)
        for name in ("B_norm", "C_norm", "B_bias", "C_bias", "out_norm", "mimo_z"):
            if hasattr(self, name):
                nn.init.ones_(getattr(self, name))
        for name in ("mimo_x", "mimo_o"):
            if hasattr(self, name):
                nn.init.constant_(getattr(self, name), 1.0 / self.R)

    def opt_tags(self):
        """Muon for the matrices that carry features; AdamW ("adamw_ssm") for the per-head
        controls (ctrl_proj: Δ, A, λ, θ, whose scale is their meaning: Muon's fixed-size
        updates drove Δ up and stalled training, docs/benchmarks.md) and for the vectors."""
        tags = {f"{n}.weight": "muon" for n in ("z_proj", "x_proj", "bc_proj", "c_proj")}
        tags.update({n: "adamw_ssm" for n, _ in self.named_parameters() if "." not in n})
        tags["ctrl_proj.weight"] = "adamw_ssm"
        return tags

    def flops_per_token(self, T):
        """6 per weight, plus the SSD's matmuls (forward x 3 for forward + backward): per
        chunk of Q tokens, scores and values 2 Q R^2 (N + P) H per token, chunk states and
        their readout 4 R N P H per token, and the pass between the T/Q chunks, 2 (T/Q) N P H
        per chunk, i.e. 2 T N P H / Q^2 per token."""
        weights = sum(p.numel() for p in self.parameters())
        Q = min(self.chunk, T)
        NPH = self.N * self.P * self.H
        return 6 * weights + 3 * (2 * Q * self.R ** 2 * (self.N + self.P) * self.H + 4 * self.R * NPH
                                  + 2 * math.ceil(T / Q) * NPH // Q)

    def init_cache(self, batch_size, max_len, device, dtype):
        with torch.no_grad():  # decoding's one matmul for the four input projections (Mamba3Cache.w_in)
            w_in = torch.cat([m.weight for m in (self.z_proj, self.x_proj, self.bc_proj, self.ctrl_proj)]).to(device)
        return Mamba3Cache(batch_size, self.H, self.n_angles, self.P, self.N, self.R, device,
                           torch.promote_types(dtype, torch.float32), w_in)

    def _inputs(self, u, w_in=None, ctx=None):
        """Everything per token that does not need the past: z, x, B, C (normed, shared by the
        heads: (B, T, R, N)), Δ, A Δ, λ and the angles θ (the increments are Δ θ). w_in: the four
        input projections' weights stacked (decoding: one matmul instead of four; ctx: a decode
        step's, whose one-row matmuls may run as attention.linear says)."""
        Bsz, T, _ = u.shape
        H, R, N = self.H, self.R, self.N
        if w_in is None:
            z, x, bc, ctrl = self.z_proj(u), self.x_proj(u), self.bc_proj(u), self.ctrl_proj(u)
        else:
            z, x, bc, ctrl = linear(u, w_in, ctx).split([self.d_inner, self.d_inner, 2 * R * N,
                                                         self.ctrl_proj.out_features], dim=-1)
        z, x = z.view(Bsz, T, H, self.P), x.view(Bsz, T, H, self.P)
        Bm, Cm = bc.view(Bsz, T, 2, R, N).unbind(2)
        if self.qknorm:
            Bm = F.rms_norm(Bm, (N,), self.B_norm.to(Bm.dtype), eps=1e-5)
            Cm = F.rms_norm(Cm, (N,), self.C_norm.to(Cm.dtype), eps=1e-5)
        ctrl = at_least_fp32(ctrl)
        dt = F.softplus(ctrl[..., :H] + self.dt_bias)                                   # (B, T, H)
        A = -F.softplus(ctrl[..., H:2 * H]).clamp(min=A_FLOOR)
        lam = torch.sigmoid(ctrl[..., 2 * H:3 * H]) if self.trapezoidal else torch.ones_like(dt)
        theta = math.pi * torch.tanh(ctrl[..., -self.n_angles:]) if self.n_angles else ctrl[..., :0]  # (B, T, A)
        return z, x, Bm, Cm, dt, A * dt, lam, theta

    def angles(self, dt, theta, phi0=None):
        """φ (B, T, H, A): the angle increments Δ θ summed over time from φ0 (the cache's, or
        zero), in fp64 (over long sequences fp32 would lose the angle), reduced mod 2π. One
        Triton kernel where the others run (mamba3_triton.angles); this is its reference."""
        if self.n_angles and fused_ok(dt.device, self.D.dtype) and dt.numel() * self.n_angles < 2 ** 31:
            return _fused[3](dt, theta, phi0)
        phi = torch.cumsum((dt[..., None] * theta[:, :, None, :]).double(), dim=1)
        if phi0 is not None:
            phi = phi + phi0[:, None]
        return torch.remainder(phi, 2 * math.pi).to(dt.dtype)

    def _per_head(self, Bm, bias):
        """(B, T, R, N) shared by the heads -> (B, T, R, H, N), each head's bias added."""
        Bm = Bm.unsqueeze(3)
        if self.bias:
            return Bm + getattr(self, bias).transpose(0, 1).to(Bm.dtype)
        return Bm.expand(-1, -1, -1, self.H, -1)

    def _values(self, x):
        """v_r = x ⊙ mimo_x[:, r]: (B, T, H, P) -> (B, T, R, H, P)."""
        if self.R == 1:
            return x.unsqueeze(2)
        return x.unsqueeze(2) * self.mimo_x.transpose(0, 1).to(x.dtype)

    def _output(self, y, v, z, skip=True):
        """y (B, T, R, H, P) from the state -> (B, T, d_inner): skip (unless ssd() added it),
        (norm), gate, MIMO readout."""
        if skip:
            y = y + self.D.to(y.dtype)[:, None] * v
        z = z.unsqueeze(2) if self.R == 1 else z.unsqueeze(2) * self.mimo_z.transpose(0, 1).to(z.dtype)
        if self.outproj_norm:  # the official is_outproj_norm: RMSNorm per head, before the gate
            y = F.rms_norm(y, (self.P,), eps=1e-5) * self.out_norm.to(y.dtype)
        y = y * F.silu(z)
        y = y.squeeze(2) if self.R == 1 else (y * self.mimo_o.transpose(0, 1).to(y.dtype)).sum(2)
        return y.flatten(-2)

    def forward(self, u, ctx, cache=None):
        if cache is not None and ctx.pos_t is not None:
            return self._step(u, cache, ctx)
        Bsz, T, _ = u.shape
        z, x, Bm, Cm, dt, adt, lam, theta = self._inputs(u)
        phi = self.angles(dt, theta, cache.phi if cache is not None else None)
        triton = self.kernel == "triton"  # (set_mamba3_kernel checked that the kernels can run here)
        bias = lambda name: getattr(self, name)[:, 0] if self.bias else None  # (H, N), SISO
        if triton:  # the kernels turn B and C themselves; only the last key is needed here (the cache)
            k_last = rotate(self._per_head(Bm[:, -1:], "B_bias"), phi[:, -1:, None])[:, 0]
        elif self.R == 1 and fused_ok(u.device, self.D.dtype) and Bsz * T * self.H * self.N < 2 ** 31:
            # (B, H, T, 1, N) from one Triton kernel (int32 offsets: the size check)
            k, q = (t.unsqueeze(3) for t in _fused[0](Bm[:, :, 0], Cm[:, :, 0], bias("B_bias"), bias("C_bias"),
                                                      phi, x.dtype))
            k_last = k[:, :, -1].transpose(1, 2)
        else:  # (B, T, R, H, N) -> head-major (B, H, T, R, N)
            k = rotate(self._per_head(Bm, "B_bias"), phi[:, :, None]).permute(0, 3, 1, 2, 4)
            q = rotate(self._per_head(Cm, "C_bias"), phi[:, :, None]).permute(0, 3, 1, 2, 4)
            k_last = k[:, :, -1].transpose(1, 2)
        v = self._values(x)
        # the trapezoid's β-term: token s enters the state again at s+1, weighted (1 - λ_{s+1}) Δ_{s+1}
        w_next = F.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))                     # (B, T, H); none after the last
        state0 = torch.zeros(Bsz, self.H, self.P, self.N, device=u.device, dtype=dt.dtype)
        if cache is not None:
            with torch.autocast(u.device.type, enabled=False):  # the carried state stays in the cache's precision
                v_prev = self._values(cache.x_prev[:, None])[:, 0]                     # (B, R, H, P)
                prev = torch.einsum("brhp,brhn->bhpn", v_prev, cache.k_prev)
                state0 = cache.state + ((1 - lam[:, 0]) * dt[:, 0])[..., None, None] * prev
        if triton:
            y, final = _ssd_rotated(x, Bm[:, :, 0], Cm[:, :, 0], bias("B_bias"), bias("C_bias"), phi, adt, lam * dt,
                                   w_next, state0, self.chunk)
            y = y.unsqueeze(2)
        else:  # (the skip D v inside: in the fused kernels, autograd then sums no two dx)
            y, final = ssd(v, adt, k, q, lam * dt, w_next, self.chunk, state0, self.D)
        if cache is not None:  # in place: the CUDA-graph decode step holds these tensors
            cache.phi.copy_(phi[:, -1])
            cache.state.copy_(final)
            cache.k_prev.copy_(k_last)
            cache.x_prev.copy_(x[:, -1])
        # the skip D v: ssd() added it; _ssd_rotated (triton) did not
        if self.R == 1 and self.outproj_norm and fused_ok(u.device, self.D.dtype) and y.numel() < 2 ** 31:
            # _output as one kernel each way
            out = _fused[4](y[:, :, 0], x if triton else None, z, self.D if triton else None, self.out_norm).flatten(-2)
        else:
            out = self._output(y, v, z, skip=triton)
        return self.c_proj(out.to(u.dtype))

    def _step(self, u, cache, ctx=None):
        """One token per row by the recurrence, the cache updated in place (fixed shapes).
        Without autograd (the engine), the input projections are the cache's one stacked
        matmul: a decode step at batch 1 is bound by kernel launches, not bytes."""
        z, x, Bm, Cm, dt, adt, lam, theta = self._inputs(u, None if torch.is_grad_enabled() else cache.w_in, ctx)
        with torch.autocast(u.device.type, enabled=False):  # the recurrence in the cache's precision
            y, v = self._recur(cache, x, Bm, Cm, dt, adt, lam, dt[..., None] * theta[:, :, None, :])
        return linear(self._output(y[:, None], v[:, None], z.to(y.dtype)).to(u.dtype), self.c_proj, ctx)

    def _recur(self, cache, x, Bm, Cm, dt, adt, lam, dphi):
        phi = cache.phi + dphi[:, 0]
        # (B, R, H, N), in the cache's precision
        k = rotate(self._per_head(Bm, "B_bias")[:, 0].to(phi.dtype), phi[:, None])
        q = rotate(self._per_head(Cm, "C_bias")[:, 0].to(phi.dtype), phi[:, None])
        v = self._values(x.to(phi.dtype))[:, 0]            # (B, R, H, P)
        v_prev = self._values(cache.x_prev[:, None])[:, 0].to(phi.dtype)
        dt, lam, alpha = dt[:, 0], lam[:, 0], torch.exp(adt[:, 0])  # (B, H)
        beta, gamma = (1 - lam) * dt * alpha, lam * dt
        # outer products and the readout as broadcasts and sums, not einsums: torch.compile
        # fuses them into a kernel or two, where einsum's batched matmuls are one launch each
        outer = lambda v, k: (v[..., :, None] * k[..., None, :]).sum(1)   # (B, R, H, P) x (B, R, H, N) -> (B, H, P, N)
        state = (alpha[..., None, None] * cache.state + beta[..., None, None] * outer(v_prev, cache.k_prev)
                 + gamma[..., None, None] * outer(v, k))
        y = (state[:, None] * q[..., None, :]).sum(-1)                      # (B, R, H, P)
        cache.phi.copy_(torch.remainder(phi, 2 * math.pi))
        cache.state.copy_(state)
        cache.k_prev.copy_(k)
        cache.x_prev.copy_(x[:, 0])
        return y, v


class Mamba3Cache:
    """One Mamba-3 layer's inference state, fp32 (fp64 for an fp64 model): the angle φ
    (B, H, A), the state H (B, H, P, N), and the previous token's turned key (B, R, H, N)
    and input x (B, H, P) for the trapezoid's β-term. Not position-indexed, so
    snapshot/restore copy it. w_in: a copy of the layer's four input projections stacked,
    taken when the cache is made and refreshed by ModelCache.load (the engine keeps a cache
    between requests; weights do not change within one), shared by the rows."""

    def __init__(self, batch_size, H, A, P, N, R, device, dtype=torch.float32, w_in=None):
        self.w_in = w_in
        f32 = dict(device=device, dtype=dtype)
        self.phi = torch.zeros(batch_size, H, A, **f32)
        self.state = torch.zeros(batch_size, H, P, N, **f32)
        self.k_prev = torch.zeros(batch_size, R, H, N, **f32)
        self.x_prev = torch.zeros(batch_size, H, P, **f32)

    def _tensors(self):
        return ("phi", "state", "k_prev", "x_prev")

    def tensors(self):  # and w_in, the weights' copy (no batch dim), refreshed by ModelCache.load
        return [getattr(self, n) for n in self._tensors()] + ([self.w_in] if self.w_in is not None else [])

    def snapshot(self):
        return [getattr(self, n).clone() for n in self._tensors()]

    def restore(self, snap):
        for name, saved in zip(self._tensors(), snap):
            getattr(self, name).copy_(saved)
