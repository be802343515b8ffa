"""
Multi-token prediction (MTP), sequential as in DeepSeek-V3 (arXiv:2412.19437, §2.2).

D modules (config.mtp_depth) extend the main model's prediction one more token each,
keeping the causal chain: module k sees the representation of module k-1 at position i
and the embedding of token t_{i+k}, and predicts t_{i+k+1}. With h^0 the main model's
final hidden state:

    h'^k_i = M_k [ RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k})) ]      M_k: Linear(2C, C)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                 one causal Transformer block
    P^k_{i+k+1} = OutHead(h^k_i)                                      the main lm_head, softcapped
    L^k = CE(P^k, t) over the valid targets;   L = L_main + (lambda / D) sum_k L^k

Emb and OutHead are the main model's wte and lm_head (shared, not copied). The norms are
parameter-free (nanochat's), so feeding the post-final-norm trunk output is the same as
feeding the pre-norm one. TRM_k is gpt.Block with full-context attention.

Indexing with nanochat's tensors (targets[:, i] = idx[:, i+1], -1 = ignore): module k
works on positions i < T-k, reads its input token t_{i+k} from idx[:, k:] (every input
token is known there, also where the main target is masked, so a -1 never indexes wte
and a masked target does not hide the MTP target after it), and its target t_{i+k+1}
is targets[:, k:]. Only the last k positions of each row, whose target lies past the
row, are dropped. Each L^k is normalised by its own count of valid targets.

The modules add to the training loss; the forward without targets and decode_step never
run them. At inference they draft tokens for self-speculative decoding, greedy or sampled
(speculative_generate, below; the Engine uses it for models that have the modules).
"""

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import Context, norm


class MTP(nn.Module):
    def __init__(self, config):
        super().__init__()
        from nanochat.gpt import Block, LayerSpec  # gpt imports this module
        C, D = config.n_embd, config.mtp_depth
        if D < 1:
            raise ValueError(f"mtp_depth={D}: must be a positive number of MTP modules")
        self.proj = nn.ModuleList(nn.Linear(2 * C, C, bias=False) for _ in range(D))  # M_k
        spec = LayerSpec("attn", config.sequence_len)
        plain = dataclasses.replace(config, mhc=False)  # the modules run on the reduced hidden state, one stream
        self.blocks = nn.ModuleList(Block(plain, config.n_layer + k, spec) for k in range(D))  # TRM_k

    @torch.no_grad()
    def init_weights(self):
        """M_k uniform with std 1/sqrt(2C): its input is two unit-rms halves, so h' starts
        at unit rms (a zero M_k would feed RMSNorm zeros, whose gradient blows up). The
        blocks' attention and MLP are modules of the mixer contract: GPT.init_weights and
        opt_tags reach them on their own."""
        for proj in self.proj:
            bound = math.sqrt(3) / math.sqrt(proj.in_features)
            nn.init.uniform_(proj.weight, -bound, bound)

    def opt_tags(self):
        return {f"proj.{k}.weight": "muon" for k in range(len(self.proj))}

    def flops_per_token(self, T, lm_head_weights):
        """Training FLOPs per token (counted over all T positions, though module k runs
        on T-k): M_k, the block, and one more lm_head pass per module."""
        return sum(6 * p.weight.numel() + b.mixer.flops_per_token(T) + 6 * sum(q.numel() for q in b.mlp.parameters())
                   + 6 * lm_head_weights for p, b in zip(self.proj, self.blocks))

    def forward(self, h, idx, targets, wte, logits, cos, sin, reduction="mean", run_block=None):
        """(1/D) sum_k L^k. h: (B, T, C) the main model's final hidden state; wte, logits:
        the main model's embedding and its softcapped head (a function of hidden states);
        cos, sin: the rotary tables of positions 0..T-1. reduction "mean": each L^k is
        the mean over its valid targets (0 when it has none); "sum": their sum.
        run_block(block, h, ctx): how the main model runs a block (GPT.run_block, which
        checkpoints it under gradient checkpointing); default: block(h, ctx)."""
        T = idx.size(1)
        total = torch.zeros((), device=h.device)
        for k, (proj, block) in enumerate(zip(self.proj, self.blocks), start=1):
            n = T - k
            if n <= 0:
                break
            e = norm(wte(idx[:, k:])).to(h.dtype)                # t_{i+k}, i < T-k
            h = proj(torch.cat([norm(h[:, :n]), e], dim=-1))    # h'^k
            ctx = Context(cos[:, :n], sin[:, :n], 0, n, {})
            h = block(h, ctx) if run_block is None else run_block(block, h, ctx)
            z = logits(norm(h))
            target = targets[:, k:]                              # t_{i+k+1}
            ce = F.cross_entropy(z.reshape(-1, z.size(-1)), target.reshape(-1), ignore_index=-1, reduction="sum")
            total = total + (ce if reduction == "sum" else ce / (target >= 0).sum().clamp(min=1))
        return total / len(self.blocks)


