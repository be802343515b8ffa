import pytest
import torch

from nanochat.engine import Engine, ToolState, adjust_logits, decode_and_argmax, naive_generate, run_tool, sample_next
from nanochat.gpt import GPTConfig, build_model


# the quality recipe's model flags (window_tile 8 so that short windows exist at T=64)
RECIPE = dict(value_embeds=True, smear=True, backout=True, layer_lambdas=True, qk_scale=1.2, rope_base=100000.0,
              pad_vocab_to=64, short_window_div=4, window_tile=8, ref_init=True)


def model_for(tokenizer, pattern="L", T=64, **kw):
    cfg = GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=4, n_kv_head=2,
                    n_embd=64, window_pattern=pattern, **kw)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    with torch.no_grad():  # a random but non-trivial model: perturb the zero-initialized projections
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


HYBRID = dict(mamba_pattern="AM", mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True,
              mamba3_trapezoidal=True, mamba3_d_state=16, mamba3_headdim=16, mamba3_chunk=8)


@pytest.mark.parametrize("pattern,recipe", [("L", False), ("SSL", False), ("SSL", True), ("SSL", "hybrid")])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_engine_equals_full_recompute(tokenizer, pattern, recipe, num_samples):
    model = model_for(tokenizer, pattern, **({} if not recipe else RECIPE if recipe is True else {**RECIPE, **HYBRID}))
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()  # a random model may emit a stop token; compare the raw streams
    for prompt in ["int main() {", "def f(x):\n    return", "The"]:
        tokens = tokenizer.encode(prompt, prepend="<|bos|>")
        ref = naive_generate(model, tokens, 20)
        out, masks = engine.generate_batch(tokens, num_samples=num_samples, max_tokens=20, temperature=0.0)
        for row, m in zip(out, masks):
            assert row == ref, f"{pattern} {prompt!r}"
            assert m == [1] * 20


@pytest.mark.parametrize("recipe", [False, True, "hybrid"])
def test_decode_step_equals_forward(tokenizer, recipe):
    model = model_for(tokenizer, "SSL", T=32, **({} if not recipe else RECIPE if recipe is True else {**RECIPE, **HYBRID}))
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 20))
    full = model(idx)
    cache = model.init_cache(2, 32)
    model(idx[:, :12], cache=cache)
    for t in range(12, 20):
        logits = model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t))
        assert torch.allclose(logits, full[:, t], atol=1e-4)


@pytest.mark.parametrize("extra", [{}, {**RECIPE, **HYBRID}, {"dsa_start_layer": 1, "dsa_top_k": 8, "dsa_dim": 16}])
def test_cache_under_autocast_keeps_the_attended_dtype_and_decodes_the_same(tokenizer, extra):
    """Under bf16 autocast the KV (and DSA index) cache is bf16, as the keys and values the
    forward attends to: prefill + decode give the same logits, bit for bit, as an fp32 cache
    (which was converted whole every step). Mamba-3's state stays fp32."""
    model = model_for(tokenizer, "SSL", T=32, **extra)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 20))
    outs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (None, torch.float32):
            cache = model.init_cache(2, 32, dtype=dtype)
            if dtype is None:
                assert {(n, getattr(c, n).dtype) for c in cache.layers for n in ("k", "ik", "state")
                        if hasattr(c, n)} == {("k", torch.bfloat16)} | (
                    {("state", torch.float32)} if "mamba_pattern" in extra else
                    {("ik", torch.bfloat16)} if "dsa_top_k" in extra else set())
            steps = [model(idx[:, :12], cache=cache)[:, -1]]
            steps += [model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)) for t in range(12, 20)]
            outs.append(torch.stack(steps))
    assert torch.equal(outs[0], outs[1])


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50)
    a = sample_next(logits, torch.Generator().manual_seed(1), temperature=1.0, top_k=5)
    b = sample_next(logits, torch.Generator().manual_seed(1), temperature=1.0, top_k=5)
    assert torch.equal(a, b)
    top5 = logits.topk(5).indices
    for _ in range(20):
        s = sample_next(logits, torch.Generator().manual_seed(_), temperature=2.0, top_k=5)
        assert all(s[i] in top5[i] for i in range(4))
    assert torch.equal(sample_next(logits, None, temperature=0.0), logits.argmax(-1))
    for k in (0, -1):  # no cut, as None (-k 0 crashed chat_eval and chat_rl)
        assert torch.equal(sample_next(logits, torch.Generator().manual_seed(3), 1.0, k),
                           sample_next(logits, torch.Generator().manual_seed(3), 1.0, None))


