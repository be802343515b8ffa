"""Greedy self-speculative decoding with the MTP modules (nanochat/mtp.py): the same tokens
as greedy decoding on every kind of model (attention, quality recipe, Mamba-3 + Engram
hybrid, DSA), also when drafts are accepted (forced, or from briefly trained modules),
drafts equal to the modules' full recomputation whatever was accepted, every cache rolled
back exactly, and the Engine's switch."""

import random

import pytest
import torch

from nanochat.attention import Context, decode_masks, masked_attention, norm
from nanochat.engine import Engine, naive_generate
from nanochat.gpt import GPTConfig, build_model
from nanochat.mtp import Drafter, speculative_generate, speculative_static, static_ready, verify
from nanochat.tokenizer import Tokenizer
from test_engine import HYBRID, RECIPE

V = 50
MODELS = {"attn": dict(), "attn D=2": dict(mtp_depth=2), "recipe D=2": dict(mtp_depth=2, **RECIPE),
          "hybrid+engram+recipe D=3": dict(mtp_depth=3, engram_layers="0", **RECIPE, **HYBRID),
          "dsa D=2": dict(mtp_depth=2, dsa_start_layer=1, dsa_top_k=6, dsa_heads=2, dsa_dim=16)}


def model_for(mtp=True, vocab_size=V, **kw):
    cfg = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern="SSL", mtp=mtp, **kw)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    with torch.no_grad():  # random but non-trivial: perturb the zero-initialised projections
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


PROMPT = [1, 5, 7, 9, 3, 3, 8]


@pytest.mark.parametrize("name", MODELS)
def test_speculative_equals_greedy(name):
    model = model_for(**MODELS[name])
    stats = {}
    assert list(speculative_generate(model, PROMPT, 24, stats)) == naive_generate(model, PROMPT, 24)
    assert 0 <= stats["accepted"] <= stats["drafted"] and stats["drafted"] > 0


@pytest.mark.parametrize("name", ["attn D=2", "hybrid+engram+recipe D=3"])
@pytest.mark.parametrize("mode", ["true", "partly true"])
def test_accepted_drafts_keep_the_output(name, mode, monkeypatch):
    """Random modules rarely draft right, so draft the true continuation (or its first few
    tokens, then a wrong one): every draft or a prefix of them is accepted, and the rollback
    after an accepted prefix leaves the output unchanged."""
    model = model_for(**MODELS[name])
    ref = naive_generate(model, PROMPT, 24)
    rng = random.Random(0)

    def draft(self, d, pick=None):
        truth = ref[self.n - len(PROMPT) + 1:][:d]
        if mode == "partly true" and d:
            j = rng.randrange(d)
            truth[j] = (truth[j] + 1) % V
        return truth

    monkeypatch.setattr(Drafter, "draft", draft)
    stats = {}
    assert list(speculative_generate(model, PROMPT, 24, stats)) == ref
    if mode == "true":
        assert stats["accepted"] == stats["drafted"] > 0
    else:
        assert 0 < stats["accepted"] < stats["drafted"]


def cache_state(cache):
    """Every tensor of a model cache at its filled positions."""
    out = [] if cache.prev_emb is None else [cache.prev_emb]
    for layer in cache.layers:
        if hasattr(layer, "k"):  # attention, position-indexed (DSA: and its indexer keys)
            out += [layer.k[:, :, :cache.pos], layer.v[:, :, :cache.pos]]
            out += [layer.ik[:, :cache.pos]] if hasattr(layer, "ik") else []
        else:
            out += layer.snapshot()
    for e in cache.engram.values():
        out += list(e.snapshot())
    return out


