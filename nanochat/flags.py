"""
Command-line flags shared by scripts/base_train and scripts/base_bench: the model's shape,
its extensions (spelled as the seed's launch command spells them) and the flags that
change how a training step runs; config_from_args turns them into a GPTConfig.
"""

import torch

from nanochat.attention import KERNELS
from nanochat.dsa import KERNELS as DSA_KERNELS
from nanochat.common import require_positive
from nanochat.gpt import GPT
from nanochat.mamba3 import KERNELS as MAMBA3_KERNELS
from nanochat.mhc import KERNELS as MHC_KERNELS



def add_model_args(parser):
    """The model's shape and extension flags, and the flags that change how a training
    step runs, spelled as the seed's launch command spells them."""
    a = parser.add_argument
    a("--depth", type=int, default=20, help="number of layers; width follows from it")
    a("--aspect_ratio", type=int, default=64, help="n_embd = depth * aspect_ratio (rounded to head_dim)")
    a("--head_dim", type=int, default=128)
    a("--n_kv_head", type=int, default=0, help="key/value heads for GQA (default: = query heads)")
    a("--max_seq_len", type=int, default=2048, help="context length")
    a("--window_pattern", default="L", help="per-layer S (half context) / L (full) attention windows, e.g. SSSL")
    a("--kernel", default="current", choices=KERNELS, help="attention kernel: current = SDPA (flash/cuDNN) for "
      "full layers + flex_attention for windows; flex = flex_attention everywhere; sdpa = SDPA everywhere")
    a("--compile", type=int, default=-1, help="torch.compile the model (default: on for CUDA)")
    a("--no_compile", action="store_true", help="same as --compile=0")
    a("--tensor_parallel", type=int, default=1, help="tensor-parallel degree on TPU (XLA SPMD, nanochat/tpu.py): a "
      "(devices / tp, tp) data x model mesh")
    a("--xla_flash_attn", action="store_true", help="on TPU: the Pallas flash attention for full-context layers "
      "(nanochat/tpu.py; SDPA where it cannot run)")
    a("--gradient_checkpointing", action="store_true", help="recompute each block's activations in backward: less "
      "memory, one more forward per block (a runtime switch; checkpoints do not change)")
    a("--mamba", action="store_true", help="hybrid model with Mamba-3 layers (see --mamba_pattern)")
    a("--mamba_pattern", default="AAM", help="A = attention, M = Mamba-3, tiled over depth (with --mamba)")
    a("--mamba3_qknorm", action="store_true", help="Mamba-3: RMSNorm (learned weight) on B and C (with --mamba)")
    a("--mamba3_bias", action="store_true", help="Mamba-3: per-head B/C biases, init 1 (with --mamba)")
    a("--mamba3_complex_rope", action="store_true", help="Mamba-3: data-dependent rotation of B/C, a complex "
      "state (with --mamba)")
    a("--mamba3_trapezoidal", action="store_true", help="Mamba-3: exponential-trapezoidal discretization "
      "(with --mamba; off = Euler, Mamba-2's)")
    a("--mamba3_mimo_rank", type=int, default=1, help="Mamba-3 MIMO rank (1 = SISO)")
    a("--mamba3_d_state", type=int, default=128, help="Mamba-3 state size N (official default 128)")
    a("--mamba3_headdim", type=int, default=64, help="Mamba-3 head dim P (official default 64)")
    a("--mamba3_expand", type=int, default=2, help="Mamba-3 inner width = expand * n_embd (official default 2)")
    a("--mamba3_chunk", type=int, default=64, help="tokens per chunk of Mamba-3's chunked form (official: 64)")
    a("--mamba3_kernel", default="torch", choices=MAMBA3_KERNELS, help="Mamba-3's chunked form: torch = PyTorch "
      "matmuls (compiled with the model); triton = fused kernels, SISO, slower on an H200 (nanochat/mamba3_triton.py; docs/benchmarks.md)")
    a("--mamba3_outproj_norm", type=int, default=1, help="1: RMSNorm per head before the gate (official option, "
      "off there; on here for Muon, docs/model.md)")
    a("--engram", action="store_true", help="Engram n-gram memory (at --engram_layers)")
    a("--engram_layers", default="0,3,6", help="comma-separated layers with Engram (with --engram)")
    a("--engram_order", type=int, default=3, help="Engram n-grams of 2..order tokens")
    a("--engram_heads", type=int, default=4, help="Engram hash heads per n-gram order")
    a("--engram_dim", type=int, default=256, help="Engram memory width per n-gram order")
    a("--engram_table", type=int, default=0, help="Engram rows per hash head (0 = vocab size)")
    a("--mhc", action="store_true", help="manifold-constrained hyper-connections")
    a("--mhc_streams", type=int, default=4, help="mHC residual streams (with --mhc)")
    a("--mhc_kernel", default="triton", choices=MHC_KERNELS, help="mHC's read-out and stream mix on CUDA: triton = "
      "fused kernels (nanochat/mhc_triton.py), torch = PyTorch compiled with the model")
    a("--mtp", action="store_true", help="DeepSeek-V3 multi-token prediction modules (training loss only)")
    a("--mtp_lambda", type=float, default=0.3, help="weight of the MTP loss (with --mtp)")
    a("--mtp_depth", type=int, default=1, help="sequential MTP modules D; module k predicts k+1 tokens ahead "
      "(with --mtp)")
    a("--dsa", action="store_true", help="DeepSeek sparse attention (from --dsa_start_layer on)")
    a("--dsa_start_layer", type=int, default=7, help="first layer with DSA (with --dsa)")
    a("--dsa_top_k", type=int, default=2048, help="DSA keys per query (>= the context: dense attention exactly)")
    a("--dsa_heads", type=int, default=4, help="DSA lightning indexer heads")
    a("--dsa_dim", type=int, default=64, help="DSA lightning indexer dims (a multiple of 4)")
    a("--dsa_kernel", default="auto", choices=DSA_KERNELS, help="DSA attention: mask = the T x T reference, flex = "
      "chunked top-k + flex_attention (nothing T x T), auto = flex from 8192 tokens on")
    # the quality recipe's model half (issue 25, from the reference nanochat 2026; docs/model.md has
    # the table): on by default since it measured val bpb 1.032 vs 1.175 at 100 d12 steps
    # (docs/benchmarks.md); 0 / 1.0 / 10000 / 1 give the January 2026 model
    a("--value_embeds", type=int, default=1, help="1: ResFormer value embeddings on alternating layers")
    a("--smear", type=int, default=1, help="1: smear gate, the previous token's embedding mixed in (modded-nanogpt)")
    a("--backout", type=int, default=1, help="1: subtract a learned share of the mid-depth residual at the end")
    a("--layer_lambdas", type=int, default=1, help="1: per-layer resid/x0 scalars, x = r[i] x + a[i] x0 (modded-nanogpt)")
    a("--qk_scale", type=float, default=1.2, help="q and k times this after QK-norm (reference: 1.2)")
    a("--rope_base", type=float, default=100000.0, help="rotary embedding base (reference: 100000)")
    a("--pad_vocab_to", type=int, default=64, help="pad wte/lm_head rows to a multiple of this (reference: 64)")
    a("--short_window_div", type=int, default=2, help="S window = context / this (reference: 4)")
    a("--window_tile", type=int, default=1, help="S window rounded up to a multiple of this (reference: 128)")
    a("--ref_init", type=int, default=1, help="1: reference init, wte std 0.8 and MLP c_fc at 0.4x")


