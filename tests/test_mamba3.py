"""Mamba-3 (nanochat/mamba3.py): the chunked form against an independent step-by-step
recurrence written here from the paper's equations, continuation from a cache, decoding,
causality, the rotation, each toggle, gradients, and hybrid models end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.attention import Context
from nanochat.gpt import GPT, GPTConfig, LayerSpec, ModelCache, build_model, layer_plan
from nanochat.mamba3 import Mamba3

ALL = dict(mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True, mamba3_trapezoidal=True,
           mamba3_outproj_norm=True)


def outnorm(m, y):
    """The optional RMSNorm per head (over P) before the gate."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * m.out_norm if m.outproj_norm else y


def layer(R=1, chunk=4, dtype=torch.float64, seed=0, **toggles):
    cfg = GPTConfig(n_embd=32, n_head=2, n_kv_head=2, mamba_pattern="AM", mamba3_d_state=16, mamba3_headdim=8,
                    mamba3_chunk=chunk, mamba3_mimo_rank=R, **(ALL if not toggles else toggles))
    torch.manual_seed(seed)
    m = Mamba3(cfg, 0, LayerSpec("mamba3", 0)).to(dtype)
    m.init_weights()
    with torch.no_grad():  # move every parameter off its init (c_proj is zero, biases are all 1)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.c_proj.weight.normal_()
    return m


def ctx(pos0, T):
    return Context(None, None, pos0, T, {})


def reference(m, u):
    """The recurrence, token by token, from the equations (not the module's own decode)."""
    Bsz, T, _ = u.shape
    H, P, N, R, nA = m.H, m.P, m.N, m.R, m.n_angles
    z = m.z_proj(u).view(Bsz, T, H, P)
    x = m.x_proj(u).view(Bsz, T, H, P)
    Bm, Cm = m.bc_proj(u).view(Bsz, T, 2, R, N).unbind(2)
    if m.qknorm:
        Bm = Bm * torch.rsqrt(Bm.pow(2).mean(-1, keepdim=True) + 1e-5) * m.B_norm
        Cm = Cm * torch.rsqrt(Cm.pow(2).mean(-1, keepdim=True) + 1e-5) * m.C_norm
    ctrl = m.ctrl_proj(u)
    dt = F.softplus(ctrl[..., :H] + m.dt_bias)
    A = -torch.clamp(F.softplus(ctrl[..., H:2 * H]), min=1e-4)
    lam = torch.sigmoid(ctrl[..., 2 * H:3 * H]) if m.trapezoidal else torch.ones_like(dt)
    theta = math.pi * torch.tanh(ctrl[..., 3 * H if m.trapezoidal else 2 * H:]) if nA else None
    state = torch.zeros(Bsz, H, P, N, dtype=u.dtype)
    phi = torch.zeros(Bsz, H, nA, dtype=u.dtype)
    k_prev = torch.zeros(Bsz, R, H, N, dtype=u.dtype)
    v_prev = torch.zeros(Bsz, R, H, P, dtype=u.dtype)
    out = []
    for t in range(T):
        k = Bm[:, t, :, None, :].expand(Bsz, R, H, N).clone()
        q = Cm[:, t, :, None, :].expand(Bsz, R, H, N).clone()
        if m.bias:
            k, q = k + m.B_bias.transpose(0, 1), q + m.C_bias.transpose(0, 1)
        if nA:
            phi = phi + dt[:, t, :, None] * theta[:, t, None, :]
            for j in range(nA):  # turn the pair (2j, 2j+1) by phi[..., j]
                c, s = torch.cos(phi[:, None, :, j]), torch.sin(phi[:, None, :, j])
                for w in (k, q):
                    a, b = w[..., 2 * j].clone(), w[..., 2 * j + 1].clone()
                    w[..., 2 * j], w[..., 2 * j + 1] = a * c - b * s, a * s + b * c
        v = x[:, t, None] * (m.mimo_x.transpose(0, 1) if R > 1 else 1)             # (B, R, H, P)
        alpha = torch.exp(A[:, t] * dt[:, t])
        beta, gamma = (1 - lam[:, t]) * dt[:, t] * alpha, lam[:, t] * dt[:, t]
        state = (alpha[..., None, None] * state
                 + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
                 + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v, k))
        y = outnorm(m, torch.einsum("bhpn,brhn->brhp", state, q) + m.D[:, None] * v)
        if R > 1:
            y = (y * F.silu(z[:, t, None] * m.mimo_z.transpose(0, 1)) * m.mimo_o.transpose(0, 1)).sum(1)
        else:
            y = y[:, 0] * F.silu(z[:, t])
        out.append(m.c_proj(y.reshape(Bsz, -1)))
        k_prev, v_prev = k, v
    return torch.stack(out, 1)


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])  # 3 does not divide T = 11; 16 > T
@pytest.mark.parametrize("outproj_norm", [True, False])
def test_chunked_equals_the_recurrence(R, chunk, outproj_norm):
    m = layer(R, chunk, **{**ALL, "mamba3_outproj_norm": outproj_norm})
    u = torch.randn(2, 11, 32, dtype=torch.float64)
    ref = reference(m, u)
    assert ref.abs().max() > 1  # a non-trivial output
    assert (m(u, ctx(0, 11)) - ref).abs().max() < 1e-10


