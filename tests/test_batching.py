import threading
import time

import pytest
import torch

from nanochat.batching import Batcher
from nanochat.engine import Engine, naive_generate
from test_engine import EXTRAS, model_for

CASES = {"plain": {}, **EXTRAS}


def within(seconds, fn):
    """fn() run in a thread: its result, or a failure after `seconds` (a lost row would hang)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"no result within {seconds} s"
    return out[0]


def run_together(batcher, jobs):
    """Each job (prompt, generate's kwargs) in its own thread, arrivals 10 ms apart (some join a
    batch already decoding): their streams, once the batcher has every row back (then closed)."""
    got = [None] * len(jobs)

    def run(i):
        time.sleep(0.01 * i)
        got[i] = list(batcher.generate(jobs[i][0], **jobs[i][1]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert batcher.busy_rows == 0
    batcher.close()
    return got


def engine_for(model, tokenizer):
    e = Engine(model, tokenizer)
    e.stop_tokens = set()  # a random model may emit a stop token; compare the raw streams
    return e


@pytest.mark.parametrize("extra", list(CASES))
def test_batched_requests_equal_one_at_a_time(tokenizer, extra):
    """Requests decoded together by the Batcher (more rows than it has, so some wait for
    others to end; each row at its own position) give what Engine.generate gives for each
    alone: greedy the same tokens, sampled the same draws of the same seeded generator
    (requests with the same temperature and top k share one softmax), two samples of one
    prompt included; with the quality recipe, a Mamba-3 hybrid, Engram +
    mHC and DSA."""
    model = model_for(tokenizer, "SSL", **CASES[extra])
    prompts = [tokenizer.encode(p, prepend="<|bos|>") for p in ("int main() {", "def f(x):\n    return", "The")]
    jobs = [(prompts[0], dict(max_tokens=12, temperature=0.0)),
            (prompts[1], dict(max_tokens=20, temperature=0.0)),
            (prompts[2], dict(max_tokens=5, temperature=0.0)),
            (prompts[1], dict(max_tokens=10, temperature=1.0, top_k=20, seed=7)),
            (prompts[0], dict(num_samples=2, max_tokens=8, temperature=0.8, seed=3, frequency_penalty=0.5,
                              logit_bias={5: 2.0})),
            (prompts[2], dict(max_tokens=15, temperature=0.0)),
            (prompts[2], dict(max_tokens=9, temperature=0.8, seed=11)),  # sampled in a group with the next ones
            (prompts[0], dict(max_tokens=7, temperature=1.0, top_k=20, seed=9)),
            (prompts[1], dict(max_tokens=6, temperature=0.8, seed=12))]
    want = [list(engine_for(model, tokenizer).generate(p, **kw)) for p, kw in jobs]
    assert run_together(Batcher(engine_for(model, tokenizer), slots=4), jobs) == want


@pytest.mark.parametrize("extra", ["plain", "hybrid", "memory"])
def test_requests_admitted_together_share_a_prefill(tokenizer, monkeypatch, extra):
    """Requests that arrive while the batcher is busy are admitted together: those whose
    prompts have the same length in one prefill forward (a group of 3 here, and one alone),
    each request then in its own rows; the answers equal Engine.generate's."""
    model = model_for(tokenizer, "SSL", **CASES[extra])
    c = tokenizer.encode("def f(x):\n    return", prepend="<|bos|>")
    a = tokenizer.encode("int x = 1;", prepend="<|bos|>")
    b = [a[0]] + a[1:][::-1]  # the same length, other tokens
    assert len(a) == len(b) != len(c) and a != b
    jobs = [(a, dict(max_tokens=6, temperature=0.0)), (b, dict(max_tokens=9, temperature=0.0)),
            (c, dict(max_tokens=7, temperature=0.0)), (a, dict(num_samples=2, max_tokens=5, temperature=0.9, seed=4))]
    want = [list(engine_for(model, tokenizer).generate(p, **kw)) for p, kw in jobs]
    batcher = Batcher(engine_for(model, tokenizer), slots=8)
    sizes, gate, prefill = [], threading.Event(), Batcher._prefill

    def gated(self, reqs):  # the first admission waits until every request is queued
        gate.wait(30)
        sizes.append(len(reqs))
        prefill(self, reqs)
    monkeypatch.setattr(Batcher, "_prefill", gated)
    got = [None] * (len(jobs) + 1)

    def run(i, p, kw):
        got[i] = list(batcher.generate(p, **kw))
    threads = [threading.Thread(target=run, args=(0, c, dict(max_tokens=3, temperature=0.0)))]
    threads[0].start()
    time.sleep(0.2)  # the first request is being admitted (held at the gate)
    threads += [threading.Thread(target=run, args=(i + 1, p, kw)) for i, (p, kw) in enumerate(jobs)]
    for t in threads[1:]:
        t.start()
    t0 = time.time()
    while batcher.waiting.qsize() < len(jobs) and time.time() - t0 < 30:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(timeout=120)
    assert got[1:] == want and len(got[0]) == 3
    assert sizes == [1, 3, 1] and batcher.busy_rows == 0
    batcher.close()


