"""The fused Triton kernels for Mamba-3's chunked form (nanochat/mamba3_triton.py) against
the PyTorch reference `ssd()` with the bias and rotation applied the PyTorch way: outputs,
final states and every input's gradient, then the whole layer with the switch on and off.
Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton), in fp32 only: the interpreter's tl.dot on
bf16 inputs returns garbage (~1e10 for unit inputs, Triton 3.5), so bf16 is checked on the GPU
(tests/test_gpu.py). On a GPU these tests pass too (fp32 products are IEEE there, not TF32)."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from nanochat.attention import Context  # noqa: E402
from nanochat.gpt import GPTConfig, LayerSpec  # noqa: E402
from nanochat import mamba3  # noqa: E402
from nanochat import mamba3_triton as mt  # noqa: E402
from nanochat.mamba3 import KERNELS, Mamba3, rotate, set_mamba3_kernel, ssd  # noqa: E402
from nanochat.mamba3_triton import pass_states, ssd_rotated, turn_qk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def turned(m, bias, phi):
    """rot(m + bias[h], φ) for every head h in PyTorch, head-major: m (B, T, N) -> (B, H, T, N)."""
    per_head = m[:, :, None, :] + (bias if bias is not None else 0)
    return rotate(per_head.expand(-1, -1, phi.size(2), -1), phi).transpose(1, 2)


def reference(x, Bm, Cm, bB, bC, phi, a, w, wn, s0, chunk):
    """rot(B + bias, φ) and rot(C + bias, φ) per head in PyTorch, then `ssd` with R = 1."""
    k, q = turned(Bm, bB, phi)[:, :, :, None], turned(Cm, bC, phi)[:, :, :, None]
    y, final = ssd(x[:, :, None], a, k, q, w, wn, chunk, s0)
    return y[:, :, 0], final


def close(got, want, tol):
    assert got.shape == want.shape
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    assert err < tol, err


@pytest.mark.parametrize("T,chunk,init,bias,A", [
    (37, 16, True, True, 8),    # T not a multiple of the chunk, from a state
    (20, 8, False, True, 8),    # from zeros
    (16, 16, True, False, 0),   # one chunk, no bias, no rotation
    (9, 4, True, True, 3),      # some pairs turned, most not; chunk below the 16-wide blocks
])
def test_fused_ssd_and_its_gradients_equal_the_torch_ssd(T, chunk, init, bias, A):
    torch.manual_seed(T)
    Bsz, H, P, N = 2, 2, 16, 32
    g = lambda *s, scale=1.0: (scale * torch.randn(*s, device=DEV)).requires_grad_()
    x, Bm, Cm = g(Bsz, T, H, P), g(Bsz, T, N), g(Bsz, T, N)
    bB, bC = (g(H, N), g(H, N)) if bias else (None, None)
    phi = (6 * torch.rand(Bsz, T, H, A, device=DEV)).requires_grad_()
    a = (-0.5 * torch.rand(Bsz, T, H, device=DEV)).requires_grad_()
    w, wn = torch.rand(Bsz, T, H, device=DEV).requires_grad_(), torch.rand(Bsz, T, H, device=DEV).requires_grad_()
    s0 = g(Bsz, H, P, N, scale=float(init))
    inputs = [t for t in (x, Bm, Cm, bB, bC, phi if A else None, a, w, wn, s0) if t is not None]
    y1, f1 = ssd_rotated(x, Bm, Cm, bB, bC, phi, a, w, wn, s0, chunk)
    y0, f0 = reference(x, Bm, Cm, bB, bC, phi, a, w, wn, s0, chunk)
    close(y1, y0, 1e-5)
    close(f1, f0, 1e-5)
    gy, gf = torch.randn_like(y0), torch.randn_like(f0)
    want = torch.autograd.grad((y0 * gy).sum() + (f0 * gf).sum(), inputs)
    got = torch.autograd.grad((y1 * gy).sum() + (f1 * gf).sum(), inputs)
    for gg, ww in zip(got, want):
        close(gg, ww, 1e-5)


def test_the_ops_take_any_layout():
    """The custom ops make their inputs contiguous themselves (under torch.compile the caller's
    .contiguous() can be traced away): the same outputs and gradients from strided inputs."""
    torch.manual_seed(0)
    Bsz, T, H, P, N, A = 2, 20, 2, 16, 32, 8
    strided = lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)  # same values, other strides
    ins = [torch.randn(Bsz, T, H, P), torch.randn(Bsz, T, N), torch.randn(Bsz, T, N), torch.randn(H, N),
           torch.randn(H, N), 6 * torch.rand(Bsz, T, H, A), -0.5 * torch.rand(Bsz, T, H), torch.rand(Bsz, T, H),
           torch.rand(Bsz, T, H), torch.randn(Bsz, H, P, N)]
    ins = [t.to(DEV) for t in ins]
    outs = [torch.ops.nanochat.mamba3_ssd_fwd(*[f(t) for t in ins], 8) for f in (lambda t: t, strided)]
    assert not strided(ins[0]).is_contiguous() and outs[1][0].is_contiguous()
    for got, want in zip(outs[1], outs[0]):
        close(got, want, 1e-6)
    dy, df = torch.randn_like(outs[0][0]), torch.randn_like(outs[0][1])
    grads = [torch.ops.nanochat.mamba3_ssd_bwd(*[f(t) for t in ins[:9]], f(outs[0][2]), f(dy), f(df), 8)
             for f in (lambda t: t, strided)]
    for got, want in zip(grads[1], grads[0]):
        close(got, want, 1e-6)


def layer(R=1):
    cfg = GPTConfig(n_embd=32, n_head=2, n_kv_head=2, mamba_pattern="AM", mamba3_d_state=32, mamba3_headdim=16,
                    mamba3_chunk=8, mamba3_mimo_rank=R, mamba3_qknorm=True, mamba3_bias=True,
                    mamba3_complex_rope=True, mamba3_trapezoidal=True)
    torch.manual_seed(0)
    m = Mamba3(cfg, 0, LayerSpec("mamba3", 0)).to(DEV)
    m.init_weights()
    with torch.no_grad():  # off the init: c_proj starts at zero, the biases at 1
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_layer_with_the_switch_on_equals_it_off_with_gradients_and_from_a_cache():
    m = layer()
    u = torch.randn(2, 19, 32, device=DEV)
    outs, grads = {}, {}
    for kernel in KERNELS:
        set_mamba3_kernel(m, kernel)
        assert m.kernel == kernel
        m.zero_grad()
        outs[kernel] = m(u, Context(None, None, 0, 19, {}))
        outs[kernel].pow(2).sum().backward()
        grads[kernel] = {n: p.grad.clone() for n, p in m.named_parameters()}
    close(outs["triton"], outs["torch"], 1e-5)
    for name, want in grads["torch"].items():
        close(grads["triton"][name], want, 1e-4)
    with torch.no_grad():  # a prefill continued from the cache (initial state, angle, β-term) equals the whole
        cache = m.init_cache(2, 0, DEV, torch.float32)
        parts = [m(u[:, :11], Context(None, None, 0, 11, {}), cache), m(u[:, 11:], Context(None, None, 11, 8, {}), cache)]
    close(torch.cat(parts, 1), outs["torch"], 1e-5)


def test_mimo_falls_back_to_torch_and_bad_names_are_refused(capsys):
    m = layer(R=2)
    u = torch.randn(1, 9, 32, device=DEV)
    want = m(u, Context(None, None, 0, 9, {}))
    set_mamba3_kernel(m, "triton")
    assert m.kernel == "torch" and "MIMO" in capsys.readouterr().out
    assert torch.equal(m(u, Context(None, None, 0, 9, {})), want)
    set_mamba3_kernel(layer().double(), "triton")
    assert "fp64" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mamba3 kernel"):
        set_mamba3_kernel(m, "cuda")


@pytest.mark.parametrize("T,bias,A,heads_per_program,N", [
    (45, True, 8, 2, 16),   # T not a multiple of the kernel's token block; 3 heads in groups of 2 (2 + 1)
    (7, False, 3, 8, 16),   # no bias; 3 of the 8 pairs turned; one group
    (33, True, 0, 1, 16),   # no rotation: the bias and the head-major layout only
    (20, True, 5, 8, 24),   # N/2 = 12 pairs in a 16-wide tile: the column masks
])
def test_turn_qk_and_its_gradients_equal_rotate(T, bias, A, heads_per_program, N, monkeypatch):
    """The default chunked form's fused bias + rotation (used on a GPU) against mamba3.rotate
    per head: k, q head-major, and the gradients of B, C, the biases and φ."""
    monkeypatch.setattr(mt, "TURN_HB", heads_per_program)
    torch.manual_seed(T)
    Bsz, H = 2, 3
    g = lambda *s, scale=1.0: (scale * torch.randn(*s, device=DEV)).requires_grad_()
    Bm, Cm = g(Bsz, T, N), g(Bsz, T, N)
    bB, bC = (g(H, N), g(H, N)) if bias else (None, None)
    phi = (6 * torch.rand(Bsz, T, H, A, device=DEV)).requires_grad_()
    k1, q1 = turn_qk(Bm, Cm, bB, bC, phi, torch.float32)
    assert k1.shape == (Bsz, H, T, N) and k1.dtype == torch.float32
    k0, q0 = turned(Bm, bB, phi), turned(Cm, bC, phi)
    close(k1, k0, 1e-6)
    close(q1, q0, 1e-6)
    inputs = [t for t in (Bm, Cm, bB, bC, phi if A else None) if t is not None]
    gk, gq = torch.randn_like(k0), torch.randn_like(q0)
    want = torch.autograd.grad((k0 * gk).sum() + (q0 * gq).sum(), inputs)
    got = torch.autograd.grad((k1 * gk).sum() + (q1 * gq).sum(), inputs)
    for gg, ww in zip(got, want):
        close(gg, ww, 1e-5)


@pytest.mark.parametrize("c,P,N,block", [(5, 4, 8, 1024), (3, 8, 16, 32), (1, 4, 12, 32)])  # 1 block; 4; 2, the last partial
def test_pass_states_and_its_gradients_equal_the_decay_matmul(c, P, N, block, monkeypatch):
    """The chunked form's walk across chunks (Triton, used on a GPU) against ssd()'s fp32
    matmul with the decay matrix: entering states, final state, and the gradients of the
    chunk states, the chunk decays and the initial state."""
    monkeypatch.setattr(mt, "PASS_BLOCK", block)
    torch.manual_seed(c)
    Bsz, H = 2, 3
    S = torch.randn(Bsz, H, c, P, N, device=DEV, requires_grad=True)
    a = (-2 * torch.rand(Bsz, H, c, device=DEV)).requires_grad_()
    H0 = torch.randn(Bsz, H, P, N, device=DEV, requires_grad=True)
    E1, F1 = pass_states(S, a, H0)
    states = torch.cat([H0[:, :, None], S], dim=2)
    decay = mamba3.segsum_exp(torch.cumsum(torch.nn.functional.pad(a, (1, 0)), dim=-1))
    states = torch.einsum("bhzc,bhcpn->bhzpn", decay, states)
    E0, F0 = states[:, :, :-1], states[:, :, -1]
    close(E1, E0, 1e-6)
    close(F1, F0, 1e-6)
    gE, gF = torch.randn_like(E0), torch.randn_like(F0)
    want = torch.autograd.grad((E0 * gE).sum() + (F0 * gF).sum(), (S, a, H0))
    got = torch.autograd.grad((E1 * gE).sum() + (F1 * gF).sum(), (S, a, H0))
    for gg, ww in zip(got, want):
        close(gg, ww, 1e-5)


def test_the_small_kernels_pass_opcheck_and_turn_qk_writes_the_asked_dtype():
    """torch.library.opcheck on turn_qk's, pass_states' and angles' ops (fake tensors, autograd
    registration, schema), and bf16 k, q within a bf16 step of the fp32 ones."""
    torch.manual_seed(0)
    Bsz, T, H, N, A, c, P = 2, 19, 3, 16, 4, 3, 4
    Bm, Cm, phi = torch.randn(Bsz, T, N, device=DEV), torch.randn(Bsz, T, N, device=DEV), 6 * torch.rand(Bsz, T, H, A, device=DEV)
    bB, bC = torch.randn(H, N, device=DEV), torch.randn(H, N, device=DEV)
    grad = lambda t: t.requires_grad_()
    torch.library.opcheck(torch.ops.nanochat.mamba3_turn_fwd, (grad(Bm), grad(Cm), grad(bB), grad(bC), grad(phi),
                                                               True, torch.float32))
    S, a, H0 = torch.randn(Bsz, H, c, P, N, device=DEV), -torch.rand(Bsz, H, c, device=DEV), torch.randn(Bsz, H, P, N, device=DEV)
    torch.library.opcheck(torch.ops.nanochat.mamba3_pass_fwd, (grad(S), grad(a), grad(H0)))
    dt, theta = torch.rand(Bsz, T, H, device=DEV), torch.randn(Bsz, T, A, device=DEV)
    torch.library.opcheck(torch.ops.nanochat.mamba3_angles_fwd, (grad(dt), grad(theta), torch.rand(Bsz, H, A, device=DEV)))
    with torch.no_grad():
        k32, q32 = turn_qk(Bm, Cm, bB, bC, phi, torch.float32)
        k16, q16 = turn_qk(Bm, Cm, bB, bC, phi, torch.bfloat16)
    assert k16.dtype == q16.dtype == torch.bfloat16
    for lo, hi in ((k16, k32), (q16, q32)):  # within one bf16 step (the interpreter rounds its own way)
        assert ((lo.float() - hi).abs() <= hi.abs() * 2 ** -7 + 1e-30).all()


def test_causality_is_bit_exact_with_the_kernels(monkeypatch):
    """The four kernels keep the chunked form's bit-exact causality: changing the
    inputs from t on leaves every output before t identical (fp32), t inside a chunk and
    on a chunk boundary (chunk 8)."""
    monkeypatch.setattr(mamba3, "FUSED_DEVICES", {"cpu", "cuda"})
    m = layer()
    u = torch.randn(2, 21, 32, device=DEV)
    with torch.no_grad():
        base = m(u, Context(None, None, 0, 21, {}))
        for t in (1, 6, 8, 16, 20):
            v = u.clone()
            v[:, t:] = torch.randn_like(v[:, t:])
            assert torch.equal(m(v, Context(None, None, 0, 21, {}))[:, :t], base[:, :t]), t


def test_layer_with_the_kernels_equals_it_without(monkeypatch):
    """A SISO layer (the default "torch" form) with its steps as kernels (angles, turn_qk,
    chunk_ssd) equals the same layer all in PyTorch, T not a multiple of the
    chunk (the padded tail): outputs, every parameter's gradient, and a prefill continued from
    the cache (the cache's last key comes from the head-major k, its state from pass_states'
    final one). MIMO: pass_states only."""
    for R in (1, 2):
        m = layer(R)
        u = torch.randn(2, 21, 32, device=DEV)
        outs, grads, split = {}, {}, {}
        for devices in (set(), {"cpu", "cuda"}):
            monkeypatch.setattr(mamba3, "FUSED_DEVICES", devices)
            assert mamba3.fused_ok(u.device, torch.float32) == bool(devices)
            m.zero_grad()
            y = m(u, Context(None, None, 0, 21, {}))
            y.pow(2).sum().backward()
            outs[bool(devices)], grads[bool(devices)] = y, {n: p.grad.clone() for n, p in m.named_parameters()}
            with torch.no_grad():
                cache = m.init_cache(2, 0, DEV, torch.float32)
                split[bool(devices)] = torch.cat([m(u[:, :13], Context(None, None, 0, 13, {}), cache),
                                                  m(u[:, 13:], Context(None, None, 13, 8, {}), cache)], 1)
        close(outs[True], outs[False], 1e-5)
        close(split[True], outs[False], 1e-5)
        for name, want in grads[False].items():
            close(grads[True][name], want, 1e-4)


def test_chunk_ssd_passes_opcheck_and_its_fakes_have_the_real_strides():
    """opcheck on chunk_ssd's op, and its ops' fake outputs (what inductor plans with) have the
    shapes and strides of the real ones for inputs handed over as non-contiguous views, as the
    compiled layer hands a_cs, w, w_next (opcheck does not compare strides; a wrong fake fails
    inductor's stride asserts on the GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(0)
    Bsz, H, P, N, c, chunk = 2, 2, 16, 16, 2, 16
    T = c * chunk
    g = lambda *s: torch.randn(*s, device=DEV).requires_grad_()
    scal = lambda: torch.rand(Bsz, c, chunk, H, device=DEV).permute(0, 3, 1, 2).detach().requires_grad_()
    acs = torch.cumsum(-0.3 * torch.rand(Bsz, c, chunk, H, device=DEV), 2).permute(0, 3, 1, 2).detach().requires_grad_()
    assert not acs.is_contiguous()
    q, k, x, w, wn, H0, D = g(Bsz, H, T, N), g(Bsz, H, T, N), g(Bsz, T, H, P), scal(), scal(), g(Bsz, H, P, N), g(H)
    ops = torch.ops.nanochat
    torch.library.opcheck(ops.mamba3_chunk_ssd_fwd, (q, k, x, acs, w, wn, H0, D, chunk))
    E = torch.randn(Bsz, H, c, P, N, device=DEV)
    dy, dF = torch.randn_like(x).transpose(1, 2).contiguous().transpose(1, 2), torch.randn(Bsz, H, P, N, device=DEV)
    for op, args in [(ops.mamba3_chunk_ssd_fwd, (q, k, x, acs, w, wn, H0, D, chunk)),
                     (ops.mamba3_chunk_ssd_bwd, (q, k, x, E, acs, w, wn, D, dy, dF, chunk))]:
        with torch.no_grad():
            real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a.detach()) if torch.is_tensor(a) else a for a in args])
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), op


