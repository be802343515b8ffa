"""mHC (nanochat/mhc.py): Sinkhorn, the init that equals the baseline, causality, decoding,
gradients, optimizer groups, and a CPU training run."""

import json

import pytest
import torch

from nanochat.gpt import GPT, Block, GPTConfig, build_model, layer_plan
from nanochat.mhc import (_collapse_op, _expand_op, _sinkhorn_backward_reference, collapse_reference, expand_reference,
                          set_mhc_kernel, sinkhorn, sinkhorn_reference)
from tests.test_base_train import base_dir, losses, run_train  # noqa: F401 (base_dir is a fixture)
from tests.test_gpt import assert_causal_bit_exact

KW = dict(sequence_len=32, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
MAMBA = dict(mamba_pattern="AM", mamba3_trapezoidal=True, mamba3_d_state=16, mamba3_headdim=16)
RECIPE = dict(layer_lambdas=True, backout=True, smear=True, value_embeds=True)


def doubly_stochastic_error(m):
    return max((m.sum(-1) - 1).abs().max().item(), (m.sum(-2) - 1).abs().max().item())


def products_of_ten(h):
    prod = h[:200]
    for k in range(1, 10):
        prod = prod @ h[200 * k:200 * (k + 1)]
    return prod


def test_sinkhorn_is_doubly_stochastic_and_so_are_its_products():
    """Columns sum to 1 to rounding (the last step divides by them): every new stream is a
    convex combination of the old ones. Rows converge more slowly. Measured at 20
    iterations, worst row-sum error over 2000 random 4x4 matrices: logits N(0, 1) 9e-5;
    uniform in [-10, 10] 0.07 (79% of matrices beyond 1e-3; 1000 iterations bring all
    within 1e-3); 6 I + uniform [-1, 1] (near our init) 0.015. Products of 10 keep a
    spectral norm within 1.003 in every case."""
    torch.manual_seed(0)
    wide = sinkhorn(torch.rand(2000, 4, 4) * 20 - 10)
    assert (wide >= 0).all() and (wide.sum(-2) - 1).abs().max() <= 1e-5 and (wide.sum(-1) - 1).abs().max() <= 0.1
    prod = products_of_ten(wide)
    assert (prod.sum(-2) - 1).abs().max() <= 1e-4 and torch.linalg.matrix_norm(prod, ord=2).max() <= 1 + 1e-2
    h = sinkhorn(torch.randn(2000, 4, 4))
    assert (h >= 0).all() and doubly_stochastic_error(h) <= 1e-3
    prod = products_of_ten(h)
    assert doubly_stochastic_error(prod) <= 1e-3 and torch.linalg.matrix_norm(prod, ord=2).max() <= 1 + 1e-3


def test_sinkhorn_op_gradient_equals_autograd_through_the_reference():
    """The op's backward (its PyTorch form here; the Triton kernel's below) equals autograd
    through the 20 iterations in fp64, and gradcheck passes through the op."""
    torch.manual_seed(0)
    l = (torch.randn(50, 4, 4, dtype=torch.float64) * 3).requires_grad_()
    g = torch.randn(50, 4, 4, dtype=torch.float64)
    want = torch.autograd.grad(sinkhorn_reference(l), l, g)[0]
    assert (_sinkhorn_backward_reference(g, l.detach(), 20, 1e-6) - want).abs().max() < 1e-12
    assert (torch.autograd.grad(sinkhorn(l), l, g)[0] - want).abs().max() < 1e-12
    assert torch.autograd.gradcheck(sinkhorn, (torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("n,M", [(4, 130), (2, 7), (8, 65)])
def test_sinkhorn_triton_kernels_match_the_reference(n, M):
    """nanochat/mhc_triton.py (Triton's CPU interpreter without a GPU): the forward and the
    recomputing backward against fp64, on strided logits as the model passes them, M not a
    multiple of the kernels' block."""
    from nanochat.mhc_triton import sinkhorn_bwd, sinkhorn_fwd
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    wide = torch.randn(M, n * n + 3, dtype=torch.float64) * 3
    l = wide[:, 3:].unflatten(-1, (n, n))  # not contiguous
    g = torch.randn(M, n, n, dtype=torch.float64)
    lr = l.clone().requires_grad_()
    want = sinkhorn_reference(lr)
    dwant = torch.autograd.grad(want, lr, g)[0]
    lf = l.float().to(device)
    out = sinkhorn_fwd(lf, 20, 1e-6).double().cpu()
    dl = sinkhorn_bwd(g.float().to(device), lf, 20, 1e-6).double().cpu()
    assert (out - want).abs().max() < 1e-6, "forward"
    assert (dl - dwant).abs().max() < 1e-6 * max(1.0, dwant.abs().max().item()), "backward"


@pytest.mark.parametrize("n,M,C", [(4, 11, 200), (2, 3, 128), (8, 9, 70)])
def test_mix_triton_kernels_match_the_reference(n, M, C):
    """The read-out u = sum_i H_pre[i] X[i] and the mix X'[j] = sum_i H_res[i, j] X[i] + H_post[j] f
    through their ops (fused Triton kernels: the CPU interpreter without a GPU), forward and
    every gradient, against autograd through the PyTorch form in fp64; M and C not multiples
    of the kernels' blocks; a bf16 stream as in training, too."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x, f, dy = torch.randn(M, n, C, dtype=torch.float64), torch.randn(M, C, dtype=torch.float64), torch.randn(M, n, C)
    res, post, pre = torch.rand(M, n, n, dtype=torch.float64), torch.rand(M, n, dtype=torch.float64), torch.rand(M, n)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        ins = [t.detach().to(device, dt).requires_grad_() for t in (x, f)] + \
              [t.detach().to(device, torch.float32).requires_grad_() for t in (res, post, pre)]
        ref = [t.detach().double().cpu().requires_grad_() for t in ins]
        xk, fk, rk, pk, prek = ins
        xr, fr, rr, pr, prer = ref
        yk = _expand_op(xk, fk, rk, pk) + _collapse_op(xk, prek).unsqueeze(-2)
        yr = expand_reference(xr, fr, rr, pr) + collapse_reference(xr, prer).unsqueeze(-2)
        assert yk.dtype == dt and ((yk.double().cpu() - yr).abs().max() < tol * yr.abs().max()), dt
        yk.backward(dy.to(device, dt))
        yr.backward(dy.to(dt).double())
        for a, b, name in zip(ins, ref, ("x", "f", "res", "post", "pre")):
            assert a.grad.dtype == a.dtype, name
            assert (a.grad.double().cpu() - b.grad).abs().max() < tol * b.grad.abs().max(), (dt, name)


def test_mix_ops_pass_opcheck_and_the_kernel_switch():
    """torch.library.opcheck on the two ops (their fake tensors, autograd registration and
    schemas, as torch.compile relies on them), fake strides equal to real ones on a permuted
    stream; set_mhc_kernel rejects an unknown kernel and
    sets every hyper-connection; a CPU model runs the PyTorch form whatever the switch."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (compiled Triton cannot read CPU tensors)
    x, f = torch.randn(3, 4, 40, device=dev, requires_grad=True), torch.randn(3, 40, device=dev, requires_grad=True)
    res, post = torch.rand(3, 4, 4, device=dev, requires_grad=True), torch.rand(3, 4, device=dev, requires_grad=True)
    torch.library.opcheck(_expand_op, (x, f, res, post))
    torch.library.opcheck(_collapse_op, (x, post))
    # a dense stream with other strides (Engram's transposed output, say): the fake outputs must
    # have the kernels' (contiguous) strides, or inductor's stride checks fail under compile
    from torch._subclasses.fake_tensor import FakeTensorMode
    xt = torch.randn(40, 3, 4, device=dev).permute(1, 2, 0)
    ins = (xt, f.detach(), res.detach(), post.detach())
    real = (_expand_op(*ins), _collapse_op(xt, ins[3]))
    with FakeTensorMode() as mode:
        fx, ff, fr, fp = (mode.from_tensor(t) for t in ins)
        fake = (_expand_op(fx, ff, fr, fp), _collapse_op(fx, fp))
    assert [t.stride() for t in fake] == [t.stride() for t in real]
    model = build_model(GPTConfig(**KW, mhc=True), "cpu")
    with pytest.raises(ValueError, match="mhc kernel"):
        set_mhc_kernel(model, "cuda")
    idx = torch.randint(0, 97, (2, 16))
    want = model(idx)
    set_mhc_kernel(model, "torch")
    assert {m.kernel for m in model.modules() if hasattr(m, "phi")} == {"torch"}
    assert torch.equal(model(idx), want)


def test_mix_kernels_in_a_model_equal_the_pytorch_forms(monkeypatch):
    """A whole fp32 model (recipe, Engram, mHC) through the fused kernels (on a GPU; without
    one the interpreter on the CPU, let in by patching the device check) gives the PyTorch
    forms' loss and every parameter's gradient to fp32 rounding: the ops' wiring (strides,
    the expanded first stream, saved tensors) in the model, not only the ops alone."""
    import nanochat.mhc as mhc
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (compiled Triton cannot read CPU tensors)
    torch.manual_seed(0)
    model = build_model(GPTConfig(**KW, **RECIPE, mhc=True, engram_layers="0,2", engram_table=256), dev)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 97, (2, 32)).to(dev)
    if dev == "cpu":
        monkeypatch.setattr(mhc, "_triton_ok", lambda x: x.dtype != torch.float64)

    def run(kernel):
        set_mhc_kernel(model, kernel)
        model.zero_grad(set_to_none=True)
        loss = model(idx, idx)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (loss_k, grads_k), (loss_r, grads_r) = run("triton"), run("torch")
    assert abs(loss_k - loss_r) < 1e-5 and grads_k.keys() == grads_r.keys()
    for n, g in grads_r.items():  # (a floor for sums that cancel: hc_mlp.scale's 5.6e-4 was off by 6e-8 on
        # one CPU, 1.1e-4 of itself; a wiring error is off by the gradient's own size)
        assert (grads_k[n] - g).norm() <= 1e-4 * g.norm() + 1e-6, n


def test_sinkhorn_of_random_logits_is_not_uniform():
    """The fork fed Sinkhorn exp(l_i + l_j), a rank-one matrix, which it maps to the uniform
    matrix whatever l is; a full n x n matrix of logits must not come out uniform."""
    torch.manual_seed(0)
    l = torch.randn(100, 4, 4) * 2
    assert (sinkhorn(l) - 0.25).abs().amax((-2, -1)).min() > 0.05
    rank_one = l[:, 0, :, None] + l[:, 0, None, :]  # the fork's bug: what this test catches
    assert (sinkhorn(rank_one) - 0.25).abs().max() < 1e-3
    m = build_model(GPTConfig(mhc=True, **KW), "cpu")  # and through the model's coefficients
    hc = m.blocks[1].hc_mixer
    with torch.no_grad():
        hc.phi.weight.normal_(0, 256 ** -0.5)  # logits of unit scale
        hc.scale.fill_(1.0)
        hc.base.zero_()
    _, _, res = hc.coefficients(torch.randn(3, 5, 4, 64))
    assert (res - 0.25).abs().amax((-2, -1)).min() > 0.05 and doubly_stochastic_error(res) <= 1e-3


def model(T=32, **kw):
    torch.manual_seed(0)
    m = build_model(GPTConfig(**{**KW, "sequence_len": T, "mhc": True, **kw}), "cpu")
    with torch.no_grad():  # off the init, where every stream is equal
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


CASES = [{}, dict(engram_layers="0,2", engram_dim=32, engram_table=50), dict(MAMBA, **RECIPE),
         dict(MAMBA, engram_layers="1,3", engram_dim=32, engram_table=50, mhc_streams=3)]


@pytest.mark.parametrize("extra", CASES)
def test_causality_is_bit_exact(extra):
    assert_causal_bit_exact(model(**extra), 97)


@pytest.mark.parametrize("extra", CASES)
def test_prefill_and_decode_equal_the_full_forward(extra):
    m = model(**extra)
    idx = torch.randint(0, 97, (3, 22))
    full = m(idx)
    cache = m.init_cache(3, 32)
    a = m(idx[:, :7], cache=cache)
    b = m(idx[:, 7:16], cache=cache)
    assert torch.allclose(torch.cat([a, b], 1), full[:, :16], atol=1e-4)
    for t in range(16, 22):
        assert torch.allclose(m.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)), full[:, t], atol=1e-4)


