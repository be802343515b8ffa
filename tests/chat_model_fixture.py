"""A tiny random chat model checkpoint for tests of the scripts that load one
(chat_cli, chat_web, chat_eval): make_chat_checkpoint(base_dir, tokenizer) writes it
where nanochat.checkpoint_manager.load_model(source, device) finds it when
NANOCHAT_BASE_DIR=base_dir. `tokenizer` is the session fixture of tests/conftest.py."""

import os
import shutil

import torch

from nanochat.checkpoint_manager import PHASE_DIRS, save_checkpoint
from nanochat.gpt import GPTConfig, build_model


def make_chat_checkpoint(base_dir, tokenizer, source="sft", model_tag="d2", step=1, sequence_len=256,
                         mute_special=False):
    """Write a 2-layer, 128-wide random model as checkpoint `step` of stage `source`
    under base_dir (plus base_dir/tokenizer if it is not there); returns its directory.
    mute_special=True zeroes the unembedding rows of the special tokens: their logits are
    then 0, in the middle of the others (std 0.001), so with top-k sampling the model
    never emits them and every answer runs to max_tokens (no early stop, no tool calls)."""
    base_dir = str(base_dir)
    tok_dir = os.path.join(base_dir, "tokenizer")
    if not os.path.exists(tok_dir):
        shutil.copytree(tokenizer.directory, tok_dir)
    cfg = GPTConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=128, vocab_size=tokenizer.get_vocab_size(),
                    sequence_len=sequence_len)
    with torch.random.fork_rng():  # the same weights for the same step; the caller's RNG untouched
        torch.manual_seed(step)
        model = build_model(cfg, "cpu")
    if mute_special:
        with torch.no_grad():
            for name in tokenizer.get_special_tokens():
                model.lm_head.weight[tokenizer.encode_special(name)] = 0.0
    directory = os.path.join(base_dir, PHASE_DIRS[source], model_tag)
    save_checkpoint(directory, step, model.state_dict(), None, {"step": step, "model_config": cfg.to_dict()},
                    tokenizer=tokenizer)
    return directory
