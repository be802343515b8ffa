"""The fused Triton kernels for Mamba-3's chunked form (nanochat/mamba3_triton.py) against
the PyTorch reference `ssd()` with the bias and rotation applied the PyTorch way: outputs,
final states and every input's gradient, then the whole layer with the switch on and off.
Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton), in fp32 only: the interpreter's tl.dot on
bf16 inputs returns garbage (~1e10 for unit inputs, Triton 3.5), so bf16 is checked on the GPU
(tests/test_gpu.py). On a GPU these tests pass too (fp32 products are IEEE there, not TF32)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from nanochat.attention import Context  # noqa: E402
from nanochat.gpt import GPTConfig, LayerSpec  # noqa: E402
from nanochat.mamba3 import KERNELS, Mamba3, rotate, set_mamba3_kernel, ssd  # noqa: E402
from nanochat.mamba3_triton import ssd_rotated  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, Bm, Cm, bB, bC, phi, a, w, wn, s0, chunk):
    """rot(B + bias, φ) and rot(C + bias, φ) per head in PyTorch, then `ssd` with R = 1."""
    per_head = lambda m, b: m[:, :, None, :] + (b if b is not None else 0)
    k = rotate(per_head(Bm, bB).expand(-1, -1, x.size(2), -1), phi)[:, :, None]
    q = rotate(per_head(Cm, bC).expand(-1, -1, x.size(2), -1), phi)[:, :, None]
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