class Drafter:
    """The MTP modules' inference state for speculative decoding: each module's own KV
    cache, the hidden states h[k] (h[0] the main model's, h[k] module k's output), and the
    token ids (true ones up to position n, the main model's cache length, then the
    drafts). Module k at position i reads ids[i + k], a draft when i + k > n, so done[k]
    counts its leading positions whose inputs were all true; its cache and h[k] are exact
    there, and it recomputes from there on each draft. Its block is attention only, so
    rewinding its position is exact (stale KV entries are overwritten before they are read)."""

    def __init__(self, model, max_len):
        D, C = len(model.mtp.blocks), model.config.n_embd
        device, dtype = model.wte.weight.device, model.wte.weight.dtype
        self.model = model
        self.kv = [b.mixer.init_cache(1, max_len, device, dtype) for b in model.mtp.blocks]
        self.h = torch.zeros(D + 1, 1, max_len, C, device=device, dtype=dtype)
        self.ids = torch.zeros(1, max_len + D + 1, dtype=torch.long, device=device)
        self.n, self.done = 0, [0] * (D + 1)

    def accept(self, tokens, h):
        """The main model's cache grew by the m positions of h (its final hidden states);
        tokens: the m + 1 true ids at positions n .. n + m (the last one its next token)."""
        m = h.size(1)
        self.h[0, :, self.n:self.n + m] = h
        self.ids[0, self.n:self.n + m + 1] = torch.tensor(tokens, device=self.ids.device)
        self.n += m
        # module k's position i read ids[i + k]; only those before n were true then (n held
        # a rejected draft, now the main model's own token, or was not read yet)
        self.done = [max(0, min(d, self.n - k)) for k, d in enumerate(self.done)]

    def draft(self, d, pick=None):
        """d <= D draft ids after position n, module k drafting ids[n + k] from its last
        position; pick: its logits (1, V) -> (1,) id, the argmax unless given (sampling)."""
        model, n = self.model, self.n
        for k, (proj, block) in enumerate(zip(model.mtp.proj[:d], model.mtp.blocks[:d]), start=1):
            a = self.done[k]  # positions a .. n-1 are new or were computed from drafts
            e = norm(model.wte(self.ids[:, a + k:n + k]))
            x = proj(torch.cat([norm(self.h[k - 1, :, a:n]), e], dim=-1))
            x = block(x, Context(model.cos[:, a:n], model.sin[:, a:n], a, n - a, {}), self.kv[k - 1])
            self.h[k, :, a:n], self.done[k] = x, n
            logits = model._logits(norm(x[:, -1]))
            self.ids[:, n + k] = pick(logits) if pick else logits.argmax(-1)
        return self.ids[0, n + 1:n + 1 + d].tolist()


def greedy_choice(logits, block):
    """verify's rule at temperature 0: the drafts kept while each equals the model's argmax
    at the position before it, and the model's argmax after them: (n kept, next token)."""
    greedy = logits.argmax(-1).tolist()
    n = 0
    while n < len(block) - 1 and block[n + 1] == greedy[n]:
        n += 1
    return n, greedy[n]


