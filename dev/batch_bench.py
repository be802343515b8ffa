"""
The continuous batcher (nanochat/batching.py) alone, without HTTP: N requests submitted at
once, each consumed by its own thread (as chat_web's), every answer max_tokens long. Prints
decode tokens/s and where a step's time goes: drawing the tokens on the device, the host's
share of sampling (which waits for the draws, and so for the step before them), launching
the step, admissions (prefills), and the step's graph replayed alone. The model is built as
chat_web serves a checkpoint: random fp32 weights under bf16 autocast on CUDA
(--bf16_linears=1: its Linear weights in bf16, GPT.linears_to); no stop tokens and no tool,
so answers run to max_tokens.

    python dev/batch_bench.py                                 # d20, 128 slots, 32 and 128 requests x 256 tokens
    python dev/batch_bench.py --depth=2 --slots=8 --requests=8 --max_tokens=16 --device_type=cpu
    python dev/batch_bench.py --prefill_rows=128 --requests=   # first-seen prefill shapes only

--prefill_rows=N first times the batcher's eager prefill of 1..N copies of the chat prompt, each
row count once the first time the process sees that shape and once again: what a shape not
seen before costs (on an H200 with cuDNN's attention: 56-80 ms against 16-21 ms, d20).
"""

import argparse
import random
import threading
import time

import torch

from nanochat.batching import Batcher
from nanochat.common import autocast_for, autodetect_device_type, compute_dtype, synchronize
from nanochat.engine import Engine, cache_length
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description="Benchmark the continuous batcher without HTTP")
parser.add_argument("--depth", type=int, default=20)
parser.add_argument("--slots", type=int, default=128, help="rows of the shared decode cache (--batch_slots)")
parser.add_argument("--requests", type=str, default="32,128", help="comma-separated numbers of concurrent requests")
parser.add_argument("--max_tokens", type=int, default=256)
parser.add_argument("--device_type", type=str, default="", help="cuda|cpu (empty: autodetect)")
parser.add_argument("--bf16_linears", type=int, default=0,
                    help="1: the Linear weights in the compute dtype (bf16 on GPUs; GPT.linears_to), not fp32 under autocast")
parser.add_argument("--stack_qkv", type=int, default=0,
                    help="1: each attention layer's q, k, v projections as one matmul (GPT.stack_projections)")
parser.add_argument("--decode_kernel", default="sdpa", choices=["sdpa", "triton"],
                    help="attention of a decode step: SDPA with a mask, or nanochat/decode_triton.py (CUDA)")
parser.add_argument("--prefill_rows", type=int, default=0,
                    help="first, time prefills of 1..N prompts, each row count first seen and again (0: skip)")
args = parser.parse_args()
device = torch.device(args.device_type or autodetect_device_type())

tok = get_tokenizer()
C = args.depth * 64
cfg = GPTConfig(n_layer=args.depth, n_head=max(C // 128, 1), n_kv_head=max(C // 128, 1), n_embd=C,
                vocab_size=tok.get_vocab_size(), sequence_len=2048)
torch.manual_seed(0)
model = build_model(cfg, device)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
model.eval()
if args.bf16_linears:
    model.linears_to(compute_dtype(device.type))
if args.stack_qkv:
    model.stack_projections()
try:
    model.set_decode_kernel(args.decode_kernel)
except ValueError as e:
    parser.error(f"--{e}")
engine = Engine(model, tok, use_tools=False)
engine.stop_tokens = set()  # a random model draws special tokens too: every answer runs to max_tokens
batcher = Batcher(engine, args.slots, autocast=lambda: autocast_for(device.type))
PARTS = ("draw", "sample", "step", "admit")  # the batcher's methods timed, each in ms a step
spent = {**dict.fromkeys(PARTS, 0.0), "steps": 0}


def timed(name, f):
    def run(*a, **k):
        t = time.perf_counter()
        out = f(*a, **k)
        spent[name] += time.perf_counter() - t
        spent["steps"] += name == "step"
        return out
    return run


for name in PARTS:
    if hasattr(batcher, "_" + name):  # (an older batcher, benchmarked for an A/B, may lack one)
        setattr(batcher, "_" + name, timed(name, getattr(batcher, "_" + name)))
prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "Tell me about compilers."},
                                                 {"role": "assistant", "content": ""}]})


def run(n, max_tokens):
    counts = []

    def consume(i):
        counts.append(sum(1 for _ in batcher.generate(prompt, max_tokens=max_tokens, temperature=0.8, seed=i)))
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for k in spent:
        spent[k] = 0
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt, steps = time.perf_counter() - t0, max(spent["steps"], 1)
    return {"requests": n, "tokens": sum(counts), "seconds": round(dt, 2), "tok_per_s": round(sum(counts) / dt),
            "ms_per_step": round(1e3 * dt / steps, 2),
            **{f"{k}_ms_per_step": round(1e3 * spent[k] / steps, 2) for k in PARTS}}


def prefill_ms(rows):
    """One eager prefill of `rows` copies of the prompt into a cache of the prompt's length, as
    Batcher._prefill runs it (its logits included), in ms."""
    ids = torch.tensor([prompt] * rows, device=device)
    with torch.inference_mode(), autocast_for(device.type):
        cache = model.init_cache(rows, cache_length(model, len(prompt)), device=device)
        synchronize(device.type)
        t0 = time.perf_counter()
        model(ids, cache=cache)[:, -1, :].float()
        synchronize(device.type)
    return 1e3 * (time.perf_counter() - t0)


if args.prefill_rows:
    prefill_ms(1)  # (the first call of all pays one-time setup, not a shape's)
    order = list(range(1, args.prefill_rows + 1))
    random.Random(0).shuffle(order)  # (not rising: a shape must not profit from its neighbour's setup)
    first = [prefill_ms(r) for r in order]
    again = [prefill_ms(r) for r in order]
    print({"prefill_rows": args.prefill_rows, "prompt_tokens": len(prompt),
           "first_ms_total": round(sum(first)), "again_ms_total": round(sum(again)),
           "first_ms_max": round(max(first), 1), "again_ms_max": round(max(again), 1),
           "first_ms_median": round(sorted(first)[len(first) // 2], 1),
           "again_ms_median": round(sorted(again)[len(again) // 2], 1)}, flush=True)
run(min(8, args.slots), 16)  # compile and capture
for n in (int(n) for n in args.requests.split(",") if n):
    print(run(n, args.max_tokens), flush=True)
if device.type == "cuda":
    with torch.inference_mode():
        for m, (_, pos, stepper) in batcher._steppers.items():
            pos.fill_(300)  # every row at position 300
            for _ in range(3):
                stepper()
            synchronize(device.type)
            t0 = time.perf_counter()
            for _ in range(50):
                stepper()
            synchronize(device.type)
            print({"graph_replay_ms": round(1e3 * (time.perf_counter() - t0) / 50, 2), "rows": m})
batcher.close()
