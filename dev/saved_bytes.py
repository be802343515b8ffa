"""
Bytes that one training step keeps for its backward, per token, on the CPU: the tensors
autograd saves (torch.compile's saved activations included), counted once per storage,
under bf16 autocast. Shows what a model change costs in activation memory without a GPU.

    python dev/saved_bytes.py --depth=4                 # eager
    python dev/saved_bytes.py --depth=4 --compile --mhc # inductor's choice of what to save (needs setuptools)
"""
import argparse

import torch

from nanochat.gpt import GPT, build_model

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--depth", type=int, default=4)
p.add_argument("--seq_len", type=int, default=256)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--compile", action="store_true")
p.add_argument("--mhc", action="store_true")
p.add_argument("--engram_layers", default="", help="e.g. 0,2: Engram on these layers")
args = p.parse_args()

torch.manual_seed(0)
flags = dict(mhc=args.mhc, engram_layers=args.engram_layers)
config = GPT.config_for_depth(args.depth, vocab_size=512, sequence_len=args.seq_len, **flags)
model = build_model(config, torch.device("cpu"))
step = torch.compile(model) if args.compile else model
idx, targets = (torch.randint(0, 512, (args.batch, args.seq_len)) for _ in range(2))
for _ in range(2):  # the first call compiles; count the second
    saved = {}
    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(idx, targets)
    loss.backward()
tokens = args.batch * args.seq_len
print(f"depth {args.depth}, n_embd {config.n_embd}, {'compiled' if args.compile else 'eager'}, mhc={args.mhc}, "
      f"engram_layers={args.engram_layers or '-'}: {sum(saved.values()) / tokens / 1024:.1f} KiB saved per token")
