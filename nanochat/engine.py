"""
The inference engine: prefill once, then decode token by token from a cache, for one or
many samples of the same prompt, with the Python tool in the loop.

- Prefill: the prompt goes through the model once, at batch 1, filling a cache that
  the model builds layer by layer (model.init_cache: each mixer makes its own state,
  KV for attention); that cache is then copied into num_samples rows.
- Decode: all rows advance one position per step. The step is GPT.decode_step, whose
  shapes never change (static cache, position as a device tensor), so on CUDA it is
  torch.compile'd (with programmatic dependent launch on Hopper and newer: decode_compile_args)
  and captured once as a CUDA graph, then replayed every step.
- Sampling: temperature (0 = greedy), top-k, and a seeded torch.Generator; optionally
  OpenAI's logit adjustments first (adjust_logits: frequency and presence penalties
  on each row's own sampled tokens, and a per-token logit_bias).
- Stopping: a row is done at <|assistant_end|> or <|bos|>; generation ends when every
  row is done or max_tokens is reached.
- Tool use: each row runs a small state machine (ToolState). Tokens between
  <|python_start|> and <|python_end|> are collected; at <|python_end|> the expression is
  evaluated (plain arithmetic directly, anything else in the execution sandbox) and
  <|output_start|> result <|output_end|> is forced into that row's stream, one token
  per step, in place of sampling. Forced tokens come back with mask 0.
"""

import re
from collections import deque
from functools import partial

import torch
import torch.nn.functional as F

from nanochat.common import logger

def torch_has_pdl():
    import torch._inductor.config as inductor_config
    return hasattr(inductor_config.triton, "enable_pdl")  # (not in torch 2.9; in 2.11)


def decode_compile_args(mode, pdl, device):
    """torch.compile's arguments for the decode step: `mode` (None: the default), and with `pdl`
    on an NVIDIA GPU of compute capability 9 or more (Hopper; ROCm reports its own numbers
    through the same call, so not there) whose torch has the setting, inductor's
    programmatic dependent launch (triton.enable_pdl: each kernel may start while the one before
    it finishes, its launch and prologue hidden behind that one's tail). A batch-1 decode step is
    ~140 small kernels back to back: on an H200 (d12) it took 0.470 ms a step without, 0.416 with
    (docs/benchmarks.md). torch.compile takes a mode or options, not both: the mode becomes its
    options here."""
    if not (pdl and device.type == "cuda" and torch.version.hip is None and torch_has_pdl()
            and torch.cuda.get_device_capability(device)[0] >= 9):
        return {"mode": mode}
    from torch._inductor import list_mode_options
    return {"options": {**list_mode_options(mode or "default"), "triton.enable_pdl": True}}


def top_k_probs(logits, temperature, top_k):
    """softmax(logits / temperature) over each row's top k: (B, k) probabilities and their
    ids, or over all of the row: (B, V) and None (top_k None or <= 0: no cut)."""
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(vals / temperature, dim=-1), idx
    return torch.softmax(logits / temperature, dim=-1), None


def sample_next(logits, rng, temperature=1.0, top_k=None):
    """(B, V) logits -> (B,) token ids. Temperatures below 1e-5 are greedy: sampling
    is the argmax there anyway, and dividing by them would overflow to inf (NaN probs)."""
    if temperature < 1e-5:
        return logits.argmax(dim=-1)
    probs, idx = top_k_probs(logits, temperature, top_k)
    # torch.multinomial(probs, 1)'s own draw (exponential noise from rng, argmax of probs / noise:
    # the same numbers from the same generator) without its validity checks, which read the GPU
    # twice a call: a host sync per token here, per request per step in the batcher
    noise = torch.empty_like(probs).exponential_(1, generator=rng)
    drawn = (probs / noise).argmax(dim=-1, keepdim=True)
    return (drawn if idx is None else idx.gather(1, drawn)).squeeze(1)


def sampling_probs(logits, temperature=1.0, top_k=None):
    """(B, V) logits -> the (B, V) distribution sample_next draws from at temperature > 0
    (zero outside the top k): what speculative sampling compares drafts against."""
    probs, idx = top_k_probs(logits, temperature, top_k)
    return probs if idx is None else torch.zeros_like(logits, dtype=probs.dtype).scatter(-1, idx, probs)


