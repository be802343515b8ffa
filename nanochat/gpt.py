"""
The GPT: nanochat's Transformer, with a per-layer plan so that later mixers (Mamba-3,
DeepSeek sparse attention) and extras (Engram) slot in without growing if-chains.

Choices, one line each:
- rotary position embeddings (RoPE, base 10000) on queries and keys, no learned positions;
- QK-norm: RMSNorm on q and k after RoPE, which keeps attention logits bounded;
- ReLU^2 MLP (Primer, So et al. 2021), 4x wide, no biases anywhere;
- untied token embedding and unembedding (lm_head), so each can have its own lr;
- parameter-free RMSNorm (F.rms_norm without a weight): before each mixer/MLP, after
  the embedding and before lm_head;
- grouped-query attention: n_kv_head key/value heads shared by n_head query heads;
- logit soft-capping: 15 * tanh(logits / 15) (Gemma 2), computed in fp32;
- under autocast the residual stream itself is bf16 (cast after the embedding), as the
  matmul outputs added to it are bf16 anyway; this halves elementwise memory traffic;
- sliding windows from a pattern string over layers, e.g. "SSSL": S = half the
  context, L = full context, tiled over depth; the last layer is always L;
- width from depth: n_embd = depth * aspect_ratio rounded up to a multiple of
  head_dim (128), n_head = n_embd / head_dim (GPT.config_for_depth);
- init: embedding N(0, 1); lm_head N(0, 0.001); q, k, v and MLP-in uniform with std
  1/sqrt(n_embd); both output projections zero, so every block starts as the identity;
- built on the meta device and materialized with to_empty + init_weights, so large
  models never allocate twice;
- inference state lives in a cache object made by init_cache(); each mixer makes its own
  part, so the engine never assumes attention.

Each layer's sequence mixer is chosen by `layer_plan(config)`; every mixer is called
as `mixer(x, ctx, cache)`: x (B, T, C), ctx the per-forward context shared by all layers
(rotary tables, masks, position offset), cache that layer's inference state or None.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"    # per-layer S (half context) / L (full), tiled over depth
    softcap: float = 15.0

    def to_dict(self):
        return asdict(self)


def norm(x):
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


def layer_plan(config):
    """For each layer: (mixer kind, attention window in tokens). The one place that
    decides what each layer is; Block builds whatever this says."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - set("SL"):
        raise ValueError(f"window_pattern {config.window_pattern!r} must be a non-empty string of S and L")
    windows = {"S": config.sequence_len // 2, "L": config.sequence_len}
    plan = [("attn", windows[pattern[i % len(pattern)]]) for i in range(config.n_layer)]
    plan[-1] = ("attn", config.sequence_len)  # the last layer always sees the full context
    return plan


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x1, x2) = (first half, second half) of each head by position angles."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

# -----------------------------------------------------------------------------
# Attention


class Context:
    """What one forward pass shares across layers: rotary tables for its positions, the
    position offset (pos0 > 0 when decoding with a cache), and cached attention masks.
    For the static one-token decode step (GPT.decode_step) the position is a device
    tensor instead, and decode_masks hold each window's mask over the whole cache."""

    def __init__(self, cos, sin, pos0, T, block_masks, pos_t=None, decode_masks=None):
        self.cos, self.sin, self.pos0, self.T = cos, sin, pos0, T
        self.block_masks = block_masks  # {window: flex_attention BlockMask}, CUDA training only
        self.pos_t, self.decode_masks = pos_t, decode_masks


