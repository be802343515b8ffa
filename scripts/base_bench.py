"""
Pretraining throughput benchmark: tokens/s, MFU and peak memory of the real training
step (model, torch.compile, bf16 autocast, Muon + AdamW, gradient accumulation) on
random tokens, so it needs no data or tokenizer. Prints one JSON line.

    python -m scripts.base_bench --depth=20 --window_pattern=L
    python -m scripts.base_bench --depth=20 --window_pattern=SSSL --steps=30
"""

import argparse
import json
import platform
import time

import torch

from nanochat.common import (autodetect_device_type, compute_dtype, compute_init, device_name, get_peak_flops,
                             synchronize)
from nanochat.flags import add_model_args, add_optimizer_args, config_from_args, optimizer_kwargs
from nanochat.gpt import build_model
from nanochat.mamba3 import set_mamba3_kernel
from nanochat.mhc import set_mhc_kernel

parser = argparse.ArgumentParser(description="Benchmark the pretraining step; prints a JSON line")
add_model_args(parser)  # the model and step flags of scripts/base_train
add_optimizer_args(parser)  # and its optimizer flags, with their defaults
parser.add_argument("--device_batch_size", type=int, default=32)
parser.add_argument("--total_batch_size", type=int, default=-1, help="tokens per optimizer step (default: one micro-step)")
parser.add_argument("--vocab_size", type=int, default=32768)
parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps, after the warmup")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
parser.add_argument("--device_type", default="")
parser.add_argument("--fp8", type=int, default=0, help="1: FP8 matmuls in the blocks' linear layers (nanochat/fp8.py)")
parser.add_argument("--sdpa", default="auto", choices=["auto", "flash", "cudnn", "efficient"],
                    help="restrict SDPA (full-context layers) to one backend, to compare them")
parser.add_argument("--profile", type=int, default=0, help="also profile one step and print the top N kernels")
args = parser.parse_args()
config = config_from_args(args, args.vocab_size)  # stops at once on a bad model flag
if args.tensor_parallel != 1 or args.xla_flash_attn:
    raise SystemExit("--tensor_parallel and --xla_flash_attn are base_train's (TPU SPMD, docs/TPU_SETUP.md); "
                     "base_bench measures one device")

device_type = autodetect_device_type(args.device_type)
_, _, _, world_size, device = compute_init(device_type)
dtype = compute_dtype(device_type)
if args.sdpa != "auto":
    for name in ("flash", "cudnn", "mem_efficient"):
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(name.endswith(args.sdpa))
model = build_model(config, device)
model.kernel = args.kernel
set_mamba3_kernel(model, args.mamba3_kernel)  # a runtime switch too
set_mhc_kernel(model, args.mhc_kernel)
model.gradient_checkpointing = args.gradient_checkpointing  # a runtime switch, not in the config
adamw, muon = optimizers = model.setup_optimizers(**optimizer_kwargs(args))  # base_train's optimizer flags
flops_per_token = model.estimate_flops()
if args.fp8:
    from nanochat import fp8
    try:
        fp8.convert(model)
    except ValueError as e:
        raise SystemExit(str(e))
use_compile = not args.no_compile and (args.compile > 0 or (args.compile < 0 and device_type == "cuda"))
train_model = torch.compile(model, dynamic=False) if use_compile else model
B, T = args.device_batch_size, args.max_seq_len
total = args.total_batch_size if args.total_batch_size > 0 else B * T * world_size
accum = total // (B * T * world_size)
gen = torch.Generator(device=device).manual_seed(0)
batches = [torch.randint(0, config.vocab_size, (B, T + 1), device=device, generator=gen) for _ in range(4)]


def step(i):
    for micro in range(accum):
        batch = batches[(i * accum + micro) % len(batches)]
        with torch.amp.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = train_model(batch[:, :-1], batch[:, 1:])
        (loss / accum).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss


for i in range(args.warmup):
    step(i).item()
synchronize(device_type)
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t0 = time.time()
for i in range(args.steps):
    loss = step(i)
loss.item()
synchronize(device_type)
dt = time.time() - t0
tok_per_sec = args.steps * total / dt
peak = get_peak_flops(device_name(device_type))
if args.profile:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(0).item()
        synchronize(device_type)
    sort = "self_cuda_time_total" if device_type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=90))
print(json.dumps({"sdpa": args.sdpa, "fp8": args.fp8, "kernel": args.kernel, "mamba3_kernel": args.mamba3_kernel,
    "mhc_kernel": args.mhc_kernel, "compile": use_compile,
    "gradient_checkpointing": args.gradient_checkpointing,
    "depth": args.depth, "window_pattern": args.window_pattern, "n_embd": config.n_embd, "params": model.num_params(),
    "seq_len": T, "device_batch_size": B, "total_batch_size": total, "grad_accum": accum, "vocab_size": config.vocab_size,
    "steps": args.steps, "step_ms": round(1000 * dt / args.steps, 1), "tok_per_sec": round(tok_per_sec),
    "mfu_percent": round(100 * tok_per_sec * flops_per_token / (peak * world_size), 2),
    "flops_per_token": flops_per_token,
    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device_type == "cuda" else None,
    "device": device_name(device_type), "torch": torch.__version__, "python": platform.python_version(),
    "date": time.strftime("%Y-%m-%d"), "loss": round(loss.item(), 4)}))