def cache_length(model, n):
    """The cache length for n positions: rounded up to a multiple of 256, so requests of many
    lengths share a few shapes (and compiled steps and graphs), at most the rotary tables' reach."""
    return min(-(-n // 256) * 256, model.rotary_len)


def request_length(tokens, max_tokens, context, reach):
    """The positions a request fills: its prompt and max_tokens new ones (None: up to the
    model's context), at least one new; a clear error for no prompt or past `reach`."""
    if not tokens:
        raise ValueError("generate needs at least one prompt token (e.g. <|bos|>)")
    max_len = context if max_tokens is None else len(tokens) + max_tokens
    max_len = max(max_len, len(tokens) + 1)
    if max_len > reach:
        raise ValueError(f"prompt + max_tokens = {max_len} tokens is more than the model can place ({reach})")
    return max_len


def adjust_logits(logits, counts, frequency_penalty=0.0, presence_penalty=0.0, bias=None):
    """OpenAI's logit adjustments: (B, V) logits minus frequency_penalty per time a token
    already came out in that row (counts, (B, V)), minus presence_penalty once it has,
    plus bias ((V,), logit_bias as a dense vector)."""
    logits = logits.float() - frequency_penalty * counts - presence_penalty * (counts > 0).float()
    return logits if bias is None else logits + bias


_ARITHMETIC = re.compile(r"^[\d\s+\-*/().%,]+$")


def run_tool(expression, timeout=3.0):
    """The Python tool: the value of an expression (or what a snippet prints), as text;
    None if it fails. Plain arithmetic is evaluated here with no names available;
    anything else runs in the sandbox (nanochat/execution.py)."""
    expression = expression.strip()
    if not expression:
        return None
    if _ARITHMETIC.match(expression) and "**" not in expression:  # no power: 9**9**9 would hang us
        try:  # thousands separators as GSM8K writes them ("1,200*2"), as nanochat's calculator
            return str(eval(expression.replace(",", ""), {"__builtins__": {}}, {}))
        except Exception:
            return None
    from nanochat.execution import execute_code
    lines = expression.splitlines()
    # a single expression prints its value; a snippet prints what it prints
    code = f"print({expression})" if len(lines) == 1 and _is_expression(expression) else expression
    try:
        result = execute_code(code, timeout=timeout)
    except Exception as e:  # the sandbox could not start (a full /tmp, no fork): this tool call fails, not the batch
        logger.warning(f"the Python tool could not run: {e!r}")
        return None
    return result.stdout.strip() if result.success else None


def _is_expression(text):
    try:
        compile(text, "<tool>", "eval")
        return True
    except Exception:  # SyntaxError; RecursionError for 'not not ... x' thousands deep; ValueError for a NUL byte
        return False


class ToolState:
    """Per-row tool-use state machine. feed(token) returns the tokens to force next."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        s = tokenizer.encode_special
        self.python_start, self.python_end = s("<|python_start|>"), s("<|python_end|>")
        self.output_start, self.output_end = s("<|output_start|>"), s("<|output_end|>")
        self.in_python, self.expr = False, []

    def feed(self, token):
        if token == self.python_start:
            self.in_python, self.expr = True, []
        elif token == self.python_end and self.in_python:
            self.in_python = False
            result = run_tool(self.tok.decode(self.expr))
            if result is not None:
                return [self.output_start] + self.tok.encode(result) + [self.output_end]
        elif self.in_python:
            self.expr.append(token)
        return []


def pooled(pool, length, make, model, *key):
    """pool[(length, autocast dtype, *key)] when it is there and not busy (a live generator's),
    else make(); kept in pool, most recent last, while the lengths add up to at most the cache
    length of a context-long request (the memory of one such cache), the least recently used
    out. Longer than that: made, not kept. A kept graph replays as it was captured, hence the
    autocast dtype in the key."""
    limit = cache_length(model, model.config.sequence_len)
    if length > limit:
        return make()
    dev = model.wte.weight.device.type
    k = (length, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None, *key)
    item = pool.pop(k, None)
    if item is None or item.busy:
        item = make()
    pool[k] = item
    while sum(n for n, *_ in pool) > limit:
        pool.pop(next(iter(pool)))
    return item


def argmax_rows(x, chunk=1024):
    """x.argmax(-1) of a (B, V) tensor in two stages: each chunk of the row its max and that
    max's first index, then the first chunk of the greatest max. The same index (the first
    of a row's maxima; NaN counts as the max in both), but compiled, the first stage runs as
    one program per chunk, where an argmax over one long row ran as one program per row
    (9.5 us for 32,768 logits on an H200, a batch-1 decode step being ~275 us)."""
    B, V = x.shape
    n = -(-V // chunk)
    best, where = F.pad(x, (0, n * chunk - V), value=float("-inf")).view(B, n, chunk).max(dim=-1)
    j = best.argmax(dim=-1, keepdim=True)
    return (j * chunk + where.gather(-1, j)).squeeze(-1)


def decode_and_argmax(model, ids, cache, pos_t, advance=False):
    """model.decode_step's logits and their argmax, the greedy tokens: one function, so that
    compiled, the argmax runs in the step's own kernels. advance: the argmax also goes into ids
    and pos_t moves on by one, in place: the next step's inputs, so that greedy decoding
    through a CUDA graph replays it with no copies in between (Engine._make_stepper)."""
    logits = model.decode_step(ids, cache, pos_t)
    greedy = argmax_rows(logits)
    if advance:
        ids.copy_(greedy.view(ids.shape))
        pos_t.add_(1)
    return logits, greedy


class Decoder:
    """A decode cache and its step function (ids (B,), pos) -> (logits (B, V), greedy ids (B,))."""

    def __init__(self, cache, step):
        self.cache, self.step, self.busy = cache, step, False


class Row:
    def __init__(self, tokenizer):
        self.tool = ToolState(tokenizer)
        self.forced = deque()
        self.done = False


def next_column(rows, sampled, stop_tokens, use_tools):
    """Each row's next token (its forced tool output first, else the sampled one) and its mask
    (0 where forced); rows are done at a stop token, and the others feed their token to the tool."""
    column, masks = [], []
    for row, tok in zip(rows, sampled):
        forced = bool(row.forced)
        tok = row.forced.popleft() if forced else tok
        column.append(tok)
        masks.append(0 if forced else 1)
        if tok in stop_tokens:
            row.done = True
        if use_tools and not row.done:  # a finished row's tokens are thrown away: run no tool for them
            row.forced.extend(row.tool.feed(tok))
    return column, masks


def forced_in(column, rows):
    """column (the drawn tokens, on the device) with each row's next forced tool token in place
    of its draw: what next_column will give, known before the host reads the draws (so the next
    decode step can start from the device's copy)."""
    at = [i for i, r in enumerate(rows) if r.forced]
    if not at:
        return column
    tokens = [rows[i].forced[0] for i in at]
    return column.index_put((torch.tensor(at, device=column.device),), torch.tensor(tokens, device=column.device))


def bias_vector(logit_bias, vocab, device):
    """logit_bias ({token id: bias}) as a dense (vocab,) vector, or None."""
    if not logit_bias:
        return None
    bias = torch.zeros(vocab, device=device)
    bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), dtype=torch.float, device=device)
    return bias


def capture_graph(fn, cache):
    """fn (no arguments, fixed shapes, reading static tensors) as one CUDA graph: (graph, fn's
    outputs, refreshed by each replay). Warmed up three times on a side stream (compiles,
    autotunes; a step that advances its own inputs advances them three times) and
    captured; fn's writes land at cache positions that decoding overwrites before reading
    them, and the state not indexed by position (the smear's "previous" token) is restored
    after the dummy runs."""
    snap = cache.snapshot()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    cache.restore(snap)
    return graph, out


class Engine:
    def __init__(self, model, tokenizer, use_cuda_graphs=True, use_tools=True, speculative=True):
        self.model, self.tokenizer = model, tokenizer
        self.use_cuda_graphs, self.use_tools = use_cuda_graphs, use_tools
        self.speculative = speculative  # decode with the MTP modules where the model has them
        self.spec_stats = {}
        self._compiled_step = None
        self.compile_mode = None  # torch.compile's mode for the decode step (engine_bench --compile_mode)
        # programmatic dependent launch in the compiled decode step and MTP rounds where it exists (above);
        # read when they are first compiled
        self.pdl = True
        self._decoders = {}  # batch-1 decoders kept between calls: (cache length, autocast) -> Decoder, oldest first
        self._rounds = {}  # the same for the speculative rounds (mtp.Rounds)
        s = tokenizer.encode_special
        self.stop_tokens = {s("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    @property
    def device(self):
        return self.model.wte.weight.device

    # ---- the decode step -----------------------------------------------------

    def _step_fn(self):
        """The decode step (ids, cache, pos) -> (logits (B, V), their argmax (B,)), compiled on
        CUDA: the greedy token comes out of the step's own kernels (ATen's argmax over a
        32K vocabulary after the graph was 10 us of a 0.29 ms batch-1 step; docs/benchmarks.md)."""
        step = partial(decode_and_argmax, self.model)
        if self.device.type == "cuda" and self._compiled_step is None:
            self._compiled_step = torch.compile(step, dynamic=False,
                                                **decode_compile_args(self.compile_mode, self.pdl, self.device))
        return self._compiled_step or step

    def _make_stepper(self, cache, batch):
        """A function (ids (B,), pos int) -> (logits (B, V), greedy ids (B,)). On CUDA: one
        captured graph, replayed. It leaves its greedy ids and pos + 1 as its own next inputs
        (decode_and_argmax's advance), so a greedy step fed the last step's greedy ids at the
        next position copies nothing in; other inputs (sampled, forced) take two small copies."""
        step = self._step_fn()
        dev = self.device
        if dev.type != "cuda" or not self.use_cuda_graphs:
            return lambda ids, pos: step(ids.view(-1, 1), cache, torch.tensor(pos, device=dev))
        static_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        # the three dummy steps write at the cache's last positions, which decoding overwrites before reading
        static_pos = torch.full((), cache.max_len - 3, dtype=torch.long, device=dev)
        graph, static_out = capture_graph(lambda: step(static_ids, cache, static_pos, advance=True), cache)
        inputs_are = [None]  # the position the graph's own inputs are at now (None: not a greedy continuation)

        def run(ids, pos):
            if not (ids is static_out[1] and pos == inputs_are[0]):
                static_ids.copy_(ids.view(-1, 1))
                static_pos.fill_(pos)
            graph.replay()
            inputs_are[0] = pos + 1
            return static_out
        return run

    def _decoder(self, batch, cache_len):
        """A Decoder of `batch` rows over cache_len positions. Batch-1 ones are kept between
        calls (pooled): on CUDA making one means capturing a graph (three warm-up steps and
        the capture), which cost more than the prefill itself in the time to the first token."""
        def make():
            cache = self.model.init_cache(batch, cache_len, device=self.device)
            return Decoder(cache, self._make_stepper(cache, batch))
        return pooled(self._decoders, cache_len, make, self.model) if batch == 1 else make()

    # ---- generation ----------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                 frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None, speculative=None):
        """Streams (token_column, mask_column) per step: the next token of each row, and
        1 where it was sampled, 0 where the tool forced it. Rows that are done keep
        producing (ignored) tokens until all are done, so the batch stays in lockstep.
        frequency_penalty, presence_penalty and logit_bias ({token id: bias}) adjust the
        logits before sampling, as OpenAI's parameters of those names (adjust_logits).
        speculative: self-speculative decoding with the model's MTP modules (nanochat/mtp.py),
        the same tokens (greedy) or the same distribution (sampled) in fewer forwards; one
        sample, no logit adjustments. Greedy on models with one MTP module and attention-only
        layers: one CUDA graph per round (speculative_static); else plain PyTorch
        (speculative_generate), with a host sync per draft. None (the default): on for
        greedy requests that the CUDA-graph rounds serve, unless the Engine was made with
        speculative=False; True: wherever it applies. A tool call ends a speculative stretch:
        its output is forced and decoding goes on from a new prefill. self.spec_stats then
        counts the drafted and accepted tokens."""
        model, device = self.model, self.device
        max_len = request_length(tokens, max_tokens, model.config.sequence_len, model.rotary_len)
        adjust = bool(frequency_penalty or presence_penalty or logit_bias)
        self.spec_stats = {}
        if speculative is None:  # by default only where it is expected to be faster: the CUDA-graph rounds
            from nanochat.mtp import static_ready
            speculative = (self.speculative and num_samples == 1 and not adjust and temperature < 1e-5
                           and static_ready(model))
        rng = torch.Generator(device=device).manual_seed(seed)
        if speculative:
            if num_samples != 1 or adjust:
                raise ValueError("speculative decoding runs one sample, without logit adjustments")
            # (None: to the context, as below: the last token is drawn, never placed, hence the + 1)
            n = max_len - len(tokens) + 1 if max_tokens is None else max_tokens
            yield from self._speculative(list(tokens), n, temperature, top_k, rng)
            return
        cache_len = cache_length(model, max_len)
        prefill = model.init_cache(1, cache_len, device=device)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, cache=prefill)[:, -1, :]         # prefill, batch 1
        if num_samples > 1:
            logits = logits.expand(num_samples, -1)
        decoder = self._decoder(num_samples, cache_len) if len(tokens) < max_len else None
        if decoder is not None:
            decoder.cache.load(prefill)  # into every row
            decoder.busy = True
        del prefill  # not kept beside the decode cache
        try:  # a Decoder is busy until this generator ends or is closed
            rows = [Row(self.tokenizer) for _ in range(num_samples)]
            pos, produced = len(tokens), 0
            if adjust:
                counts = torch.zeros(num_samples, logits.size(-1), device=device)
                bias = bias_vector(logit_bias, logits.size(-1), device)
            # one step ahead: the next decode step is launched with the device's copy of the column
            # before the host reads it, so the GPU is not idle while the host reads the tokens, runs
            # the rows' tool and stop logic and the caller handles the column (the forced tokens are
            # known one token early). The last step launched may be for nothing: it writes cache
            # position `pos`, which a next request overwrites before reading.
            host = torch.empty(num_samples, dtype=torch.long, pin_memory=device.type == "cuda")
            read = torch.cuda.Event() if device.type == "cuda" else None
            greedy = None  # the decode step's argmax of logits (None after the prefill)
            while True:
                if adjust:
                    logits = adjust_logits(logits, counts, frequency_penalty, presence_penalty, bias)
                if greedy is not None and temperature < 1e-5 and not adjust:  # = sample_next's argmax, computed
                    drawn = greedy
                else:
                    drawn = sample_next(logits, rng, temperature, top_k)
                column = forced_in(drawn, rows)
                host.copy_(column, non_blocking=True)
                if read is not None:
                    read.record()
                if adjust:
                    counts[torch.arange(num_samples, device=device), column] += 1
                produced += 1
                last = (max_tokens is not None and produced >= max_tokens) or pos >= max_len
                if not last:
                    logits, greedy = decoder.step(column, pos)
                    pos += 1
                if read is not None:
                    read.synchronize()
                col, masks = next_column(rows, host.tolist(), self.stop_tokens, self.use_tools)
                yield col, masks
                if last or all(r.done for r in rows):
                    break
        finally:
            if decoder is not None:
                decoder.busy = False

    def _speculative(self, tokens, max_tokens, temperature, top_k, rng):
        from nanochat.mtp import speculative_generate, speculative_static, static_ready
        if temperature < 1e-5 and static_ready(self.model) and len(tokens) + max_tokens < self.model.rotary_len:
            # one MTP module, attention only: fixed-shape rounds, each one CUDA graph
            graph = self.device.type == "cuda" and self.use_cuda_graphs
            gen = speculative_static(self.model, tokens, max_tokens, self.spec_stats, cuda_graph=graph, pool=self._rounds,
                                     pdl=self.pdl)
        else:
            gen = speculative_generate(self.model, tokens, max_tokens, self.spec_stats, temperature, top_k, rng)
        tool, out = ToolState(self.tokenizer) if self.use_tools else None, []
        for tok in gen:
            out.append(tok)
            yield [tok], [1]
            if tok in self.stop_tokens:
                return
            forced = tool.feed(tok)[:max_tokens - len(out)] if tool else []
            if forced:  # the tool's output goes in as the model's input: a new prefill after it
                gen.close()
                for f in forced:
                    yield [f], [0]
                rest = max_tokens - len(out) - len(forced)
                if rest > 0:
                    yield from self._speculative(tokens + out + forced, rest, temperature, top_k, rng)
                return

    def generate_batch(self, tokens, num_samples=1, keep_stop=False, **kwargs):
        """All samples at once: (token lists, mask lists), each without the prompt and, unless
        keep_stop, without the stop token (keep_stop: a row that stopped ends with it, mask 1:
        the model sampled it, and RL trains on it)."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if tok in self.stop_tokens:
                    done[i] = True
                    if keep_stop:
                        results[i].append(tok)
                        masks[i].append(m)
                else:
                    results[i].append(tok)
                    masks[i].append(m)
        return results, masks


@torch.inference_mode()
def naive_generate(model, tokens, max_tokens):
    """Greedy decoding by full recomputation, no cache: the reference the engine must match."""
    ids = list(tokens)
    device = model.wte.weight.device
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(tokens):]