def test_euler_is_mamba2_ssd_without_conv():
    """λ ≡ 1 (trapezoid off) and no rotation: the state update is Mamba-2's H = exp(AΔ)H + Δ v Bᵀ."""
    m = layer(mamba3_qknorm=True, mamba3_bias=True)
    u = torch.randn(1, 9, 32, dtype=torch.float64)
    H, P = m.H, m.P
    x = m.x_proj(u).view(1, 9, H, P)
    Bm, Cm = m.bc_proj(u).view(1, 9, 2, 1, m.N).unbind(2)
    Bm = F.rms_norm(Bm, (m.N,), m.B_norm, eps=1e-5)[:, :, 0, None] + m.B_bias[:, 0]
    Cm = F.rms_norm(Cm, (m.N,), m.C_norm, eps=1e-5)[:, :, 0, None] + m.C_bias[:, 0]
    ctrl = m.ctrl_proj(u)
    dt = F.softplus(ctrl[..., :H] + m.dt_bias)
    A = -F.softplus(ctrl[..., H:2 * H]).clamp(min=1e-4)
    state, ys = torch.zeros(1, H, P, m.N, dtype=u.dtype), []
    for t in range(9):
        state = torch.exp(A[:, t] * dt[:, t])[..., None, None] * state + \
            dt[:, t, :, None, None] * x[:, t, :, :, None] * Bm[:, t, :, None, :]
        ys.append(outnorm(m, torch.einsum("bhpn,bhn->bhp", state, Cm[:, t]) + m.D[:, None] * x[:, t])
                  * F.silu(m.z_proj(u[:, t]).view(1, H, P)))
    ref = m.c_proj(torch.stack(ys, 1).flatten(-2))
    assert (m(u, ctx(0, 9)) - ref).abs().max() < 1e-10


