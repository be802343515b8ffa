"""
Inference benchmark: time to first token (prefill) and decode tokens/s of the engine
for several batch sizes, with the memory bandwidth each decode step achieves against
the bytes it must read (weights + the whole static KV cache), and the first call's time
(what a server's first request of that size waits: compile and CUDA-graph capture). Random weights and a
random prompt (speed does not depend on the values; speculative decoding's acceptance
does, so its rate here says nothing about a trained model). Prints a table, then one JSON line.

    python -m scripts.engine_bench                                # d12, prompt 1792, 256 new, batch 1 and 128
    python -m scripts.engine_bench --mamba_pattern=AAM            # the same with Mamba-3 layers
    python -m scripts.engine_bench --depth=2 --prompt_len=64 --new_tokens=32 --batch_sizes=1,4 --device_type=cpu
    python -m scripts.engine_bench --speculative=2 --batch_sizes=1  # + greedy self-speculative decoding, 2 MTP modules
    python -m scripts.engine_bench --weights=fp32 --stack_qkv=1     # as chat_cli / chat_web serve with --bf16_linears=0
    python -m scripts.engine_bench --temperature=0.6 --top_k=50     # sampled, as chat answers (greedy by default)
    python -m scripts.engine_bench --inductor=combo_kernels=True    # an inductor setting for the decode step's compile
    python -m scripts.engine_bench --pdl=0                          # without programmatic dependent launch (Hopper+)

--weights: bf16 (default) casts the whole model to bf16 and runs it without autocast;
bf16_linears keeps a checkpoint's fp32 weights but the Linear ones in bf16 (GPT.linears_to)
under bf16 autocast, as chat_cli and chat_web serve (the same speed); fp32 is theirs with
--bf16_linears=0 (autocast casts every weight at every step).

--speculative=D adds D MTP modules to the model and one more row: batch 1 decoded by
self-speculative decoding (nanochat/mtp.py; one CUDA graph per round when D = 1 on an
attention-only model, plain PyTorch otherwise), with its acceptance rate. With random
weights the drafts are almost never accepted, so that row measures the cost of drafting
and verifying, not the gain a trained model would get: for that, --model_tag benchmarks a
trained base checkpoint (its own config, its MTP modules if it has them) on a prompt cut
from the validation shard of --data_dir:

    python -m scripts.engine_bench --model_tag=d12 --data_dir=DIR --speculative=1 --batch_sizes=1
"""

import argparse
import contextlib
import json
import platform
import time

import torch

from nanochat import attention, gpt
from nanochat.common import (autocast_for, autodetect_device_type, compute_dtype, compute_init, device_name,
                             get_peak_bandwidth, synchronize)
from nanochat.engine import Engine, decode_compile_args
from nanochat.gpt import GPT, build_model
from nanochat.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="Benchmark the inference engine; prints a table and a JSON line")
parser.add_argument("--depth", type=int, default=12)
parser.add_argument("--vocab_size", type=int, default=32768)
parser.add_argument("--seq_len", type=int, default=2048, help="model context (the static cache's length)")
parser.add_argument("--prompt_len", type=int, default=1792)
parser.add_argument("--new_tokens", type=int, default=256)
parser.add_argument("--batch_sizes", default="1,128")
parser.add_argument("--cuda_graphs", type=int, default=1)
parser.add_argument("--compile_mode", default="", help="torch.compile mode of the decode step, e.g. "
                    "max-autotune-no-cudagraphs (Triton matmul templates with fused epilogues; long compile)")
parser.add_argument("--pdl", type=int, default=1, help="0: the decode step compiled without programmatic dependent "
                    "launch (on by default on Hopper and newer GPUs, as chat serves: engine.decode_compile_args)")
parser.add_argument("--stack_qkv", type=int, default=0,
                    help="1: each attention layer's q, k, v projections as one matmul (GPT.stack_projections)")
parser.add_argument("--decode_kernel", default="sdpa", choices=["sdpa", "triton"],
                    help="attention of a decode step: SDPA over the whole cache with a mask, or nanochat/decode_triton.py "
                         "(flash-decoding over the visible keys; CUDA; at batch 1 its linears run decode_triton.gemv)")
