"""--gradient_checkpointing (GPT.gradient_checkpointing, GPT.run_block): the same loss and
gradients as without, for every kind of block; decoding untouched; far fewer bytes saved
for backward; torch.compile keeps it; base_train trains the same with it."""

import pytest
import torch

import nanochat.gpt as gpt
from nanochat.gpt import GPTConfig, build_model
from tests.test_base_train import base_dir, losses, run_train, val_bpbs  # noqa: F401 (base_dir is a fixture)
from tests.test_gpu import RECIPE

KW = dict(sequence_len=32, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
MAMBA = dict(mamba_pattern="AM", mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True,
             mamba3_trapezoidal=True, mamba3_mimo_rank=2, mamba3_d_state=16, mamba3_headdim=16, mamba3_chunk=8)
ENGRAM_MHC = dict(engram_layers="0,2", engram_dim=32, engram_table=50, mhc=True)
CASES = {"plain": {}, "recipe": RECIPE, "mamba3": dict(RECIPE, **MAMBA), "engram_mhc": dict(RECIPE, **ENGRAM_MHC),
         "mtp": dict(RECIPE, mtp=True, mtp_depth=2),
         # DSA's indexer loss is a side output of the block (ctx.aux_losses): its backward too
         "dsa": dict(RECIPE, dsa_start_layer=2, dsa_top_k=8, dsa_dim=16)}


def model(extra, on, **kw):
    torch.manual_seed(0)
    m = build_model(GPTConfig(**{**KW, **kw}, **extra), "cpu").train()
    with torch.no_grad():  # off the init (zero projections would hide a block's gradients)
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.gradient_checkpointing = on
    return m


def batch(cfg, B=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (B, cfg.sequence_len), generator=g) for _ in range(2)]