def sliding_window_mask(q_len, k_len, pos0, window, device):
    """Boolean (q_len, k_len) mask: query at absolute position pos0+i sees key j
    iff j <= pos0+i and pos0+i-j < window."""
    qpos = torch.arange(pos0, pos0 + q_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    return (kpos <= qpos) & (qpos - kpos < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window, self.layer_idx = window, layer_idx
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head}: "
                             "n_embd must divide by n_head and n_head by n_kv_head")
        C, D = config.n_embd, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(self.n_head * D, C, bias=False)

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, ctx.cos, ctx.sin), apply_rotary_emb(k, ctx.cos, ctx.sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            if ctx.pos_t is not None:  # static decode: write at a device-side position, read the whole cache
                k, v = cache.write(k, v, ctx.pos_t)
            else:
                k, v = cache.update(k, v, ctx.pos0)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may keep another dtype than autocast's
        y = self.attend(q, k, v, ctx)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, ctx):
        gqa = self.n_head != self.n_kv_head
        T, S = q.size(2), k.size(2)
        if ctx.decode_masks is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.decode_masks[self.window], enable_gqa=gqa)
        if T == S and ctx.pos0 == 0 and self.window >= T:
            # full causal attention: SDPA picks flash / cuDNN on GPU
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if self.window in ctx.block_masks and T == S:
            # sliding window during GPU training: flex_attention skips the masked-out blocks
            return flex_attention(q, k, v, block_mask=ctx.block_masks[self.window], enable_gqa=gqa)
        # CPU, or decoding with a cache: an explicit boolean mask
        mask = sliding_window_mask(T, S, ctx.pos0, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def init_cache(self, batch_size, max_len, device, dtype):
        return KVCache(batch_size, self.n_kv_head, max_len, self.head_dim, device, dtype)


def flex_attention(q, k, v, block_mask, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention as _flex
    return _flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class KVCache:
    """Keys and values of one attention layer, preallocated to max_len positions."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k, v, pos0):
        T = k.size(2)
        if pos0 + T > self.k.size(2):
            raise ValueError(f"KV cache of {self.k.size(2)} positions is full (need {pos0 + T})")
        self.k[:, :, pos0:pos0 + T] = k
        self.v[:, :, pos0:pos0 + T] = v
        return self.k[:, :, :pos0 + T], self.v[:, :, :pos0 + T]

    def write(self, k, v, pos_t):
        """One position given as a device tensor: same shapes every step (CUDA graphs)."""
        self.k.index_copy_(2, pos_t.view(1), k.to(self.k.dtype))
        self.v.index_copy_(2, pos_t.view(1), v.to(self.v.dtype))
        return self.k, self.v

    def repeat(self, n):
        """Copy a batch-1 cache (a shared prefill) into n rows."""
        self.k, self.v = self.k.repeat(n, 1, 1, 1), self.v.repeat(n, 1, 1, 1)


MIXERS = {"attn": CausalSelfAttention}

# -----------------------------------------------------------------------------
# Blocks and the model


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, mixer_kind, window):
        super().__init__()
        self.mixer = MIXERS[mixer_kind](config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, ctx, cache=None):
        x = x + self.mixer(norm(x), ctx, cache)
        x = x + self.mlp(norm(x))
        return x


class ModelCache:
    """Inference state for every layer plus the number of positions already filled."""

    def __init__(self, layers, max_len):
        self.layers, self.pos, self.max_len = layers, 0, max_len

    def repeat(self, n):
        for layer in self.layers:
            layer.repeat(n)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.plan = layer_plan(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i, kind, w) for i, (kind, w) in enumerate(self.plan))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables for 10x the training context, so inference can run past it
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._block_masks = {}

    @staticmethod
    def config_for_depth(depth, vocab_size=32768, sequence_len=2048, aspect_ratio=64, head_dim=128,
                         n_kv_head=None, window_pattern="L"):
        """nanochat sizes a model by depth alone: width = depth * aspect_ratio, rounded
        up to whole heads of head_dim."""
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                         n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)

    @staticmethod
    def _rotary_tables(length, head_dim, base=10000.0, device=None):
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialize every parameter and buffer; call after to_empty() from meta."""
        C = self.config.n_embd
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) / math.sqrt(C)  # uniform with std 1/sqrt(C)
        for block in self.blocks:
            for name, p in block.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.zeros_(p)
                elif p.dim() == 2:
                    nn.init.uniform_(p, -bound, bound)
        cos, sin = self._rotary_tables(self.rotary_len, C // self.config.n_head, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token: 6 * (parameters outside the embedding lookup) for the
        matmuls (2 forward + 4 backward per weight), plus attention scores and values:
        12 * n_head * head_dim * (keys each query sees, the window capped at the context)
        per layer. Like nanochat (and PaLM's MFU), attention is counted without the
        causal half-saving, so MFU is comparable with their figures."""
        c = self.config
        matmul = 6 * (self.num_params() - self.wte.weight.numel())
        head_dim = c.n_embd // c.n_head
        attn = sum(12 * c.n_head * head_dim * min(w, c.sequence_len) for _, w in self.plan)
        return matmul + attn

    @torch.compiler.disable
    def _context(self, T, pos0, device):
        if pos0 + T > self.rotary_len:
            raise ValueError(f"sequence of {pos0 + T} positions is longer than the rotary tables ({self.rotary_len})")
        cos, sin = self.cos[:, pos0:pos0 + T], self.sin[:, pos0:pos0 + T]
        masks = {}
        if device.type == "cuda" and pos0 == 0 and self.training:
            for _, w in self.plan:
                if w < T:
                    masks[w] = self._block_mask(T, w, device)
        return Context(cos, sin, pos0, T, masks)

    def _block_mask(self, T, window, device):
        key = (T, window, str(device))
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            def mask_mod(b, h, q, k):
                return (k <= q) & (q - k < window)
            self._block_masks[key] = create_block_mask(mask_mod, None, None, T, T, device=device)
        return self._block_masks[key]

    def init_cache(self, batch_size, max_len, device=None, dtype=None):
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        return ModelCache([b.mixer.init_cache(batch_size, max_len, device, dtype) for b in self.blocks], max_len)

    def forward(self, idx, targets=None, cache=None, loss_reduction="mean"):
        """idx (B, T) token ids. With targets: the loss (ignore_index -1). Without: logits
        (B, T, vocab) in fp32. With a cache: positions continue from cache.pos."""
        B, T = idx.shape
        pos0 = cache.pos if cache is not None else 0
        ctx = self._context(T, pos0, idx.device)
        x = norm(self.wte(idx))
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the compute dtype (bf16): every norm and residual add moves
            # half the bytes; measured +3.7% tok/s and -6 GiB at d20 on an H100
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, cache.layers[i] if cache is not None else None)
        x = norm(x)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(x).float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def decode_step(self, idx, cache, pos_t):
        """Logits (B, vocab) for one new token per row at position pos_t (a 0-dim device
        tensor), written into the cache. Every shape is fixed whatever the position, so
        the engine can compile this and replay it as a CUDA graph. Attention reads the
        whole cache under a mask; the caller keeps cache.pos."""
        cos = self.cos.index_select(1, pos_t.view(1))
        sin = self.sin.index_select(1, pos_t.view(1))
        kpos = torch.arange(cache.max_len, device=idx.device)
        masks = {w: ((kpos <= pos_t) & (pos_t - kpos < w)).view(1, 1, 1, -1) for w in {w for _, w in self.plan}}
        ctx = Context(cos, sin, None, 1, {}, pos_t=pos_t, decode_masks=masks)
        x = norm(self.wte(idx))
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block(x, ctx, layer_cache)
        logits = self.lm_head(norm(x[:, -1])).float()
        return self.config.softcap * torch.tanh(logits / self.config.softcap)

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0, adam_betas=(0.8, 0.95)):
        """Muon for the 2D matrices inside blocks; AdamW for the embedding, the lm_head
        and anything else (scalars, biases of later extensions). AdamW learning rates
        scale as 1/sqrt(n_embd / 768), tuned at 768 (nanochat's rule). Both optimizers
        split their work across DDP ranks when a process group is up."""
        from nanochat.adamw import DistAdamW
        from nanochat.muon import Muon
        scale = (self.config.n_embd / 768) ** -0.5
        matrix = [p for p in self.blocks.parameters() if p.dim() == 2]
        scalars = [p for p in self.blocks.parameters() if p.dim() != 2]
        groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
                  dict(params=[self.wte.weight], lr=embedding_lr * scale)]
        if scalars:
            groups.append(dict(params=scalars, lr=scalar_lr))
        adamw = DistAdamW(groups, betas=adam_betas, eps=1e-10, weight_decay=0.0)
        muon = Muon(matrix, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        for opt in (adamw, muon):
            for g in opt.param_groups:
                g["initial_lr"] = g["lr"]
        return [adamw, muon]

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Plain sampling with a KV cache, one sequence; yields token ids. The engine
        (nanochat/engine.py) does batched sampling and tool use; this is for quick samples."""
        device = self.wte.weight.device
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        cache = self.init_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, cache=cache)[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                ids = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                ids = torch.argmax(logits, dim=-1, keepdim=True)
            yield ids.item()


def build_model(config, device):
    """Construct on the meta device, then materialize on `device` and initialize."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