def add_optimizer_args(parser):
    """The optimizer's flags (GPT.setup_optimizers), shared by base_train and base_bench so a
    benchmark steps the optimizer that training uses. Defaults: the reference nanochat
    2026's optimizer without three parts that lost when left out one at a time (its lrs,
    per-group AdamW, MuonEq): val bpb 0.813 vs 1.032 for the January optimizer at 100 d12
    steps (docs/benchmarks.md); docs/model.md lists the January 2026 value of each flag."""
    a = parser.add_argument
    a("--embedding_lr", type=float, default=0.2, help="AdamW lr for the embedding (reference: 0.3)")
    a("--unembedding_lr", type=float, default=0.004, help="AdamW lr for lm_head (reference: 0.008)")
    a("--matrix_lr", type=float, default=0.02, help="Muon lr for the block matrices")
    a("--scalar_lr", type=float, default=0.5, help="AdamW lr for non-matrix block parameters")
    a("--weight_decay", type=float, default=0.28, help="Muon weight decay (January 2026: 0)")
    a("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (embedding, lm_head, scalars)")
    a("--adam_per_group", type=int, default=0, help="1: embedding and lm_head get the reference nanochat's own AdamW "
      "betas and weight decays (emb (0.8, 0.995) wd 0.001; lm_head (0.8, 0.96) wd 0.01)")
    a("--cautious_wd", type=int, default=1, help="1: Muon decays only where update and weight agree in sign "
      "(cautious weight decay; reference nanochat)")
    a("--normuon_beta2", type=float, default=0.9, help="NorMuon per-neuron variance normalization in Muon, EMA "
      "beta2 (0: off; reference nanochat: 0.9)")
    a("--muon_eq", type=int, default=0, help="1: MuonEq row equilibration before orthogonalizing")
    a("--muon_plus", type=int, default=1, help="1: Muon+ Frobenius renormalization after orthogonalizing")