@pytest.mark.parametrize("name", ["recipe D=2", "hybrid+engram+recipe D=3", "dsa D=2"])
def test_verify_rolls_back_every_cache(name):
    """A draft of the true continuation is kept whole, a wrong one rolled back to the one
    token before it; either way the cache equals the one of plain decoding of the kept tokens."""
    model = model_for(**MODELS[name])
    ref = naive_generate(model, PROMPT, 6)
    D = model.config.mtp_depth
    wrong = [(t + 1) % V for t in ref]
    for drafts, n_expected in [(ref[1:1 + D], D), (wrong[1:2] + ref[2:1 + D], 0), (ref[1:D] + wrong[D:D + 1], D - 1)]:
        cache = model.init_cache(1, 32)
        model(torch.tensor([PROMPT]), cache=cache)
        n, nxt, h = verify(model, cache, [ref[0]] + drafts)
        assert n == n_expected and nxt == ref[n + 1] and h.shape[1] == n + 1
        plain = model.init_cache(1, 32)
        _, h_plain = model(torch.tensor([PROMPT]), cache=plain, return_hidden=True)
        for t in ref[:n + 1]:
            _, h_plain = model(torch.tensor([[t]]), cache=plain, return_hidden=True)
        assert cache.pos == plain.pos == len(PROMPT) + n + 1
        assert torch.allclose(h[:, -1], h_plain[:, -1], atol=1e-5)
        for a, b in zip(cache_state(cache), cache_state(plain), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def reference_drafts(model, ids, n):
    """The modules' drafts after the true ids[:n + 1], each recomputed over the whole sequence
    (true ids, then the drafts so far), as in training."""
    _, h = model(torch.tensor([ids[:n]]), return_hidden=True)
    ids = list(ids[:n + 1])
    for k, (proj, block) in enumerate(zip(model.mtp.proj, model.mtp.blocks), start=1):
        e = norm(model.wte(torch.tensor([ids[k:n + k]])))
        h = block(proj(torch.cat([norm(h), e], -1)), Context(model.cos[:, :n], model.sin[:, :n], 0, n, {}))
        ids.append(int(model._logits(norm(h[:, -1])).argmax()))
    return ids[n + 1:]


@pytest.mark.parametrize("name", ["attn D=2", "hybrid+engram+recipe D=3"])
def test_drafter_equals_full_recompute_whatever_was_accepted(name):
    """The modules' KV caches and done counts: after any accepted prefix (the true sequence
    continues with the accepted drafts, then another token), the next drafts equal those of
    a full recomputation."""
    model = model_for(**MODELS[name])
    D, rng = model.config.mtp_depth, random.Random(1)
    ids = PROMPT + [4]
    drafter = Drafter(model, 64)
    with torch.no_grad():
        drafter.accept(ids, model(torch.tensor([PROMPT]), return_hidden=True)[1])
        accepted = []
        for _ in range(10):
            drafts = drafter.draft(D)
            assert drafts == reference_drafts(model, ids, drafter.n)
            n = rng.randrange(D + 1)
            accepted.append(n)
            new = drafts[:n] + [(drafts[n] + 1) % V if n < D else rng.randrange(V)]
            m = len(ids)
            ids += new
            h = model(torch.tensor([ids[:-1]]), return_hidden=True)[1][:, m - 1:]
            drafter.accept(ids[m - 1:], h)
    assert len(set(accepted)) == D + 1  # every outcome, from none to all, was exercised


def test_engine_speculative_switch():
    """On by default for greedy requests that the one-graph rounds serve (one MTP module,
    attention only), off with Engine(speculative=False), the same tokens either way;
    speculative=True also runs the plain-PyTorch path (two modules, or sampling); explicit
    requests it cannot serve are errors; other requests fall back to plain decoding."""
    tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    tokens = tokenizer.encode("int main() {", prepend="<|bos|>")
    for depth in (1, 2):
        model = model_for(vocab_size=tokenizer.get_vocab_size(), mtp_depth=depth)
        engines = {on: Engine(model, tokenizer, use_tools=False, speculative=on) for on in (True, False)}
        for e in engines.values():
            e.stop_tokens = set()
        plain, _ = engines[False].generate_batch(tokens, max_tokens=16, temperature=0.0)
        assert engines[False].spec_stats == {}
        fast, masks = engines[True].generate_batch(tokens, max_tokens=16, temperature=0.0)
        assert fast == plain and masks == [[1] * 16]
        assert (engines[True].spec_stats != {}) == (depth == 1)  # by default only where the rounds apply
        fast, _ = engines[True].generate_batch(tokens, max_tokens=16, temperature=0.0, speculative=True)
        assert fast == plain and engines[True].spec_stats["drafted"] > 0
        engines[True].generate_batch(tokens, max_tokens=4, temperature=1.0)
        assert engines[True].spec_stats == {}  # sampling: plain by default
        engines[True].generate_batch(tokens, max_tokens=4, temperature=1.0, speculative=True)
        assert engines[True].spec_stats["drafted"] > 0
        two, _ = engines[True].generate_batch(tokens, num_samples=2, max_tokens=4, temperature=0.0)  # plain decoding
        assert two == [plain[0][:4]] * 2 and engines[True].spec_stats == {}
    for kw, match in [(dict(num_samples=2), "one sample"), (dict(logit_bias={3: 1.0}), "logit adjustments")]:
        with pytest.raises(ValueError, match=match):
            engines[True].generate_batch(tokens, max_tokens=4, temperature=0.0, speculative=True, **kw)
    # max_tokens None: to the context, as many tokens speculative or not (it had one fewer)
    long = tokenizer.encode("x" * 50, prepend="<|bos|>")
    to_end = {on: e.generate_batch(long, max_tokens=None, temperature=0.0, speculative=on)[0]
              for on, e in engines.items()}
    assert engines[True].spec_stats["drafted"] > 0
    assert to_end[True] == to_end[False] and len(to_end[True][0]) == 64 - len(long) + 1
    plain_model = model_for(mtp=False, vocab_size=tokenizer.get_vocab_size())
    with pytest.raises(ValueError, match="MTP"):
        Engine(plain_model, tokenizer, use_tools=False).generate_batch(tokens, max_tokens=4, temperature=0.0,
                                                                       speculative=True)


def test_engine_speculative_tool_call(monkeypatch):
    """A tool call in a speculative stream: the tool's output is forced (mask 0) and decoding
    goes on speculatively from a new prefill of everything so far, within the same budget.
    The drafting itself is scripted here (what the engine does around it is under test)."""
    import nanochat.mtp as mtp
    tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    s = tokenizer.encode_special
    model = model_for(vocab_size=tokenizer.get_vocab_size(), mtp_depth=2)
    script = [7, s("<|python_start|>")] + tokenizer.encode("1+2") + [s("<|python_end|>"), 9, 9, 9]
    calls = []

    def scripted(model, tokens, max_tokens, stats, temperature, top_k, rng):
        calls.append((list(tokens), max_tokens))
        yield from (script if len(calls) == 1 else [11] * max_tokens)[:max_tokens]
    monkeypatch.setattr(mtp, "speculative_generate", scripted)
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()
    out, masks = engine.generate_batch([1, 2], max_tokens=14, temperature=1.0, speculative=True)
    forced = [s("<|output_start|>")] + tokenizer.encode("3") + [s("<|output_end|>")]
    head = script[:6]  # up to <|python_end|>
    assert out[0] == head + forced + [11] * (14 - 6 - len(forced))
    assert masks[0] == [1] * 6 + [0] * len(forced) + [1] * (14 - 6 - len(forced))
    assert calls == [([1, 2], 14), ([1, 2] + head + forced, 14 - 6 - len(forced))]


def progression_model(**kw):
    """A tiny model with MTP trained 20 steps on arithmetic progressions mod 16: its modules
    then draft what the model says most of the time."""
    cfg = GPTConfig(sequence_len=32, vocab_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, mtp=True,
                    mtp_lambda=1.0, **kw)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        start, step = torch.randint(0, 16, (8, 1), generator=g), torch.randint(1, 4, (8, 1), generator=g)
        seq = (start + step * torch.arange(33)) % 16
        model(seq[:, :-1].contiguous(), seq[:, 1:].contiguous()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def test_trained_modules_draft_what_the_model_says():
    """A model and its two MTP modules trained briefly on arithmetic progressions mod 16:
    their drafts are mostly accepted (all of them, or a prefix), and the output is still
    exactly greedy decoding's."""
    model = progression_model(mtp_depth=2)
    drafted = accepted = 0
    for prompt in ([3, 5, 7], [1, 2, 3, 4], [0, 3, 6]):
        stats = {}
        assert list(speculative_generate(model, prompt, 20, stats)) == naive_generate(model, prompt, 20)
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    assert accepted / drafted > 0.5, (accepted, drafted)  # 35 / 40 when written


STATIC = {"attn": dict(), "recipe": dict(**RECIPE), "mhc+recipe": dict(mhc=True, **RECIPE)}


@pytest.mark.parametrize("name", STATIC)
def test_static_rounds_equal_greedy(name):
    """The fixed-shape round (one CUDA graph on a GPU) gives greedy decoding's tokens, with
    drafts kept and rejected: the random module's own drafts, then the true continuation
    forced by a model whose module always drafts greedy's next-next token."""
    model = model_for(**STATIC[name])
    if model.config.smear:  # a strong smear, so a wrong previous embedding after a rejected draft shows
        with torch.no_grad():
            model.smear_lambda.fill_(3.0)
    ref = naive_generate(model, PROMPT, 24)
    stats = {}
    assert static_ready(model)
    assert list(speculative_static(model, PROMPT, 24, stats)) == ref
    assert stats["drafted"] > 0
    for n in (1, 2, 3, 7):  # budgets that end inside a round
        assert list(speculative_static(model, PROMPT, n)) == ref[:n]


def test_static_rounds_keep_accepted_drafts():
    """Trained modules draft right most of the time: those rounds emit two tokens, still greedy's."""
    model = progression_model(smear=True)
    drafted = accepted = 0
    for prompt in ([3, 5, 7], [1, 2, 3, 4], [0, 3, 6]):
        stats = {}
        assert list(speculative_static(model, prompt, 20, stats)) == naive_generate(model, prompt, 20)
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    assert 0 < accepted < drafted and accepted / drafted > 0.5, (accepted, drafted)  # 28 / 31 when written


def test_static_rounds_kept_between_calls():
    """With a pool (the Engine's), the rounds' caches and graph are kept between calls: later
    prompts, with drafts kept and rejected and a strong smear, still give greedy's tokens
    from the same Rounds; one closed early frees it; two live streams do not share one;
    weights changed in place between calls are seen. The Engine passes its pool."""
    model = progression_model(smear=True)
    with torch.no_grad():
        model.smear_lambda.fill_(3.0)
    pool, prompts = {}, ([3, 5, 7], [1, 2, 3, 4], [0, 3, 6])
    for prompt in prompts:  # the same drafts as without a pool: the module's cache is loaded too
        stats, fresh = {}, {}
        assert list(speculative_static(model, prompt, 20, stats, pool=pool)) == naive_generate(model, prompt, 20)
        list(speculative_static(model, prompt, 20, fresh))
        assert stats == fresh and 0 < stats["accepted"] < stats["drafted"]
    assert list(pool) == [(256, None, False)]  # length, autocast, CUDA graph
    kept = pool[256, None, False]
    gen = speculative_static(model, prompts[0], 20, pool=pool)
    next(gen)
    with torch.no_grad():  # the module's cache was loaded from this prompt's drafter, as the main one
        logits, h = model(torch.tensor([prompts[0]]), cache=model.init_cache(1, 256), return_hidden=True)
        drafter = Drafter(model, 256)
        drafter.accept(prompts[0] + [int(logits[0, -1].argmax())], h)
        drafter.draft(1)
    assert all(torch.equal(a, b) for a, b in zip(kept.mcache.tensors(), drafter.kv[0].tensors()))
    gen.close()
    assert pool[256, None, False] is kept and not kept.busy
    g1, g2 = (speculative_static(model, p, 12, pool=pool) for p in prompts[:2])
    assert list(zip(g1, g2)) == list(zip(naive_generate(model, prompts[0], 12), naive_generate(model, prompts[1], 12)))
    g2.close()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    for prompt in prompts:
        assert list(speculative_static(model, prompt, 20, pool=pool)) == naive_generate(model, prompt, 20)
    tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(16)})
    engine = Engine(model, tokenizer, use_tools=False)
    engine.stop_tokens = set()
    assert engine.generate_batch(prompts[0], max_tokens=20, temperature=0.0)[0][0] == naive_generate(model, prompts[0], 20)
    assert engine.spec_stats["drafted"] > 0 and list(engine._rounds) == [(256, None, False)]


