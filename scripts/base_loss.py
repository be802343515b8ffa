"""
Bits per byte of a base model on the train and val splits, and a few samples.

    python -m scripts.base_loss                       # latest base checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""

import argparse

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_cleanup, compute_dtype, compute_init, print0
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="Evaluate a base model's bits per byte and print samples")
parser.add_argument("--device_batch_size", type=int, default=32)
parser.add_argument("--split_tokens", type=int, default=20 * 524288, help="tokens to evaluate per split")
parser.add_argument("--model_tag", default=None, help="default: the largest base model")
parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
parser.add_argument("--device_type", default="")
parser.add_argument("--data_dir", default=None)
args = parser.parse_args()

device_type = autodetect_device_type(args.device_type)
ddp, rank, local_rank, world_size, device = compute_init(device_type)
dtype = compute_dtype(device_type)
autocast = torch.amp.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
T = model.config.sequence_len
token_bytes = get_token_bytes(device=device)
steps = max(1, args.split_tokens // (args.device_batch_size * T * world_size))

results = {}
for split in ("train", "val"):
    loader = DataLoader(tokenizer, args.device_batch_size, T, split, device, data_dir=args.data_dir)
    with autocast:
        results[f"{split} bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
    loader.close()
    print0(f"{split} bpb: {results[f'{split} bpb']:.4f}")

samples = []
if rank == 0:
    prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
               "#include <iostream>\n\nint main() {", "template <typename T>\nT max(", "def is_prime(n):"]
    for prompt in prompts:
        with autocast:
            out = list(model.generate(tokenizer.encode(prompt, prepend="<|bos|>"), 32, temperature=0))
        samples.append(prompt + tokenizer.decode(out))
        print0(f"sample: {samples[-1]!r}")

get_report().log(section="Base model loss", data=[results, "\n".join(["", "Samples (greedy):", "```"] + [repr(x) for x in samples] + ["```"])])
compute_cleanup()