def optimizer_kwargs(args, weight_decay=None):
    """GPT.setup_optimizers' arguments from add_optimizer_args' flags; weight_decay: Muon's,
    when the caller has scaled --weight_decay (base_train)."""
    return dict(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
                scalar_lr=args.scalar_lr, weight_decay=args.weight_decay if weight_decay is None else weight_decay,
                adam_weight_decay=args.adam_weight_decay, adam_per_group=bool(args.adam_per_group),
                cautious_wd=bool(args.cautious_wd), normuon_beta2=args.normuon_beta2, muon_eq=bool(args.muon_eq),
                muon_plus=bool(args.muon_plus))


def check_tpu_flags(args, device_type):
    """--tensor_parallel and --xla_flash_attn are TPU features (XLA SPMD, nanochat/tpu.py):
    SystemExit with one line when they are asked for on another device."""
    for asked, flag in ((args.tensor_parallel != 1, f"--tensor_parallel={args.tensor_parallel}"),
                        (args.xla_flash_attn, "--xla_flash_attn")):
        if asked and device_type != "xla":
            raise SystemExit(f"{flag} is for TPUs (--device_type=xla, XLA SPMD; docs/TPU_SETUP.md), not "
                             f"--device_type={device_type}: on GPUs data parallelism is torchrun's")


def config_from_args(args, vocab_size):
    """GPTConfig from add_model_args' flags; SystemExit with one line for a bad value or a
    sub-flag given without its feature."""
    require_positive(args, ("depth", "aspect_ratio", "head_dim", "max_seq_len"))
    if args.n_kv_head < 0:
        raise SystemExit(f"--n_kv_head={args.n_kv_head}: must be 0 (= query heads) or a positive divisor of them")
    if args.tensor_parallel < 1:
        raise SystemExit(f"--tensor_parallel={args.tensor_parallel}: must be a positive divisor of the XLA devices")
    require_positive(args, ("mtp_depth", "mamba3_mimo_rank", "mamba3_d_state", "mamba3_headdim", "mamba3_expand",
                            "mamba3_chunk", "engram_order", "engram_heads", "engram_dim", "mhc_streams", "dsa_top_k",
                            "dsa_heads", "dsa_dim"))
    if args.engram_table < 0:
        raise SystemExit(f"--engram_table={args.engram_table}: must be 0 (= vocab size) or a positive number of rows")
    if not args.mamba and any(getattr(args, f"mamba3_{p}") for p in ("qknorm", "bias", "complex_rope", "trapezoidal")):
        raise SystemExit("--mamba3_* flags configure Mamba-3 layers: add --mamba (and --mamba_pattern)")
    if args.mamba and "M" not in args.mamba_pattern.upper():
        raise SystemExit(f"--mamba_pattern={args.mamba_pattern}: has no M (Mamba-3) layer; e.g. AAM")
    ext = dict(mamba_pattern=args.mamba_pattern if args.mamba else "",
               mamba3_qknorm=args.mamba3_qknorm, mamba3_bias=args.mamba3_bias,
               mamba3_complex_rope=args.mamba3_complex_rope, mamba3_trapezoidal=args.mamba3_trapezoidal,
               mamba3_mimo_rank=args.mamba3_mimo_rank, mamba3_d_state=args.mamba3_d_state,
               mamba3_headdim=args.mamba3_headdim, mamba3_expand=args.mamba3_expand, mamba3_chunk=args.mamba3_chunk,
               mamba3_outproj_norm=bool(args.mamba3_outproj_norm),
               engram_layers=args.engram_layers if args.engram else "", engram_order=args.engram_order,
               engram_heads=args.engram_heads, engram_dim=args.engram_dim, engram_table=args.engram_table, mhc=args.mhc,
               mhc_streams=args.mhc_streams, mtp=args.mtp, mtp_lambda=args.mtp_lambda, mtp_depth=args.mtp_depth,
               dsa_start_layer=args.dsa_start_layer if args.dsa else -1, dsa_top_k=args.dsa_top_k,
               dsa_heads=args.dsa_heads, dsa_dim=args.dsa_dim,
               value_embeds=bool(args.value_embeds), smear=bool(args.smear), backout=bool(args.backout),
               layer_lambdas=bool(args.layer_lambdas), qk_scale=args.qk_scale, rope_base=args.rope_base,
               pad_vocab_to=args.pad_vocab_to, short_window_div=args.short_window_div,
               window_tile=args.window_tile, ref_init=bool(args.ref_init))
    config = GPT.config_for_depth(args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len,
                                  aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                  n_kv_head=args.n_kv_head or None, window_pattern=args.window_pattern, **ext)
    try:
        with torch.device("meta"):  # builds nothing real; catches every shape the modules refuse
            GPT(config)
    except ValueError as e:
        raise SystemExit(str(e))
    return config