def test_static_ready_only_for_position_indexed_caches():
    assert not static_ready(model_for(mtp_depth=2))
    assert not static_ready(model_for(**MODELS["hybrid+engram+recipe D=3"]))
    assert not static_ready(model_for(mtp=False))
    with pytest.raises(ValueError, match="attention-only"):
        list(speculative_static(model_for(mtp_depth=2), PROMPT, 4))


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (8, 2)])
def test_masked_attention_equals_sdpa(heads, kv_heads):
    """The static verify's attention (T > 1 queries over the whole cache, written out because
    cuDNN's kernel for it was 7x slower than for one query) equals SDPA with the same mask,
    GQA included, for a sliding window and a full one."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, 2, 16, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 40, 16, dtype=torch.float64) for _ in range(2))
    masks = decode_masks({8, 64}, 40, torch.tensor([20, 21]))
    for mask in masks.values():
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
        assert (masked_attention(q, k, v, mask) - want).abs().max() < 1e-12
    # in bf16 about as exact as SDPA's own bf16 (scores and softmax in fp32): checked against fp64
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    for mask in masks.values():
        want = torch.nn.functional.scaled_dot_product_attention(qb.double(), kb.double(), vb.double(), attn_mask=mask,
                                                                enable_gqa=heads != kv_heads)
        sdpa = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=heads != kv_heads)
        err = (masked_attention(qb, kb, vb, mask).double() - want).abs().max()
        assert err <= 1.5 * (sdpa.double() - want).abs().max() + 1e-3, err


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 4)])
def test_speculative_sampling_keeps_the_model_distribution(temperature, top_k):
    """Leviathan et al.'s accept / resample rule: tokens 2 and 3 of speculative samples
    follow the model's own distribution (exact marginals by enumeration), though the
    modules draft from their own distributions and are both accepted and rejected.
    Total variation over 3000 samples: within 0.05 (accepting every draft instead fails
    this at both settings: checked when written)."""
    from nanochat.engine import sampling_probs
    model = progression_model(mtp_depth=2)
    prompt = [3, 5]
    with torch.no_grad():
        p1 = sampling_probs(model(torch.tensor([prompt]))[:, -1], temperature, top_k)[0]  # (16,)
        two = torch.tensor([prompt + [a] for a in range(16)])
        p2 = sampling_probs(model(two)[:, -1], temperature, top_k)  # (16, 16): p(t2 | t1)
        three = torch.tensor([prompt + [a, b] for a in range(16) for b in range(16)])
        p3 = sampling_probs(model(three)[:, -1], temperature, top_k).view(16, 16, 16)
    want2 = p1 @ p2
    want3 = torch.einsum("a,ab,abc->c", p1, p2, p3)
    rng, stats = torch.Generator().manual_seed(0), {}
    got = torch.tensor([list(speculative_generate(model, prompt, 3, stats, temperature, top_k, rng))
                        for _ in range(3000)])
    for k, want in ((1, want2), (2, want3)):
        freq = torch.bincount(got[:, k], minlength=16).float() / len(got)
        assert 0.5 * (freq - want).abs().sum() < 0.05, (k, freq, want)
    assert 0 < stats["accepted"] < stats["drafted"]


@pytest.mark.parametrize("name", ["attn", "recipe"])
def test_static_multi_token_decode_equals_full_forward_and_is_causal(name):
    """decode_hidden over two tokens at device positions p, p+1 (the verify of the static
    rounds, with masked_attention for T > 1; sliding windows and GQA): the full forward's
    hidden states at those positions, and the first position's output does not change
    with the second token."""
    model = model_for(**STATIC[name])
    n = len(PROMPT)
    outs = []
    for second in (11, 23):
        ids = torch.tensor([PROMPT + [4, second]])
        with torch.no_grad():
            _, full = model(ids, return_hidden=True)
            cache = model.init_cache(1, 64)
            model(ids[:, :n], cache=cache)
            h = model.decode_hidden(ids[:, n:], cache, torch.tensor(n))
        assert (h - full[:, n:]).abs().max() < 1e-5
        outs.append(h)
    assert torch.equal(outs[0][:, 0], outs[1][:, 0])
