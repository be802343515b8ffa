"""
Checkpoints: save and load model + optimizer + data loader state + metadata.

A checkpoint of step N in a directory is
    model_{N:06d}.pt           the model's weights (written by rank 0)
    state_{N:06d}_rank{r}.pt   rank r's optimizer and data loader state (each rank)
    meta_{N:06d}.json          model config, training flags, step, losses (rank 0, last)
Every file is written atomically (temp file + rename) and the metadata last, so a
checkpoint whose meta file exists is complete; find_last_step only counts those.
"""

import glob
import json
import os
import re

import torch

from nanochat.common import atomic_torch_save, atomic_write, get_base_dir, logger
from nanochat.gpt import GPT, GPTConfig

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}


def checkpoint_dir(source, model_tag):
    """Where a stage's checkpoints of one model go; SystemExit for a tag that is not a plain name."""
    if source not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; one of {', '.join(PHASE_DIRS)}")
    if not model_tag or model_tag in (".", "..") or os.sep in model_tag or (os.altsep and os.altsep in model_tag):
        # a tag like ../../x would write checkpoints outside the base directory
        raise SystemExit(f"--model_tag={model_tag!r}: must be a plain directory name (no '/' or '..'), e.g. d20")
    return os.path.join(get_base_dir(), PHASE_DIRS[source], model_tag)


def save_checkpoint(directory, step, model_state, rank_state, meta, rank=0):
    """model_state and meta are written by rank 0; rank_state by every rank. Call on all
    ranks; rank 0 writes meta last, after a barrier, so it marks a complete checkpoint."""
    os.makedirs(directory, exist_ok=True)
    meta_path = os.path.join(directory, f"meta_{step:06d}.json")
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # re-saving a step: until the new meta, this step is not complete
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank replaces its state file while the old meta still vouches for it
    if rank == 0:
        atomic_torch_save(model_state, os.path.join(directory, f"model_{step:06d}.pt"))
    if rank_state is not None:
        atomic_torch_save(rank_state, os.path.join(directory, f"state_{step:06d}_rank{rank}.pt"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        atomic_write(meta_path,
                     lambda f: f.write(json.dumps(meta, indent=2)), mode="w")
        logger.info(f"saved checkpoint step {step} to {directory}")


def find_last_step(directory):
    steps = [int(m.group(1)) for f in glob.glob(os.path.join(directory, "meta_*.json"))
             if (m := re.search(r"meta_(\d+)\.json$", f))]
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return max(steps)


def load_checkpoint(directory, step, load_state=False, rank=0):
    """Returns (model_state, rank_state or None, meta), all on the CPU."""
    meta_path = os.path.join(directory, f"meta_{step:06d}.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory} (missing {meta_path})")
    with open(meta_path) as f:
        meta = json.load(f)
    # loaded to the CPU: load_state_dict copies onto the model's device (XLA can't be a map_location)
    model_state = torch.load(os.path.join(directory, f"model_{step:06d}.pt"), map_location="cpu")
    rank_state = None
    if load_state:
        path = os.path.join(directory, f"state_{step:06d}_rank{rank}.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: resume with the same number of processes "
                                    f"as the run that saved step {step}")
        rank_state = torch.load(path, map_location="cpu", weights_only=False)
    return model_state, rank_state, meta


def build_from_checkpoint(directory, step, device, phase):
    """Model (eval or train mode) from a checkpoint, plus its metadata."""
    model_state, _, meta = load_checkpoint(directory, step)
    config = GPTConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the state dict
    model.load_state_dict(model_state, strict=True)
    model.train(phase == "train")
    return model, meta


def load_model(source, device, phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) of the latest (or given) checkpoint of a stage.
    model_tag defaults to the largest model of that stage."""
    from nanochat.tokenizer import check_vocab_size, get_tokenizer
    root = os.path.join(get_base_dir(), PHASE_DIRS[source])
    if model_tag is None:
        tags = [t for t in os.listdir(root)] if os.path.isdir(root) else []
        if not tags:
            raise FileNotFoundError(f"no {source} checkpoints in {root}; train one first")
        model_tag = max(tags, key=lambda t: (int(m.group(1)) if (m := re.match(r"d(\d+)", t)) else -1, t))
    directory = os.path.join(root, model_tag)
    step = find_last_step(directory) if step is None else step
    device = torch.device(device) if isinstance(device, str) else device
    model, meta = build_from_checkpoint(directory, step, device, phase)
    meta = dict(meta, model_tag=model_tag, step=step)
    tokenizer = get_tokenizer()
    check_vocab_size(tokenizer, model.config.vocab_size, f"checkpoint {directory} step {step}")
    return model, tokenizer, meta


def load_previous_stage(source, device, model_tag=None, step=None):
    """(model in train mode, tokenizer, meta) of the stage a chat script starts from, or
    a SystemExit that says which script makes the missing checkpoint."""
    makers = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft",
              "rl": "scripts.chat_rl"}
    if source not in PHASE_DIRS:
        raise SystemExit(f"--source={source!r}: one of {', '.join(PHASE_DIRS)}")
    try:
        return load_model(source, device, phase="train", model_tag=model_tag, step=step)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nNo {source} checkpoint to start from: run `python -m {makers[source]}` first "
                         f"(or point --source / --model_tag / --model_step at one that exists).") from None


def resume_stage(directory, step, model, optimizers, rank=0):
    """Load a stage's own checkpoint (step 0: the latest) into model and optimizers;
    returns (step, rank_state, meta) so the script can restore its data cursor."""
    step = find_last_step(directory) if step == 0 else step
    model_state, rank_state, meta = load_checkpoint(directory, step, load_state=True, rank=rank)
    model.load_state_dict(model_state)
    for opt, s in zip(optimizers, rank_state["optimizers"]):
        opt.load_state_dict(s)
    return step, rank_state, meta
