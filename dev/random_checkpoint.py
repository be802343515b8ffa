"""
A random-weight checkpoint of a given depth, for serving and load benchmarks without training
(dev/loadtest.py against chat_web, scripts.engine_bench-like runs through chat_cli): written
where scripts load a stage's model from ($NANOCHAT_BASE_DIR/<stage dir>/d<depth>), on the
tokenizer there. The special tokens' output rows are zeroed, so a sampled answer never
ends early or calls the tool: every answer runs to max_tokens.

    python -m scripts.tok_train                         # (a tokenizer first, if there is none)
    python dev/random_checkpoint.py --depth=20          # $NANOCHAT_BASE_DIR/chatsft_checkpoints/d20
    python -m scripts.chat_web -i sft --batch_slots=128
"""

import argparse
import os

import torch

from nanochat.checkpoint_manager import PHASE_DIRS, save_checkpoint
from nanochat.common import autodetect_device_type, get_base_dir
from nanochat.gpt import GPT, build_model
from nanochat.tokenizer import get_tokenizer

parser = argparse.ArgumentParser(description="Write a random-weight checkpoint for serving benchmarks")
parser.add_argument("--depth", type=int, default=20)
parser.add_argument("--source", default="sft", choices=sorted(PHASE_DIRS), help="which stage's directory")
parser.add_argument("--model_tag", default=None, help="default: d<depth>")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device_type", default="", help="where to initialise (cuda is faster for big models)")
args = parser.parse_args()

tok = get_tokenizer()
cfg = GPT.config_for_depth(args.depth, vocab_size=tok.get_vocab_size())
torch.manual_seed(args.seed)
model = build_model(cfg, args.device_type or autodetect_device_type())
with torch.no_grad():
    for name in tok.get_special_tokens():
        model.lm_head.weight[tok.encode_special(name)] = 0.0
directory = os.path.join(get_base_dir(), PHASE_DIRS[args.source], args.model_tag or f"d{args.depth}")
save_checkpoint(directory, 1, {k: v.cpu() for k, v in model.state_dict().items()}, None,
                {"step": 1, "model_config": cfg.to_dict()}, tokenizer=tok)
print(f"random d{args.depth} ({sum(p.numel() for p in model.parameters()):,} parameters) saved to {directory}")
