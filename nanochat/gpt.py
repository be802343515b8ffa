"""
The GPT: nanochat's Transformer, built from a per-layer plan so that other sequence
mixers (Mamba-3, DeepSeek sparse attention) and per-layer extras (Engram) slot in as
modules of their own, without if-chains here.

Choices, one line each:
- rotary position embeddings and QK-norm in attention (nanochat/attention.py);
- ReLU^2 MLP (Primer, So et al. 2021), 4x wide, no biases anywhere;
- untied token embedding and unembedding (lm_head), so each can have its own lr;
- parameter-free RMSNorm (F.rms_norm without a weight): before each mixer/MLP, after
  the embedding and before lm_head;
- logit soft-capping: 15 * tanh(logits / 15) (Gemma 2), computed in fp32;
- under autocast the residual stream itself is bf16 (cast after the embedding), as the
  matmul outputs added to it are bf16 anyway; this halves elementwise memory traffic;
- sliding windows from a pattern string over layers, e.g. "SSSL": S = half the
  context, L = full context, tiled over depth; the last layer is always L;
- width from depth: n_embd = depth * aspect_ratio rounded up to a multiple of
  head_dim (128), n_head = n_embd / head_dim (GPT.config_for_depth);
- init: embedding N(0, 1); lm_head N(0, 0.001); every other module initialises its
  own parameters (init_weights) and names each one's optimizer group (opt_tags):
  GPT.init_weights and setup_optimizers follow those, never tensor shapes;
- built on the meta device and materialized with to_empty + init_weights, so large
  models never allocate twice;
- optional mHC (nanochat/mhc.py): n residual streams, each mixer and MLP wrapped in a
  manifold-constrained hyper-connection, initialised to equal this pre-norm residual;
- inference state lives in a cache object made by init_cache(); each mixer makes its own
  part, so the engine never assumes attention;
- optional DeepSeek-V3 multi-token prediction (config.mtp, nanochat/mtp.py): extra
  modules that add to the training loss; the forward and decode_step never run them,
  only greedy self-speculative decoding does (mtp.speculative_generate);
- gradient checkpointing is a runtime switch the training script sets from outside
  (model.gradient_checkpointing, like model.kernel), not a config field: each block's
  activations are then recomputed in backward (GPT.run_block); on XLA nanochat/tpu.py
  also sets model.checkpoint_block (torch_xla's checkpoint) and model.flash (the
  Pallas flash attention), the model's only hooks for TPU training.

Each layer's sequence mixer and extras come from `layer_plan(config)`, one LayerSpec per
layer; the mixer class is MIXERS[spec.mixer], called as `mixer(x, ctx, cache)` (the
contract is in nanochat/attention.py's docstring; docs/model.md says how to add one).
"""

import copy
import importlib.util
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanochat import attention
from nanochat.attention import (CausalSelfAttention, Context, block_masks, decode_masks, linear, norm,
                                prefill_attention, rotary_tables)
from nanochat.dsa import SparseAttention
from nanochat.engram import Engram, layer_hash_params
from nanochat.mamba3 import Mamba3
from nanochat.mhc import HyperConnection

SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding (reference nanochat)


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
    # extensions (off by default; saved in checkpoints so later stages rebuild the same model)
    mamba_pattern: str = ""      # e.g. "AAM": A = attention, M = Mamba-3, tiled over depth ("" = none)
    mamba3_qknorm: bool = False  # Mamba-3's parts (nanochat/mamba3.py); all off = Mamba-2's SSD without conv
    mamba3_bias: bool = False
    mamba3_complex_rope: bool = False
    mamba3_trapezoidal: bool = False
    mamba3_mimo_rank: int = 1    # 1 = SISO
    mamba3_d_state: int = 128    # N; the official module's defaults from here on
    mamba3_headdim: int = 64     # P
    mamba3_expand: int = 2       # d_inner = expand * n_embd
    mamba3_chunk: int = 64       # tokens per chunk of the chunked (SSD) form
    mamba3_outproj_norm: bool = True  # RMSNorm per head before the gate (the official is_outproj_norm)
    engram_layers: str = ""      # comma-separated layer indices with Engram memory ("" = none)
    engram_order: int = 3        # n-grams of 2..order tokens (nanochat/engram.py)
    engram_heads: int = 4        # hash heads per n-gram order
    engram_dim: int = 256        # memory width per n-gram order
    engram_table: int = 0        # rows per hash head (0 = vocab_size)
    mhc: bool = False            # manifold-constrained hyper-connections on the residual stream
    mhc_streams: int = 4         # n residual streams under mHC (nanochat/mhc.py)
    mtp: bool = False            # DeepSeek-V3 multi-token prediction modules (nanochat/mtp.py)
    mtp_lambda: float = 0.3      # weight of the MTP loss
    mtp_depth: int = 1           # D: sequential MTP modules, module k predicts the token k+1 ahead
    dsa_start_layer: int = -1    # DeepSeek sparse attention from this layer on (-1 = off; nanochat/dsa.py)
    dsa_top_k: int = 2048        # keys per query (>= the keys a query sees: dense attention exactly)
    dsa_heads: int = 4           # lightning indexer heads H_I
    dsa_dim: int = 64            # indexer dims d_I
    # quality recipe (issue 25; the reference nanochat's 2026 model); defaults = the old model,
    # the values of the new recipe are in dev/quality_ablation.sh and docs/model.md
    value_embeds: bool = False   # ResFormer value embeddings on alternating layers (the last included)
    smear: bool = False          # add a gated share of the previous token's embedding (modded-nanogpt)
    backout: bool = False        # subtract a learned share of the mid-depth residual before the final norm
    layer_lambdas: bool = False  # per-layer resid and x0 scalars: x = resid[i] * x + x0[i] * x0 (modded-nanogpt)
    qk_scale: float = 1.0        # q and k times this after QK-norm (reference: 1.2, sharper attention)
    rope_base: float = 10000.0   # rotary base (reference: 100000)
    pad_vocab_to: int = 1        # wte/lm_head rows rounded up to a multiple of this (reference: 64)
    short_window_div: int = 2    # S window = sequence_len / this (reference: 4) ...
    window_tile: int = 1         # ... rounded up to a multiple of this (reference: 128, FA3's tile)
    ref_init: bool = False       # the reference's init: wte std 0.8, MLP c_fc at 0.4x the bound

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """From a checkpoint's model_config. A field the checkpoint lacks gets its LEGACY
        value (the model before that field existed), not today's default, so an old
        checkpoint rebuilds exactly even after the defaults change."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config has fields this nanochat does not know: {unknown} "
                             "(written by a newer version?)")
        return cls(**{**LEGACY, **d})


# What each field added after the first checkpoints meant before it existed. Every field
# that is not in the oldest checkpoints must be here (tests/test_gpt.py checks).
LEGACY = dict(mamba_pattern="", mamba3_qknorm=False, mamba3_bias=False, mamba3_complex_rope=False,
              mamba3_trapezoidal=False, mamba3_mimo_rank=1, mamba3_d_state=128, mamba3_headdim=64, mamba3_expand=2,
              mamba3_chunk=64, mamba3_outproj_norm=True, engram_layers="", engram_order=3, engram_heads=4,
              engram_dim=256, engram_table=0, mhc=False, mhc_streams=4, mtp=False, mtp_lambda=0.3, mtp_depth=1,
              dsa_start_layer=-1, dsa_top_k=2048, dsa_heads=4, dsa_dim=64,
              value_embeds=False, smear=False, backout=False, layer_lambdas=False, qk_scale=1.0, rope_base=10000.0,
              pad_vocab_to=1, short_window_div=2, window_tile=1, ref_init=False)


def padded_vocab(config):
    """Rows of wte/lm_head/value embeddings: vocab_size rounded up to pad_vocab_to (tensor-core
    and DDP friendly shapes); the extra logits are cropped in forward."""
    return -(-config.vocab_size // config.pad_vocab_to) * config.pad_vocab_to


def has_value_embed(config, i):
    """Value embeddings on alternating layers, the last one always included (reference nanochat)."""
    return config.value_embeds and i % 2 == (config.n_layer - 1) % 2


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is: its sequence mixer (a key of MIXERS), the attention window in
    tokens (attention mixers; 0 for the others), and the extras on that layer (e.g.
    "value_embed", "engram")."""
    mixer: str
    window: int
    extras: tuple = ()


