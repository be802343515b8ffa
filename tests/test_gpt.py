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
    plan = layer_plan(cfg)
    assert [s.window for s in plan] == [50, 50, 50, 100, 50, 100]  # last layer always full
    assert all(s.mixer == "attn" and s.extras == () for s in plan)
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


@pytest.mark.parametrize("kernel", ["current", "sdpa", "flex"])
def test_windowed_layer_ignores_tokens_beyond_its_window(kernel):
    model = tiny("S", T=32).eval()  # window 16 on every layer but the last
    model.kernel = kernel
    mixer = model.blocks[0].mixer
    assert mixer.window == 16
    ctx = model._context(torch.zeros(2, 32, dtype=torch.long), 0)
    x = torch.randn(2, 32, 64)
    changed = x.clone()
    changed[:, 3] += 1.0  # token 3: seen by queries 3..18 only
    with torch.no_grad():
        a, b = mixer(x, ctx), mixer(changed, ctx)
    diff = (a - b).abs().amax(dim=(0, 2))
    assert (diff[:3] == 0).all() and (diff[3:19] > 1e-4).all(), diff
    assert (diff[19:] == 0).all(), "a query saw a token further back than its window"
    # the last layer is full: it does see token 3 from everywhere after it
    last = model.blocks[-1].mixer
    with torch.no_grad():
        diff = (last(x, ctx) - last(changed, ctx)).abs().amax(dim=(0, 2))
    assert (diff[3:] > 1e-4).all()


def test_sliding_window_mask():
    model = tiny("S", T=32).eval()
    from nanochat.attention import sliding_window_mask
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


@pytest.mark.parametrize("recipe", [False, True])
def test_tiny_batch_overfits(recipe):
    torch.manual_seed(0)
    extra = RECIPE if recipe else {}  # the quality recipe's model, with every Muon option on
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, **extra)
    model = build_model(cfg, "cpu")
    opt_extra = dict(adam_per_group=True, weight_decay=0.05, cautious_wd=True, normuon_beta2=0.9, muon_eq=True,
                     muon_plus=True) if recipe else {}
    opts = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.05, **opt_extra)
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


def assert_causal_bit_exact(fn, vocab, T=24, cuts=(1, 5, 17)):
    """fn(idx) -> (B, T', ...) outputs per position: changing the tokens from t on leaves
    the outputs before t bit-identical (fp32), for each cut t."""
    idx = torch.randint(0, vocab, (2, T))
    base = fn(idx)
    for t in cuts:
        other = idx.clone()
        other[:, t:] = torch.randint(0, vocab, (2, T - t))
        assert torch.equal(fn(other)[:, :t], base[:, :t]), t


def init_twice_over_garbage(cfg):
    """Build twice on meta, fill the materialized memory with different garbage, init with
    the same seed; returns the last model and both state dicts."""
    states = []
    for garbage in (float("nan"), 123.0):
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.fill_(garbage if t.is_floating_point() else -7)  # integer buffers (Engram's hash constants)
        torch.manual_seed(7)
        model.init_weights()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, states


def test_every_parameter_initialised_whatever_memory_held():
    """Identical, finite weights after init whatever memory held: a parameter that
    init_weights skips (a 1-D one, say) keeps its garbage and fails this."""
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL")
    model, states = init_twice_over_garbage(cfg)
    assert all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers()))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_each_parameter_in_exactly_one_optimizer_group():
    model = tiny("SL")
    tags = model.opt_tags()
    assert set(tags) == {n for n, _ in model.named_parameters()}
    assert tags["wte.weight"] == "adamw_embedding" and tags["lm_head.weight"] == "adamw_unembedding"
    assert tags["blocks.0.mixer.c_q.weight"] == "muon" and tags["blocks.1.mlp.c_proj.weight"] == "muon"
    adamw, muon = model.setup_optimizers()
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # all of them, each once
    assert {id(p) for g in muon.param_groups for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if tags[n] == "muon"}


def test_untagged_parameter_is_an_error_not_a_guess():
    model = tiny()
    model.blocks[0].mixer.extra = torch.nn.Parameter(torch.zeros(8))  # a 1-D parameter its module did not tag
    with pytest.raises(ValueError, match="blocks.0.mixer.extra"):
        model.setup_optimizers()


