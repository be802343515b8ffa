"""
Pretrain the base model.

    python -m scripts.base_train --depth=20                                  # one GPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
    python -m scripts.base_train --depth=4 --max_seq_len=256 --device_batch_size=8 \
        --total_batch_size=4096 --num_iterations=50 --eval_tokens=8192 \
        --core_metric_every=-1 --device_type=cpu                              # CPU
    python -m scripts.base_train --depth=24 --tensor_parallel=4 --xla_flash_attn \
        --device_type=xla                                    # TPU v6e-8: TP=4 x DP=2 (docs/TPU_SETUP.md)

Gradient accumulation is derived: total_batch_size = device_batch_size * max_seq_len
* world_size * grad_accum_steps; on XLA world_size is the mesh's data axis (devices /
--tensor_parallel; one process, SPMD: nanochat/tpu.py). MFU = tokens/s * model.estimate_flops() / (peak bf16
FLOP/s of the device * world_size); see GPT.estimate_flops for what is counted.
"""

import argparse
import json
import os
import time

import torch

from nanochat.checkpoint_manager import (checkpoint_dir, init_from, load_optimizer_states, resume_checkpoint,
                                         save_checkpoint, warn_earlier_run)
from nanochat.common import (DummyWandb, all_reduce_mean, autodetect_device_type, compute_cleanup, compute_dtype,
                             compute_init, device_name, get_peak_flops, max_memory_allocated_mib, print0,
                             require_positive, synchronize)
from nanochat import schedules
from nanochat.dataloader import DataLoader
from nanochat.attention import rope_base_enough, suggest_rope_base
from nanochat.dataset import resolve_data_dir
from nanochat.flags import add_model_args, add_optimizer_args, check_tpu_flags, config_from_args, optimizer_kwargs
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.mamba3 import set_mamba3_kernel
from nanochat.mhc import set_mhc_kernel
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="Pretrain the nanochat base model")
# runtime
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
parser.add_argument("--device_type", default="", help="cuda|xla|mps|cpu (default: autodetect)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--fp8", type=int, default=0, help="1: the blocks' linear layers train with FP8 matmuls "
                    "(nanochat/fp8.py; H100/H200; eval and checkpoints stay bf16/fp32)")
# model and how its step runs (shared with scripts/base_bench; extensions that are not built yet stop at once)
add_model_args(parser)
# training horizon: the first that is set wins
parser.add_argument("--num_iterations", type=int, default=-1, help="optimizer steps (-1: derive from the ratio below)")
parser.add_argument("--target_flops", type=float, default=-1, help="train for this many FLOPs (-1: off)")
parser.add_argument("--target_param_data_ratio", type=float, default=20, help="tokens = ratio * params (Chinchilla: 20; "
                    "reference nanochat 2026: 12 with --param_count=scaling)")
parser.add_argument("--param_count", default="all", choices=["all", "scaling"], help="the params of the ratio: all, "
                    "or the reference nanochat's scaling params (block matrices + lm_head, see GPT.num_scaling_params)")
# batch
parser.add_argument("--device_batch_size", type=int, default=32, help="sequences per device per micro-step")
parser.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step")
# optimization: the optimizer's flags are shared with base_bench (nanochat/flags.py), the schedules are here
add_optimizer_args(parser)
parser.add_argument("--weight_decay_scaling", type=int, default=1, help="1: Muon's weight decay = "
                    "wd * sqrt(B / 2**19) * (D_d12 / D) (reference nanochat, tuned at d12)")
parser.add_argument("--weight_decay_schedule", default="cosine", choices=["constant", "cosine"],
                    help="Muon's weight decay over training: constant, or cosine to 0 (reference nanochat)")
parser.add_argument("--muon_momentum_schedule", default="ref", choices=["legacy", "ref"], help="legacy: 0.85 -> "
                    "0.95 over 300 steps; ref: 0.85 -> 0.97 over 400 steps, 0.90 at the end of the warmdown (ref. nanochat)")
parser.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
parser.add_argument("--dsa_warmup_steps", type=int, default=0, help="with --dsa: first steps with dense attention "
                    "where only the indexers train, on their KL loss (DeepSeek-V3.2's warm-up; for a dense checkpoint)")