def layer_plan(config):
    """One LayerSpec per layer: the one place that decides what each layer is; Block
    builds whatever this says."""
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - set("SL"):
        raise ValueError(f"window_pattern {config.window_pattern!r} must be a non-empty string of S and L")
    mixers = config.mamba_pattern.upper() or "A"
    if set(mixers) - set("AM"):
        raise ValueError(f"mamba_pattern {config.mamba_pattern!r} must be a string of A (attention) and M (Mamba-3)")
    T, tile = config.sequence_len, config.window_tile
    # floor(T / div) (the old S = T // 2 exactly), then up to the tile; the reference takes the
    # ceiling of T / 4 first, which differs only when that crosses a tile boundary
    short = min(-(-(T // config.short_window_div) // tile) * tile, T)
    windows = {"S": short, "L": T}
    if not -1 <= config.dsa_start_layer < config.n_layer:
        raise ValueError(f"dsa_start_layer {config.dsa_start_layer} must be a layer index (0..{config.n_layer - 1})")
    if config.mhc and config.mhc_streams < 1:
        raise ValueError(f"mhc_streams {config.mhc_streams} must be at least 1")
    engram = engram_layers(config)
    plan, n_attn = [], 0
    for i in range(config.n_layer):
        extras = ("engram",) if i in engram else ()
        if mixers[i % len(mixers)] == "M" and i < config.n_layer - 1:  # the last layer stays attention
            plan.append(LayerSpec("mamba3", 0, extras))
            continue
        # the window pattern runs over the attention layers; the last one sees the full context
        window = T if i == config.n_layer - 1 else windows[pattern[n_attn % len(pattern)]]
        mixer = "dsa" if 0 <= config.dsa_start_layer <= i else "attn"  # DSA: attention layers from its start on
        plan.append(LayerSpec(mixer, window, extras + (("value_embed",) if has_value_embed(config, i) else ())))
        n_attn += 1
    return plan


MIXERS = {"attn": CausalSelfAttention, "mamba3": Mamba3, "dsa": SparseAttention}


def engram_layers(config):
    """The layer indices of config.engram_layers ("0,3,6"), checked against the depth."""
    try:
        layers = sorted({int(p) for p in config.engram_layers.split(",") if p.strip()})
    except ValueError:
        raise ValueError(f"engram_layers {config.engram_layers!r} must be comma-separated layer indices, e.g. 0,3,6")
    if layers and not 0 <= layers[0] <= layers[-1] < config.n_layer:
        raise ValueError(f"engram_layers {config.engram_layers!r}: indices must be in 0..{config.n_layer - 1}")
    return layers


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.fc_scale = 0.4 if config.ref_init else 1.0  # reference nanochat: a smaller c_fc init trains better

    @torch.no_grad()
    def init_weights(self):
        bound = self.fc_scale * math.sqrt(3) / math.sqrt(self.c_fc.in_features)  # uniform, std fc_scale/sqrt(n_embd)
        nn.init.uniform_(self.c_fc.weight, -bound, bound)
        nn.init.zeros_(self.c_proj.weight)  # the block starts as the identity

    def opt_tags(self):
        return {"c_fc.weight": "muon", "c_proj.weight": "muon"}

    def forward(self, x, ctx=None):  # (ctx: a decode step's one-row matmuls, attention.linear)
        return linear(linear(x, self.c_fc, ctx, relu2=True), self.c_proj, ctx)

    def decode_row(self, x):
        """x + forward(norm(x)) for the one row of a batch-1 decode step (Block.decode_row): the
        norm inside c_fc's gemv, the residual add inside c_proj's."""
        from nanochat.decode_triton import gemv
        return gemv(gemv(x, self.c_fc.weight, relu2=True, norm=True), self.c_proj.weight, residual=x)


ROW_FUSION = True  # batch-1 Triton decode steps through Block.decode_row (engine_bench --fuse_rows=0: not)


def same_dtype(x, *layers):
    """Whether every layer's weight is in x's dtype: where gemv may take them (attention.linear's rule)."""
    return all(m.weight.dtype == x.dtype for m in layers)


def mixed(x, mix):
    """x := r x + a x0, GPT's per-layer lambdas (modded-nanogpt's residual and x0 scalars)."""
    r, a, x0 = mix
    return r.to(x.dtype) * x + a.to(x.dtype) * x0


class Block(nn.Module):
    def __init__(self, config, layer_idx, spec, engram_hash=None):
        super().__init__()
        # Engram memory (an extra of the spec) adds to the residual stream before the mixer
        self.engram = Engram(config, layer_idx, engram_hash) if "engram" in spec.extras else None
        self.mixer = MIXERS[spec.mixer](config, layer_idx, spec)
        self.mlp = MLP(config)
        # mHC: x is (B, T, n, C), n streams, and each sublayer is wrapped in a hyper-connection
        self.hc_mixer = HyperConnection(config, layer_idx, 0) if config.mhc else None
        self.hc_mlp = HyperConnection(config, layer_idx, 1) if config.mhc else None

    def forward(self, x, ctx, cache=None, engram_cache=None):
        if self.hc_mixer is None:
            if self.engram is not None:
                x = x + self.engram(x, ctx.idx, engram_cache)
            x = x + self.mixer(norm(x), ctx, cache)
            return x + self.mlp(norm(x), ctx)
        if self.engram is not None:
            x = x + self._engram_streams(x, ctx.idx, engram_cache)
        x = self.hc_mixer(x, lambda u: self.mixer(norm(u), ctx, cache))
        return self.hc_mlp(x, lambda u: self.mlp(norm(u), ctx))

    def decode_row(self, x, ctx, cache, engram_cache=None, mix=None):
        """forward(x') with x' = r x + a x0 for mix = (r, a, x0) (GPT's per-layer lambdas), else
        x' = x, for the one row of a batch-1 decode step with the Triton decode kernels
        (GPT._trunk): the same sums, with the lambdas and the norms inside the linears' gemvs
        and the residual adds on their way out (decode_triton.gemv), two kernels fewer a layer;
        rounded once where PyTorch rounds twice (y, then x + y; each lambda's product, then the sum).
        Attention with stacked projections fuses all of it (CausalSelfAttention.decode_row);
        other mixers (Mamba-3, DSA) and Engram layers take norm(x) as in forward; the MLP fuses
        its own. (Mamba-3's input and output projections took the same fusion once: no faster
        on an H200, AAM 0.268 against 0.266 ms a step, so not kept; docs/benchmarks.md.)"""
        if self.hc_mixer is not None or not same_dtype(x, self.mlp.c_fc, self.mlp.c_proj):  # (mHC: one stream here)
            return self(x if mix is None else mixed(x, mix), ctx, cache, engram_cache)
        attn = self.mixer if type(self.mixer) is CausalSelfAttention and self.engram is None else None  # (not DSA's)
        if attn is not None and attn.w_qkv is not None and attn.w_qkv.dtype == x.dtype and same_dtype(x, attn.c_proj):
            return self.mlp.decode_row(attn.decode_row(x, ctx, cache, mix))
        x = x if mix is None else mixed(x, mix)
        if self.engram is not None:
            x = x + self.engram(x, ctx.idx, engram_cache)
        return self.mlp.decode_row(x + self.mixer(norm(x), ctx, cache))

    def _engram_streams(self, x, idx, cache):
        """Engram on every mHC stream, as its demo runs it: one lookup, key and value for all
        streams (all weights shared), a gate per stream (each stream is its own query) and
        the conv per stream. The streams ride in the batch dimension (rows b * n + s)."""
        B, T, n, C = x.shape
        k, v = self.engram.lookup(idx, x.dtype, cache)
        h = x.transpose(1, 2).reshape(B * n, T, C)
        o = self.engram.mix(h, k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0), cache)
        return o.view(B, n, T, C).transpose(1, 2)


class ModelCache:
    """Inference state for every layer plus the number of positions already filled."""

    def __init__(self, layers, max_len, prev_emb=None, engram=None, batch=1):
        self.layers, self.pos, self.max_len, self.batch = layers, 0, max_len, batch
        # smear: the previous token's normed embedding, (B, 1, C), written in place each step
        # (fixed shape and address, so the CUDA-graph decode step can own it); zeros before token 0
        self.prev_emb = prev_emb
        self.engram = engram or {}  # {layer index: EngramCache} for the layers with Engram

    def _states(self):
        return list(self.layers) + list(self.engram.values())

    def load(self, src):
        """This cache := src, a batch-1 cache of the same length (a prefill), in every row and
        in place: a captured decode graph holds these tensors. Row b * k + s of a tensor with
        k rows per sequence (Engram's conv: one per mHC stream) gets src's row s."""
        for dst, s in zip(self._tensors(), src._tensors(), strict=True):
            dst.view(dst.size(0) // s.size(0), *s.shape).copy_(s)
        self.pos = src.pos

    def load_rows(self, src, rows, src_rows):
        """Row rows[i] of this cache := row src_rows[i] of src, a prefill of one prompt or of
        several (its cache may be shorter: its positions land at the start), in place and one
        copy per tensor (continuous batching admits requests into free rows, a request with n
        samples into n rows; nanochat/batching.py). A tensor with k rows per sequence (Engram's
        conv under mHC: one per stream) copies k rows each; Mamba-3's copy of its weights
        (w_in) is copied whole."""
        pairs = [(d, t, getattr(st, "w_in", None)) for ds, st in zip(self._states(), src._states(), strict=True)
                 for d, t in zip(ds.tensors(), st.tensors(), strict=True)]
        if self.prev_emb is not None:
            pairs.append((self.prev_emb, src.prev_emb, None))
        picks = {}  # k -> (this cache's rows, src's rows): a slice where consecutive (a plain copy), else an index

        def pick(rs, k, device):
            flat = [r * k + j for r in rs for j in range(k)]
            if flat == list(range(flat[0], flat[0] + len(flat))):
                return slice(flat[0], flat[0] + len(flat))
            return torch.tensor(flat, device=device)
        for dst, s, weights in pairs:
            if s is weights:
                dst.copy_(s)
                continue
            k = s.size(0) // src.batch
            if k not in picks:
                picks[k] = (pick(rows, k, dst.device), pick(src_rows, k, s.device))
            to, frm = picks[k]
            dst[(to, *(slice(0, n) for n in s.shape[1:]))] = s[frm]  # (src's leading positions along each dim)

    def head(self, m):
        """The first m rows of this cache as a cache of batch m: views, so what a decode step
        writes there lands here (continuous batching decodes only the rows in use)."""
        def rows(state):
            out, w_in = copy.copy(state), getattr(state, "w_in", None)
            for name, t in vars(state).items():
                if any(t is u for u in state.tensors()) and t is not w_in:
                    setattr(out, name, t[:m * (t.size(0) // self.batch)])
            return out
        head = copy.copy(self)
        head.layers, head.engram = [rows(s) for s in self.layers], {i: rows(s) for i, s in self.engram.items()}
        head.prev_emb, head.batch = None if self.prev_emb is None else self.prev_emb[:m], m
        return head

    def _tensors(self):
        return [t for s in self._states() for t in s.tensors()] + ([self.prev_emb] if self.prev_emb is not None else [])

    def snapshot(self):
        """A copy of the state that is not indexed by position (the smear's prev_emb, a
        Mamba layer's recurrent state, Engram's recent ids and conv inputs): a dummy decode
        step (CUDA-graph warmup and capture) overwrites it, unlike the KV entries it writes
        at a position that real decoding overwrites before reading."""
        return (None if self.prev_emb is None else self.prev_emb.clone(), [s.snapshot() for s in self._states()])

    def restore(self, snap):
        prev, states = snap
        if prev is not None:
            self.prev_emb.copy_(prev)  # in place: the captured graph holds this tensor
        for state, saved in zip(self._states(), states):
            state.restore(saved)


def _save_dsa_selection(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.nanochat.dsa_select.default else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_dsa_selection():
    return create_selective_checkpoint_contexts(_save_dsa_selection)


def _checkpoint_dsa(block, x, ctx):
    """A checkpointed DSA block: its indexer loss leaves as an output (Context.losses_out),
    its selection is saved (selective checkpointing)."""
    y, *aux = checkpoint(ctx.losses_out(block), x, use_reentrant=False, context_fn=_keep_dsa_selection)
    ctx.aux_losses.extend(aux)
    return y


# Under torch.compile, a checkpointed DSA block runs eagerly (a graph break; its flex_attention
# and selection are compiled on their own): inductor's flex_attention backward compiled inside
# the checkpoint hit "an illegal memory access" on an H200 (torch 2.11, 2026-12-01, in the fused
# backward kernel that reads the saved selection; eager checkpointing passes). False: compile it.
EAGER_DSA_CHECKPOINT = True
_checkpoint_dsa_eager = torch.compiler.disable(_checkpoint_dsa)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.plan = layer_plan(config)
        self.kernel = "current"  # attention kernel, one of attention.KERNELS (set by the training script)
        self.dsa_stage = "sparse"  # DSA layers: "warmup" = dense attention, only the indexer trains (base_train)
        self.dsa_kernel = "auto"  # DSA layers: one of dsa.KERNELS, "auto" = the T x T reference below dsa.LONG_T
        self.decode_kernel = "sdpa"  # decode_step's attention: "sdpa" (a mask) or "triton" (decode_triton.py, CUDA)
        self.gradient_checkpointing = False  # recompute each block in backward (set by the training script)
        self.checkpoint_block = None  # (block, x, ctx) -> y: another checkpoint than torch's (nanochat/tpu.py on XLA)
        self.flash = None  # (q, k, v) -> y: causal attention for full-context layers (nanochat/tpu.py on XLA)
        V, C, L = padded_vocab(config), config.n_embd, config.n_layer
        self.wte = nn.Embedding(V, C)
        engram = [i for i, spec in enumerate(self.plan) if "engram" in spec.extras]
        hashes = layer_hash_params(engram, config.engram_order, config.engram_heads,
                                   config.engram_table or config.vocab_size, config.vocab_size) if engram else {}
        self.blocks = nn.ModuleList(Block(config, i, spec, hashes.get(i)) for i, spec in enumerate(self.plan))
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.mtp:  # extra predictions for training (and drafts); a submodule, so checkpoints keep it
            from nanochat.mtp import MTP  # mtp.py imports Block from here
            self.mtp = MTP(config)
        # the optional residual-stream parameters of the quality recipe exist only when on,
        # so older checkpoints' state dicts load unchanged
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.empty(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.empty(1))
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.empty(L))
            self.x0_lambdas = nn.Parameter(torch.empty(L))
        # rotary tables for 10x the training context, so inference can run past it
        self.rotary_len = config.sequence_len * 10
        cos, sin = rotary_tables(self.rotary_len, config.n_embd // config.n_head, base=config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._block_masks = {}

    @staticmethod
    def config_for_depth(depth, vocab_size=32768, sequence_len=2048, aspect_ratio=64, head_dim=128,
                         n_kv_head=None, window_pattern="L", **extensions):
        """nanochat sizes a model by depth alone: width = depth * aspect_ratio, rounded
        up to whole heads of head_dim. `extensions`: GPTConfig's extension fields."""
        n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = n_embd // head_dim
        return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                         n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern, **extensions)

    def _tagged_modules(self):
        """(name, module) of every submodule that owns parameters by the mixer contract."""
        return [(n, m) for n, m in self.named_modules() if m is not self and hasattr(m, "opt_tags")]

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialize every parameter and buffer; call after to_empty() from meta."""
        c = self.config
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8 if c.ref_init else 1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for _, module in self._tagged_modules():
            module.init_weights()
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)  # gate starts just above sigmoid(0)
            nn.init.zeros_(self.smear_lambda)                    # and smearing starts off
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        if c.layer_lambdas:
            # early layers: a stronger residual and more of the embedding blended back in
            frac = torch.arange(c.n_layer, dtype=torch.float32, device=self.resid_lambdas.device) / max(c.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        cos, sin = rotary_tables(self.rotary_len, c.n_embd // c.n_head, base=c.rope_base, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def opt_tags(self):
        """{parameter name: optimizer group} for every parameter, from the modules' own
        tags. A parameter nobody tagged is an error, never a guess from its shape."""
        tags = {"wte.weight": "adamw_embedding", "lm_head.weight": "adamw_unembedding"}
        # the residual-stream scalars, grouped as the reference nanochat does (own lrs and betas)
        own = {"smear_gate.weight": "adamw_smear", "smear_lambda": "adamw_smear", "backout_lambda": "adamw_smear",
               "resid_lambdas": "adamw_resid", "x0_lambdas": "adamw_x0"}
        tags.update({n: g for n, g in own.items() if hasattr(self, n.split(".")[0])})
        for prefix, module in self._tagged_modules():
            tags.update({f"{prefix}.{name}": group for name, group in module.opt_tags().items()})
        untagged = [n for n, _ in self.named_parameters() if n not in tags]
        if untagged:
            raise ValueError(f"parameters without an optimizer group (add them to their module's opt_tags): {untagged}")
        return tags

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self):
        """Parameters that the data:param ratio counts in the reference nanochat: the
        blocks' matrices (Muon's) and lm_head, no embedding tables or scalars (its
        scaling-law fits were cleanest with these)."""
        tags = self.opt_tags()
        return sum(p.numel() for n, p in self.named_parameters() if tags[n] in ("muon", "adamw_unembedding"))

    def estimate_flops(self):
        """Training FLOPs per token: 6 per weight outside the embedding lookups (2 forward,
        4 backward) for lm_head, the MLPs and the smear gate, plus each mixer's own count
        (attention: its weights and its scores, see CausalSelfAttention.flops_per_token),
        Engram's (its conv once per mHC stream under mHC), mHC's projections Phi, and with MTP its
        projections, blocks and extra lm_head passes (MTP.flops_per_token).
        The per-layer scalars are elementwise, not matmuls: not counted."""
        T = self.config.sequence_len
        smear = 6 * self.smear_gate.weight.numel() if self.config.smear else 0
        mtp = self.mtp.flops_per_token(T, self.lm_head.weight.numel()) if self.config.mtp else 0
        return 6 * self.lm_head.weight.numel() + smear + mtp + sum(
            b.mixer.flops_per_token(T) + 6 * sum(p.numel() for p in b.mlp.parameters())
            + (b.engram.flops_per_token(self.config.mhc_streams if self.config.mhc else 1) if b.engram else 0)
            + (b.hc_mixer.flops_per_token() + b.hc_mlp.flops_per_token() if b.hc_mixer else 0) for b in self.blocks)

    @torch.compiler.disable
    def _context(self, idx, pos0, cached=False):
        T, device = idx.size(1), idx.device
        if pos0 + T > self.rotary_len:
            raise ValueError(f"sequence of {pos0 + T} positions is longer than the rotary tables ({self.rotary_len})")
        cos, sin = self.cos[:, pos0:pos0 + T], self.sin[:, pos0:pos0 + T]
        masks = {}
        if pos0 == 0 and self.training:
            masks = block_masks({s.window for s in self.plan if s.window}, T, self.kernel, device, self._block_masks)
        flash = self.flash
        if flash is None and cached and device.type == "cuda":  # an inference prefill: no cuDNN plan per shape
            flash = prefill_attention
        return Context(cos, sin, pos0, T, masks, idx=idx, dsa_stage=self.dsa_stage, flash=flash,
                       dsa_kernel=self.dsa_kernel)

    def linears_to(self, dtype):
        """Every nn.Linear weight in dtype (not the embeddings, norms or scalars), for serving
        under autocast in that dtype: the values autocast casts them to at each matmul anyway, so
        a decode step reads half the weight bytes and runs no cast per weight. The model must
        then run under autocast (an fp32 input against a bf16 weight is an error). On the CPU the
        outputs are the fp32-weight model's bit for bit (tested); on a GPU the compiled step may
        round differently (an H200 gave different bits, 2026-12-01; tests/test_gpu.py checks
        the closeness; a likely cause, not verified: where inductor fuses a weight's bf16 cast
        into a Triton kernel, e.g. a small matmul it decomposes, it may compute with the fp32
        value, since torch._inductor.config.emulate_precision_casts is off by default). Used by
        --bf16_linears of dev/batch_bench.py, chat_web and chat_cli (opt-in: +12% batched decode
        tokens/s on an H200, docs/benchmarks.md)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.to(dtype)
        for m in self.modules():  # stack_projections' views were replaced: stack the new weights
            if isinstance(m, CausalSelfAttention) and m.w_qkv is not None:
                m.stack_projections()
        return self

    def stack_projections(self):
        """Serving: every attention layer's q, k, v projections as one matmul in forwards
        without autograd (CausalSelfAttention.stack_projections: the weights become views of
        one tensor, no copy; linears_to stacks its new weights again). Used by
        --stack_qkv of engine_bench, dev/batch_bench.py, chat_web and chat_cli (opt-in)."""
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                m.stack_projections()
        return self

    def set_decode_kernel(self, kernel):
        """decode_step's attention from outside (--decode_kernel of engine_bench, batch_bench,
        chat_cli, chat_web): "sdpa", "triton" (nanochat/decode_triton.py: a CUDA GPU and a
        power-of-two head dim), or "auto": triton where it runs, else sdpa."""
        if kernel not in ("sdpa", "triton", "auto"):
            raise ValueError(f"decode_kernel={kernel}: use auto, sdpa or triton")
        head_dims = {m.head_dim for m in self.modules() if isinstance(m, CausalSelfAttention)}
        why = (f"needs a power-of-two head dim >= 16 (this model's: {sorted(head_dims)})"
               if any(d & (d - 1) or d < 16 for d in head_dims) else
               "needs the triton package (pip install triton)" if importlib.util.find_spec("triton") is None else
               "runs on CUDA GPUs only (its kernels are Triton's)" if self.wte.weight.device.type != "cuda" else None)
        if kernel == "triton" and why:
            raise ValueError(f"decode_kernel=triton {why}; use sdpa here")
        self.decode_kernel = "sdpa" if kernel == "sdpa" or (kernel == "auto" and why) else "triton"
        return self

    def init_cache(self, batch_size, max_len, device=None, dtype=None):
        device = torch.device(device or self.wte.weight.device)
        kv_dtype, dtype = dtype, dtype or self.wte.weight.dtype
        # keys and values in the dtype attention computes them in: autocast's where it is on
        # (bf16 on GPUs), exactly the values the forward attends to. An fp32 cache was read
        # whole and converted to bf16 in every layer of every decode step (measured on an H200:
        # a 128-row d20 step over 2,048 positions 26 ms; Mamba-3 keeps its state in fp32 anyway)
        if kv_dtype is None:
            autocast = device.type != "meta" and torch.is_autocast_enabled(device.type)  # (meta: no autocast to ask)
            kv_dtype = torch.get_autocast_dtype(device.type) if autocast else dtype
        prev = torch.zeros(batch_size, 1, self.config.n_embd, device=device, dtype=dtype) if self.config.smear else None
        streams = self.config.mhc_streams if self.config.mhc else 1  # Engram's conv runs per mHC stream
        engram = {i: b.engram.init_cache(batch_size, device, dtype, streams) for i, b in enumerate(self.blocks)
                  if b.engram}
        layers = [b.mixer.init_cache(batch_size, max_len, device, kv_dtype) for b in self.blocks]
        return ModelCache(layers, max_len, prev, engram, batch_size)

    def _embed(self, idx, cache):
        """The normed token embedding in the compute dtype, smeared when on: each position
        gets smear_lambda * sigmoid(gate(x[..., :24])) of the previous token's embedding
        (a cheap bigram signal). Position 0 of a sequence has no predecessor (zeros); with
        a cache, the predecessor of a chunk's first token is the cache's prev_emb."""
        x = norm(self.wte(idx))
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the compute dtype (bf16): every norm and residual add moves
            # half the bytes; measured +3.7% tok/s and -6 GiB at d20 on an H100
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if not self.config.smear:
            return x
        if cache is None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        else:
            prev = torch.cat([cache.prev_emb.to(x.dtype), x[:, :-1]], dim=1)
            cache.prev_emb.copy_(x[:, -1:])  # in place: the decode step's CUDA graph holds this tensor
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + gate * prev

    def _trunk(self, x, ctx, cache):
        """The blocks, with the optional per-layer lambdas and the backout, then the final norm.
        Under mHC the embedding is copied into n streams first and the streams' mean is
        normed at the end; the lambdas and the backout act on every stream alike (x0 is
        the embedding, the same for every stream), so with equal streams they do what
        they do on the single residual."""
        c = self.config
        if c.mhc:
            x = x.unsqueeze(-2).expand(*x.shape[:-1], c.mhc_streams, x.size(-1))
        x0, mid = x, None
        # one row of a batch-1 decode step with the Triton kernels: each block's norms, adds and
        # lambdas ride in its gemvs (Block.decode_row)
        rows = (cache is not None and ctx.decode_kernel == "triton" and ROW_FUSION and attention.ROW_GEMV
                and x.numel() == x.size(-1) and not torch.is_grad_enabled())
        for i, block in enumerate(self.blocks):
            mix = (self.resid_lambdas[i], self.x0_lambdas[i], x0) if c.layer_lambdas else None
            if rows:
                x = block.decode_row(x, ctx, cache.layers[i], cache.engram.get(i), mix)
            else:
                x = x if mix is None else mixed(x, mix)
                x = self.run_block(block, x, ctx) if cache is None else block(x, ctx, cache.layers[i], cache.engram.get(i))
            if i == c.n_layer // 2:
                mid = x
        if c.backout:  # remove a share of the low-level features of mid-depth before the readout
            x = x - self.backout_lambda.to(x.dtype) * mid
        if c.mhc:
            x = x.mean(-2)  # the mean, not the sum: at init every stream is the baseline's x
        return norm(x)

    def run_block(self, block, x, ctx):
        """block(x, ctx) without a cache (the trunk's blocks and MTP's). With
        gradient_checkpointing and grad enabled, it runs under torch.utils.checkpoint
        (non-reentrant): backward keeps only the block's input and runs its forward once
        more to get the activations it needs. ctx rides in a closure, so the checkpoint
        (and torch.compile's version of it) sees one tensor input. DSA's key selection is
        kept from the forward, not recomputed (selective checkpointing: at 64K it costs more
        than the rest of its layer's forward, and its bits are 512 MiB)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self.checkpoint_block is not None:
                return self.checkpoint_block(block, x, ctx)
            if isinstance(block.mixer, SparseAttention):
                return (_checkpoint_dsa_eager if EAGER_DSA_CHECKPOINT else _checkpoint_dsa)(block, x, ctx)
            return checkpoint(lambda u: block(u, ctx), x, use_reentrant=False)
        return block(x, ctx)

    def _logits(self, x):
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()  # crop the padded rows
        return self.config.softcap * torch.tanh(logits / self.config.softcap)

    def forward(self, idx, targets=None, cache=None, loss_reduction="mean", return_parts=False, return_hidden=False):
        """idx (B, T) token ids. With targets: the loss (ignore_index -1). Without: logits
        (B, T, vocab) in fp32, or with return_hidden=True (logits, final hidden state (B, T, C)),
        which the MTP modules draft from (nanochat/mtp.py). With a cache: positions continue from cache.pos.
        With MTP (config.mtp) and a "mean" or "sum" reduction the loss is
        main + mtp_lambda * L_MTP (nanochat/mtp.py; "sum": the main sum plus the MTP
        modules' summed losses); "none" gives the main per-token losses only (evaluation).
        return_parts=True: (loss, main loss, MTP loss), the last two detached, for logging
        (the MTP loss is 0 without MTP).
        With DSA layers in training, their indexer loss L^I (the mean over layers) is added
        (it reaches only the indexers) and kept detached in self.indexer_loss for logging;
        in the "warmup" stage the loss is L^I alone, so only the indexers train."""
        B, T = idx.shape
        pos0 = cache.pos if cache is not None else 0
        ctx = self._context(idx, pos0, cached=cache is not None)
        x = self._trunk(self._embed(idx, cache), ctx, cache)
        if cache is not None:
            cache.pos += T
        logits = self._logits(x)
        if targets is None:
            return (logits, x) if return_hidden else logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        main, mtp = loss, torch.zeros((), device=loss.device)
        if self.config.mtp and loss_reduction != "none":
            if cache is not None:
                raise ValueError("the MTP loss needs whole sequences from position 0, not a cache")
            mtp = self.mtp(x, idx, targets, self.wte, self._logits, ctx.cos, ctx.sin, loss_reduction, self.run_block)
            loss = main + self.config.mtp_lambda * mtp
        if ctx.aux_losses and loss_reduction != "none":
            indexer = torch.stack(ctx.aux_losses).mean()
            self.indexer_loss = indexer.detach()
            loss = indexer if self.dsa_stage == "warmup" else loss + indexer
        return (loss, main.detach(), mtp.detach()) if return_parts else loss

    def decode_step(self, idx, cache, pos_t):
        """Logits (B, vocab) for one new token per row at position pos_t (a 0-dim device
        tensor; or (B,), each row's own position: continuous batching, nanochat/batching.py),
        written into the cache. Every shape is fixed whatever the position, so the engine can
        compile this and replay it as a CUDA graph. Attention reads the whole cache under a
        mask; the caller keeps the positions (cache.pos)."""
        return self._logits(self.decode_hidden(idx, cache, pos_t)[:, -1])

    def decode_hidden(self, idx, cache, pos_t):
        """decode_step's final hidden states (B, T, C), for T tokens per row at positions
        pos_t .. pos_t + T - 1. T > 1 (speculative decoding's verify, nanochat/mtp.py) needs
        every layer's state indexed by position: attention layers only, no Engram."""
        T = idx.size(1)
        if T > 1 and not self.position_indexed():
            raise ValueError("a static decode step over several tokens needs attention-only layers without Engram")
        ctx = self.decode_context(idx, pos_t, cache.max_len, {s.window for s in self.plan if s.window})
        return self._trunk(self._embed(idx, cache), ctx, cache)

    def position_indexed(self):
        """Whether every layer's cache is indexed by position (attention only, no Engram): a
        static decode step can then take several tokens, and dropping a token needs no
        rollback of state beyond the smear's previous embedding."""
        return all(s.mixer == "attn" and "engram" not in s.extras for s in self.plan)

    def decode_context(self, idx, pos_t, max_len, windows):
        """The Context of a static decode step: the T tokens of idx at device positions
        pos_t .. pos_t + T - 1, each window's mask over a whole cache of max_len positions."""
        T = idx.size(1)
        pos = pos_t.unsqueeze(-1) + torch.arange(T, device=pos_t.device)  # (T,), or (B, T): per-row positions
        if pos.dim() == 2:
            if T > 1:
                raise ValueError("per-row positions take one token per row")
            cos, sin = self.cos[0, pos], self.sin[0, pos]  # (B, 1, 1, D/2)
        else:
            cos, sin = self.cos.index_select(1, pos), self.sin.index_select(1, pos)
        return Context(cos, sin, None, T, {}, pos_t=pos_t, decode_masks=decode_masks(windows, max_len, pos), idx=idx,
                       decode_kernel=self.decode_kernel)

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0, adam_weight_decay=0.0, adam_betas=(0.8, 0.95), adam_per_group=False,
                         cautious_wd=False, normuon_beta2=0.0, muon_eq=False, muon_plus=False, dsa_lr=1e-3):
        """Muon for the parameters tagged "muon" (the blocks' matrices); AdamW for the
        rest, one group per tag: the embedding, the lm_head, scalars/vectors/biases
        ("adamw_scalar"), and the quality recipe's value embeddings and residual scalars.
        AdamW learning rates of the embeddings and lm_head scale as 1/sqrt(n_embd / 768),
        tuned at 768 (nanochat's rule). weight_decay is Muon's, adam_weight_decay AdamW's;
        adam_per_group=True gives the embedding and lm_head the reference nanochat's own
        betas and weight decays instead (the recipe's new groups always have theirs).
        The Muon options are documented in nanochat/muon.py. Both optimizers split their
        work across DDP ranks when a process group is up."""
        from nanochat.adamw import DistAdamW
        from nanochat.muon import Muon
        scale = (self.config.n_embd / 768) ** -0.5
        shared = (adam_betas, adam_weight_decay)
        # tag: (lr, betas, weight decay), the last two as in the reference nanochat's setup_optimizer
        adamw_groups = {
            "adamw_unembedding": (unembedding_lr * scale,) + (((0.8, 0.96), 0.01) if adam_per_group else shared),
            "adamw_embedding": (embedding_lr * scale,) + (((0.8, 0.995), 0.001) if adam_per_group else shared),
            "adamw_scalar": (scalar_lr,) + shared,
            "adamw_value_embed": (embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            "adamw_resid": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
            "adamw_x0": (scalar_lr, (0.96, 0.95), 0.0),  # a slower beta1 for x0 (reference LOG, Jan 2026)
            "adamw_smear": (0.2, (0.8, 0.95), 0.0),
            # Mamba-3's per-head controls and vectors (ctrl_proj, dt_bias, D, norms, biases, MIMO), and
            # Engram's norm weights and conv: 0.002 at the default scalar_lr, in the Mamba papers' AdamW
            # range, no decay; not tuned
            "adamw_ssm": (scalar_lr * 0.004, adam_betas, 0.0),
            # mHC's Phi, scales and biases: 0.005 at the default scalar_lr, not adamw_scalar's 0.5,
            # which would move the +-6 logits of the init by a tenth per step; no decay; not tuned
            "adamw_mhc": (scalar_lr * 0.01, adam_betas, 0.0),
            # DSA's lightning indexers: AdamW at the paper's warm-up lr 1e-3, no decay; not tuned
            "adamw_dsa": (dsa_lr, adam_betas, 0.0),
        }
        tags = self.opt_tags()
        by_group = {}
        for name, p in self.named_parameters():
            if tags[name] != "muon" and tags[name] not in adamw_groups:
                raise ValueError(f"{name}: unknown optimizer group {tags[name]!r}")
            by_group.setdefault(tags[name], []).append(p)
        groups = [dict(params=by_group[g], lr=lr, betas=betas, weight_decay=wd, tag=g)
                  for g, (lr, betas, wd) in adamw_groups.items() if g in by_group]
        adamw = DistAdamW(groups, betas=adam_betas, eps=1e-10, weight_decay=adam_weight_decay)
        muon = Muon(by_group.get("muon", []), lr=matrix_lr, momentum=0.95, weight_decay=weight_decay,
                    cautious_wd=cautious_wd, beta2=normuon_beta2, row_eq=muon_eq, renorm=muon_plus)
        for opt in (adamw, muon):
            for g in opt.param_groups:
                g["initial_lr"] = g["lr"]
        return [adamw, muon]

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Plain sampling with a KV cache, one sequence; yields token ids. The engine
        (nanochat/engine.py) does batched sampling and tool use; both use its sample_next."""
        from nanochat.engine import sample_next
        device = self.wte.weight.device
        # XLA has no torch.Generator: there the draws run on the CPU (one row of logits a token)
        draw_on = device if device.type in ("cpu", "cuda", "mps") else torch.device("cpu")
        rng = torch.Generator(device=draw_on).manual_seed(seed)
        cache = self.init_cache(1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids, cache=cache)[:, -1, :]
            ids = sample_next(logits.to(draw_on), rng, temperature, top_k).view(1, 1).to(device)
            yield ids.item()


def build_model(config, device):
    """Construct on the meta device, then materialize on `device` and initialize."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