@pytest.fixture
def count_checkpoints(monkeypatch):
    """Counts the blocks run under torch.utils.checkpoint; records the bytes of their inputs
    (what a checkpoint keeps for backward)."""
    calls = []
    real = gpt.checkpoint

    def counted(fn, x, **kw):
        calls.append(x.untyped_storage().nbytes())
        return real(fn, x, **kw)
    monkeypatch.setattr(gpt, "checkpoint", counted)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_without(case, count_checkpoints):
    results = []
    for on in (False, True):
        m = model(CASES[case], on)
        idx, y = batch(m.config)
        loss = m(idx, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    n_blocks = KW["n_layer"] + (CASES[case].get("mtp_depth", 0) if CASES[case].get("mtp") else 0)
    assert len(count_checkpoints) == n_blocks  # every block of the trunk and of MTP ran checkpointed
    assert torch.equal(loss0, loss1)
    assert all(g is not None for g in g0.values()) and g0.keys() == g1.keys()
    for n in g0:  # the recomputation repeats the same CPU ops: bit-exact (fp32 rounding would be allowed)
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("case", ["recipe", "mamba3", "engram_mhc"])
def test_decoding_with_a_cache_is_unaffected(case, count_checkpoints):
    """With a cache no block is checkpointed, grad enabled or not, and the logits equal
    those of the model without the switch (and a full forward's)."""
    m = model(CASES[case], True)
    idx, _ = batch(m.config, B=1)
    outs = []
    for on in (True, False):
        m.gradient_checkpointing = on
        cache = m.init_cache(1, m.config.sequence_len)
        outs.append(torch.cat([m(idx[:, :20], cache=cache), m(idx[:, 20:], cache=cache)], dim=1))
    assert count_checkpoints == []
    assert torch.equal(outs[0], outs[1])
    m.gradient_checkpointing = True
    with torch.no_grad():
        full = m(idx)
    assert count_checkpoints == []  # no grad: nothing to save, nothing checkpointed
    torch.testing.assert_close(outs[0], full, rtol=1e-4, atol=1e-4)
    state = dict(m.state_dict())
    assert state.keys() == model(CASES[case], False).state_dict().keys()  # checkpoints do not change


def saved_bytes(m, f, checkpoint_inputs):
    """Bytes of the distinct tensors autograd keeps for backward (parameters excluded) in one
    forward of f; the checkpoints' own inputs are added (a checkpoint keeps them outside
    these hooks)."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    idx, y = batch(m.config)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = f(idx, y)
    loss.backward()
    return sum(seen.values()) + sum(checkpoint_inputs)


@pytest.mark.parametrize("case,factor", [("plain", 5), ("engram_mhc", 3)])
def test_backward_keeps_far_fewer_bytes(case, factor, count_checkpoints):
    """8 layers: without checkpointing every block keeps ~20 residual-sized activations (more
    in the MLP and under mHC); with it, one input per block plus what lies outside the blocks
    (under the recipe the layer lambdas keep each block's 4-stream output: 2.1 of mHC's 3.3
    MB). Measured: plain 4.6 MB -> 0.69 MB; Engram + mHC 11.8 MB -> 3.3 MB (16.7 MB before
    Sinkhorn became one op that keeps only its logits)."""
    kw = dict(n_layer=8, sequence_len=64, vocab_size=64)
    m = model(CASES[case], False, **kw)
    without = saved_bytes(m, m, [])
    m = model(CASES[case], True, **kw)
    with_ = saved_bytes(m, m, count_checkpoints)
    assert len(count_checkpoints) == 8
    assert with_ < without / factor, (with_, without)


@pytest.mark.slow
def test_torch_compile_keeps_checkpointing():
    """torch.compile (aot_eager: dynamo and AOT autograd's partitioning; this CPU venv
    cannot build inductor's C++ kernels) traces the checkpointed blocks without a new
    graph break, gives eager's loss and gradients, and keeps far fewer bytes for backward."""
    from torch._dynamo.utils import counters
    extra = dict(RECIPE, mtp=True)
    kw = dict(n_layer=4, sequence_len=64, vocab_size=64)
    eager = model(extra, False, **kw)
    idx, y = batch(eager.config)
    eager(idx, y).backward()
    runs = []
    for on in (False, True):
        torch._dynamo.reset()
        counters.clear()
        m = model(extra, on, **kw)
        nbytes = saved_bytes(m, torch.compile(m, dynamic=False, backend="aot_eager"), [])
        runs.append((nbytes, sum(counters["graph_break"].values()), m))
    (off_bytes, off_breaks, _), (on_bytes, on_breaks, m) = runs
    assert on_breaks == off_breaks  # the trunk stays one graph (only _context, compiler.disable'd, breaks)
    assert on_bytes < off_bytes / 3, (on_bytes, off_bytes)
    for (n, p), q in zip(m.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_base_train_with_gradient_checkpointing_trains_the_same(base_dir, corpus_dir):  # noqa: F811
    """The flag is built: base_train runs with it (MTP on, so its block is checkpointed too)
    and prints the same losses and val bpb as without; the checkpoint's model config is the same."""
    import json
    common = ["--mtp", "--num_iterations=4", "--eval_every=4"]
    plain = run_train(base_dir, corpus_dir, *common, "--model_tag=gc_off")
    ckpt = run_train(base_dir, corpus_dir, *common, "--gradient_checkpointing", "--model_tag=gc_on")
    assert list(losses(ckpt)) == ["00001", "00002", "00003", "00004"]
    assert losses(ckpt) == losses(plain) and val_bpbs(ckpt) == val_bpbs(plain)
    metas = [json.loads((base_dir / "base_checkpoints" / t / "meta_000004.json").read_text()) for t in ("gc_off", "gc_on")]
    assert metas[0]["model_config"] == metas[1]["model_config"]
    assert metas[1]["user_config"]["gradient_checkpointing"]


@pytest.mark.parametrize("compiled,eager_blocks", [(False, True), (True, False), (True, True)])
def test_dsa_long_context_path_keeps_its_selection(compiled, eager_blocks, monkeypatch, request):
    """On the flex path (64K contexts) the key selection is saved by the checkpoint, not run
    again in backward: as many selections with checkpointing as without, same loss and
    gradients. Compiled (aot_eager, as above) with gpt.EAGER_DSA_CHECKPOINT off, the
    checkpointed DSA blocks add no graph break (the indexer loss leaves the block as an output,
    the selection is one custom op); on (the default, for an inductor bug on CUDA), they run
    eagerly behind one break each and give the same loss and gradients."""
    import nanochat.dsa as dsa
    import nanochat.gpt as gpt
    monkeypatch.setattr(gpt, "EAGER_DSA_CHECKPOINT", eager_blocks)
    from torch._dynamo.utils import counters
    checkpoints = [] if compiled else request.getfixturevalue("count_checkpoints")  # (its hook would break graphs)
    selections = []
    real = dsa.pack_bits
    monkeypatch.setattr(dsa, "pack_bits", lambda m: selections.append(1) or real(m))  # once a chunk of rows
    results = []
    for on in (False, True):
        torch._dynamo.reset()
        counters.clear()
        m = model(CASES["dsa"], on)
        m.dsa_kernel = "flex"
        idx, y = batch(m.config)
        selections.clear()
        loss = (torch.compile(m, dynamic=False, backend="aot_eager") if compiled else m)(idx, y)
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        results.append((loss.detach(), grads, len(selections), sum(counters["graph_break"].values())))
    (loss0, g0, n0, breaks0), (loss1, g1, n1, breaks1) = results
    assert n0 == n1 > 0 and len(checkpoints) == (0 if compiled else KW["n_layer"])
    assert breaks1 == breaks0 if not (compiled and eager_blocks) else breaks1 > breaks0
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert all(g is not None for g in g0.values()) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