@pytest.mark.parametrize("extra", ["hybrid", "memory", "dsa"])
def test_a_step_decodes_only_the_rows_in_use(tokenizer, monkeypatch, extra):
    """32 slots: steps of 8 rows while the requests in flight sit in rows 0-7 (rows are taken
    lowest first), of 32 once one sits above; the answers equal Engine.generate's either way
    (the 8-row step works on views of the cache: Mamba-3's state, Engram's and mHC's, DSA's keys)."""
    model = model_for(tokenizer, "SSL", **CASES[extra])
    prompts = [tokenizer.encode(p, prepend="<|bos|>") for p in ("int main() {", "The", "def f(x):")]
    jobs = [(prompts[i % 3], dict(max_tokens=4 + i, temperature=0.0 if i % 2 else 0.8, seed=i)) for i in range(10)]
    want = [list(engine_for(model, tokenizer).generate(p, **kw)) for p, kw in jobs]
    batcher = Batcher(engine_for(model, tokenizer), slots=32)
    assert batcher.sizes == [8, 32]
    used, make = [], Batcher._make_stepper

    def spy(self):
        make(self)
        self._steppers = {m: (i, p, (lambda f, m: lambda: (used.append(m), f())[1])(f, m))
                          for m, (i, p, f) in self._steppers.items()}
    monkeypatch.setattr(Batcher, "_make_stepper", spy)
    assert [list(batcher.generate(p, **kw)) for p, kw in jobs[:2]] == want[:2]  # one at a time: row 0
    assert set(used) == {8}
    gate, prefill = threading.Event(), Batcher._prefill
    monkeypatch.setattr(Batcher, "_prefill", lambda self, reqs: (gate.wait(30), prefill(self, reqs)))
    got = [None] * len(jobs)

    def run(i):
        got[i] = list(batcher.generate(*jobs[i][:1], **jobs[i][1]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    time.sleep(0.5)  # all ten asked for (the first admission held at the gate): they decode together
    gate.set()
    for t in threads:
        t.join(timeout=120)
    assert got == want and 32 in used and batcher.free == list(range(32))
    batcher.close()


def test_batched_tool_calls_and_stops_as_the_engine(tokenizer, monkeypatch):
    """A scripted sampler (the model runs, the choice is fixed): the row writes a Python call,
    gets <|output_start|>42<|output_end|> forced with mask 0, decodes a few greedy tokens, then
    stops at <|assistant_end|>; the Batcher's stream equals the Engine's, and the request ends
    at the stop token."""
    assert_tool_call_streams_equal(model_for(tokenizer), tokenizer, monkeypatch, slots=2)


def assert_tool_call_streams_equal(model, tokenizer, monkeypatch, slots):
    """One request whose draws are scripted (a Python tool call, 6*7, then ten greedy tokens,
    of which the steps with forced tool output throw the first away, then <|assistant_end|>) through Engine.generate and through a Batcher of
    `slots` rows on the model's device: the same stream, the tool's output forced (mask 0), the
    stop at the end. The greedy tokens equal full recomputation's after the stream so far: the
    forced tokens went into the decode steps (both launch a step before the host reads the
    draws, with the forced tokens put in on the device). (Also tests/test_gpu.py's, on CUDA.)"""
    import nanochat.batching as batching
    import nanochat.engine as eng
    s = tokenizer.encode_special
    script = [s("<|python_start|>")] + tokenizer.encode("6*7") + [s("<|python_end|>")]
    tokens = tokenizer.encode("q", prepend="<|bos|>")
    streams = []
    for module, make in ((eng, lambda: Engine(model, tokenizer)),
                         (batching, lambda: Batcher(Engine(model, tokenizer), slots))):
        seq = iter(script + [None] * 10 + [s("<|assistant_end|>")] * 50)  # None: the model's greedy choice

        def scripted(logits, rng, t, k, seq=seq):
            tok = next(seq)
            return logits.argmax(-1) if tok is None else torch.full((logits.size(0),), tok, device=logits.device)
        monkeypatch.setattr(module, "sample_next", scripted)
        runner = make()
        # (a logit bias sends the batcher's draw through sample_next too, not its shared softmax; 0 changes nothing)
        streams.append(list(runner.generate(tokens, max_tokens=30, logit_bias={0: 0.0})))
        monkeypatch.undo()
    assert streams[0] == streams[1]
    got = [c[0] for c, _ in streams[1]]
    text = tokenizer.decode(got)
    assert text.startswith("<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|>"), text
    assert got[-1] == s("<|assistant_end|>") and [0] in [m for _, m in streams[1]]
    head = got.index(s("<|output_end|>")) + 1  # greedy tokens from here to the stop
    assert len(got) - 1 - head >= 4 and got[head:-1] == naive_generate(model, tokens + got[:head], len(got) - 1 - head)
    runner.close()


def test_a_closed_request_frees_its_rows_and_bad_requests_fail_clearly(tokenizer):
    model = model_for(tokenizer, "L", T=2048)  # long answers: they cannot end on their own during the test
    batcher = Batcher(engine_for(model, tokenizer), slots=3)
    tokens = tokenizer.encode("The", prepend="<|bos|>")
    gens = [batcher.generate(tokens, max_tokens=2000, temperature=0.0) for _ in range(3)]
    for gen in gens:
        next(gen)
    assert batcher.busy_rows == 3
    t0 = time.time()
    gens[0].close()  # clients gone: the batcher frees their rows at its next step
    gens[2].close()
    while batcher.busy_rows > 1 and time.time() - t0 < 5:
        time.sleep(0.01)
    assert batcher.busy_rows == 1 and len(batcher.active) == 1
    # rows 0 and 2 free (not consecutive): two samples there still equal the Engine's
    assert batcher.free == [0, 2]
    kw = dict(num_samples=2, max_tokens=8, temperature=1.0, seed=5)
    assert list(batcher.generate(tokens, **kw)) == list(engine_for(model, tokenizer).generate(tokens, **kw))
    gens[1].close()
    while batcher.busy_rows and time.time() - t0 < 10:
        time.sleep(0.01)
    assert batcher.busy_rows == 0 and batcher.active == []
    with pytest.raises(ValueError, match="batch_slots"):
        next(batcher.generate(tokens, num_samples=4))
    with pytest.raises(ValueError, match="more than the model can place"):
        next(batcher.generate(tokens, max_tokens=10 ** 6))
    # an admission that fails (a logit_bias id past the vocabulary) gives its error and loses no row
    with pytest.raises(IndexError):
        next(batcher.generate(tokens, max_tokens=3, logit_bias={10 ** 6: 1.0}))
    assert len(within(60, lambda: list(batcher.generate(tokens, num_samples=2, max_tokens=3, temperature=0.0)))) == 3
    assert batcher.busy_rows == 0
    batcher.close()


def test_a_failed_admission_loses_no_request_and_no_row(tokenizer, monkeypatch):
    """Two requests of different lengths admitted together, the first group's copy into the
    batch cache failing (out of memory, say): that request gets the error, the other one its
    answer, the request already decoding its answer too, and every row comes back. (Before, the
    error left the admission: the batch was reset, the other request never prefilled and its
    client waited forever.)"""
    from nanochat.gpt import ModelCache
    model = model_for(tokenizer, "L")
    batcher = Batcher(engine_for(model, tokenizer), slots=4)
    a = tokenizer.encode("int x = 1;", prepend="<|bos|>")
    c = tokenizer.encode("def f(x):\n    return", prepend="<|bos|>")
    assert len(a) != len(c)
    gate, prefill = threading.Event(), Batcher._prefill

    def gated(self, reqs):  # the first admission waits until both other requests are queued
        gate.wait(30)
        prefill(self, reqs)
    monkeypatch.setattr(Batcher, "_prefill", gated)
    real, calls = ModelCache.load_rows, []

    def failing_once(self, *args):
        calls.append(1)
        if len(calls) == 2:  # the second admission's first group
            raise RuntimeError("out of memory (a test)")
        return real(self, *args)
    monkeypatch.setattr(ModelCache, "load_rows", failing_once)
    out = {}

    def run(name, prompt, n):
        try:
            out[name] = list(batcher.generate(prompt, max_tokens=n, temperature=0.0))
        except RuntimeError as e:
            out[name] = e
    threads = [threading.Thread(target=run, args=("first", c, 40))]
    threads[0].start()
    time.sleep(0.2)  # held at the gate, in its admission
    threads += [threading.Thread(target=run, args=(name, p, 3)) for name, p in (("a", a), ("c", c))]
    for t in threads[1:]:
        t.start()
    t0 = time.time()
    while batcher.waiting.qsize() < 2 and time.time() - t0 < 30:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert set(out) == {"first", "a", "c"}, out  # nobody left waiting
    assert len(out["first"]) == 40
    failed = [name for name in ("a", "c") if isinstance(out[name], RuntimeError)]
    assert len(failed) == 1 and "out of memory" in str(out[failed[0]])
    assert len(out[({"a", "c"} - set(failed)).pop()]) == 3
    assert batcher.busy_rows == 0 and batcher.free == [0, 1, 2, 3]
    batcher.close()


def test_decode_step_with_a_position_per_row_equals_the_forward(tokenizer):
    """Rows at different positions in one decode step (pos_t of shape (B,)): each row's
    logits equal the full forward of its own sequence, with the quality recipe's windows."""
    model = model_for(tokenizer, "SSL", T=32, **EXTRAS["recipe"])
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 24))
    full = model(idx)
    cache = model.init_cache(2, 32)
    starts = [9, 14]
    for b, n in enumerate(starts):
        one = model.init_cache(1, 32)
        model(idx[b:b + 1, :n], cache=one)
        cache.load_rows(one, [b], [0])
    for step in range(8):
        pos = torch.tensor([n + step for n in starts])
        ids = torch.stack([idx[b, p] for b, p in enumerate(pos)]).view(2, 1)
        logits = model.decode_step(ids, cache, pos)
        for b in range(2):
            assert torch.allclose(logits[b], full[b, pos[b]], atol=1e-4), (step, b)