parser.add_argument("--warmup_ratio", type=float, default=0.0, help="fraction of steps of lr warmup")
parser.add_argument("--warmup_steps", type=int, default=-1, help="steps of lr warmup (-1: use --warmup_ratio; "
                    "reference nanochat: 40)")
parser.add_argument("--warmdown_ratio", type=float, default=0.2, help="fraction of steps of linear lr decay at the end")
parser.add_argument("--final_lr_frac", type=float, default=0.0, help="lr at the end, as a fraction of the peak")
# evaluation, sampling, checkpoints
parser.add_argument("--eval_every", type=int, default=250, help="val bpb every N steps (-1: only at the end)")
parser.add_argument("--eval_tokens", type=int, default=20 * 524288, help="tokens for each val bpb evaluation")
parser.add_argument("--core_metric_every", type=int, default=2000, help="CORE metric every N steps (-1: off)")
parser.add_argument("--core_metric_max_per_task", type=int, default=500, help="examples per CORE task")
parser.add_argument("--sample_every", type=int, default=2000, help="print samples every N steps (-1: off)")
parser.add_argument("--save_every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume_from_step", type=int, default=-1, help="resume from this checkpoint step (-1: start fresh; 0: latest)")
parser.add_argument("--init_from", default="", help="start from base checkpoint TAG's weights (its latest step; TAG:STEP "
                    "for another) with fresh optimizers at step 0; this model may add modules: e.g. a dense run, then "
                    "--dsa --dsa_warmup_steps=N from it (DeepSeek-V3.2 trains its indexers from a dense model); the other model "
                    "flags as TAG's but the context (checkpoint_manager.INIT_FROM_MAY_DIFFER), and another --model_tag")
parser.add_argument("--model_tag", default="", help="checkpoint directory name (default: d<depth>)")
parser.add_argument("--data_dir", default=None, help="parquet shards (default: $NANOCHAT_DATA_DIR or downloaded shards)")
parser.add_argument("--streaming_data", action="store_true",
                    help="--data_dir is being written while training: at the end of its shards wait for new ones "
                         "instead of starting another epoch (shards must sort before the last, validation, shard)")
parser.add_argument("--fim_rate", type=float, default=0.0, help="fraction of documents turned into fill-in-the-middle "
                    "(context-level, in the loader: nanochat/fim.py; the paper and the seed use 0.5)")
parser.add_argument("--fim_spm_rate", type=float, default=0.5, help="fraction of the FIM documents in SPM order "
                    "(the rest PSM)")
parser.add_argument("--data_order", default="sharded", choices=["sharded", "global"],
                    help="sharded: each rank reads its own documents; global: the batches of a step do not depend "
                         "on the number of GPUs (each rank tokenizes everything; for comparing runs)")
args = parser.parse_args()
user_config = vars(args).copy()
if args.no_compile:
    args.compile = 0
config_from_args(args, vocab_size=1)  # a bad model flag, or one whose feature is not built yet, stops here
require_positive(args, ("device_batch_size", "total_batch_size", "eval_tokens"))
for flag in ("fim_rate", "fim_spm_rate"):
    if not 0.0 <= getattr(args, flag) <= 1.0:
        raise SystemExit(f"--{flag}={getattr(args, flag)}: must be in [0, 1]")
checkpoint_dir("base", args.model_tag or f"d{args.depth}")  # the tag names a directory under the base dir
if args.num_iterations == 0 or args.num_iterations < -1:
    raise SystemExit(f"--num_iterations={args.num_iterations}: a positive number of steps, or -1 to derive it "
                     "from --target_flops / --target_param_data_ratio")

# -----------------------------------------------------------------------------
# Compute

device_type = autodetect_device_type(args.device_type)
check_tpu_flags(args, device_type)
xla = device_type == "xla"
if xla:
    from nanochat import tpu
    tpu.require_xla()
ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
num_devices = world_size  # for MFU
if xla:  # one process, SPMD over a (data, model) mesh: the data axis plays the DDP ranks' part in the batch
    mesh = tpu.make_mesh(args.tensor_parallel)
    num_devices = int(mesh.size())
    world_size = num_devices // args.tensor_parallel