def verify(model, cache, block, choose=greedy_choice):
    """One main forward over block = [its next token, drafts...] from cache.pos. Keeps the
    drafts that choose(logits (len(block), V), block) accepts (greedy_choice: the longest
    prefix equal to its own greedy choices): returns (n accepted, its next
    token after them, its hidden states at the 1 + n kept positions); the cache then holds
    exactly those positions. Rollback: attention rewinds cache.pos (its entries past it are
    overwritten before they are read, exact); state that is not indexed by position
    (Mamba-3, Engram, the smear's prev_emb) is restored from a snapshot taken before the
    block and advanced again over the kept tokens (exact: the same forward on true tokens)."""
    pos0, snap = cache.pos, cache.snapshot()
    ids = torch.tensor([block], device=model.wte.weight.device)
    logits, h = model(ids, cache=cache, return_hidden=True)
    n, t_next = choose(logits[0], block)
    if n < len(block) - 1:
        cache.pos = pos0 + n + 1
        if snap[0] is not None or any(s is not None for s in snap[1]):
            cache.restore(snap)
            cache.pos = pos0
            _, h = model(ids[:, :n + 1], cache=cache, return_hidden=True)
    return n, t_next, h[:, :n + 1]


def static_ready(model):
    """Whether speculative_static can serve the model: one MTP module, and every layer's
    cache indexed by position (attention only, no Engram), so a rejected draft needs no
    rollback beyond the smear's previous embedding."""
    return model.config.mtp and model.config.mtp_depth == 1 and model.position_indexed()


def static_round(model, cache, mcache, blk, pos_t):
    """One round of speculative decoding with one MTP module, in fixed shapes and without a
    host sync, so that it can be one CUDA graph. blk (1, 2) = [t, d]: the main model's next
    token t, at position pos_t, and the draft d after it. Returns (g, acc, t', d'): g (1, 2)
    the main model's greedy tokens after t and after d, acc (1,) whether d == g[0] (kept),
    then the next round's token and draft. The main model's and the module's caches get
    positions pos_t and pos_t + 1; when d is rejected, the entries at pos_t + 1 are
    overwritten by the next round before they are read, and the smear's previous
    embedding is set to the last kept token's (the only state not indexed by position)."""
    h = model.decode_hidden(blk, cache, pos_t)                  # (1, 2, C)
    g = model._logits(h).argmax(-1)
    acc = g[:, 0] == blk[:, 1]
    keep = acc.long().view(-1, 1)                               # the last kept position: 0 or 1
    if cache.prev_emb is not None:
        cache.prev_emb.copy_(norm(model.wte(blk.gather(1, keep))))
    # module 1 at positions p, p+1 reads h there and the tokens at p+1, p+2: g[0], the true
    # token after t whether d was kept or not, and g[1], true when d was kept
    ctx = model.decode_context(g, pos_t, mcache.k.size(2), {model.config.sequence_len})
    x = model.mtp.proj[0](torch.cat([norm(h), norm(model.wte(g))], dim=-1))
    drafts = model._logits(norm(model.mtp.blocks[0](x, ctx, mcache))).argmax(-1)  # for p+2 (from p) and p+3
    return g, acc, g.gather(1, keep), drafts.gather(1, keep)


_compiled_rounds = {}  # pdl -> static_round compiled once per process (recompiled only for another cache length)


def _round_runner(model, cache, mcache, blk, pos_t, cuda_graph, pdl=True):
    """static_round as a function of no arguments: plain, or compiled (with programmatic
    dependent launch where pdl and the GPU allow: engine.decode_compile_args) and captured
    as one CUDA graph (warmed up at the cache's last two positions, which every round writes
    before it reads them, with the smear's state restored after)."""
    if not cuda_graph:
        return lambda: static_round(model, cache, mcache, blk, pos_t)
    from nanochat.engine import capture_graph, decode_compile_args
    if pdl not in _compiled_rounds:
        _compiled_rounds[pdl] = torch.compile(static_round, dynamic=False, **decode_compile_args(None, pdl, pos_t.device))
    step = _compiled_rounds[pdl]
    pos_t.fill_(cache.max_len - 2)
    graph, out = capture_graph(lambda: step(model, cache, mcache, blk, pos_t), cache)
    return lambda: (graph.replay(), out)[1]