def test_weight_decay_flags_reach_both_optimizers():
    adamw, muon = tiny().setup_optimizers(weight_decay=0.1, adam_weight_decay=0.01)
    assert all(g["weight_decay"] == 0.01 for g in adamw.param_groups)
    assert all(g["weight_decay"] == 0.1 for g in muon.param_groups)


def test_config_from_old_checkpoint_and_unknown_fields():
    old = {"sequence_len": 64, "vocab_size": 50, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 32,
           "window_pattern": "L", "softcap": 15.0}  # a checkpoint from before the extension fields
    cfg = GPTConfig.from_dict(old)
    assert cfg.mamba_pattern == "" and not cfg.mhc and cfg.dsa_start_layer == -1
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="future_field"):
        GPTConfig.from_dict(dict(old, future_field=1))


def test_generate_uses_the_engine_sampler():
    """GPT.generate and Engine sample with one function: top_k <= 0 means no cut in both."""
    model = tiny()
    prompt = [1, 2, 3]
    a = list(model.generate(prompt, 8, temperature=1.0, top_k=0, seed=5))
    b = list(model.generate(prompt, 8, temperature=1.0, top_k=None, seed=5))
    assert a == b
    greedy = list(model.generate(prompt, 6, temperature=0.0))
    from nanochat.engine import naive_generate
    assert greedy == naive_generate(model.eval(), prompt, 6)


# -----------------------------------------------------------------------------
# The quality recipe (issue 25): each flag on its own, and all of them together

RECIPE = dict(value_embeds=True, smear=True, backout=True, layer_lambdas=True, qk_scale=1.2, rope_base=100000.0,
              pad_vocab_to=64, short_window_div=4, window_tile=8, ref_init=True)
# window_tile 8, not the recipe's 128: tiny contexts still get a short window (T=32: 8)


@pytest.mark.parametrize("field", sorted(RECIPE))
def test_each_recipe_flag_changes_the_model(field):
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(3))
    if field == "ref_init":  # an init change: compare the initialised weights, not a perturbed model
        a, b = (build_model(GPTConfig(sequence_len=32, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                                      ref_init=on), "cpu") for on in (False, True))
        assert abs(a.wte.weight.std() - 1.0) < 0.05 and abs(b.wte.weight.std() - 0.8) < 0.05
        assert torch.allclose(b.blocks[0].mlp.c_fc.weight.abs().max(), 0.4 * a.blocks[0].mlp.c_fc.weight.abs().max(), rtol=0.05)
        return
    if field == "window_tile":  # only matters with a divisor that leaves a remainder: T/4 = 8 -> tile 6 -> 12
        base, new = dict(short_window_div=4), dict(short_window_div=4, window_tile=6)
    else:
        base, new = {}, {field: RECIPE[field]}
    a, b = tiny("SL", **base).eval(), tiny("SL", **new).eval()
    with torch.no_grad():
        out_a, out_b = a(idx), b(idx)
    assert out_a.shape == out_b.shape == (2, 32, 97)  # padded vocab is cropped
    assert not torch.allclose(out_a, out_b, atol=1e-4), field


def test_recipe_layer_plan_and_shapes():
    cfg = GPTConfig(sequence_len=2048, n_layer=12, window_pattern="SSSL", vocab_size=50000, **dict(RECIPE, window_tile=128))
    plan = layer_plan(cfg)
    assert [s.window for s in plan[:4]] == [512, 512, 512, 2048]
    assert [i for i, s in enumerate(plan) if "value_embed" in s.extras] == [1, 3, 5, 7, 9, 11]  # the last included
    assert layer_plan(GPTConfig(sequence_len=2000, short_window_div=4, window_tile=128, window_pattern="S"))[0].window == 512
    assert layer_plan(GPTConfig(sequence_len=101, window_pattern="S"))[0].window == 50  # legacy: T // 2, exactly
    assert [i for i, s in enumerate(layer_plan(GPTConfig(n_layer=5, value_embeds=True))) if s.extras] == [0, 2, 4]
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 50048
    assert model.blocks[1].mixer.ve.weight.shape == (50048, 768) and not hasattr(model.blocks[0].mixer, "ve")


def test_recipe_init_values():
    model = build_model(GPTConfig(sequence_len=32, vocab_size=97, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, **RECIPE), "cpu")
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    assert model.smear_lambda.item() == 0 and abs(model.backout_lambda.item() - 0.2) < 1e-7
    for w in (model.smear_gate.weight, model.blocks[1].mixer.ve_gate.weight):
        assert w.min() >= 0 and w.max() <= 0.02
    bound = 3 ** 0.5 / 64 ** 0.5
    ve = model.blocks[1].mixer.ve.weight
    assert ve.abs().max() <= bound and ve.abs().max() > 0.9 * bound


