"""
Continuous batching: many requests decoded together in one batch whose rows come and go.

The Engine (nanochat/engine.py) decodes one request at a time: its rows (samples of one
prompt) share one position. A server with many clients would then serve them one after
another. The Batcher keeps one decode cache of `slots` rows instead and a thread that loops:

1. admit: a waiting request with n samples takes n free rows: its prompt is prefilled
   (model(ids, cache=prefill), a cache of the prompt's length) and the prefill cache copied
   into those rows (ModelCache.load_rows); requests admitted together whose prompts have the
   same length share one prefill forward (a burst of clients: one forward, not one each);
2. sample: each request picks its rows' next tokens from their logits exactly as
   Engine.generate does (its own seeded generator, temperature, top-k, penalties, logit
   bias, the Python tool's forced tokens; requests with the same temperature and top k
   share one softmax over all rows, each drawing its own noise) and hands them to its
   consumer (generate()'s stream, or submit()'s sink: each step's items for every request
   go out in one Batcher.deliver call); a request that is finished (every row stopped,
   max_tokens, the end of the context) or abandoned frees its rows;
3. step: one GPT.decode_step for the first m rows, each row at its own position (pos_t of
   shape (m,)), m the fewest of a few sizes (slots, slots / 4, ...) that hold every request
   (rows are taken lowest first); on CUDA one captured graph per size, as the Engine's.
   Free rows decode a dummy token at position 0 of their own row, which the next admission
   overwrites. The step is launched before step 2's host work, straight from the tokens drawn
   on the device (a row's waiting tool output put in there: the host knows it a token early),
   so that the host turns one step's tokens into text while the GPU computes the next (a
   request that ends with the drawn tokens decodes a dummy at position 0 there too); the host
   waits only for the draws.

So a request's tokens are the ones Engine.generate gives for the same arguments (greedy:
the same tokens; sampled: the same draws from the same generator), up to the float
rounding of a different batch size. Speculative decoding (one request at a time) is not
used here. A tool call runs on the decode thread, as in Engine.generate: while the sandbox
runs it (up to 3 s) every row waits, since a row's recurrent state (Mamba-3, Engram, the
smear) cannot sit out a step.
"""

import queue
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch

from nanochat.engine import (Row, adjust_logits, bias_vector, cache_length, capture_graph, forced_in, next_column,
                             request_length, sample_next, top_k_probs)


PREFILL_TOKENS = 4096  # the most prompt tokens prefilled in one forward (its fp32 logits: 4,096 x vocab)


class Request:
    def __init__(self, tokens, n, max_len, max_tokens, temperature, top_k, rng, penalties, bias, rows, sink):
        self.tokens, self.n, self.max_len, self.max_tokens = tokens, n, max_len, max_tokens
        self.temperature, self.top_k, self.rng = temperature, top_k, rng
        self.penalties, self.bias, self.bias_t, self.counts = penalties, bias, None, None
        self.rows = rows  # Row per sample (tool state, forced tokens, done)
        self.sink = sink  # gets (column, masks) per step, then None (or an exception), through Batcher.deliver
        self.slots, self.logits, self.pos, self.produced = [], None, len(tokens), 0
        self.cancelled = False
        self.submitted = time.perf_counter()