@pytest.mark.parametrize("T,H,A,with_phi0", [(37, 5, 8, False), (16, 4, 32, True), (5, 1, 6, True)])
def test_angles_and_their_gradients_equal_the_fp64_scan(T, H, A, with_phi0, monkeypatch):
    """mamba3_triton.angles (blocks of tokens, fp64 carry, heads in groups) against the
    layer's PyTorch reference (Mamba3.angles without the kernels): T not a multiple of the
    block, H not of the group, A not a power of two, from a cache's angle; equal as angles
    (mod 2π) to fp32 rounding, and the gradients of Δ and θ."""
    torch.manual_seed(T)
    Bsz = 2
    dt = (0.5 * torch.rand(Bsz, T, H, device=DEV) + 0.01).requires_grad_()
    theta = (math.pi * (2 * torch.rand(Bsz, T, A, device=DEV) - 1)).requires_grad_()
    phi0 = 6 * torch.rand(Bsz, H, A, device=DEV) if with_phi0 else None
    m = layer()
    m.n_angles = A
    monkeypatch.setattr(mamba3, "FUSED_DEVICES", set())
    want = m.angles(dt, theta, phi0)
    monkeypatch.setattr(mamba3, "FUSED_DEVICES", {"cpu", "cuda"})
    got = m.angles(dt, theta, phi0)
    assert got.shape == want.shape == (Bsz, T, H, A) and got.dtype == torch.float32
    assert ((got >= 0) & (got <= 2 * math.pi)).all()
    diff = torch.remainder(got.double() - want.double() + math.pi, 2 * math.pi) - math.pi  # as angles
    assert diff.abs().max() < 1e-5
    g = torch.randn_like(want)
    for a_, b_ in zip(torch.autograd.grad((got * g).sum(), (dt, theta)), torch.autograd.grad((want * g).sum(), (dt, theta))):
        close(a_, b_, 1e-5)