def test_a_loaded_cache_decodes_each_row_like_its_full_forward():
    """The engine prefills one row and loads it into every row of its decode cache; Engram's
    cache holds a row per (sample, stream), so each sample must get the streams in order."""
    m = model(**CASES[3])
    prompt, tails = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (3, 4))
    one = m.init_cache(1, 32)
    m(prompt, cache=one)
    cache = m.init_cache(3, 32)
    cache.load(one)
    full = m(torch.cat([prompt.expand(3, -1), tails], 1))
    for t in range(4):
        out = m.decode_step(tails[:, t:t + 1], cache, torch.tensor(9 + t))
        assert torch.allclose(out, full[:, 9 + t], atol=1e-4), t


def test_one_stream_with_identity_coefficients_is_the_plain_block_exactly():
    cfg = GPTConfig(mhc=True, mhc_streams=1, **KW)
    torch.manual_seed(0)
    m = build_model(cfg, "cpu")
    block = m.blocks[1]
    plain = Block(GPTConfig(**KW), 1, layer_plan(GPTConfig(**KW))[1])
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("hc_")})
    ones = lambda x: (x.new_ones(*x.shape[:-2], 1), x.new_ones(*x.shape[:-2], 1), x.new_ones(*x.shape[:-2], 1, 1))
    block.hc_mixer.coefficients = block.hc_mlp.coefficients = ones
    x = torch.randn(2, 9, 64)
    ctx = m._context(torch.zeros(2, 9, dtype=torch.long), 0)
    assert torch.equal(block(x.unsqueeze(-2), ctx).squeeze(-2), plain(x, ctx))
    block.hc_mlp.coefficients = lambda x: (x.new_ones(*x.shape[:-2], 1), 2 * x.new_ones(*x.shape[:-2], 1),
                                           x.new_ones(*x.shape[:-2], 1, 1))
    assert not torch.equal(block(x.unsqueeze(-2), ctx).squeeze(-2), plain(x, ctx))  # the coefficients are used