@pytest.mark.parametrize("R", [1, 2])
def test_continuation_at_every_split_equals_the_full_forward(R):
    m = layer(R, chunk=4)
    u = torch.randn(2, 13, 32, dtype=torch.float64)
    full = m(u, ctx(0, 13))
    for s in range(1, 13):  # splits inside and across chunk boundaries
        cache = m.init_cache(2, 0, "cpu", torch.float64)
        a = m(u[:, :s], ctx(0, s), cache)
        b = m(u[:, s:], ctx(s, 13 - s), cache)
        assert (torch.cat([a, b], 1) - full).abs().max() < 1e-10, s
    # three segments, the middle one of a single token
    cache = m.init_cache(2, 0, "cpu", torch.float64)
    parts = [m(u[:, :5], ctx(0, 5), cache), m(u[:, 5:6], ctx(5, 1), cache), m(u[:, 6:], ctx(6, 7), cache)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10


@pytest.mark.parametrize("grad", [True, False])  # without autograd the step takes the cache's stacked projections
@pytest.mark.parametrize("R", [1, 2])
def test_prefill_then_decode_steps_equal_the_full_forward(R, grad):
    m = layer(R, chunk=4)
    u = torch.randn(3, 12, 32, dtype=torch.float64)
    full = m(u, ctx(0, 12))
    cache = m.init_cache(3, 0, "cpu", torch.float64)
    assert cache.w_in.shape == (sum(p.size(0) for p in (m.z_proj.weight, m.x_proj.weight, m.bc_proj.weight,
                                                         m.ctrl_proj.weight)), 32)
    with torch.set_grad_enabled(grad):
        outs = [m(u[:, :5], ctx(0, 5), cache)]
        for t in range(5, 12):
            step = Context(None, None, None, 1, {}, pos_t=torch.tensor(t))
            outs.append(m(u[:, t:t + 1], step, cache))
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-10


def test_causality_is_bit_exact():
    m = layer(dtype=torch.float32, chunk=4)
    u = torch.randn(2, 16, 32)
    base = m(u, ctx(0, 16))
    for t in (1, 6, 8, 15):
        v = u.clone()
        v[:, t:] = torch.randn_like(v[:, t:])
        assert torch.equal(m(v, ctx(0, 16))[:, :t], base[:, :t]), t


def test_rotation_without_angles_is_no_rotation_and_depends_on_angle_differences():
    on = layer(seed=1)
    off = layer(seed=1, mamba3_qknorm=True, mamba3_bias=True, mamba3_trapezoidal=True, mamba3_outproj_norm=True)
    with torch.no_grad():  # the same weights, and the rotated model's angle rows zeroed: θ ≡ 0
        off.load_state_dict({k: v for k, v in on.state_dict().items() if k != "ctrl_proj.weight"}, strict=False)
        off.ctrl_proj.weight.copy_(on.ctrl_proj.weight[:3 * on.H])
        on.ctrl_proj.weight[3 * on.H:].zero_()
    u = torch.randn(2, 10, 32, dtype=torch.float64)
    assert (on(u, ctx(0, 10)) - off(u, ctx(0, 10))).abs().max() < 1e-12
    # q·k after turning both depends only on φ_t - φ_s
    from nanochat.mamba3 import rotate
    q, k, phi = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64), torch.rand(4) * 6
    shift = torch.rand(4, dtype=torch.float64) * 6
    a = rotate(q, phi.double()) @ rotate(k, torch.zeros(4, dtype=torch.float64))
    b = rotate(q, phi.double() + shift) @ rotate(k, shift)
    assert abs(a - b) < 1e-12


@pytest.mark.parametrize("toggle", sorted(ALL))
def test_each_toggle_changes_the_output(toggle):
    u = torch.randn(2, 10, 32, dtype=torch.float64)
    on = layer(seed=3)
    off = layer(seed=3, **{**ALL, toggle: False})
    with torch.no_grad():  # share what both have, so the toggle is the only difference
        off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()
                             and v.shape == off.state_dict()[k].shape}, strict=False)
        if toggle in ("mamba3_complex_rope", "mamba3_trapezoidal"):
            n = off.ctrl_proj.weight.size(0)
            keep = list(range(2 * on.H)) + (list(range(2 * on.H, 3 * on.H)) if toggle != "mamba3_trapezoidal" else []) \
                + (list(range(3 * on.H, on.ctrl_proj.weight.size(0))) if toggle != "mamba3_complex_rope" else [])
            assert len(keep) == n
            off.ctrl_proj.weight.copy_(on.ctrl_proj.weight[keep])
    assert (on(u, ctx(0, 10)) - off(u, ctx(0, 10))).abs().max() > 1e-3