master = rank == 0
dtype = compute_dtype(device_type)
autocast = torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device_type, enabled=False)
if args.run == "dummy" or not master:
    wandb_run = DummyWandb()
else:
    import wandb
    wandb_run = wandb.init(project="nanochat", name=args.run, config=user_config)

tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()

# -----------------------------------------------------------------------------
# Model

config = config_from_args(args, vocab_size)
if xla:
    try:
        table = tpu.layout(config, args.tensor_parallel, world_size, args.device_batch_size * world_size,
                           flash=args.xla_flash_attn)
    except ValueError as e:
        raise SystemExit(str(e))
    print0(f"mesh: (data, model) = ({world_size}, {args.tensor_parallel})\n" + tpu.format_layout(table, args.tensor_parallel))
head_dim = config.n_embd // config.n_head
if master and not rope_base_enough(config.rope_base, args.max_seq_len, head_dim):
    better = suggest_rope_base(args.max_seq_len, head_dim)
    print0(f"warning: --rope_base={config.rope_base:g} is too small for {args.max_seq_len}-token context at head dim "
           f"{head_dim} (Men et al. 2024, docs/model.md): " +
           (f"--rope_base={better:g} suits it" if better else "no base up to 5e9 does"))
dsa = config.dsa_start_layer >= 0
if args.dsa_warmup_steps < 0 or (args.dsa_warmup_steps and not dsa):
    raise SystemExit(f"--dsa_warmup_steps={args.dsa_warmup_steps}: needs --dsa and a number of steps >= 0")
if xla and args.dsa_kernel == "flex":
    raise SystemExit("--dsa_kernel=flex: flex_attention does not run on XLA; use auto or mask there")
# on XLA built on the CPU and moved: the CPU's generator gives the init a CPU run of the same seed has
model = build_model(config, "cpu").to(device) if xla else build_model(config, device)
model.kernel, model.dsa_kernel = args.kernel, args.dsa_kernel
set_mamba3_kernel(model, args.mamba3_kernel)  # a runtime switch too
set_mhc_kernel(model, args.mhc_kernel)
model.gradient_checkpointing = args.gradient_checkpointing  # a runtime switch, not in the config
model_tag = args.model_tag or f"d{args.depth}"
ckpt_dir = checkpoint_dir("base", model_tag)
num_params = model.num_params()
flops_per_token = model.estimate_flops()
print0(f"model: {json.dumps(config.to_dict())}")
print0(f"parameters: {num_params:,}  FLOPs/token: {flops_per_token:e}")



def ratio_params(m):
    """The parameters that --target_param_data_ratio multiplies (--param_count)."""
    return m.num_scaling_params() if args.param_count == "scaling" else m.num_params()


tokens_per_micro = args.device_batch_size * args.max_seq_len * world_size
if args.total_batch_size % tokens_per_micro:
    raise SystemExit(f"--total_batch_size={args.total_batch_size} must be a multiple of device_batch_size * "
                     f"max_seq_len * world_size = {tokens_per_micro}")
grad_accum_steps = args.total_batch_size // tokens_per_micro
print0(f"tokens per step: {args.total_batch_size:,} = {tokens_per_micro:,} per micro-step x {grad_accum_steps} accumulation steps")

if args.num_iterations > 0:
    num_iterations = args.num_iterations
elif args.target_flops > 0:
    num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
elif args.target_param_data_ratio > 0:
    num_iterations = round(args.target_param_data_ratio * ratio_params(model) / args.total_batch_size)
else:
    raise SystemExit("set one of --num_iterations, --target_flops, --target_param_data_ratio")
num_iterations = max(num_iterations, 1)
total_tokens = args.total_batch_size * num_iterations
print0(f"training for {num_iterations:,} steps = {total_tokens:,} tokens "
       f"({total_tokens / num_params:.1f} tokens/param, {flops_per_token * total_tokens:e} FLOPs)")