parser.add_argument("--gemv", type=int, default=1, help="0: with --decode_kernel=triton, batch 1's linears through cuBLAS "
                    "(F.linear) instead of decode_triton.gemv, to compare")
parser.add_argument("--gemv_bk", type=int, default=0, help="columns of W a decode_triton.gemv program reads at a "
                    "time, a power of two (0: its default, GEMV_BK); its first tile is read before the PDL wait, so "
                    "one of K or more reads all of W's rows early")
parser.add_argument("--gemv_warps", type=int, default=0, help="warps of a decode_triton.gemv program (0: its default)")
parser.add_argument("--fuse_rows", type=int, default=1, help="0: with --decode_kernel=triton, batch 1's norms, residual "
                    "adds and layer lambdas as kernels of their own, not inside the gemvs (gpt.Block.decode_row), to compare")
parser.add_argument("--mamba_pattern", default="", help="e.g. AAM: a hybrid with Mamba-3 layers (all four parts on)")
parser.add_argument("--speculative", type=int, default=0,
                    help="D > 0: the model gets D MTP modules, and a batch-1 row decoded speculatively")
parser.add_argument("--model_tag", default="", help="benchmark this base checkpoint (trained weights) instead of random ones")
parser.add_argument("--data_dir", default=None, help="with --model_tag: the prompt is text from this directory's validation shard")
parser.add_argument("--profile", type=int, default=0,
                    help="N > 0: also profile 16 decode steps at each batch size (CUDA graphs replayed) and print "
                         "the N longest GPU kernels and the kernels a step")
parser.add_argument("--weights", default="bf16", choices=["bf16", "fp32", "bf16_linears"],
                    help="bf16: the model cast to bf16, no autocast; bf16_linears: fp32 weights with the Linear ones in "
                         "bf16 (GPT.linears_to) under bf16 autocast, as chat_cli and chat_web serve; fp32: theirs with "
                         "--bf16_linears=0 (autocast casts every weight each step)")
parser.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (default); > 0: sampled, as chat does (its default 0.6 with --top_k 50)")
parser.add_argument("--top_k", type=int, default=0, help="with --temperature > 0: sample from the k most likely (0: all)")
parser.add_argument("--inductor", default="", help="torch._inductor.config settings for the decode step's compile, "
                    "name=value pairs, e.g. combo_kernels=True,aggressive_fusion=True (experiments)")
parser.add_argument("--device_type", default="")
parser.add_argument("--peak_bandwidth", type=float, default=None,
                    help="bytes/s of device memory (default: from the GPU's name, common.PEAKS; H200 4.8e12)")
args = parser.parse_args()
if args.inductor:
    import ast

    import torch._inductor.config as inductor_config
    for pair in args.inductor.split(","):
        name, _, value = pair.partition("=")
        *path, last = name.strip().split(".")
        holder = inductor_config
        for part in path:
            holder = getattr(holder, part, None)
        if holder is None or not hasattr(holder, last):
            parser.error(f"--inductor: torch._inductor.config has no {name.strip()!r} in torch {torch.__version__}")
        try:
            setattr(holder, last, ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError):
            parser.error(f"--inductor: {pair!r}: give name=value with a Python literal value (True, 64, 'x')")

device_type = autodetect_device_type(args.device_type)
_, _, _, _, device = compute_init(device_type)
dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
hybrid = dict(mamba_pattern=args.mamba_pattern, mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True,
              mamba3_trapezoidal=True) if args.mamba_pattern else {}
if args.model_tag:
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataset import list_parquet_files, parquets_iter_batched, split_files
    model, tokenizer, _ = load_model("base", device, model_tag=args.model_tag)
    model, config = model.eval(), model.config
    if args.speculative and config.mtp_depth != args.speculative:
        raise SystemExit(f"--speculative={args.speculative}, but checkpoint {args.model_tag} has "
                         f"{config.mtp_depth if config.mtp else 0} MTP modules")
    split_files(list_parquet_files(args.data_dir), "val")  # a clear error without shards
    text = "".join(doc for batch in parquets_iter_batched("val", args.data_dir) for doc in batch)
    prompt = tokenizer.encode(text[:args.prompt_len * 20], prepend="<|bos|>")[:args.prompt_len]