def test_gradcheck_through_the_chunked_form():
    m = layer(R=2, chunk=3)
    m.bc_proj.weight.data.mul_(0.3)
    u = torch.randn(1, 7, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, ctx(0, 7)), (u,), eps=1e-6, atol=1e-6)
    m(u, ctx(0, 7)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("R", [1, 2])
def test_parameter_gradients_of_the_chunked_form_equal_the_recurrences(R):
    """Every parameter's gradient through the chunked form (B/C, their per-head biases, the
    angles' projection included) equals autograd's through the step-by-step reference, in fp64."""
    m = layer(R=R, chunk=3)
    u = torch.randn(2, 8, 32, dtype=torch.float64)
    gy = torch.randn(2, 8, 32, dtype=torch.float64)
    grads = []
    for fn in (lambda: m(u, ctx(0, 8)), lambda: reference(m, u)):
        m.zero_grad()
        (fn() * gy).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n, g in grads[1].items():
        assert torch.allclose(grads[0][n], g, rtol=1e-9, atol=1e-11), n


def test_a_batch_1_prefill_loaded_into_3_rows_equals_a_batched_prefill():
    m = layer(R=2)
    u = torch.randn(1, 9, 32, dtype=torch.float64)
    nxt = torch.randn(3, 1, 32, dtype=torch.float64)
    first = m.init_cache(1, 0, "cpu", torch.float64)
    m(u, ctx(0, 9), first)
    one = m.init_cache(3, 0, "cpu", torch.float64)
    ModelCache([one], 0).load(ModelCache([first], 0))  # as the engine loads its decode cache
    many = m.init_cache(3, 0, "cpu", torch.float64)
    m(u.expand(3, -1, -1), ctx(0, 9), many)
    for name in ("phi", "state", "k_prev", "x_prev"):
        assert torch.allclose(getattr(one, name), getattr(many, name), atol=1e-12), name
    step = Context(None, None, None, 1, {}, pos_t=torch.tensor(9))
    assert torch.allclose(m(nxt, step, one), m(nxt, step, many), atol=1e-12)


# ---- hybrid models -------------------------------------------------------------------

def hybrid(T=32, pattern="AAM", window_pattern="L", **kw):
    cfg = GPTConfig(sequence_len=T, vocab_size=97, n_layer=6, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern=window_pattern, mamba_pattern=pattern, mamba3_d_state=16, mamba3_headdim=16,
                    mamba3_chunk=8, **{**ALL, **kw})
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_layer_plan_tiles_the_pattern_and_keeps_the_last_layer_attention():
    cfg = GPTConfig(sequence_len=100, n_layer=6, window_pattern="SL", mamba_pattern="AAM")
    plan = layer_plan(cfg)
    assert [s.mixer for s in plan] == ["attn", "attn", "mamba3", "attn", "attn", "attn"]
    # the window pattern runs over the attention layers; the last one is full
    assert [s.window for s in plan] == [50, 100, 0, 50, 100, 100]
    assert [s.mixer for s in layer_plan(GPTConfig(n_layer=4, mamba_pattern="M"))] == ["mamba3"] * 3 + ["attn"]
    with pytest.raises(ValueError, match="A \\(attention\\) and M"):
        layer_plan(GPTConfig(mamba_pattern="AXM"))


def test_value_embeddings_only_on_attention_layers():
    plan = layer_plan(GPTConfig(n_layer=6, mamba_pattern="AM", value_embeds=True))
    assert all(s.extras == () for s in plan if s.mixer == "mamba3")
    assert any(s.extras for s in plan)


@pytest.mark.parametrize("R", [1, 2])
def test_hybrid_decoding_equals_full_forward_and_survives_dummy_steps(R):
    model = hybrid(mamba3_mimo_rank=R, value_embeds=True, smear=True)
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    cache = model.init_cache(2, 32)
    model(idx[:, :7], cache=cache)
    snap = cache.snapshot()  # as the engine does around its CUDA-graph warmup
    for _ in range(2):
        model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache, torch.tensor(31))
    cache.restore(snap)
    for t in range(7, 20):
        assert torch.allclose(model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)), full[:, t], atol=1e-4), t