weight_decay = args.weight_decay
if args.weight_decay_scaling:
    # reference nanochat: wd tuned at d12 with B_ref = 2**19 tokens/step and D_ref = its ratio
    # horizon; keep the decay's timescale: lambda = lambda_ref * sqrt(B / B_ref) * (D_ref / D)
    with torch.device("meta"):
        d12 = GPT(config_from_args(argparse.Namespace(**{**vars(args), "depth": 12}), vocab_size))
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else 12
    weight_decay = schedules.scaled_weight_decay(args.weight_decay, args.total_batch_size,
                                                 ratio * ratio_params(model), ratio * ratio_params(d12))
    print0(f"Muon weight decay scaled from {args.weight_decay} to {weight_decay:.6f}")
optimizers = model.setup_optimizers(**optimizer_kwargs(args, weight_decay=weight_decay))
adamw, muon = optimizers

# -----------------------------------------------------------------------------
# Resume

step, loader_state, smooth_loss, train_time, val_bpb, min_val_bpb = 0, None, 0.0, 0.0, None, float("inf")
timed_steps = 0  # the steps train_time covers, over every resume (for the run's mean tok/s and MFU)
timed_flops = 0.0  # the FLOPs of those steps (a DSA warm-up step does less than a training step)
core_metric = None  # the last CORE measured (saved with the checkpoints: miniseries.sh reads it there)
if args.resume_from_step < 0:
    warn_earlier_run(ckpt_dir, "to keep it: --model_tag=NEW", print0)