@pytest.mark.parametrize("extra", [{}, RECIPE, dict(engram_layers="0,2", engram_dim=32, engram_table=50)])
def test_init_is_the_baseline_model(extra):
    """At init every stream equals the baseline's residual and the mean of them is read out;
    the only differences are rounding (the pre-norm removes u's scale 1 + 2 sigmoid(-6))."""
    torch.manual_seed(0)
    m = build_model(GPTConfig(mhc=True, **KW, **extra), "cpu")
    plain = build_model(GPTConfig(**KW, **extra), "cpu")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.05)  # the zero-initialised output projections, so the blocks do something
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if ".hc_" not in k})
    idx = torch.randint(0, 97, (2, 20))
    assert torch.allclose(m(idx), plain(idx), atol=1e-5)
    pre, post, res = m.blocks[2].hc_mixer.coefficients(torch.randn(1, 1, 4, 64))
    assert pre.argmax().item() == 0 and pre.max() > 0.99 and pre.min() < 0.01  # stream (2*2+0) mod 4
    assert torch.allclose(post, torch.ones(4)) and (res.diagonal(dim1=-2, dim2=-1) > 0.99).all()


def test_init_groups_gradients_and_learning():
    from tests.test_gpt import init_twice_over_garbage
    cfg = GPTConfig(mhc=True, engram_layers="0", engram_dim=16, engram_table=20, **{**KW, "n_layer": 3}, **MAMBA)
    built, states = init_twice_over_garbage(cfg)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]) and torch.isfinite(states[0][k].float()).all(), k
    torch.manual_seed(0)
    m = build_model(GPTConfig(mhc=True, **KW, **RECIPE), "cpu").train()
    opts = m.setup_optimizers()
    seen = [id(p) for opt in opts for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())  # each parameter in exactly one group
    (mhc_group,) = [g for g in opts[0].param_groups if g["tag"] == "adamw_mhc"]
    assert len(mhc_group["params"]) == 3 * 2 * 4 and mhc_group["lr"] == 0.005
    assert m.estimate_flops() - build_model(GPTConfig(**KW, **RECIPE), "cpu").estimate_flops() == 6 * 24 * 256 * 8
    idx = torch.randint(0, 97, (4, 17))
    first = None
    for _ in range(25):  # from the init: the streams must come apart and every mHC parameter learn
        loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        first = first or loss.item()
        for opt in opts:
            opt.step()
        m.zero_grad(set_to_none=True)
    assert loss.item() < 0.5 * first
    m(idx[:, :-1], idx[:, 1:]).backward()
    for name, p in m.named_parameters():
        if ".hc_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            if name.endswith("base"):  # the pre, post and res parts each
                assert all(p.grad[s].abs().sum() > 0 for s in (slice(0, 4), slice(4, 8), slice(8, 24))), name