def test_submit_delivers_a_step_in_one_call(tokenizer):
    """Batcher.submit with a deliver hook (chat_web's way): each call carries at most one item
    per request (one call a step, not one per request), the columns are generate()'s, and a
    request cancelled before its turn gets only its end."""
    model = model_for(tokenizer, "L", T=64)
    batcher = Batcher(engine_for(model, tokenizer), slots=2)
    prompts = [tokenizer.encode(t, prepend="<|bos|>") for t in ("Once", "The cat", "Hi")]
    want = [[c for c, _ in batcher.generate(p, max_tokens=5, temperature=0.0)] for p in prompts]
    calls, got, ended = [], [[] for _ in prompts], threading.Event()
    lock = threading.Lock()

    def deliver(pairs):
        with lock:
            calls.append([sink for sink, item in pairs if item is not None])  # columns (a last one comes with its end)
        for sink, item in pairs:
            sink(item)
    batcher.deliver = deliver
    sinks = [lambda item, i=i: got[i].append(item) for i in range(len(prompts))]
    reqs = [batcher.submit(p, sink, max_tokens=5, temperature=0.0) for p, sink in zip(prompts, sinks)]
    gone = batcher.submit(prompts[0], lambda item: (got.append([item]), ended.set()), max_tokens=5)
    gone.cancelled = True  # (two rows: it waits behind the others, then is dropped)
    assert ended.wait(60)
    t0 = time.time()
    while any(not g or g[-1] is not None for g in got[:3]) and time.time() - t0 < 60:
        time.sleep(0.01)
    assert got[3] == [None]
    assert [[c for c, _ in g[:-1]] for g in got[:3]] == want and all(g[-1] is None for g in got[:3])
    assert all(len(c) == len(set(map(id, c))) for c in calls) and max(map(len, calls)) == 2
    assert batcher.busy_rows == 0 and all(r.slots for r in reqs) and not gone.slots  # (the dropped one never got rows)
    batcher.close()


