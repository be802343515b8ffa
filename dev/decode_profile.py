"""
Where batch-1 decoding's GPU time goes: plain greedy decoding against self-speculative
rounds (one MTP module, nanochat/mtp.py), on a random-weight model, each timed and then
run under torch.profiler (top kernels by device time, device time per token).

    python dev/decode_profile.py                   # d12, prompt 1792, 128 new tokens (a GPU)
    python dev/decode_profile.py --depth=2 --prompt_len=32 --new_tokens=8   # a CPU smoke run

Random weights accept almost no drafts, so each round yields one token: the speculative
figure is the cost of one round. docs/benchmarks.md (issue 20) has what it found.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanochat.engine import Engine
from nanochat.gpt import GPT, build_model
from nanochat.tokenizer import Tokenizer

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--depth", type=int, default=12)
p.add_argument("--prompt_len", type=int, default=1792)
p.add_argument("--new_tokens", type=int, default=128)
p.add_argument("--rows", type=int, default=22, help="kernels listed per profile")
args = p.parse_args()

cuda = torch.cuda.is_available()
config = GPT.config_for_depth(args.depth, vocab_size=32768, sequence_len=2048, mtp=True, mtp_depth=1)
model = build_model(config, torch.device("cuda" if cuda else "cpu")).to(torch.bfloat16 if cuda else torch.float32).eval()
tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})  # special tokens only
prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
engine = Engine(model, tokenizer, use_cuda_graphs=cuda, use_tools=False)
engine.stop_tokens = set()
sync = torch.cuda.synchronize if cuda else (lambda: None)


def decode(speculative):
    """ms per token after the first (the first includes the prefill and the graph capture)."""
    gen = engine.generate(prompt, num_samples=1, max_tokens=args.new_tokens, temperature=0.0, speculative=speculative)
    next(gen)
    sync()
    t0 = time.time()
    n = sum(1 for _ in gen)
    sync()
    return 1000 * (time.time() - t0) / n, n


for speculative in (False, True):
    decode(speculative)  # compiles and captures
    ms, n = decode(speculative)
    print(f"speculative={speculative}: {ms:.3f} ms per token", flush=True)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        decode(speculative)
    key = "device_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60), flush=True)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"speculative={speculative}: {len(kernels)} kernels, {sum(e.device_time for e in kernels) / 1000 / n:.3f} "
              f"ms device time per token", flush=True)