def multinomial_draw(logits, rng, temperature, k):
    """The ids sample_next drew with torch.multinomial (before it drew without the syncs)."""
    probs, idx = torch.softmax(logits / temperature, -1), None
    if k:
        vals, idx = logits.topk(k, -1)
        probs = torch.softmax(vals / temperature, -1)
    want = torch.multinomial(probs, 1, generator=rng)
    return (want if idx is None else idx.gather(1, want)).squeeze(1)


def test_sampling_draws_what_torch_multinomial_draws():
    """sample_next draws by multinomial's own method, without its syncing checks: the same
    ids as torch.multinomial from the same seed, step after step (so seeded answers did not
    change). A draw from another noise (a different generator state) fails this."""
    for seed, (B, V, k) in enumerate([(1, 7, None), (3, 50, 5), (2, 65536, None), (4, 1000, 50)]):
        logits = torch.randn(B, V) * 3
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(10):
            want = multinomial_draw(logits, g1, 0.8, k)
            assert torch.equal(sample_next(logits, g2, 0.8, k), want)


def test_adjust_logits_penalties_and_bias():
    logits = torch.zeros(2, 4)
    counts = torch.tensor([[0, 1, 3, 0], [2, 0, 0, 0]], dtype=torch.float)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    out = adjust_logits(logits, counts, frequency_penalty=0.5, presence_penalty=1.0, bias=bias)
    assert out.tolist() == [[0, -1.5, -2.5, 5], [-2, 0, 0, 5]]
    assert torch.equal(adjust_logits(logits, counts), logits)


def test_engine_streams_and_stops(tokenizer, monkeypatch):
    model = model_for(tokenizer)
    engine = Engine(model, tokenizer)
    tokens = tokenizer.encode("hello", prepend="<|bos|>")
    steps = list(engine.generate(tokens, num_samples=2, max_tokens=7, temperature=1.0, seed=3))
    assert len(steps) == 7 and all(len(c) == 2 and len(m) == 2 for c, m in steps)
    # same seed, same samples
    again = list(engine.generate(tokens, num_samples=2, max_tokens=7, temperature=1.0, seed=3))
    assert steps == again
    # rows stop at their stop token: row 0 at once, row 1 after two tokens, and
    # generation ends when both are done (a scripted choice of tokens; the model still runs)
    import nanochat.engine as eng
    end = tokenizer.encode_special("<|assistant_end|>")
    script = iter([[end, 5], [7, 6], [7, end], [8, 8], [9, 9]])
    monkeypatch.setattr(eng, "sample_next", lambda logits, rng, t, k: torch.tensor(next(script)))
    steps = list(engine.generate(tokens, num_samples=2, max_tokens=5))
    assert len(steps) == 3
    script = iter([[end, 5], [7, 6], [7, end], [8, 8], [9, 9]])
    out, _ = engine.generate_batch(tokens, num_samples=2, max_tokens=5)
    assert out == [[], [5, 6]]
    script = iter([[end, 5], [7, 6], [7, end], [8, 8], [9, 9]])
    out, masks = engine.generate_batch(tokens, num_samples=2, max_tokens=5, keep_stop=True)  # (chat_rl's)
    assert out == [[end], [5, 6, end]] and masks == [[1], [1, 1, 1]]