@pytest.mark.parametrize("extra", ["plain", "hybrid", "memory"])
def test_load_rows_places_prefilled_rows_anywhere(tokenizer, extra):
    """ModelCache.load_rows: rows of a two-prompt prefill copied (one repeated, into rows
    apart and out of order) into a longer cache decode as the full forward of their prompt;
    Engram's conv under mHC has a row per stream, Mamba-3's state its own shapes."""
    model = model_for(tokenizer, "SSL", T=32, **CASES[extra])
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 8))
    full = model(idx)
    src = model.init_cache(2, 16)
    model(idx[:, :7], cache=src)
    cache = model.init_cache(5, 32)
    cache.load_rows(src, [4, 0, 1], [1, 1, 0])
    prompt_of = {4: 1, 0: 1, 1: 0}
    ids = torch.zeros(5, 1, dtype=torch.long)
    pos = torch.zeros(5, dtype=torch.long)
    for r, p in prompt_of.items():
        ids[r, 0], pos[r] = idx[p, 7], 7
    logits = model.decode_step(ids, cache, pos)
    for r, p in prompt_of.items():
        assert torch.allclose(logits[r], full[p, 7], atol=1e-4), (extra, r)
    assert not torch.allclose(full[0, 7], full[1, 7], atol=1e-4)  # (the two prompts tell apart)