class Rounds:
    """What the fixed-shape rounds run on: the main cache, module 1's cache, the round's two
    input ids and position, and the round itself (run: a captured CUDA graph with
    cuda_graph=True). Made before the prefill, which is then loaded into its caches, so it
    can be kept for the next request (Engine: the capture cost more than the prefill)."""

    def __init__(self, model, max_len, cuda_graph, pdl=True):
        dev, dtype = model.wte.weight.device, model.wte.weight.dtype
        # module 1's cache as the Drafter makes it (not a whole Drafter: its hidden-state buffer is large)
        self.cache = model.init_cache(1, max_len)
        self.mcache = model.mtp.blocks[0].mixer.init_cache(1, max_len, dev, dtype)
        self.blk = torch.zeros(1, 2, dtype=torch.long, device=dev)
        self.pos_t = torch.zeros((), dtype=torch.long, device=dev)
        self.run = _round_runner(model, self.cache, self.mcache, self.blk, self.pos_t, cuda_graph, pdl)
        self.busy = False

    def load(self, cache, mcache):
        self.cache.load(cache)
        for dst, src in zip(self.mcache.tensors(), mcache.tensors(), strict=True):
            dst.copy_(src)


@torch.inference_mode()
def speculative_static(model, tokens, max_tokens, stats=None, cuda_graph=False, pool=None, pdl=True):
    """speculative_generate for static_ready models, one fixed-shape round per step
    (static_round; one CUDA graph with cuda_graph=True) and one host sync per round to
    read its tokens. The same tokens as greedy decoding, up to argmax ties within the
    rounding difference between a two-token forward and one token at a time. pool: a dict
    that keeps the rounds' caches and graph between calls (engine.pooled; the Engine's); pdl:
    the compiled round with programmatic dependent launch where it exists (Engine.pdl)."""
    if not static_ready(model):
        raise ValueError("speculative_static needs one MTP module and attention-only layers without Engram")
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0), stats.setdefault("accepted", 0)  # a caller's dict adds up
    n, dev = len(tokens), model.wte.weight.device
    max_len = n + max_tokens + 1  # a round writes one position past the last token it keeps
    if max_len > model.rotary_len:
        raise ValueError(f"{n} prompt + {max_tokens} new tokens are longer than the rotary tables ({model.rotary_len})")
    from nanochat.engine import cache_length, pooled
    max_len = cache_length(model, max_len)  # as the engine: fewer lengths to compile for

    def make():
        return Rounds(model, max_len, cuda_graph, pdl)
    rounds = make() if pool is None else pooled(pool, max_len, make, model, cuda_graph)  # before the first token
    cache, drafter = model.init_cache(1, max_len), Drafter(model, max_len)
    logits, h = model(torch.tensor([tokens], device=dev), cache=cache, return_hidden=True)
    t = int(logits[0, -1].argmax())
    drafter.accept(list(tokens) + [t], h)  # the module over the prompt drafts d; the rounds then own its cache
    d = drafter.draft(1)[0]
    rounds.load(cache, drafter.kv[0])
    rounds.busy = True
    del cache, drafter  # copied into the rounds' own
    try:  # busy until this generator ends or is closed
        yield t
        p, produced = n, 1
        while produced < max_tokens:
            rounds.blk.copy_(torch.tensor([[t, d]]))
            rounds.pos_t.fill_(p)
            g, acc, t_next, d_next = rounds.run()
            g0, g1, kept, t_next, d_next = torch.cat([g[0], acc.long(), t_next[0], d_next[0]]).tolist()
            new = [d, g1] if kept else [g0]  # kept: d == g0
            stats["drafted"] += 1
            stats["accepted"] += kept
            yield from new[:max_tokens - produced]
            produced, p, t, d = produced + len(new), p + len(new), t_next, d_next
    finally:
        rounds.busy = False