@pytest.mark.parametrize("pattern", ["L", "SSL"])
def test_recipe_causality_and_cache(pattern):
    model = tiny(pattern, **RECIPE).eval()
    idx = torch.randint(0, 97, (2, 32))
    base = model(idx)
    for t in (0, 7, 30):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 97, (2, 31 - t))
        assert torch.allclose(model(changed)[:, :t + 1], base[:, :t + 1], atol=1e-5), f"position <= {t} saw the future"
    # prefill + token-by-token decode == full forward, at several split points
    for split in (1, 10, 31):
        cache = model.init_cache(2, 32)
        inc = torch.cat([model(idx[:, :split], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(split, 32)], 1)
        assert torch.allclose(inc, base, atol=1e-4), split
    # the static decode step (the engine's CUDA-graph path) too
    cache = model.init_cache(2, 32)
    model(idx[:, :12], cache=cache)
    for t in range(12, 32):
        assert torch.allclose(model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)), base[:, t], atol=1e-4)


def test_smear_cache_repeat_copies_the_previous_embedding():
    model = tiny(**RECIPE).eval()
    idx = torch.randint(0, 97, (1, 20))
    one = model.init_cache(1, 20)
    model(idx[:, :10], cache=one)
    cache = model.init_cache(3, 20)
    cache.load(one)
    assert cache.prev_emb.shape == (3, 1, 64) and cache.pos == 10
    out = model(idx[:, 10:11].expand(3, 1), cache=cache)
    assert torch.allclose(out, model(idx[:, :11])[:, -1:].expand(3, 1, 97), atol=1e-4)


def test_recipe_init_and_optimizer_groups():
    """With every flag on: all parameters initialised whatever the memory held, each in
    exactly one optimizer group, the groups as the reference nanochat sets them up."""
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SL",
                    **RECIPE)
    model, states = init_twice_over_garbage(cfg)
    for k in states[0]:
        assert torch.isfinite(states[0][k]).all() and torch.equal(states[0][k], states[1][k]), k
    tags = model.opt_tags()
    assert tags["blocks.0.mixer.ve.weight"] == "adamw_value_embed" and tags["blocks.0.mixer.ve_gate.weight"] == "muon"
    assert tags["resid_lambdas"] == "adamw_resid" and tags["x0_lambdas"] == "adamw_x0"
    assert {tags[n] for n in ("smear_gate.weight", "smear_lambda", "backout_lambda")} == {"adamw_smear"}
    adamw, muon = model.setup_optimizers(scalar_lr=0.5, embedding_lr=0.3, adam_per_group=True)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    g = {grp["tag"]: grp for grp in adamw.param_groups}
    scale = (32 / 768) ** -0.5
    assert g["adamw_value_embed"]["lr"] == pytest.approx(0.3 * scale * 0.5)
    assert (g["adamw_resid"]["lr"], g["adamw_resid"]["weight_decay"]) == (pytest.approx(0.005), 0.05)
    assert (g["adamw_x0"]["lr"], g["adamw_x0"]["betas"]) == (0.5, (0.96, 0.95))
    assert g["adamw_smear"]["lr"] == 0.2
    assert (g["adamw_embedding"]["betas"], g["adamw_embedding"]["weight_decay"]) == ((0.8, 0.995), 0.001)
    assert (g["adamw_unembedding"]["betas"], g["adamw_unembedding"]["weight_decay"]) == ((0.8, 0.96), 0.01)
    legacy = {grp["tag"]: grp for grp in model.setup_optimizers(adam_weight_decay=0.02)[0].param_groups}
    assert legacy["adamw_embedding"]["betas"] == (0.8, 0.95) and legacy["adamw_embedding"]["weight_decay"] == 0.02