def test_tool_state_machine_forces_the_result(tokenizer):
    s = tokenizer.encode_special
    tool = ToolState(tokenizer)
    stream = [s("<|python_start|>")] + tokenizer.encode("12*(3+4)") + [s("<|python_end|>")]
    forced = []
    for t in stream:
        forced = tool.feed(t) or forced
    assert forced[0] == s("<|output_start|>") and forced[-1] == s("<|output_end|>")
    assert tokenizer.decode(forced[1:-1]) == "84"
    # outside a python block nothing happens; a failing expression forces nothing
    assert tool.feed(tokenizer.encode("x")[0]) == []
    bad = [s("<|python_start|>")] + tokenizer.encode("1/0") + [s("<|python_end|>")]
    assert [tool.feed(t) for t in bad][-1] == []


def test_forced_tokens_enter_the_stream_with_mask_zero(tokenizer, monkeypatch):
    """A model that always writes `<|python_start|> 6*7 <|python_end|>` then stops: the
    engine must inject <|output_start|>42<|output_end|> with mask 0."""
    s = tokenizer.encode_special
    script = [s("<|python_start|>")] + tokenizer.encode("6*7") + [s("<|python_end|>")]
    model = model_for(tokenizer)
    engine = Engine(model, tokenizer)
    tokens = tokenizer.encode("q", prepend="<|bos|>")
    # drive the real engine with a scripted sampler: the model runs, the choice is fixed
    import nanochat.engine as eng
    seq = iter(script + [s("<|assistant_end|>")] * 50)
    monkeypatch.setattr(eng, "sample_next", lambda logits, rng, t, k: torch.full((logits.size(0),), next(seq)))
    out, masks = engine.generate_batch(tokens, num_samples=1, max_tokens=30)
    text = tokenizer.decode(out[0])
    assert text.startswith("<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"), text
    n = len(script)
    forced = tokenizer.encode("42")
    assert masks[0][:n] == [1] * n and masks[0][n:n + len(forced) + 2] == [0] * (len(forced) + 2)


def test_finished_rows_run_no_tools(tokenizer, monkeypatch):
    """A row that has ended keeps sampling in lockstep with the others; its tokens are
    thrown away, so a tool call it writes must not run (each can take seconds)."""
    s = tokenizer.encode_special
    end, x = s("<|assistant_end|>"), tokenizer.encode("a")[0]
    row0 = [end, s("<|python_start|>")] + tokenizer.encode("6*7") + [s("<|python_end|>")] + [x] * 50
    row1 = [x] * 8 + [end] * 50
    import nanochat.engine as eng
    steps = iter(zip(row0, row1))
    monkeypatch.setattr(eng, "sample_next", lambda logits, rng, t, k: torch.tensor(next(steps)))
    calls = []
    monkeypatch.setattr(eng, "run_tool", lambda expr, *a, **kw: calls.append(expr) or "42")
    engine = Engine(model_for(tokenizer), tokenizer)
    out, _ = engine.generate_batch(tokenizer.encode("q", prepend="<|bos|>"), num_samples=2, max_tokens=30)
    assert out[0] == [] and out[1] == [x] * 8 and calls == []


def test_run_tool_fails_as_none_not_as_an_exception(monkeypatch):
    """A tool call that cannot run returns None (no output forced), never raises: in the
    batcher an exception on its thread ends every request in the batch. Thousands of nested
    unary operators (RecursionError in compile) and a sandbox that cannot start (OSError)."""
    from nanochat import engine, execution
    assert run_tool("not " * 3000 + "x") is None and run_tool("~" * 3000 + "1") is None

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(execution, "execute_code", broken)
    assert engine.run_tool("print('hi')") is None and engine.run_tool("2 + 3") == "5"


def test_run_tool():
    assert run_tool("2 + 3 * 4") == "14"
    assert run_tool("1,200*2") == "2400" and run_tool("1,050+5") == "1055"  # GSM8K's thousands separators
    assert run_tool("") is None
    assert run_tool("1/0") is None
    assert run_tool("'strawberry'.count('r')") == "3"  # not plain arithmetic: runs in the sandbox


