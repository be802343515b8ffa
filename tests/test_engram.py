"""Engram (nanochat/engram.py): the hash against a numpy reference of the demo's algorithm,
distinct primes, causality, decoding from the cache, the identity-preserving init, and
Engram in a trained model."""
import numpy as np
import pytest
import torch

from nanochat.engram import layer_hash_params, ngram_hashes
from nanochat.gpt import GPTConfig, build_model, layer_plan


def numpy_hashes(ids, mult, primes, pad):
    """The demo's suffix-n-gram hash, written out with numpy loops."""
    B, T = ids.shape
    order, heads = len(mult), primes.shape[1]
    out = np.zeros((B, T, (order - 1) * heads), dtype=np.int64)
    for b in range(B):
        for t in range(T):
            toks = [ids[b, t - k] if t - k >= 0 else pad for k in range(order)]
            mix = np.int64(0)
            for k in range(order):
                mix = np.int64(mix ^ np.int64(toks[k]) * mult[k])
                if k >= 1:
                    for j in range(heads):
                        out[b, t, (k - 1) * heads + j] = mix % primes[k - 1, j]
    return out


def test_hash_equals_the_numpy_reference_and_primes_are_distinct():
    vocab = 32768
    params = layer_hash_params([0, 3, 6], order=3, heads=4, table=vocab, vocab=vocab)
    primes = np.concatenate([p.reshape(-1) for _, p in params.values()])
    assert len(set(primes.tolist())) == len(primes) == 3 * 2 * 4 and primes.min() >= vocab
    assert all(all(n % d for d in range(2, int(n ** 0.5) + 1)) for n in primes.tolist())
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, 37))
    ids[0, :3] = vocab - 1  # large ids: products must not overflow
    for layer, (mult, pr) in params.items():
        assert (mult % 2 == 1).all()
        ours = ngram_hashes(torch.from_numpy(ids), torch.from_numpy(mult), torch.from_numpy(pr), vocab).numpy()
        assert np.array_equal(ours, numpy_hashes(ids, mult, pr, vocab)), layer
        assert (ours < pr.reshape(1, 1, -1)).all() and (ours >= 0).all()
    assert not np.array_equal(params[0][0], params[3][0])  # each layer hashes differently


def model(engram_layers="0,2", T=32, **kw):
    cfg = GPTConfig(sequence_len=T, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                    engram_layers=engram_layers, engram_dim=32, engram_table=50, **kw)
    torch.manual_seed(0)
    m = build_model(cfg, "cpu")
    with torch.no_grad():  # off the init: the conv and output projections start at zero
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_layer_plan_marks_the_engram_layers():
    plan = layer_plan(GPTConfig(n_layer=8, engram_layers="0,3,6", mamba_pattern="AAM"))
    assert [i for i, s in enumerate(plan) if "engram" in s.extras] == [0, 3, 6]
    for bad in ("0,9", "a,b", "-1"):
        with pytest.raises(ValueError, match="engram_layers"):
            layer_plan(GPTConfig(n_layer=8, engram_layers=bad))


def test_causality_is_bit_exact():
    from tests.test_gpt import assert_causal_bit_exact
    assert_causal_bit_exact(model(), 97)


@pytest.mark.parametrize("extra", [{}, dict(mamba_pattern="AM", mamba3_trapezoidal=True, mamba3_d_state=16,
                                            mamba3_headdim=16, smear=True)])
def test_chunked_prefill_and_decode_equal_the_full_forward(extra):
    m = model(**extra)
    idx = torch.randint(0, 97, (3, 22))
    full = m(idx)
    for split in (1, 4, 11):  # before and after the conv's reach of 9 positions
        cache = m.init_cache(3, 32)
        a = m(idx[:, :split], cache=cache)
        b = m(idx[:, split:16], cache=cache)
        assert torch.allclose(torch.cat([a, b], 1), full[:, :16], atol=1e-4), split
        snap = cache.snapshot()  # dummy steps, as the engine's CUDA-graph warmup does, then restore
        m.decode_step(torch.zeros(3, 1, dtype=torch.long), cache, torch.tensor(31))
        cache.restore(snap)
        for t in range(16, 22):
            assert torch.allclose(m.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)), full[:, t], atol=1e-4)


def test_zero_conv_gives_the_gated_value_and_zero_value_the_baseline():
    m = model("1")
    eng = m.blocks[1].engram
    h, idx = torch.randn(2, 10, 64), torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        eng.conv.zero_()
        out = eng(h, idx)
        rows = ngram_hashes(idx, eng.mult, eng.primes, eng.pad) + eng.offsets
        e = eng.table(rows).flatten(-2)
        k = torch.nn.functional.rms_norm(eng.w_k(e), (64,), eng.k_norm)
        q = torch.nn.functional.rms_norm(h, (64,), eng.q_norm)
        s = (q * k).sum(-1, keepdim=True) / 8.0
        g = torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())
        assert torch.allclose(out, g * eng.w_v(e), atol=1e-6)
        eng.w_v.weight.zero_()
        plain = model("")
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if ".engram." not in k})
        x = torch.randint(0, 97, (2, 12))
        assert torch.allclose(m(x), plain(x), atol=1e-6)


def test_init_optimizer_groups_and_learning():
    from tests.test_gpt import init_twice_over_garbage
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, engram_layers="0,1",
                    engram_dim=16, engram_table=20)
    built, states = init_twice_over_garbage(cfg)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]) and torch.isfinite(states[0][k].float()).all(), k
    assert torch.equal(built.blocks[0].engram.primes, torch.from_numpy(layer_hash_params([0, 1], 3, 4, 20, 50)[0][1]))
    tags = built.opt_tags()
    assert tags["blocks.0.engram.table.weight"] == "adamw_embedding" and tags["blocks.1.engram.w_v.weight"] == "muon"
    assert tags["blocks.0.engram.conv"] == "adamw_ssm"
    m = model().train()
    opts = m.setup_optimizers()
    idx = torch.randint(0, 97, (4, 17))
    first = None
    for _ in range(25):
        loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if first is None:
            first = loss.item()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "engram" in n)
        for opt in opts:
            opt.step()
        m.zero_grad(set_to_none=True)
    assert loss.item() < 0.5 * first