else:
    mtp = dict(mtp=True, mtp_depth=args.speculative) if args.speculative else {}
    config = GPT.config_for_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len, **hybrid, **mtp)
    model = build_model(config, device).eval()
    # a byte-level tokenizer needs no training: the engine only uses it for special tokens here
    tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
if args.weights == "bf16":
    model = model.to(dtype)
elif args.weights == "bf16_linears":
    model.linears_to(compute_dtype(device_type))
# (fp32 weights: bf16 autocast around every generation, as chat_cli and chat_web run it)
autocast = (lambda: contextlib.nullcontext()) if args.weights == "bf16" else (lambda: autocast_for(device_type))
if args.stack_qkv:
    model.stack_projections()
attention.ROW_GEMV = bool(args.gemv)
gpt.ROW_FUSION = bool(args.fuse_rows)
if args.gemv_bk & (args.gemv_bk - 1) or args.gemv_warps & (args.gemv_warps - 1):
    parser.error(f"--gemv_bk={args.gemv_bk}, --gemv_warps={args.gemv_warps}: each a power of two (or 0)")
if args.gemv_bk or args.gemv_warps:
    from nanochat import decode_triton
    decode_triton.GEMV_BK = args.gemv_bk or decode_triton.GEMV_BK
    decode_triton.GEMV_WARPS = args.gemv_warps or decode_triton.GEMV_WARPS
try:
    model.set_decode_kernel(args.decode_kernel)
except ValueError as e:
    parser.error(f"--{e}")
engine = Engine(model, tokenizer, use_cuda_graphs=bool(args.cuda_graphs), use_tools=False)
engine.stop_tokens = set()  # decode exactly new_tokens tokens (random weights would rarely stop anyway)
engine.compile_mode = args.compile_mode or None
engine.pdl = bool(args.pdl)
elt = torch.finfo(dtype).bits // 8
mtp_bytes = sum(p.numel() * p.element_size() for p in model.mtp.parameters()) if args.speculative else 0  # not read by plain decoding
# every matrix is read each step, in the dtype it is kept in
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - \
    model.wte.weight.numel() * model.wte.weight.element_size() - mtp_bytes
head_dim = config.n_embd // config.n_head
max_len = len(prompt) + args.new_tokens

peak_bandwidth = args.peak_bandwidth or get_peak_bandwidth(device_name(device_type))  # None: unknown (a CPU)
rows = []
runs = [(int(b), False) for b in args.batch_sizes.split(",")] + ([(1, True)] if args.speculative else [])
for B, speculative in runs:
    for attempt in range(2):  # the first run compiles and captures; time the second
        with autocast():
            synchronize(device_type)
            t0 = time.time()
            gen = engine.generate(prompt, num_samples=B, max_tokens=args.new_tokens, temperature=args.temperature,
                                  top_k=args.top_k or None, speculative=speculative)
            next(gen)
            synchronize(device_type)
            t_first = time.time()
            n = 1 + sum(1 for _ in gen)
            synchronize(device_type)
            t_end = time.time()
        if attempt == 0:  # what a server's first request of this size costs: compile and graph capture included
            first_call_s = t_end - t0
    decode_steps = n - 1  # speculative: tokens after the first, in fewer (longer) forwards
    step_s = (t_end - t_first) / max(decode_steps, 1)
    # attention reads its whole static KV cache (SDPA with a mask), or only the keys each step
    # sees (the Triton kernel: on average the mean position + 1, at most the window); a Mamba-3
    # layer reads and writes its fp32 state
    seen = lambda w: max_len if args.decode_kernel == "sdpa" else min(w, (len(prompt) + 1 + max_len) / 2)
    cache_bytes = sum(2 * B * config.n_kv_head * seen(s.window) * head_dim * elt if s.mixer == "attn" else
                      2 * 4 * B * sum(t.numel() for t in (c.phi, c.state, c.k_prev, c.x_prev))
                      for s, c in zip(model.plan, model.init_cache(1, 1, "meta").layers))
    bw = (weight_bytes + cache_bytes) / step_s
    rows.append({"batch": B, "speculative": speculative, "ttft_ms": round(1000 * (t_first - t0), 1),
                 "decode_step_ms": round(1000 * step_s, 3), "decode_tok_per_s": round(B / step_s),
                 "first_call_s": round(first_call_s, 2),
                 "bytes_per_step_mb": round((weight_bytes + cache_bytes) / 1e6, 1),
                 "bandwidth_util_percent": round(100 * bw / peak_bandwidth, 1) if peak_bandwidth else None,
                 "tokens": n})
    if speculative:  # per token, not per forward: the bytes per step do not apply
        s = engine.spec_stats
        rows[-1].update(acceptance=round(s["accepted"] / max(s["drafted"], 1), 3), bytes_per_step_mb=None,
                        bandwidth_util_percent=None)