@pytest.mark.parametrize("c,chunk,skip", [(3, 16, True), (2, 8, False)])  # chunk 8: below the kernels' 16-wide tiles
def test_chunk_ssd_and_its_gradients_equal_the_torch_ssd(c, chunk, skip, monkeypatch):
    """Steps 1-4 as one op (chunk_state, pass_states, chunk_out; backward with chunk_state's
    inside chunk_out's second part) against `mamba3.ssd` all in PyTorch: y, the final state
    and the gradients of q, k, x, a, w, w_next and the initial state, and of D with the skip
    D x (added in the kernels)."""
    torch.manual_seed(c)
    Bsz, H, P, N = 2, 2, 16, 32
    T = c * chunk
    g = lambda *s: torch.randn(*s, device=DEV).requires_grad_()
    q, k, x, H0 = g(Bsz, H, T, N), g(Bsz, H, T, N), g(Bsz, T, H, P), g(Bsz, H, P, N)
    a = (-0.3 * torch.rand(Bsz, T, H, device=DEV)).requires_grad_()
    w, wn = torch.rand(Bsz, T, H, device=DEV).requires_grad_(), torch.rand(Bsz, T, H, device=DEV).requires_grad_()
    D = g(H) if skip else None
    ins = (q, k, x, a, w, wn, H0) + ((D,) if skip else ())
    out = {}
    for on in (False, True):
        monkeypatch.setattr(mamba3, "FUSED_DEVICES", {"cpu", "cuda"} if on else set())
        y, final = ssd(x.unsqueeze(2), a, k.unsqueeze(3), q.unsqueeze(3), w, wn, chunk, H0, D)
        gy, gf = torch.ones_like(y).cumsum(1) / T, torch.ones_like(final)
        out[on] = (y, final, torch.autograd.grad((y * gy).sum() + (final * gf).sum(), ins))
    close(out[True][0], out[False][0], 1e-5)
    close(out[True][1], out[False][1], 1e-5)
    for got, want in zip(out[True][2], out[False][2]):
        close(got, want, 1e-5)