class Batcher:
    def __init__(self, engine, slots=32, autocast=None, use_cuda_graphs=True):
        """engine: the Engine whose model, tokenizer, compiled step and tool settings this uses.
        slots: rows of the shared decode cache (requests' samples decoded at once).
        autocast: a context manager factory for the decode thread (chat_web's worker's).
        self.deliver (settable): how a step's items reach their requests' sinks, called once
        per step on the decode thread with [(sink, item), ...]; None: each sink called there
        (chat_web hands the whole list to its event loop instead: one wakeup a step, not one
        thread per request)."""
        self.engine, self.model, self.slots = engine, engine.model, slots
        self.autocast = autocast or nullcontext
        self.cache_len = cache_length(self.model, self.model.config.sequence_len)
        self.waiting = queue.Queue()
        self.first = None  # the request first in line, waiting for enough free rows (first come, first served)
        self.active = []
        self.free = list(range(slots))  # kept sorted: requests take the lowest rows
        # the decode steps' row counts: slots, and slots / 4, / 16, / 64 while at least 8
        self.sizes = sorted({slots} | {slots >> k for k in (2, 4, 6) if slots >> k >= 8})
        self.use_cuda_graphs = use_cuda_graphs
        self._stepper = None  # made by the thread on its first step
        self._ready = None  # (CUDA) marks each step's draws copied to the host
        self._closed = False
        self.first_token_s = deque(maxlen=1000)  # the last requests' waits from submit() to their first token
        self.deliver = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="batcher")
        self._thread.start()

    @property
    def busy_rows(self):
        return self.slots - len(self.free)

    @property
    def queued(self):  # requests waiting for rows
        return self.waiting.qsize() + (self.first is not None)

    # ---- the consumer's side ---------------------------------------------------

    def generate(self, tokens, num_samples=1, **kwargs):
        """Engine.generate's stream (token column, mask column) per step for one request,
        decoded in the shared batch (kwargs: submit's). Blocks while waiting for free rows.
        Closing the generator (a consumer that goes away) frees the request's rows at the
        batcher's next step."""
        out = queue.Queue()
        req = self.submit(tokens, out.put, num_samples, **kwargs)
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            req.cancelled = True

    def submit(self, tokens, sink, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
               frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None):
        """Queue one request (Engine.generate's arguments); sink(item) gets its (token column,
        mask column) per step, then None at the end or an exception, through self.deliver.
        Returns the request: setting its .cancelled frees its rows at the next step (its sink
        still gets the None)."""
        if num_samples > self.slots:
            raise ValueError(f"{num_samples} samples need more rows than the batcher's {self.slots} (--batch_slots)")
        model = self.model
        max_len = request_length(tokens, max_tokens, model.config.sequence_len, min(model.rotary_len, self.cache_len))
        device = self.engine.device
        req = Request(list(tokens), num_samples, max_len, max_tokens, temperature, top_k,
                      torch.Generator(device=device).manual_seed(seed), (frequency_penalty, presence_penalty),
                      logit_bias, [Row(self.engine.tokenizer) for _ in range(num_samples)], sink)
        self.waiting.put(req)
        return req

    # ---- the decode thread ---------------------------------------------------------

    def close(self, timeout=60):
        """Stop the decode thread once the requests in flight are done (no new ones after this),
        and wait up to `timeout` s for it to end: a daemon thread still inside torch when the
        interpreter shuts down can abort the process ("terminate called without an active
        exception", seen once from dev/batch_bench.py in CI)."""
        self.waiting.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self):
        if self.engine.device.type == "cuda":  # this thread's kernels, streams and graph on the model's GPU
            torch.cuda.set_device(self.engine.device)
        while not self._closed or self.active:
            try:
                with torch.inference_mode(), self.autocast():
                    self._admit(block=not self.active)
                    if not self.active:
                        continue
                    drawn = self._draw()
                    # the next step starts now, reading the draws on the device (tool output waiting
                    # to be forced put in there), while this thread turns them into text: the host's
                    # work overlaps the GPU's step
                    self._step(forced_in(drawn[0], [row for req in self.active for row in req.rows]))
                    self._sample(drawn)
            except Exception as e:  # every request in flight gets the error; the batcher goes on
                self._deliver([(req.sink, e) for req in self.active])
                self._reset()

    def _deliver(self, pairs):
        if not pairs:
            return
        if self.deliver is not None:
            self.deliver(pairs)
        else:
            for sink, item in pairs:
                sink(item)

    def _reset(self):
        self.active, self.free, self._stepper = [], list(range(self.slots)), None  # (self.first keeps its turn)

    def _admit(self, block):
        """Waiting requests into free rows, first come first served; those admitted together
        whose prompts have the same length are prefilled in one forward."""
        ready, free = [], len(self.free)
        while free > 0:
            req, self.first = self.first, None
            if req is None:
                try:
                    req = self.waiting.get(block=block)
                except queue.Empty:
                    break
                if req is None:  # close()
                    self._closed = True
                    break
            block = False
            if req.cancelled:  # gone before its turn: its end only
                self._deliver([(req.sink, None)])
                continue
            if req.n > free:  # not enough rows yet: it stays first in line until others end
                self.first = req
                break
            ready.append(req)
            free -= req.n
        groups = {}
        for req in ready:
            groups.setdefault(len(req.tokens), []).append(req)
        for length, reqs in groups.items():
            per = max(1, PREFILL_TOKENS // length)
            for i in range(0, len(reqs), per):
                self._prefill(reqs[i:i + per])

    def _prefill(self, reqs):
        """One forward for prompts of one length, into a cache of their length; then each
        request takes its rows (a row is taken only once everything that may fail has not)."""
        model, device = self.model, self.engine.device
        try:
            if self._stepper is None:
                self._make_stepper()
            prefill = model.init_cache(len(reqs), cache_length(model, len(reqs[0].tokens)), device=device)
            ids = torch.tensor([r.tokens for r in reqs], dtype=torch.long, device=device)
            logits = model(ids, cache=prefill)[:, -1, :].float()
        except Exception as e:
            self._deliver([(req.sink, e) for req in reqs])
            return
        rows, src_rows, failed, admitted = [], [], [], []
        for i, req in enumerate(reqs):
            try:
                req.bias_t = bias_vector(req.bias, logits.size(-1), device)
                if any(req.penalties) or req.bias:
                    req.counts = torch.zeros(req.n, logits.size(-1), device=device)
            except Exception as e:
                failed.append((req.sink, e))
                continue
            req.logits = logits[i:i + 1].expand(req.n, -1)
            req.slots, self.free = self.free[:req.n], self.free[req.n:]
            rows, src_rows = rows + req.slots, src_rows + [i] * req.n
            admitted.append(req)
        self._deliver(failed)  # (first: a failing copy below must not keep their errors from them)
        try:
            if rows:  # every admitted row in one copy per cache tensor (a copy per row was ~40 small kernels)
                self.cache.load_rows(prefill, rows, src_rows)
        except Exception as e:  # (out of memory, say): these requests get the error and give their rows back
            self.free = sorted(self.free + rows)
            self._deliver([(req.sink, e) for req in admitted])
            return
        self.active += admitted

    def _make_stepper(self):
        """The batch cache, and a decode step (on CUDA a captured graph) for each of a few row
        counts: a step decodes only the first m rows, the fewest that hold every request in
        flight (rows are taken lowest first), so a lightly loaded batch reads less of the cache."""
        model, device = self.model, self.engine.device
        self.cache = model.init_cache(self.slots, self.cache_len, device=device)
        step_and_argmax = self.engine._step_fn()
        step = lambda ids, cache, pos: step_and_argmax(ids, cache, pos)[0]  # (the logits: rows are sampled each)
        self._steppers = {}
        for m in self.sizes:
            ids = torch.zeros(m, 1, dtype=torch.long, device=device)
            pos = torch.zeros(m, dtype=torch.long, device=device)
            head = self.cache.head(m)
            if device.type != "cuda" or not self.use_cuda_graphs:
                fn = (lambda ids, head, pos: lambda: step(ids, head, pos))(ids, head, pos)
            else:
                pos.fill_(self.cache_len - 1)  # the dummy steps write where decoding overwrites before reading
                graph, logits = capture_graph(lambda: step(ids, head, pos), head)
                fn = (lambda graph, logits: lambda: (graph.replay(), logits)[1])(graph, logits)
            self._steppers[m] = (ids, pos, fn)
        self._stepper = self._steppers[self.slots][2]

    @staticmethod
    def _span(req):
        """The request's slots as a slice where they are consecutive (its rows are then a view), else None."""
        s = req.slots
        return slice(s[0], s[0] + len(s)) if s[-1] - s[0] == len(s) - 1 else None

    @classmethod
    def _rows(cls, t, req):
        """The request's rows of t (one per slot): a view where its slots are consecutive (no copy)."""
        span = cls._span(req)
        return t[req.slots] if span is None else t[span]

    def _draw(self):
        """Every active row's next token drawn on the device, in request order: (the tokens,
        their copy on the way to the host, an event that marks the copy done, on CUDA)."""
        draws, greedy, groups = [], None, {}
        for req in self.active:
            plain = req.logits is None and req.counts is None  # plain: its rows of this step's logits
            if plain and req.temperature < 1e-5:
                if greedy is None:  # every plain greedy row's argmax in one kernel
                    greedy = self._logits.argmax(dim=-1)
                draws.append(self._rows(greedy, req))
            elif plain and self._span(req) is not None:
                # sample_next's draw, shared: one softmax (top k) over every row for all requests with
                # the same settings, each request's noise drawn from its own generator into its rows
                # (the shape sample_next draws, so the same numbers), one argmax per group below
                key = (req.temperature, req.top_k)
                if key not in groups:
                    probs, idx = top_k_probs(self._logits, *key)
                    groups[key] = (probs, idx, torch.empty_like(probs))
                groups[key][2][self._span(req)].exponential_(1, generator=req.rng)
                draws.append(key)
            else:  # a first token (the prefill's logits), penalties or bias, or rows apart
                logits = req.logits if req.logits is not None else self._rows(self._logits, req)
                if req.counts is not None:
                    logits = adjust_logits(logits, req.counts, req.penalties[0], req.penalties[1], req.bias_t)
                draws.append(sample_next(logits, req.rng, req.temperature, req.top_k).view(-1))
        for key, (probs, idx, noise) in groups.items():  # each group's ids, every row
            drawn = (probs / noise).argmax(dim=-1, keepdim=True)  # (rows of no request: garbage, not read)
            groups[key] = (drawn if idx is None else idx.gather(1, drawn)).view(-1)
        draws = [self._rows(groups[d], req) if isinstance(d, tuple) else d for d, req in zip(draws, self.active)]
        flat = torch.cat(draws)
        host = flat.to("cpu", non_blocking=True)  # (into pinned memory on CUDA: a step launched after it
        ready = None                              # does not delay it)
        if flat.is_cuda:
            if self._ready is None:
                self._ready = torch.cuda.Event()
            ready = self._ready
            ready.record()
        return flat, host, ready

    @staticmethod
    def _ends_now(req):
        """The request ends with this step's token whatever the token is (cancelled, max_tokens, or
        the end of its context); asked before req.produced counts that token."""
        return (req.cancelled or (req.max_tokens is not None and req.produced + 1 >= req.max_tokens)
                or req.pos >= req.max_len)

    def _sample(self, drawn):
        """The drawn tokens to each request's consumer (forced tool output first, stops, text), and
        the requests that are done out (their rows freed); the next step was launched already
        (_step)."""
        engine = self.engine
        _, host, ready = drawn
        if ready is not None:
            ready.synchronize()  # the draws only, not the step launched after them
        sampled = host.tolist()  # one host sync for every request
        still, i, out = [], 0, []
        for req in self.active:
            column, masks = next_column(req.rows, sampled[i:i + req.n], engine.stop_tokens, engine.use_tools)
            i += req.n
            if not req.cancelled:
                out.append((req.sink, (column, masks)))
            if req.produced == 0:
                self.first_token_s.append(time.perf_counter() - req.submitted)
            if req.counts is not None:
                req.counts[torch.arange(req.n, device=req.counts.device),
                           torch.tensor(column, device=req.counts.device)] += 1
            ends = all(r.done for r in req.rows) or self._ends_now(req)  # (before produced counts this token)
            req.produced += 1
            if ends:
                self.free = sorted(self.free + req.slots)  # (before the end reaches the consumer)
                out.append((req.sink, None))
            else:
                still.append(req)
        self.active = still
        self._stepped(still)
        self._deliver(out)

    def _step(self, flat):
        """One decode step of the rows in use, from their next tokens still on the device (before
        _sample; a request that ends with them decodes a dummy at position 0 of its rows, freed
        after)."""
        top = max(s for req in self.active for s in req.slots) + 1
        m = min(m for m in self.sizes if m >= top)
        static_ids, static_pos, stepper = self._steppers[m]
        pos = [0] * m
        for req in self.active:
            if not self._ends_now(req):  # (an ending request's position may be past the cache)
                for s in req.slots:
                    pos[s] = req.pos
        # (rows of no request keep a stale token: a dummy at their position 0)
        slots = [s for req in self.active for s in req.slots]
        static_ids.view(-1).index_copy_(0, torch.tensor(slots, device=flat.device), flat)
        static_pos.copy_(torch.tensor(pos, dtype=torch.long))
        # (on CUDA the graph's output tensor: read by the next _draw, before the next replay)
        self._logits = stepper().float()

    @staticmethod
    def _stepped(reqs):
        for req in reqs:
            req.logits = None  # its rows of self._logits from now on (the prefill's logits until then)
            req.pos += 1