if args.profile:  # where a decode step's time goes: its kernels (a graph replay shows each of them)
    from torch.profiler import ProfilerActivity, profile
    for B, speculative in runs:
        with autocast():
            gen = engine.generate(prompt, num_samples=B, max_tokens=17, temperature=args.temperature,
                                  top_k=args.top_k or None, speculative=speculative)
            next(gen)  # the prefill, outside the profile
            synchronize(device_type)
            with profile(activities=[ProfilerActivity.CUDA if device_type == "cuda" else ProfilerActivity.CPU]) as prof:
                n = sum(1 for _ in gen)
                synchronize(device_type)
        if device_type == "cuda":
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            print(f"batch {B}{' speculative' if speculative else ''}: {sum(e.count for e in events) / max(n, 1):.0f} "
                  f"GPU kernels a step, {sum(e.device_time_total for e in events) / max(n, 1):.0f} us of GPU time a step")
        sort = "self_cuda_time_total" if device_type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=90))

print(f"{'batch':>6} {'TTFT ms':>9} {'step ms':>9} {'tok/s':>10} {'MB/step':>9} {'BW util':>8} {'1st call s':>10}")
for r in rows:
    if r["speculative"]:
        print(f"{'1 spec':>6} {r['ttft_ms']:>9} {r['decode_step_ms']:>9} {r['decode_tok_per_s']:>10,}   "
              f"acceptance {r['acceptance']:.1%}")
        continue
    print(f"{r['batch']:>6} {r['ttft_ms']:>9} {r['decode_step_ms']:>9} {r['decode_tok_per_s']:>10,} "
          f"{r['bytes_per_step_mb']:>9} {r['bandwidth_util_percent'] if peak_bandwidth else '?':>7}% {r['first_call_s']:>10}")
print(json.dumps({"model_tag": args.model_tag or None, "depth": config.n_layer, "mamba_pattern": config.mamba_pattern, "mtp_depth": args.speculative, "prompt_len": len(prompt), "new_tokens": args.new_tokens,
                  "dtype": str(dtype).replace("torch.", ""), "cuda_graphs": bool(args.cuda_graphs) and device_type == "cuda",
                  "compile_mode": engine.compile_mode, "pdl": "options" in decode_compile_args(None, engine.pdl, model.wte.weight.device), "stack_qkv": bool(args.stack_qkv), "decode_kernel": args.decode_kernel, "gemv": bool(args.gemv), "fuse_rows": bool(args.fuse_rows), "gemv_bk": args.gemv_bk or None, "gemv_warps": args.gemv_warps or None, "weights": args.weights,
                  "temperature": args.temperature, "top_k": args.top_k, "inductor": args.inductor or None, "peak_bandwidth": peak_bandwidth, "results": rows,
                  "device": device_name(device_type), "torch": torch.__version__, "python": platform.python_version(),
                  "date": time.strftime("%Y-%m-%d")}))