def test_hybrid_init_and_optimizer_groups():
    from tests.test_gpt import init_twice_over_garbage
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, mamba_pattern="AM",
                    mamba3_d_state=8, mamba3_headdim=8, mamba3_mimo_rank=2, **ALL)
    model, states = init_twice_over_garbage(cfg)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]) and torch.isfinite(states[0][k]).all(), k
    tags = model.opt_tags()
    mixer = "blocks.1.mixer."
    assert tags[mixer + "x_proj.weight"] == "muon" and tags[mixer + "c_proj.weight"] == "muon"
    for name in ("dt_bias", "D", "B_norm", "C_bias", "out_norm", "mimo_x", "mimo_o", "ctrl_proj.weight"):
        assert tags[mixer + name] == "adamw_ssm"
    adamw, muon = model.setup_optimizers()
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert model.blocks[1].mixer.D.dim() == 1 and id(model.blocks[1].mixer.D) not in \
        {id(p) for g in muon.param_groups for p in g["params"]}


def test_hybrid_trains_and_every_parameter_learns():
    model = hybrid(T=16).train()
    idx = torch.randint(0, 97, (4, 17))
    opts = model.setup_optimizers()
    first = None
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if first is None:
            first = loss.item()
            assert all(p.grad is not None for p in model.parameters())
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < first * 0.5, (first, loss.item())


def test_hybrid_flops_count_the_mamba_layers():
    a = GPT(GPTConfig(sequence_len=64, n_layer=3, n_embd=64, n_head=2, n_kv_head=2)).estimate_flops()
    h = GPT(GPTConfig(sequence_len=64, n_layer=3, n_embd=64, n_head=2, n_kv_head=2, mamba_pattern="AM")).estimate_flops()
    m = Mamba3(GPTConfig(sequence_len=64, n_embd=64, n_head=2, mamba_pattern="AM"), 1, LayerSpec("mamba3", 0))
    assert h != a and m.flops_per_token(64) > 6 * sum(p.numel() for p in m.parameters())


def test_bf16_autocast_prefill_and_decode_stay_close_to_fp32():
    """Under bf16 autocast (as the engine runs), the carried state and the decode step stay
    fp32: prefill + decode is as close to the fp32 result as a bf16 full forward is."""
    m = layer(R=2, chunk=4, dtype=torch.float32)
    u = torch.randn(2, 24, 32)
    ref = m(u, ctx(0, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = m(u, ctx(0, 24)).float()
        cache = m.init_cache(2, 0, "cpu", torch.bfloat16)
        assert cache.state.dtype == torch.float32
        outs = [m(u[:, :9], ctx(0, 9), cache).float()]
        for t in range(9, 24):
            outs.append(m(u[:, t:t + 1], Context(None, None, None, 1, {}, pos_t=torch.tensor(t)), cache).float())
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()
    assert rel(full) < 2e-2 and rel(torch.cat(outs, 1)) < 2e-2, (rel(full), rel(torch.cat(outs, 1)))


@pytest.mark.parametrize("R,toggles", [(1, {}), (2, {}), (1, dict(mamba3_qknorm=False, mamba3_bias=False,
                                                                      mamba3_complex_rope=False, mamba3_trapezoidal=False))])
def test_bf16_autocast_gradients_stay_close_to_fp32(R, toggles):
    """Training's backward under bf16 autocast: ssd()'s own matmul Functions get bf16 gradients
    against the operands they saved; every parameter's gradient stays near fp32's."""
    m = layer(R=R, chunk=4, dtype=torch.float32, **toggles)
    u, gy = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    grads = []
    for bf16 in (False, True):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(u, ctx(0, 24))
        (y.float() * gy).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n, want in grads[0].items():
        rel = ((grads[1][n] - want).norm() / want.norm()).item()
        assert rel < 5e-2, (n, rel)


def test_long_sequences_with_strong_decay_stay_finite():
    m = layer(chunk=8)
    with torch.no_grad():
        m.ctrl_proj.weight[m.H:2 * m.H] += 3.0  # large dd_A: strong decay
        m.dt_bias += 4.0                          # and large steps
    u = torch.randn(1, 300, 32, dtype=torch.float64, requires_grad=True)
    y = m(u, ctx(0, 300))
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(u.grad).all()