def test_streams_must_be_positive():
    with pytest.raises(ValueError, match="mhc_streams"):
        layer_plan(GPTConfig(mhc=True, mhc_streams=0))


def test_base_train_with_mhc_trains_and_its_checkpoint_rebuilds(base_dir, corpus_dir):  # noqa: F811
    out = run_train(base_dir, corpus_dir, "--mhc", "--mhc_streams=3", "--model_tag=mhc")
    ls = losses(out)
    assert list(ls) == [f"{i:05d}" for i in range(1, 7)] and float(ls["00006"]) < float(ls["00001"])
    ckpt = base_dir / "base_checkpoints" / "mhc"
    cfg = json.loads((ckpt / "meta_000006.json").read_text())["model_config"]
    assert cfg["mhc"] and cfg["mhc_streams"] == 3
    from nanochat.checkpoint_manager import build_from_checkpoint
    model, _ = build_from_checkpoint(str(ckpt), 6, torch.device("cpu"), "eval")
    assert isinstance(model, GPT) and model.blocks[0].hc_mixer.n == 3
    assert model.blocks[1].hc_mlp.scale.ne(0.01).any()  # the trained values, not a fresh init


def test_hyper_connection_equals_the_equations():
    """The wrapper (norm applied after Φ, streams mixed as broadcast products) equals the
    docstring's equations written plainly: RMSNorm(vec X) Φ, Sinkhorn, an einsum mix."""
    from nanochat.mhc import HyperConnection
    cfg = GPTConfig(**KW, mhc=True)
    hc = HyperConnection(cfg, 1, 0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hc.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 5, 4, 64) * 3
    f_of = lambda u: torch.tanh(u) * 2  # any sublayer
    n, C = 4, 64
    m = torch.nn.functional.rms_norm(x.flatten(-2), (n * C,)) @ hc.phi.weight.T
    m = m * torch.cat([hc.scale[0].expand(n), hc.scale[1].expand(n), hc.scale[2].expand(n * n)]) + hc.base
    pre, post = torch.sigmoid(m[..., :n]) + 1e-6, 2 * torch.sigmoid(m[..., n:2 * n])
    res = sinkhorn(m[..., 2 * n:].unflatten(-1, (n, n)))
    f = f_of((pre.unsqueeze(-1) * x).sum(-2))
    ref = torch.einsum("btij,btic->btjc", res, x) + post.unsqueeze(-1) * f.unsqueeze(-2)
    torch.testing.assert_close(hc(x, f_of), ref, rtol=1e-5, atol=1e-5)


def test_dev_saved_bytes_counts_the_streams():
    """dev/saved_bytes.py (activation memory on the CPU): mHC's four streams keep more for
    backward than the single residual."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    def kib(*flags):
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run([sys.executable, "dev/saved_bytes.py", "--depth=2", "--seq_len=32", *flags],
                             capture_output=True, text=True, check=True, cwd=root).stdout
        return float(re.search(r"([\d.]+) KiB saved per token", out).group(1))
    assert kib("--mhc") > 1.2 * kib()