@pytest.mark.parametrize("T,P,skip", [(37, 16, True), (5, 12, True), (37, 16, False)])  # tokens not a multiple of the block; P not a power of two
def test_gate_norm_and_its_gradients_equal_the_layer_output(T, P, skip, monkeypatch):
    """mamba3_triton.gate_norm (one kernel each way, the norm weight's and D's gradients as
    per-program partial sums) against Mamba3._output with the output norm (its PyTorch
    reference): the output and the gradients of y, x, z, D and the norm weight (without the
    skip, as after chunk_ssd: of y, z and the norm weight); and opcheck."""
    torch.manual_seed(T)
    Bsz, H = 2, 3
    g = lambda *s: torch.randn(*s, device=DEV).requires_grad_()
    y, x, z, D, w = g(Bsz, T, H, P), g(Bsz, T, H, P), g(Bsz, T, H, P), g(H), g(H, P)
    m = layer()
    m.P, m.H = P, H
    m.D, m.out_norm = torch.nn.Parameter(D.detach().clone()), torch.nn.Parameter(w.detach().clone())
    want = m._output(y[:, :, None], x[:, :, None], z, skip)
    got = (mt.gate_norm(y, x, z, D, w) if skip else mt.gate_norm(y, None, z, None, w)).flatten(-2)
    close(got, want, 1e-5)
    go = torch.randn_like(want)
    ref = torch.autograd.grad((want * go).sum(), (y, x, z, m.D, m.out_norm) if skip else (y, z, m.out_norm))
    for a_, b_ in zip(torch.autograd.grad((got * go).sum(), (y, x, z, D, w) if skip else (y, z, w)), ref):
        close(a_, b_, 1e-5)
    xs, Ds = (x, D) if skip else (y, w)  # (without the skip the op's x and D are placeholders)
    torch.library.opcheck(torch.ops.nanochat.mamba3_gate_fwd, (y, xs, z, Ds, w, skip))
    from torch._subclasses.fake_tensor import FakeTensorMode  # fakes as real, for a non-contiguous y
    ops, yt = torch.ops.nanochat, y.detach().transpose(0, 1).contiguous().transpose(0, 1)
    for op, args in [(ops.mamba3_gate_fwd, (yt, xs, z, Ds, w)), (ops.mamba3_gate_bwd, (torch.randn_like(y), yt, xs, z, Ds, w))]:
        args = [a.detach() for a in args]
        real = op(*args, skip)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a) for a in args], skip)
        for r, f in zip(real if isinstance(real, list) else [real], fake if isinstance(fake, list) else [fake]):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), op


def test_mamba3_bench_prints_the_mixer_and_the_ops():
    """dev/mamba3_bench.py end to end on tiny shapes (the kernels in the interpreter): one JSON
    line per mixer variant and per op setting, the figures positive."""
    import json, os, subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "dev/mamba3_bench.py", "--depth=2", "--batch=1", "--seq=32", "--device_type=cpu",
                          "--compile=0", "--iters=1"], cwd=root, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=root))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows if r["what"] == "mixer"] == ["kernels", "gate_in_pytorch", "pytorch"]
    assert [r["op"] for r in rows if r["what"] == "op"] == ["gate_norm", "turn_qk"]
    assert all(r["fwd_bwd_ms"] > 0 for r in rows if r["what"] == "mixer")
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows if r["what"] == "op")