if args.init_from:
    if args.resume_from_step >= 0:
        raise SystemExit("--init_from starts a new run from another run's weights, --resume_from_step continues this "
                         "run: give one of them")
    tag, _, at = args.init_from.partition(":")
    if not tag or (at and not at.isdigit()):
        raise SystemExit(f"--init_from={args.init_from}: give a base checkpoint's model tag, or TAG:STEP")
    if os.path.abspath(checkpoint_dir("base", tag)) == os.path.abspath(ckpt_dir):
        raise SystemExit(f"--init_from={args.init_from}: this run would save its steps into {ckpt_dir}, the run it "
                         "starts from: give it another --model_tag")
    try:
        src_step, src_meta, fresh = init_from(model, checkpoint_dir("base", tag), int(at) if at else None, tokenizer,
                                              device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--init_from={args.init_from}: {e}")
    user_config["init_from"] = f"{tag}:{src_step}"  # the step loaded, in every checkpoint's meta (and across resumes)
    ours = config.to_dict()
    differ = {k: v for k, v in src_meta["model_config"].items() if ours.get(k) != v}
    print0(f"initialized from base checkpoint {tag} step {src_step}; {len(fresh)} parameters of this model are "
           f"not in it and keep their init" + (f" ({fresh[0]}, ...)" if fresh else "") +
           (f"; its config had {differ}" if differ else ""))
if args.resume_from_step >= 0:
    resume_step, model_state, rank_state, meta = resume_checkpoint(ckpt_dir, args.resume_from_step, rank, device)
    if GPTConfig.from_dict(meta["model_config"]) != config:
        raise SystemExit(f"checkpoint {ckpt_dir} step {resume_step} has model {meta['model_config']}, "
                         f"not {config.to_dict()}: resume with the same model flags")
    model.load_state_dict(model_state)
    load_optimizer_states(optimizers, rank_state["optimizers"])  # (the flags of this run keep their lrs)
    loader_state = rank_state["loader"]
    step, smooth_loss, train_time = meta["step"], meta["smooth_loss"], meta["train_time"]
    timed_steps = meta.get("timed_steps", 0)
    timed_flops = meta.get("timed_flops", timed_steps * args.total_batch_size * flops_per_token)
    if step > num_iterations:
        raise SystemExit(f"checkpoint step {step} is past this run's {num_iterations} steps: resume with the flags "
                         f"that set the length (--num_iterations, --total_batch_size, ...; it was {meta.get('num_iterations')} steps)")
    if meta.get("num_iterations") not in (None, num_iterations):
        print0(f"warning: the checkpoint's run had {meta['num_iterations']} steps, this one {num_iterations}: "
               "the learning-rate schedule continues at the new length")
    val_bpb, min_val_bpb, core_metric = meta.get("val_bpb"), meta.get("min_val_bpb", float("inf")), meta.get("core_metric")
    user_config["init_from"] = meta.get("user_config", {}).get("init_from", "")  # where the run's weights began
    print0(f"resumed from {ckpt_dir} step {step}")
    del model_state, rank_state

if xla:  # shard after any resume: the plan annotates the parameters in place, and a resume's optimizer state
    plan = tpu.shard_model(model, mesh, args.tensor_parallel)
    tpu.shard_optimizer_states(optimizers, model, mesh, plan)
    if args.gradient_checkpointing:
        model.checkpoint_block = tpu.checkpoint_block
    if args.xla_flash_attn:
        why = tpu.flash_unavailable()
        if why:
            print0(f"--xla_flash_attn: {why}; full-context layers use SDPA")
        else:
            model.flash = tpu.FlashAttention(mesh)
    if args.sample_every > 0 or args.core_metric_every > 0:
        print0("note: on XLA, sampling and CORE compile a graph per sequence length (slow); "
               "--sample_every=-1 --core_metric_every=-1 skip them")
if args.fp8:
    from nanochat import fp8
    try:
        print0(f"fp8: {fp8.convert(model)} linear layers train with FP8 matmuls")
    except ValueError as e:
        raise SystemExit(str(e))
orig_model = model  # uncompiled, for state dicts, sampling and evaluation with other shapes
use_compile = args.compile if args.compile >= 0 else device_type == "cuda"
if use_compile:
    model = torch.compile(model, dynamic=False)

print0(f"data: {resolve_data_dir(args.data_dir)}")
rows = args.device_batch_size * (world_size if xla else 1)  # SPMD: one loader for all data-parallel slices
place = (lambda b: tuple(tpu.shard_batch(t, mesh) for t in b)) if xla else (lambda b: b)
train_loader = DataLoader(tokenizer, rows, args.max_seq_len, "train", device,
                          data_dir=args.data_dir, resume_state=loader_state, data_order=args.data_order,
                          streaming=args.streaming_data, fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate,
                          fim_seed=args.seed)


def make_val_loader():  # no FIM: val bpb stays left-to-right
    return DataLoader(tokenizer, rows, args.max_seq_len, "val", device, data_dir=args.data_dir)


# the loader runs one batch ahead of training; a checkpoint stores its state from before
# that batch was fetched, so a resumed run trains on exactly the batches it would have
loader_state = train_loader.state_dict()
x, y = place(next(train_loader))

# -----------------------------------------------------------------------------
# Schedules


def lr_multiplier(it):
    warmup = args.warmup_steps if args.warmup_steps >= 0 else round(args.warmup_ratio * num_iterations)
    return schedules.lr_multiplier(it, num_iterations, warmup, args.warmdown_ratio, args.final_lr_frac)


def fetch_eval_bundle():
    """The CORE bundle's directory, or None (then CORE is off for the run). Rank 0 downloads
    while the others wait, and all ranks take one decision: a rank that skipped CORE would
    leave the others waiting in its collectives."""
    from nanochat.core_eval import EVAL_BUNDLE_URL, ensure_eval_bundle
    url = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", EVAL_BUNDLE_URL)

    def fetch():
        try:
            return ensure_eval_bundle(url)
        except (RuntimeError, ValueError) as e:
            print(f"rank {rank}: CORE metric turned off for this run: {e}", flush=True)
            return None
    path = fetch() if master else None
    if ddp:
        ok = torch.tensor(float(path is not None), device=device)
        torch.distributed.broadcast(ok, 0)  # the others wait for rank 0's download, and skip theirs if it failed
        if not master and ok.item() == 1.0:
            path = fetch()  # in place by now on a shared disk, else this node's own download
        ok = torch.tensor(float(path is not None), device=device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        path = path if ok.item() == 1.0 else None
    return path


def muon_momentum(it):
    return schedules.muon_momentum(it, num_iterations, args.muon_momentum_schedule, args.warmdown_ratio)


def muon_weight_decay(it):
    return schedules.muon_weight_decay(it, num_iterations, weight_decay, args.weight_decay_schedule)


def throughput():
    """Mean tok/s and MFU (%) of the timed steps so far; MFU None where the peak is unknown."""
    tok_per_sec = timed_steps * args.total_batch_size / train_time if train_time > 0 else None
    known = tok_per_sec is not None and peak_flops < float("inf")
    return tok_per_sec, 100 * timed_flops / train_time / (peak_flops * num_devices) if known else None


def checkpoint(step):
    tok_per_sec, mfu = throughput()
    meta = {"step": step, "model_config": config.to_dict(), "user_config": user_config,
            "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
            "world_size": world_size, "smooth_loss": smooth_loss, "train_time": train_time,
            "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "num_iterations": num_iterations,
            "num_params": num_params, "num_scaling_params": orig_model.num_scaling_params(),
            "flops_per_token": flops_per_token, "total_batch_size": args.total_batch_size,
            "timed_steps": timed_steps, "timed_flops": timed_flops, "tok_per_sec": tok_per_sec, "mfu": mfu, "core_metric": core_metric}
    host = tpu.to_cpu if xla else (lambda o: o)  # whole CPU tensors: the GPU checkpoint format
    save_checkpoint(ckpt_dir, step, host(orig_model.state_dict()),
                    host({"optimizers": [o.state_dict() for o in optimizers], "loader": loader_state}), meta, rank)

# -----------------------------------------------------------------------------
# Training loop

peak_flops = get_peak_flops(device_name(device_type))
print0(f"device: {device_name(device_type)}, " + (f"peak bf16 {peak_flops:e} FLOP/s" if peak_flops < float("inf")
                                                   else "peak FLOP/s unknown, so MFU shows as 0"))
ema_beta = 0.9
steps_run, timed_time = 0, 0.0  # steps this process ran, time of those after its first 10
loss_curve, bpb_curve = [], []  # (step, value) for the report's plots (from this process's start)
while True:
    last_step = step == num_iterations
    # --- evaluation, sampling, checkpoint (not timed) ---
    if args.eval_every > 0 and (last_step or step % args.eval_every == 0) or (last_step and args.eval_every <= 0):
        model.eval()
        val_loader = make_val_loader()
        eval_steps = max(1, args.eval_tokens // tokens_per_micro)
        with autocast:
            val_bpb = evaluate_bpb(model, map(place, val_loader), eval_steps, token_bytes)
        val_loader.close()
        min_val_bpb = min(min_val_bpb, val_bpb)
        bpb_curve.append((step, val_bpb))
        print0(f"step {step:05d} | val bpb: {val_bpb:.4f}")
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()
    if args.core_metric_every > 0 and step > 0 and (last_step or step % args.core_metric_every == 0):
        from nanochat.core_eval import evaluate_core
        bundle_dir = fetch_eval_bundle()
        if bundle_dir is None:  # offline: don't lose the run over a metric
            args.core_metric_every = -1
        else:
            orig_model.eval()
            with autocast:
                core = evaluate_core(orig_model, tokenizer, device, bundle_dir, max_per_task=args.core_metric_max_per_task)
            core_metric = core["core_metric"]
            print0(f"step {step:05d} | CORE: {core['core_metric']:.4f}")
            wandb_run.log({"step": step, "core_metric": core["core_metric"]})
            orig_model.train()
    if step > 0 and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
        checkpoint(step)  # (before the samples: nothing they do can cost the run its checkpoint)
    if master and args.sample_every > 0 and step > 0 and (last_step or step % args.sample_every == 0):
        orig_model.eval()
        for prompt in ["The capital of France is", "#include <vector>\n\nint main() {", "def fibonacci(n):"]:
            with autocast:
                out = list(orig_model.generate(tokenizer.encode(prompt, prepend="<|bos|>"), 24, temperature=0))
            print0(f"sample: {prompt!r} -> {tokenizer.decode(out)!r}")
        orig_model.train()
    if last_step:
        break

    # --- one optimizer step ---
    synchronize(device_type)
    t0 = time.time()
    train_loss = torch.zeros((), device=device)
    mtp_loss = torch.zeros((), device=device)  # the MTP modules' loss L_MTP, logged on its own
    index_loss = torch.zeros((), device=device)  # DSA's indexer loss L^I, logged on its own
    orig_model.dsa_stage = "warmup" if step < args.dsa_warmup_steps else "sparse"
    # a warm-up step trains only the indexers: a forward's FLOPs (a third of a training step's;
    # the indexers' own backward is not counted)
    step_flops = flops_per_token / 3 if orig_model.dsa_stage == "warmup" else flops_per_token
    for micro in range(grad_accum_steps):
        with autocast:
            loss, main_loss, micro_mtp = model(x, y, return_parts=True)
        train_loss += main_loss / grad_accum_steps  # the main loss, comparable to runs without MTP
        mtp_loss += micro_mtp / grad_accum_steps
        if dsa:
            index_loss += orig_model.indexer_loss / grad_accum_steps
        (loss / grad_accum_steps).backward()
        loader_state = train_loader.state_dict()
        x, y = place(next(train_loader))  # overlaps the host-side packing with the GPU's work
    grad_norm = None
    if args.grad_clip > 0:
        if ddp:  # clip the gradient averaged over ranks, as one process would (the optimizers'
            for p in orig_model.parameters():  # own averaging then leaves it unchanged)
                if p.grad is not None:
                    all_reduce_mean(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(orig_model.parameters(), args.grad_clip)
    lrm = lr_multiplier(step)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
    for g in muon.param_groups:
        g["momentum"] = muon_momentum(step)
        g["weight_decay"] = muon_weight_decay(step)
    for opt in optimizers:
        opt.step()
    orig_model.zero_grad(set_to_none=True)
    if ddp:  # the step's loss: the mean over all micro-batches of all ranks
        torch.distributed.all_reduce(train_loss, op=torch.distributed.ReduceOp.AVG)
        if config.mtp:
            torch.distributed.all_reduce(mtp_loss, op=torch.distributed.ReduceOp.AVG)
        if dsa:
            torch.distributed.all_reduce(index_loss, op=torch.distributed.ReduceOp.AVG)
    synchronize(device_type)  # on XLA this runs the step's graph; .item() before it would run the forward twice
    train_loss, mtp_loss, index_loss = train_loss.item(), mtp_loss.item(), index_loss.item()
    dt = time.time() - t0
    step += 1

    # --- logging ---
    smooth_loss = ema_beta * smooth_loss + (1 - ema_beta) * train_loss
    debiased = smooth_loss / (1 - ema_beta ** step)
    tok_per_sec = args.total_batch_size / dt
    mfu = 100 * tok_per_sec * step_flops / (peak_flops * num_devices)
    steps_run += 1
    if steps_run > 10:  # the first steps of a process include compilation
        train_time += dt
        timed_time += dt
        timed_steps += 1
        timed_flops += step_flops * args.total_batch_size
    eta = (num_iterations - step) * timed_time / (steps_run - 10) if steps_run > 10 else float("nan")
    print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss: {debiased:.6f} "
           f"(step: {train_loss:.6f}) | " + (f"mtp_loss: {mtp_loss:.6f} | " if config.mtp else "") +
           (f"indexer_loss: {index_loss:.6f} | " if dsa else "") +
           f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,.0f} | mfu: {mfu:.2f} | "
           f"eta: {eta / 60:.1f}m" + (f" | grad norm: {grad_norm:.3f}" if grad_norm is not None else ""))
    loss_curve.append((step, debiased))
    wandb_run.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": tok_per_sec, "train/mfu": mfu,
                   **({"train/mtp_loss": mtp_loss} if config.mtp else {}),
                   **({"train/indexer_loss": index_loss} if dsa else {})})

print0(f"peak memory: {max_memory_allocated_mib(device_type):.0f} MiB; training time: {train_time / 60:.2f}m; "
       f"min val bpb: {min_val_bpb:.4f}; data cropped by packing: {train_loader.crop_fraction:.2%}")
tok_per_sec, mfu = throughput()
report = get_report()
report.log(section="Base model training", data=[user_config, {
    "parameters": num_params, "flops_per_token": flops_per_token, "num_iterations": num_iterations,
    "tokens": total_tokens, "min_val_bpb": min_val_bpb, "final_val_bpb": val_bpb, "core_metric": core_metric,
    "training_time_min": round(train_time / 60, 2), "tok_per_sec": tok_per_sec, "mfu_percent": mfu,
    "peak_memory_mib": round(max_memory_allocated_mib(device_type))}])
report.log_curve("base", "train loss", loss_curve)
report.log_curve("base", "val bpb", bpb_curve)
train_loader.close()
wandb_run.finish()
compute_cleanup()
