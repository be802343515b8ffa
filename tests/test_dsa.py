"""DeepSeek sparse attention (nanochat/dsa.py): the selection, its causality, the detached
indexer and its KL loss, the stages, decoding with the index cache, and the long-context
"flex" path (chunked top-k, packed bits, flex_attention) against the T x T reference."""

import dataclasses

import pytest
import torch

from nanochat import dsa
from nanochat.gpt import GPTConfig, build_model
from tests.test_gpt import assert_causal_bit_exact, init_twice_over_garbage

V = 97


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Eager flex_attention runs through an internal torch.compile (backend "eager"); a second
    shape in one process recompiles it with dynamic shapes, whose guards import
    torch.utils.cpp_extension (setuptools, absent here). A reset per test keeps each one static."""
    torch._dynamo.reset()


def config(top_k=6, T=32, **kw):
    return GPTConfig(sequence_len=T, vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, dsa_start_layer=1,
                     dsa_top_k=top_k, dsa_heads=2, dsa_dim=16, **kw)


def model_of(cfg, seed=0):
    torch.manual_seed(seed)
    m = build_model(cfg, "cpu")
    with torch.no_grad():  # c_proj starts at zero: make every layer matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def chosen_sets(m, idx, layer=1):
    """The key sets that layer `layer` chose for idx (B, T, S bool), from a training-mode forward."""
    mixer = m.blocks[layer].mixer
    seen = {}
    orig = mixer.indexer_loss
    # T <= KL_ROWS here, so the loss's rows are all of them
    mixer.indexer_loss = lambda q, k, rows, scores, allowed: (seen.setdefault("chosen", allowed),
                                                              orig(q, k, rows, scores, allowed))[1]
    m(idx, idx)
    mixer.indexer_loss = orig
    return seen["chosen"]


def test_plan_and_groups():
    m = model_of(config())
    assert [s.mixer for s in m.plan] == ["attn", "dsa", "dsa"]
    tags = m.opt_tags()
    assert tags["blocks.1.mixer.indexer.wq.weight"] == "adamw_dsa" and tags["blocks.1.mixer.c_q.weight"] == "muon"
    adamw, _ = m.setup_optimizers()
    dsa = [g for g in adamw.param_groups if g["tag"] == "adamw_dsa"]
    assert len(dsa) == 1 and len(dsa[0]["params"]) == 6 and dsa[0]["lr"] == 1e-3
    built, states = init_twice_over_garbage(config())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(ValueError, match="dsa_start_layer 5"):
        build_model(dataclasses.replace(config(), dsa_start_layer=5), "cpu")


@pytest.mark.parametrize("kernel", ["mask", "flex"])
def test_top_k_at_least_the_context_is_dense_attention_exactly(kernel):
    dense = model_of(dataclasses.replace(config(), dsa_start_layer=-1))
    sparse = model_of(config(top_k=32))
    sparse.dsa_kernel = kernel
    sparse.load_state_dict(dense.state_dict(), strict=False)  # the indexers are extra
    idx = torch.randint(0, V, (2, 32))
    for mode in ("eval", "train"):
        getattr(dense, mode)(), getattr(sparse, mode)()
        assert torch.equal(dense(idx), sparse(idx))


def test_selected_sets_are_causal_and_of_size_min_k_t_plus_1():
    m = model_of(config(top_k=6))
    chosen = chosen_sets(m, torch.randint(0, V, (2, 32)))
    assert chosen.shape == (2, 32, 32)
    assert not torch.triu(chosen, diagonal=1).any()  # never a future key
    counts = chosen.sum(-1)
    assert torch.equal(counts, torch.arange(32).clamp(max=5).add(1).expand(2, 32))
    # and the sparse output differs from dense attention (the selection acts)
    dense = model_of(dataclasses.replace(config(), dsa_start_layer=-1))
    dense.load_state_dict(m.state_dict(), strict=False)
    idx = torch.randint(0, V, (2, 32))
    assert not torch.allclose(m(idx), dense(idx))


@pytest.mark.parametrize("mode,kernel", [("eval", "mask"), ("train", "mask"), ("eval", "flex"), ("train", "flex")])
def test_causality_bit_exact(mode, kernel):
    m = model_of(config(top_k=4))
    m.dsa_kernel = kernel
    getattr(m, mode)()
    assert_causal_bit_exact(lambda idx: m(idx), V, T=32, cuts=(1, 6, 20))


def test_indexer_is_detached_from_the_model_and_the_model_from_its_loss():
    m = model_of(config(top_k=4)).train()
    idx = torch.randint(0, V, (2, 32))
    indexer = {n for n, _ in m.named_parameters() if ".indexer." in n}
    # the LM loss alone (logits without targets add no indexer loss): nothing reaches an indexer
    torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is None or not p.grad.any() for n, p in m.named_parameters() if n in indexer)
    assert all(p.grad is not None and p.grad.any() for n, p in m.named_parameters() if n not in indexer)
    # L^I alone (the warm-up's loss): it reaches the indexers and nothing else
    m.zero_grad(set_to_none=True)
    m.dsa_stage = "warmup"
    m(idx, idx).backward()
    assert all(p.grad is not None and p.grad.any() for n, p in m.named_parameters() if n in indexer)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in indexer)
    assert m.indexer_loss > 0


def test_warmup_kl_falls_and_only_the_indexers_move():
    m = model_of(config(top_k=4, T=64))
    m.dsa_stage = "warmup"
    idx = torch.randint(0, V, (4, 64))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    adamw, muon = m.setup_optimizers(dsa_lr=1e-2)
    losses = []
    for _ in range(30):
        loss = m(idx, idx)
        losses.append(loss.item())
        loss.backward()
        adamw.step(), muon.step()
        m.zero_grad(set_to_none=True)
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (".indexer." in n), n


def test_decode_with_the_cache_equals_the_full_forward():
    m = model_of(config(top_k=5, T=48)).eval()
    idx = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        full = m(idx)
        cache = m.init_cache(2, 48)
        parts = [m(idx[:, :13], cache=cache), m(idx[:, 13:30], cache=cache)]
        parts += [m(idx[:, t:t + 1], cache=cache) for t in range(30, 40)]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
        # the static decode step (the engine's CUDA-graph path): fixed shapes over the whole cache
        cache = m.init_cache(2, 48)
        m(idx[:, :30], cache=cache)
        for t in range(30, 40):
            logits = m.decode_step(idx[:, t:t + 1], cache, torch.tensor(t))
            assert torch.allclose(logits, full[:, t], atol=1e-5), t


def test_base_train_flag_checks():
    import argparse

    from nanochat.flags import add_model_args, config_from_args
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    cfg = config_from_args(parser.parse_args(["--depth=4", "--dsa", "--dsa_start_layer=2", "--dsa_top_k=64"]), 100)
    assert (cfg.dsa_start_layer, cfg.dsa_top_k, cfg.dsa_heads, cfg.dsa_dim) == (2, 64, 4, 64)
    assert config_from_args(parser.parse_args(["--depth=4", "--dsa_start_layer=2"]), 100).dsa_start_layer == -1
    with pytest.raises(SystemExit, match="--dsa_top_k=0"):
        config_from_args(parser.parse_args(["--depth=4", "--dsa", "--dsa_top_k=0"]), 100)
    with pytest.raises(SystemExit, match="dsa_start_layer 7"):
        config_from_args(parser.parse_args(["--depth=4", "--dsa"]), 100)


# --- the long-context path ("flex") against the reference ("mask")

def test_top_k_mask_is_the_stable_sorts_set():
    torch.manual_seed(0)
    T = 50
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    scores = torch.randint(0, 4, (3, T, T)).float().masked_fill(~visible, float("-inf"))  # many ties
    for k in (1, 5, 20, 49):
        top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        ref = torch.zeros_like(visible).expand(3, T, T).clone().scatter_(-1, top, True) & visible
        assert torch.equal(dsa.top_k_mask(scores, visible, k), ref), k
        assert torch.equal(dsa.top_k_chosen(scores, k), ref), k  # (rows with too many ties, and without)


def test_bits_round_trip_and_block_mask_covers_exactly_the_chosen_blocks():
    torch.manual_seed(0)
    B, T, S, blk = 2, 72, 72, 32  # not a multiple of the block
    chosen = (torch.rand(B, T, S) < 0.05) & torch.ones(T, S, dtype=torch.bool).tril()
    chosen[:, 32:64, :32] = True  # one block fully chosen
    chosen[0, 40, 70] = True     # a bit in the padded last word
    bits = dsa.pack_bits(chosen)
    assert bits.shape == (B, T, 3) and bits.dtype == torch.int32
    assert torch.equal(dsa.unpack_bits(bits, S), chosen)
    bm = dsa.block_mask_of(bits, S, block=blk)
    nq, nk = -(-T // blk), -(-S // blk)
    padded = torch.nn.functional.pad(chosen, (0, nk * blk - S, 0, nq * blk - T)).view(B, nq, blk, nk, blk)

    def dense(num, idx):  # (B, 1, nq) counts and (B, 1, nq, nk) indices -> (B, nq, nk) bool
        on = torch.arange(nk) < num[:, 0, :, None]
        return torch.zeros(B, nq, nk, dtype=torch.bool).scatter_(-1, idx[:, 0].long(), on)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert torch.equal(full, padded.all(4).all(2)) and full[:, 1, 0].all()
    assert torch.equal(full | dense(bm.kv_num_blocks, bm.kv_indices), padded.any(4).any(2))
    # the mask_mod reads the bits back, key by key
    b, q, k = torch.meshgrid(torch.arange(B), torch.arange(T), torch.arange(S), indexing="ij")
    assert torch.equal(bm.mask_mod(b, 0, q, k), chosen)


@pytest.mark.parametrize("R,S,H,D,q_pos0,k_pos0,window", [(70, 100, 2, 16, 30, 0, 10 ** 6), (64, 64, 4, 32, 0, 0, 64),
                                                           (33, 150, 4, 16, 200, 96, 70), (20, 40, 3, 12, 20, 0, 10 ** 6)])
def test_triton_scores_equal_the_pytorch_form(R, S, H, D, q_pos0, k_pos0, window):
    """dsa_triton.masked_scores (Triton's interpreter here: fp32 dots) against index_scores with
    the visibility mask: the same -inf entries, the rest to fp32 rounding; tiles past the causal
    edge skipped, sizes that are not multiples of the tiles, a window, a batch of 2, an indexer
    dim below 16 that is not a power of two (padded for tl.dot)."""
    triton = pytest.importorskip("triton")  # noqa: F841
    from nanochat.dsa_triton import masked_scores
    from nanochat.attention import sliding_window_mask
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the interpreter runs only without a GPU)
    torch.manual_seed(0)
    q, w, keys = torch.randn(2, R, H, D, device=dev), torch.randn(2, R, H, device=dev), torch.randn(2, S, D, device=dev)
    precision, torch.backends.cuda.matmul.fp32_precision = torch.backends.cuda.matmul.fp32_precision, "ieee"
    try:  # (fp32 dots, not TF32, on a GPU)
        got = masked_scores(q, w, keys, q_pos0, k_pos0, window)
    finally:
        torch.backends.cuda.matmul.fp32_precision = precision
    visible = sliding_window_mask(R, S, q_pos0 - k_pos0, window, dev)
    want = dsa.index_scores(q, w, keys).masked_fill(~visible, float("-inf"))
    assert torch.equal(got == float("-inf"), want == float("-inf")) and visible.any() and (~visible).any()
    fin = visible.expand_as(got)
    assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-6)
    assert (want[fin] == 0).any() and (want[fin] > 0).any()  # ReLU zeros (ties) and real scores both present


@pytest.mark.parametrize("R,S,k", [(7, 100, 5), (9, 64, 40), (5, 33, 33), (12, 600, 17)])
def test_triton_chosen_bits_equal_the_pytorch_form(R, S, k):
    """dsa_triton.chosen_bits (the interpreter here) == pack_bits(top_k_chosen(...)), written
    into a column slice of a wider bits tensor (the rest untouched): scores with many ties at
    the k-th value (small integers), rows that see fewer than k keys (all they see), -inf
    keys, S not a multiple of 32 and more words than a step."""
    pytest.importorskip("triton")
    from nanochat.dsa_triton import chosen_bits
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    scores = torch.randint(-3, 4, (2, R, S), device=dev).float()
    t = torch.arange(R, device=dev)[:, None] + S - R  # causal rows: the first see S - R + 1 keys
    scores = scores.masked_fill(torch.arange(S, device=dev)[None] > t, float("-inf"))
    scores[1, 0] = float("-inf")
    scores[1, 0, :k // 2] = 1.0  # a row that sees fewer than k keys
    want = dsa.pack_bits(dsa.top_k_chosen(scores, k))
    bits = torch.full((2, R + 3, want.size(-1) + 2), 7, dtype=torch.int32, device=dev)
    chosen_bits(scores, k, bits[:, 1:R + 1, 1:want.size(-1) + 1])
    assert torch.equal(bits[:, 1:R + 1, 1:-1], want)
    assert (bits[:, 0] == 7).all() and (bits[:, R + 1:] == 7).all() and (bits[..., 0] == 7).all() and (bits[..., -1] == 7).all()
    chosen = dsa.unpack_bits(want, S)
    assert (chosen.sum(-1) <= k).all() and (chosen.sum(-1) == k).any() and (chosen.sum(-1) < k).any()
    kth = scores.topk(k, dim=-1).values[..., -1:]
    assert ((scores == kth).sum(-1) > (chosen & (scores == kth)).sum(-1)).any()  # ties really cut


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_chunked_selection_equals_the_reference(pattern, fused, monkeypatch):
    """The flex path's selection (chunks of rows, only the keys they can see, top-k at or above
    the k-th value, bits) is the reference's stable sort's, with the scores from PyTorch or
    from the Triton kernel (its interpreter here)."""
    if fused:
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors: Triton's interpreter, which runs only without a GPU (test_gpu.py covers the kernel)")
        monkeypatch.setattr(dsa, "TRITON_DEVICES", {"cpu", "cuda"})
        monkeypatch.setattr(dsa, "TRITON_IEEE", True)  # the interpreter's fp32 dots
    assert (dsa.triton_kernels_on(torch.device("cpu")) is not None) == fused
    monkeypatch.setattr(dsa, "CHUNK", 5 * 96 * 2)  # 5 query rows per chunk: many chunks, a short last one
    m = model_of(config(top_k=7, T=96, window_pattern=pattern))
    idx = torch.randint(0, V, (2, 96))
    for layer in (1, 2):
        mixer = m.blocks[layer].mixer
        with torch.no_grad():
            x = m.wte(idx)  # any input: the selection of an input, both ways
            ctx = m._context(idx, 0)
            iq, iw = mixer.indexer.queries(x, ctx)
            bits = mixer.select_packed(iq, iw, mixer.indexer.keys(x, ctx))
            ref = chosen_sets_of_input(mixer, x, ctx)  # the stable sort of the T x T scores
        assert torch.equal(dsa.unpack_bits(bits, 96), ref), layer
        assert ref.sum(-1).max() == 7  # really sparse: top_k keys of up to 96


def chosen_sets_of_input(mixer, x, ctx):
    """The reference's chosen sets (B, T, S) for the mixer input x (a training-mode forward)."""
    seen = {}
    orig = mixer.indexer_loss
    mixer.indexer_loss = lambda q, k, rows, scores, allowed: seen.setdefault("chosen", allowed.expand(len(x), -1, -1))
    was, mixer.training = mixer.training, True
    ctx.dsa_kernel = "mask"
    mixer(x, ctx)
    mixer.indexer_loss, mixer.training = orig, was
    return seen["chosen"]


