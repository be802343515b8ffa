import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, build_model, layer_plan


def tiny(pattern="L", T=32, n_kv_head=2, **kw):
    cfg = GPTConfig(sequence_len=T, vocab_size=97, n_layer=4, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                    window_pattern=pattern, **kw)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    # output projections start at zero; perturb them so every path is exercised
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_config_for_depth():
    c = GPT.config_for_depth(20)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (1280, 10, 10, 20)
    c = GPT.config_for_depth(12)
    assert (c.n_embd, c.n_head) == (768, 6)


def test_layer_plan():
    cfg = GPTConfig(sequence_len=100, n_layer=6, window_pattern="SSSL")
    assert [w for _, w in layer_plan(cfg)] == [50, 50, 50, 100, 50, 100]  # last layer always full
    with pytest.raises(ValueError, match="string of S and L"):
        layer_plan(GPTConfig(window_pattern="SXL"))


@pytest.mark.parametrize("pattern", ["L", "SL", "SSSL", "S"])
def test_causality(pattern):
    model = tiny(pattern).eval()
    T = 32
    idx = torch.randint(0, 97, (2, T))
    base = model(idx)
    for t in (0, 7, 15, 30):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 97, (2, T - t - 1))
        out = model(changed)
        assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5), f"position <= {t} saw the future"
        if t + 1 < T:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_sliding_window_limits_what_a_query_sees():
    model = tiny("S", T=32).eval()  # window 16 on every layer but the last
    # a 1-layer-deep dependency check: with all layers windowed except the last, a token
    # far in the past still reaches through stacked layers, so check the mask itself
    from nanochat.gpt import sliding_window_mask
    m = sliding_window_mask(4, 8, 4, 3, "cpu")
    assert m.tolist() == [[False, False, True, True, True, False, False, False],
                          [False, False, False, True, True, True, False, False],
                          [False, False, False, False, True, True, True, False],
                          [False, False, False, False, False, True, True, True]]
    assert model(torch.randint(0, 97, (1, 32))).shape == (1, 32, 97)


@pytest.mark.parametrize("pattern", ["L", "SSL"])
def test_kv_cache_decoding_equals_full_forward(pattern):
    model = tiny(pattern).eval()
    idx = torch.randint(0, 97, (2, 24))
    full = model(idx)
    cache = model.init_cache(2, 24)
    prefill = model(idx[:, :10], cache=cache)
    steps = [model(idx[:, t:t + 1], cache=cache) for t in range(10, 24)]
    inc = torch.cat([prefill] + steps, dim=1)
    assert cache.pos == 24
    assert torch.allclose(inc, full, atol=1e-4)


def test_softcap_and_loss():
    model = tiny()
    idx = torch.randint(0, 97, (2, 16))
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1  # ignored
    loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), targets[:, :-1].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-5)


def test_init_and_meta_construction():
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = build_model(cfg, "cpu")
    assert all(not p.is_meta for p in model.parameters())
    for b in model.blocks:
        assert b.mixer.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0
    assert abs(model.wte.weight.std().item() - 1.0) < 0.1
    # zero output projections: each block starts as the identity on the residual stream
    assert model.num_params() == 50 * 32 * 2 + 2 * (4 * 32 * 32 + 2 * 4 * 32 * 32)


def test_estimate_flops():
    model = tiny("SL", T=32)
    dense = 6 * (model.num_params() - 97 * 64)
    attn = 12 * 4 * 16 * (16 + 32 + 16 + 32)
    assert model.estimate_flops() == dense + attn


def test_tiny_batch_overfits():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(cfg, "cpu")
    opts = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.05)
    x = torch.randint(0, 64, (4, 32))
    y = x.roll(-1, 1)
    first = None
    for _ in range(150):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    assert first > 3.5 and loss.item() < 0.1, (first, loss.item())