@torch.inference_mode()
def speculative_generate(model, tokens, max_tokens, stats=None, temperature=0.0, top_k=None, rng=None):
    """Self-speculative decoding with the MTP modules; yields max_tokens ids. Greedy
    (temperature 0): the same tokens as greedy decoding, in fewer main forwards when drafts
    are accepted (token for token, up to argmax ties within the rounding difference between
    a forward over a few positions and one position at a time). Sampled (temperature > 0,
    top_k as Engine.generate): the same distribution as sampling token by token. DeepSeek-V3
    (arXiv:2412.19437, §2.2 and §5.4.3) proposes its MTP module for this; draft-then-verify
    is Leviathan et al. 2023 (arXiv:2211.17192), with the model drafting for itself as in
    Medusa (Cai et al. 2024), here from its sequential MTP modules:

      1. the main model has its next token t and final hidden state h at the last position;
      2. draft: module 1 reads (h, t) and drafts d_1, module k reads module k-1's state
         and d_{k-1} and drafts d_k (up to D = mtp_depth drafts), each the argmax of its
         logits, or sampled from q_k (its logits under the same temperature and top-k);
      3. verify: one main forward over [t, d_1 .. d_D] with the cache, p_k the main model's
         distribution at the position before d_k. Greedy: accept d_1 .. d_n while each
         equals the argmax of p_k. Sampled (Leviathan et al.'s rule): accept d_k with
         probability min(1, p_k(d_k) / q_k(d_k)); at the first rejection sample the next
         token from max(0, p_k - q_k), renormalised, and stop; if all are accepted, sample
         one more from p_{D+1}. Either way n + 1 tokens per forward;
      4. roll the rejected positions back in every cache (verify) and in the modules' (Drafter).

    Batch 1; plain PyTorch (speculative_static is the CUDA-graph path for one module on
    attention-only models, greedy). stats, a dict, gets "drafted" and "accepted" added to
    (the acceptance rate is accepted / drafted); rng: a torch.Generator on the model's device."""
    from nanochat.engine import sample_next, sampling_probs
    if not model.config.mtp:
        raise ValueError("speculative decoding drafts with the MTP modules: this model has none (train with --mtp)")
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0), stats.setdefault("accepted", 0)
    dev = model.wte.weight.device
    sampled = temperature >= 1e-5
    if sampled and rng is None:
        rng = torch.Generator(device=dev).manual_seed(0)
    qs = []  # the drafts' distributions, in order

    def pick(logits):  # a draft sampled from q_k
        qs.append(sampling_probs(logits, temperature, top_k)[0])
        return torch.multinomial(qs[-1], 1, generator=rng)

    def choose(logits, block):  # Leviathan et al.'s accept / resample rule
        p = sampling_probs(logits, temperature, top_k)
        for k, q in enumerate(qs):
            d = block[k + 1]
            if torch.rand((), generator=rng, device=dev) * q[d] < p[k, d]:  # probability min(1, p/q)
                continue
            rest = (p[k] - q).clamp_min(0)
            rest = rest if rest.sum() > 0 else p[k]  # p == q: no rejection, only rounding
            return k, int(torch.multinomial(rest, 1, generator=rng))
        return len(qs), int(torch.multinomial(p[len(qs)], 1, generator=rng))

    max_len = len(tokens) + max_tokens
    cache, drafter = model.init_cache(1, max_len), Drafter(model, max_len)
    logits, h = model(torch.tensor([tokens], device=dev), cache=cache, return_hidden=True)
    t = int(sample_next(logits[:, -1], rng, temperature, top_k))
    drafter.accept(list(tokens) + [t], h)
    yield t
    produced = 1
    while produced < max_tokens:
        qs.clear()
        d = min(model.config.mtp_depth, max_tokens - produced - 1)  # none past the budget
        drafts = drafter.draft(d, pick if sampled else None)
        n, t_next, h = verify(model, cache, [t] + drafts, choose if sampled else greedy_choice)
        stats["drafted"] += len(drafts)
        stats["accepted"] += n
        new = drafts[:n] + [t_next]
        drafter.accept([t] + new, h)
        yield from new
        produced, t = produced + len(new), t_next