@pytest.mark.parametrize("stage", ["sparse", "warmup"])
def test_flex_path_equals_the_reference_values_and_gradients(stage):
    m = model_of(config(top_k=9, T=128)).train()
    mixer = m.blocks[1].mixer
    idx = torch.randint(0, V, (2, 128))
    x0 = torch.randn(2, 128, 64)
    g = torch.randn(2, 128, 64)
    results = {}
    for kernel in ("mask", "flex"):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        m.dsa_stage, m.dsa_kernel = stage, kernel
        ctx = m._context(idx, 0)
        y = mixer(x, ctx)
        (aux,) = ctx.aux_losses
        ((y * g).sum() + aux).backward()
        results[kernel] = [y, aux, x.grad] + [p.grad for p in mixer.parameters()]
    for a, b in zip(results["mask"], results["flex"]):
        assert a is not None and (a - b).norm() <= 1e-6 * a.norm(), (a - b).norm() / a.norm()  # fp32 rounding
    # and the whole model's loss (LM + indexer) agrees
    m.dsa_kernel = "mask"
    ref = m(idx, idx)
    m.dsa_kernel = "flex"
    assert torch.allclose(m(idx, idx), ref, rtol=1e-5)


def test_auto_takes_the_flex_path_from_long_t(monkeypatch):
    m = model_of(config(top_k=4)).eval()
    calls = []
    orig = dsa.SparseAttention.select_packed
    monkeypatch.setattr(dsa.SparseAttention, "select_packed", lambda self, *a: calls.append(1) or orig(self, *a))
    idx = torch.randint(0, V, (1, 32))
    m(idx)
    assert not calls  # 32 < LONG_T: the reference
    monkeypatch.setattr(dsa, "LONG_T", 32)
    m(idx)
    assert len(calls) == 2  # both DSA layers
