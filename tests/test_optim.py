"""The distributed optimizers give the same result as one process: 2 gloo processes on
CPU, each with half of the batch, against 1 process with all of it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanochat.muon as muon_module
from nanochat import schedules
from nanochat.gpt import GPTConfig, build_model
from nanochat.muon import Muon, polar_express

CFG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=32)
# the quality recipe's model (value embeddings, scalars, padded vocab) and optimizer options
RECIPE_CFG = GPTConfig(sequence_len=16, vocab_size=60, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, value_embeds=True,
                       smear=True, backout=True, layer_lambdas=True, qk_scale=1.2, pad_vocab_to=64, ref_init=True)
RECIPE_OPT = dict(adam_per_group=True, cautious_wd=True, normuon_beta2=0.9, muon_eq=True, muon_plus=True)
STEPS = 3


def train(rank, world, batch, recipe=False):
    torch.manual_seed(0)
    model = build_model(RECIPE_CFG if recipe else CFG, "cpu")
    with torch.no_grad():  # non-zero output projections so every gradient is non-trivial
        for b in model.blocks:
            b.mixer.c_proj.weight.normal_(0, 0.05)
            b.mlp.c_proj.weight.normal_(0, 0.05)
    opts = model.setup_optimizers(weight_decay=0.1, **(RECIPE_OPT if recipe else {}))
    for g in opts[1].param_groups:
        g["ns_dtype"] = torch.float32  # bf16 rounding would hide small differences in the averaging
    x, y = batch
    n = x.size(0) // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    for _ in range(STEPS):
        model(x, y).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}, [o.state_dict() for o in opts]


def _worker(rank, world, init_file, batch, out_dir, recipe):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state, _ = train(rank, world, batch, recipe)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", [False, True])
def test_distributed_equals_single_process(tmp_path, recipe):
    torch.manual_seed(1)
    x = torch.randint(0, 60, (4, 16))
    batch = (x, x.roll(-1, 1))
    single, _ = train(0, 1, batch, recipe)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), batch, str(tmp_path), recipe), nprocs=2, join=True)
    for rank in range(2):
        dist_state = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in single.items():
            assert torch.allclose(dist_state[k], v, atol=5e-5, rtol=1e-5), f"rank {rank} differs in {k}"
    # and training really moved the weights
    torch.manual_seed(0)
    init = build_model(RECIPE_CFG if recipe else CFG, "cpu").state_dict()
    assert not torch.allclose(init["wte.weight"], single["wte.weight"])


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64), (3, 32, 16)])
def test_polar_express_orthogonalizes(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    O = polar_express(G).float()
    s = torch.linalg.svdvals(O)
    # Polar Express drives singular values into roughly [0.7, 1.2] (approximate, bf16)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # and keeps the singular vectors: O is close to U V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (O * (U @ Vh)).sum(dim=(-2, -1)) / (O.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert (cos > 0.97).all()


def muon_step(p0, grad, **opts):
    """One Muon step on one matrix, momentum 0, with orthogonalization replaced by the
    identity (monkeypatched by the callers that need to know the update exactly)."""
    p = torch.nn.Parameter(p0.clone())
    p.grad = grad.clone()
    opt = Muon([p], lr=0.1, momentum=0.0, ns_dtype=torch.float32, **opts)
    opt.step()
    return p.detach()


def test_cautious_weight_decay_skips_entries_whose_update_opposes_them(monkeypatch):
    monkeypatch.setattr(muon_module, "orthogonalize", lambda G, steps, dtype: G)  # O = the gradient
    p0 = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    grad = torch.tensor([[0.5, 0.5, -0.5, -0.5]])  # step -lr*O: toward 0 for entries 0 and 3 only
    plain = muon_step(p0, grad, weight_decay=0.5)
    cautious = muon_step(p0, grad, weight_decay=0.5, cautious_wd=True)
    no_wd = muon_step(p0, grad)
    assert torch.allclose(plain, p0 * (1 - 0.05) - 0.1 * grad)
    decayed = torch.tensor([[True, False, False, True]])
    assert torch.allclose(cautious[decayed], plain[decayed])
    assert torch.allclose(cautious[~decayed], no_wd[~decayed])  # update opposes the sign: not decayed


def test_muon_options_each_change_the_update():
    torch.manual_seed(0)
    p0, grad = torch.randn(16, 8), torch.randn(16, 8) * torch.linspace(0.1, 3, 16)[:, None]
    base = muon_step(p0, grad)
    for opt in (dict(beta2=0.9), dict(row_eq=True), dict(renorm=True)):
        assert not torch.allclose(muon_step(p0, grad, **opt), base, atol=1e-6), opt


def test_muon_plus_and_normuon_norms(monkeypatch):
    """Muon+ sets ||O||_F to sqrt(min(m, n)); NorMuon keeps ||O||_F and evens out the rows."""
    monkeypatch.setattr(muon_module, "orthogonalize", lambda G, steps, dtype: G)
    torch.manual_seed(0)
    p0, grad = torch.zeros(16, 8), torch.randn(16, 8) * torch.linspace(0.1, 3, 16)[:, None]
    upd = lambda **o: -muon_step(p0, grad, **o) / (0.1 * 2 ** 0.5)  # lr 0.1, sqrt(rows/cols) = sqrt(2)
    assert torch.allclose(upd(renorm=True).norm(), torch.tensor(8 ** 0.5))
    normed = upd(beta2=0.9)
    assert torch.allclose(normed.norm(), grad.norm(), rtol=1e-5)
    row_rms = normed.square().mean(dim=1).sqrt()
    assert torch.allclose(row_rms, row_rms.mean().expand(16), rtol=1e-4)  # first step: every row the same rms
    eq = upd(row_eq=True)
    assert torch.allclose(eq.norm(dim=1), eq.norm(dim=1).mean().expand(16), rtol=1e-5)


def test_lr_schedule_of_the_recipe():
    lrm = [schedules.lr_multiplier(it, 1000, 40, 0.65, 0.05) for it in range(1000)]
    assert lrm[0] == 1 / 40 and lrm[39] == 1.0  # warmup over 40 steps
    assert lrm[349] == 1.0 and lrm[350] < 1.0  # the warmdown over the last 650
    assert lrm[-1] == pytest.approx(0.05)  # the last step at final_lr_frac
    # 100 steps (the ablation): warmup and warmdown overlap; the warmup wins, as in the reference,
    # then the warmdown's line continues from where it is at step 40
    lrm = [schedules.lr_multiplier(it, 100, 40, 0.65, 0.05) for it in range(100)]
    assert lrm[39] == 1.0 and lrm[40] == pytest.approx(59 / 65 + (6 / 65) * 0.05) and lrm[-1] == pytest.approx(0.05)
    legacy = [schedules.lr_multiplier(it, 100, 0, 0.2, 0.0) for it in range(100)]
    assert legacy[79] == 1.0 and legacy[80] < 1.0 and legacy[-1] == 0.0


def test_momentum_and_weight_decay_schedules():
    mom = lambda it, n=2000: schedules.muon_momentum(it, n, "ref", 0.65)
    assert mom(0) == 0.85 and mom(200) == pytest.approx(0.91) and mom(400) == 0.97 and mom(600) == 0.97
    warmdown_start = 2000 - 1300
    assert mom(warmdown_start) == 0.97 and mom(warmdown_start + 650) == pytest.approx(0.935)
    assert mom(1999) == pytest.approx(0.90, abs=1e-4)
    assert mom(99, n=100) == pytest.approx(0.85 + 0.12 * 99 / 400)  # short runs: the ramp wins, as in the reference
    assert schedules.muon_momentum(300, 1000) == 0.95 and schedules.muon_momentum(0, 1000) == 0.85
    wd = [schedules.muon_weight_decay(it, 100, 0.28, "cosine") for it in (0, 50, 100)]
    assert wd == [pytest.approx(0.28), pytest.approx(0.14), pytest.approx(0.0)]
    assert schedules.muon_weight_decay(50, 100, 0.28) == 0.28
    assert schedules.scaled_weight_decay(0.28, 2**19, 1e9, 1e9) == 0.28
    assert schedules.scaled_weight_decay(0.28, 2**21, 2e9, 1e9) == pytest.approx(0.28 * 2 / 2)


def test_rl_step_on_an_mtp_model_leaves_the_mtp_modules_alone():
    """chat_rl's loss (loss_reduction="none") leaves the MTP modules without gradients while
    trunk matrices of the same shapes have them, in the same Muon group: the step must not
    stack a None (it raised TypeError), must train the trunk and leave MTP's matrices as they
    were (no update, no decay)."""
    from nanochat.chat_data import policy_gradient_loss
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                  mtp=True), "cpu")
    optimizers = model.setup_optimizers(weight_decay=0.5)
    mtp_before = {n: p.detach().clone() for n, p in model.mtp.named_parameters()}
    trunk = model.blocks[0].mlp.c_fc.weight
    trunk_before = trunk.detach().clone()
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    policy_gradient_loss(model, x, y, torch.tensor([[1.0], [-1.0]]), 32).backward()
    assert all(p.grad is None for p in model.mtp.parameters()) and trunk.grad is not None
    mixed = [g for o in optimizers if isinstance(o, Muon) for g in o.param_groups
             if {p.grad is None for p in g["params"]} == {True, False}]
    assert mixed  # (the case at hand)
    for o in optimizers:
        o.step()
    assert not torch.equal(trunk, trunk_before)
    for n, p in model.mtp.named_parameters():
        assert torch.equal(p, mtp_before[n]), n