def test_batch_bench_runs_every_answer_to_max_tokens(tokenizer, tmp_path):
    """dev/batch_bench.py on the CPU: one line per request count, every answer max_tokens long."""
    import ast
    import os
    import shutil
    import subprocess
    import sys
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "dev/batch_bench.py", "--depth=1", "--slots=8", "--requests=3,8",
                          "--max_tokens=6", "--device_type=cpu", "--prefill_rows=3"], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ast.literal_eval(line) for line in out.stdout.splitlines()]
    prefill = rows.pop(0)  # --prefill_rows: the first line
    assert prefill["prefill_rows"] == 3 and prefill["first_ms_total"] >= 0 and prefill["again_ms_max"] > 0
    assert [(r["requests"], r["tokens"]) for r in rows] == [(3, 18), (8, 48)]
    assert all(r["tok_per_s"] > 0 and r["sample_ms_per_step"] > 0 for r in rows)


@pytest.mark.parametrize("extra", ["plain", "hybrid"])
def test_requests_to_the_end_of_the_cache_decode_ahead_safely(tokenizer, extra):
    """The next step is launched before the host has seen the drawn tokens: a request that ends
    with them whatever they are (here: at the very end of the batch cache, 256 positions)
    decodes a dummy at position 0 of its rows instead of a write past the cache, and the
    others (one admitted into those rows afterwards) still get the engine's tokens."""
    model = model_for(tokenizer, "L", T=256, **CASES[extra])
    torch.manual_seed(1)
    long = [tokenizer.get_bos_token_id()] + torch.randint(0, 200, (249,)).tolist()  # 6 positions left
    short = tokenizer.encode("int main() {", prepend="<|bos|>")
    jobs = [(long, dict(temperature=0.0)), (short, dict(max_tokens=20, temperature=0.0)),
            (short, dict(max_tokens=9, temperature=0.8, seed=5))]
    want = [list(engine_for(model, tokenizer).generate(p, **kw)) for p, kw in jobs]
    assert len(want[0]) == 7  # to the end of the context: 6 fed (250 + 6 = 256), the 7th only drawn
    assert run_together(Batcher(engine_for(model, tokenizer), slots=2), jobs) == want  # (the third waits for rows)