def test_dummy_decode_steps_then_restore_leave_decoding_unchanged(tokenizer):
    """The engine's CUDA-graph warmup/capture runs decode_step on dummy ids at the cache's
    last position; the smear's prev_emb is not position-indexed, so the engine snapshots and
    restores it. The same sequence on the CPU: decoding afterwards equals a full forward."""
    model = model_for(tokenizer, "SSL", T=32, **RECIPE)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 20))
    full = model(idx)
    cache = model.init_cache(2, 32)
    model(idx[:, :12], cache=cache)
    snap = cache.snapshot()
    for _ in range(3):
        model.decode_step(torch.zeros(2, 1, dtype=torch.long), cache, torch.tensor(31))
    assert not torch.equal(cache.prev_emb, snap[0])  # without the restore, decoding would be wrong
    cache.restore(snap)
    for t in range(12, 20):
        assert torch.allclose(model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)), full[:, t], atol=1e-4)


EXTRAS = {"recipe": RECIPE, "hybrid": {**RECIPE, **HYBRID}, "memory": dict(RECIPE, engram_layers="0", mhc=True),
          "dsa": dict(dsa_start_layer=1, dsa_top_k=6, dsa_heads=2, dsa_dim=16)}


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_engine_keeps_its_decoder_between_calls(tokenizer, extra):
    """Batch-1 decoders (on CUDA: a captured graph each) are kept between generate calls.
    Later calls (other prompts and lengths, a batch of 3 in between, sampled) give what a
    fresh Engine gives; the kept decoder is the same object, also after a generator closed
    early; two live generators of one length do not share it; weights changed in place
    between calls are seen (Mamba-3's cached copy of its input projections included); the
    kept lengths add up to at most the model's reach."""
    model = model_for(tokenizer, "SSL", **EXTRAS[extra])
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()
    prompts = [tokenizer.encode(p, prepend="<|bos|>") for p in ("int main() {", "def f(x):\n    return", "The")]

    def fresh(tokens, **kw):
        e = Engine(model, tokenizer)
        e.stop_tokens = set()
        return e.generate_batch(tokens, **kw)[0]
    for tokens in prompts:
        assert engine.generate_batch(tokens, max_tokens=12, temperature=0.0)[0][0] == naive_generate(model, tokens, 12)
    kept = engine._decoders[256, None]
    assert engine.generate_batch(prompts[0], num_samples=3, max_tokens=8, temperature=0.0)[0] == \
        [naive_generate(model, prompts[0], 8)] * 3
    kw = dict(max_tokens=12, temperature=1.0, top_k=20, seed=7)
    assert engine.generate_batch(prompts[1], **kw)[0] == fresh(prompts[1], **kw)
    gen = engine.generate(prompts[2], max_tokens=12, temperature=0.0)
    next(gen)
    gen.close()
    assert engine._decoders[256, None] is kept and not kept.busy
    # two live generators of one length: the second gets a private decoder
    g1, g2 = (engine.generate(p, max_tokens=10, temperature=0.0) for p in prompts[:2])
    out1, out2 = [], []
    for (c1, _), (c2, _) in zip(g1, g2):
        out1 += c1
        out2 += c2
    assert (out1, out2) == (naive_generate(model, prompts[0], 10), naive_generate(model, prompts[1], 10))
    g2.close()  # zip stopped at g1's end: g2 still holds its decoder
    assert not any(d.busy for d in engine._decoders.values())
    with torch.no_grad():  # weights move between calls (training-time sampling), the mixers' inputs a lot
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if "mixer" in name else 0.05))
    for tokens in prompts:
        assert engine.generate_batch(tokens, max_tokens=12, temperature=0.0)[0][0] == naive_generate(model, tokens, 12)
    long_out = engine.generate_batch(prompts[1], max_tokens=300, temperature=0.0)[0][0]  # a 512-position cache
    assert long_out[:12] == naive_generate(model, prompts[1], 12)
    assert list(engine._decoders) == [(256, None)]  # past the context (64, so 256 at most): not kept, nothing evicted


def test_the_decode_step_compiles_with_the_engines_compile_mode(tokenizer, monkeypatch):
    """Engine.compile_mode reaches torch.compile of the decode step (engine_bench
    --compile_mode), which only CUDA compiles: the device is made to read as CUDA here."""
    engine = Engine(model_for(tokenizer), tokenizer)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    monkeypatch.setattr(Engine, "device", property(lambda self: torch.device("cuda")))
    engine.compile_mode = "max-autotune-no-cudagraphs"
    step = engine._step_fn()  # the step and its argmax, one compiled function
    assert step.func is decode_and_argmax and step.args == (engine.model,)
    assert calls == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]