def test_recipe_flops_count_the_gates_not_the_lookups():
    plain, model = tiny("SL", T=32), tiny("SL", T=32, **RECIPE)
    gates = sum(p.numel() for n, p in model.named_parameters() if "gate" in n)
    assert gates == 24 + 2 * (2 * 12)  # smear gate + one ve gate (2 kv heads x 12) on layers 1 and 3
    attn = 12 * 4 * 16 * (8 + 32 + 8 + 32)  # short window 32/4 = 8
    dense = 6 * sum(p.numel() for n, p in plain.named_parameters() if n != "wte.weight")
    assert model.estimate_flops() == dense + 6 * gates + 6 * (128 - 97) * 64 + attn  # + lm_head's padded rows


def test_old_checkpoint_config_gets_legacy_values_not_defaults():
    """A field missing from a checkpoint means the model from before it existed, even after
    the defaults flip to the new recipe."""
    from dataclasses import fields as dc_fields, make_dataclass
    import nanochat.gpt as gpt
    old = {"sequence_len": 64, "vocab_size": 50, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 32,
           "window_pattern": "L", "softcap": 15.0}
    oldest = set(old)
    assert {f.name for f in dc_fields(GPTConfig)} - oldest == set(gpt.LEGACY), "every later field needs a LEGACY value"
    # flip the defaults to the recipe, as the lead will: an old checkpoint still loads as the old model
    new_cls = make_dataclass("Flipped", [(k, type(v), v) for k, v in RECIPE.items()], bases=(GPTConfig,))
    assert new_cls().value_embeds  # the defaults really are flipped here
    cfg = new_cls.from_dict(old)
    for k, v in gpt.LEGACY.items():
        assert getattr(cfg, k) == v, k
    model = build_model(GPTConfig.from_dict(old), "cpu")
    assert not hasattr(model, "smear_gate") and model.wte.weight.shape[0] == 50


def test_rope_base_bound_for_long_contexts():
    """Men et al. 2024's criterion (sum_i cos(m theta_i) >= 0 at every distance m up to the
    context), computed for head dim 128: the recipe's 1e5 suits 2K but not 64K; 1e7 (the C++
    run's choice) suits 64K; the suggestion is the smallest listed base from which all pass."""
    import numpy as np
    from nanochat.attention import ROPE_BASES, rope_base_enough, suggest_rope_base
    assert rope_base_enough(1e5, 2048, 128) and not rope_base_enough(1e5, 65536, 128)
    assert rope_base_enough(1e7, 65536, 128)
    theta = 1e5 ** (-np.arange(0, 128, 2) / 128)  # a plain numpy reading of the criterion at 16K
    assert rope_base_enough(1e5, 16384, 128) == bool((np.cos(np.arange(16384)[:, None] * theta).sum(1) >= 0).all())
    best = suggest_rope_base(65536, 128)
    assert best == 5e6 and not rope_base_enough(ROPE_BASES[ROPE_BASES.index(best) - 1], 65536, 128)
    assert all(rope_base_enough(b, 65536, 128) for b in ROPE_BASES if b >= best)
    assert suggest_rope_base(2048, 128) == 2e4


def spy_sdpa(monkeypatch):
    """Record, for every SDPA call, whether cuDNN attention was enabled and whether it was causal
    (also tests/test_gpu.py's): (the real SDPA, the list of records)."""
    import torch.nn.functional as F
    real, seen = F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), kwargs.get("is_causal", False)))
        return real(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return real, seen


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_prefill_attention_is_causal_sdpa_without_cudnn(monkeypatch, n_kv_head):
    from nanochat.attention import prefill_attention
    real, seen = spy_sdpa(monkeypatch)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, n_kv_head, 9, 16), torch.randn(2, n_kv_head, 9, 16)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    y = prefill_attention(q, k, v)
    assert seen == [(False, True)]  # cuDNN off inside, causal
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # and the setting restored after
    torch.testing.assert_close(y, real(q, k, v, is_causal=True, enable_gqa=n_kv_head != 4))


def test_only_forwards_with_a_cache_ask_for_the_prefill_attention(monkeypatch):
    """GPT.forward tells _context whether it prefills a cache (on CUDA that picks
    prefill_attention: tests/test_gpu.py); training and evaluation forwards do not."""
    model = tiny().eval()
    calls, real = [], model._context
    monkeypatch.setattr(model, "_context",
                        lambda idx, pos0, cached=False: calls.append(cached) or real(idx, pos0, cached))
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        full = model(idx)
        cached = model(idx, cache=model.init_cache(1, 32))
    assert calls == [False, True]
    torch.testing.assert_close(cached, full)
    assert real(idx, 0, cached=True).flash is None  # on the CPU: SDPA as before