def test_pdl_joins_the_decode_compile_only_on_hopper_gpus_whose_torch_has_it(monkeypatch):
    """decode_compile_args: programmatic dependent launch (inductor's triton.enable_pdl) as
    torch.compile options with the mode's own, only with pdl on, on CUDA, compute capability
    9 or more and a torch that has the setting (it appeared after 2.9); the mode alone otherwise."""
    from nanochat import engine
    from nanochat.engine import decode_compile_args
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if not engine.torch_has_pdl():
        assert decode_compile_args("max-autotune", True, cuda) == {"mode": "max-autotune"}  # (no capability asked)
        monkeypatch.setattr(engine, "torch_has_pdl", lambda: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    mode = "max-autotune-no-cudagraphs"
    assert decode_compile_args(mode, True, cuda) == {"options": {"max_autotune": True, "coordinate_descent_tuning": True,
                                                                 "triton.enable_pdl": True}}
    assert decode_compile_args(None, True, cuda) == {"options": {"triton.enable_pdl": True}}
    assert decode_compile_args(mode, False, cuda) == decode_compile_args(mode, True, cpu) == {"mode": mode}
    capability[0] = (8, 0)  # an A100: no PDL
    assert decode_compile_args(None, True, cuda) == {"mode": None}
    capability[0] = (9, 4)  # an AMD MI300 under ROCm reads as 9.4: no PDL either
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert decode_compile_args(None, True, cuda) == {"mode": None}


@pytest.mark.parametrize("extra", ["plain", *EXTRAS, "mtp"])
def test_bf16_linears_under_autocast_give_the_same_outputs(tokenizer, extra):
    """GPT.linears_to(bf16) (dev/batch_bench.py --bf16_linears): under bf16 autocast on the CPU
    the forward, a prefill and the cached decode steps give the fp32-weight model's outputs bit
    for bit (autocast casts each Linear weight to those same values at every matmul); every
    Linear is bf16 after it, nothing else."""
    kw = {"plain": {}, "mtp": dict(mtp=True)}.get(extra, EXTRAS.get(extra))
    model = model_for(tokenizer, "SSL", T=32, **kw)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 20))
    assert all(torch.equal(a, b) for a, b in zip(*bf16_linears_outputs(model, idx, prefix=12)))


@pytest.mark.parametrize("extra", ["plain", *EXTRAS])
def test_stacked_projections_give_the_same_outputs(tokenizer, extra):
    """GPT.stack_projections (--stack_qkv): without autograd, the forward, a prefill and the
    cached decode steps give the unstacked model's outputs (fp32 on the CPU, to rounding: one
    matmul for q, k, v instead of three). The weights are views of the stack (an in-place change
    reaches both), training forwards still run through the Parameters, and linears_to
    afterwards stacks the new weights again."""
    kw = {"plain": {}}.get(extra, EXTRAS.get(extra))
    model = model_for(tokenizer, "SSL", T=32, **kw)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 20))

    def outputs():
        with torch.inference_mode():
            cache = model.init_cache(idx.size(0), model.config.sequence_len)
            steps = [model(idx), model(idx[:, :12], cache=cache)]
            return steps + [model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t)) for t in range(12, 20)]
    plain = outputs()
    model.stack_projections()
    attn = [b.mixer for b in model.blocks if hasattr(b.mixer, "c_q")]
    assert attn and all(a.w_qkv is not None and a.c_q.weight.data_ptr() == a.w_qkv.data_ptr() for a in attn)
    calls = []
    for a in attn:  # the stacked matmul really runs: the separate Linears are not called without autograd
        for lin in (a.c_q, a.c_k, a.c_v):
            lin.register_forward_hook(lambda *_: calls.append(1))
    for got, want in zip(outputs(), plain, strict=True):
        torch.testing.assert_close(got, want)
    assert not calls
    loss = model(idx, idx)  # training: through the Parameters
    loss.backward()
    assert calls and all(a.c_q.weight.grad is not None and a.c_q.weight.grad.abs().sum() > 0 for a in attn)
    a = attn[0]
    nq, nk = a.c_q.out_features, a.c_k.out_features
    with torch.no_grad():
        a.c_k.weight.mul_(0)  # in place: the stack sees it
    assert (a.w_qkv[nq:nq + nk] == 0).all() and (a.w_qkv[:nq] != 0).any() and (a.w_qkv[nq + nk:] != 0).any()
    model.linears_to(torch.bfloat16)
    assert all(a.w_qkv.dtype == torch.bfloat16 and a.c_q.weight.data_ptr() == a.w_qkv.data_ptr() for a in attn)


def bf16_linears_outputs(model, idx, prefix):
    """Under bf16 autocast on idx's device, with the model's weights as they are and then after
    GPT.linears_to(bf16) (checked: every Linear weight bf16, no other parameter changed): the
    forward of idx, a prefill of its first `prefix` tokens and teacher-forced decode steps over
    the rest, each run's list of outputs. (Also tests/test_gpu.py's, on CUDA.)"""
    outs = []
    for cast in (False, True):
        if cast:
            others = {n: p.dtype for n, p in model.named_parameters()}
            model.linears_to(torch.bfloat16)
            linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            assert linears and all(p.dtype == (torch.bfloat16 if n in linears else others[n])
                                   for n, p in model.named_parameters())
        with torch.inference_mode(), torch.autocast(idx.device.type, dtype=torch.bfloat16):
            cache = model.init_cache(idx.size(0), model.config.sequence_len)
            steps = [model(idx), model(idx[:, :prefix], cache=cache)]
            steps += [model.decode_step(idx[:, t:t + 1], cache, torch.tensor(t, device=idx.device))
                      for t in range(prefix, idx.size(1))]
        outs.append(steps)
    return outs


def test_argmax_rows_is_argmax_ties_nan_and_all():
    """engine.argmax_rows (the decode step's two-stage argmax) against torch's argmax: random rows
    over several chunk sizes (dividing the vocabulary and not), ties (the first index wins, also
    across chunks), NaN, -inf rows and one-element chunks."""
    from nanochat.engine import argmax_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1000, generator=g)
    x[1, 3] = x[1, 900] = x[1, 500] = 9.0           # ties in three chunks: index 3
    x[2, 700] = x[2, 701] = 9.0                      # ties in one chunk
    x[3, 10], x[3, 20] = float("nan"), float("nan")  # NaN is the max (the first one)
    x[4] = float("-inf")                             # all -inf: 0
    x[5] = 0.0                                       # all equal: 0
    for chunk in (1, 7, 64, 1000, 1024, 4096):
        got = argmax_rows(x, chunk)
        assert torch.equal(got, x.argmax(-1)), chunk
    assert got.tolist()[:5] == [x[0].argmax().item(), 3, 700, 10, 0]
    y = torch.randn(3, 32768, generator=g).to(torch.bfloat16)  # bf16 logits: many exact ties
    assert torch.equal(argmax_rows(y), y.argmax(-1))


def test_decode_and_argmax_advances_its_inputs_in_place(tokenizer):
    """decode_and_argmax(advance=True), what the CUDA-graph stepper captures: the same logits and
    argmax, and the argmax and position + 1 left in its ids and pos tensors."""
    model = model_for(tokenizer)
    cache = model.init_cache(2, 64)
    with torch.no_grad():
        model(torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0)), cache=cache)
        ids, pos = torch.tensor([[4], [7]]), torch.tensor(9)
        logits, greedy = decode_and_argmax(model, ids.clone(), cache, pos.clone())
        ids2, pos2 = ids.clone(), pos.clone()
        logits2, greedy2 = decode_and_argmax(model, ids2, cache, pos2, advance=True)
    assert torch.equal(logits2, logits) and torch.equal(greedy2, logits.argmax(-1)) and torch.equal(greedy, greedy2)
    assert torch.equal(ids2.view(-1), greedy) and pos2.item() == 10
