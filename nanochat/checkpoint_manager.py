"""
Checkpoints: save and load model + optimizer + data loader state + metadata.

A checkpoint of step N in a directory is
    model_{N:06d}.pt           the model's weights (written by rank 0)
    state_{N:06d}_rank{r}.pt   rank r's optimizer and data loader state (each rank)
    meta_{N:06d}.json          model config, training flags, step, losses (rank 0, last)
Every file is written atomically (temp file + rename) and the metadata last, so a
checkpoint whose meta file exists is complete; find_last_step only counts those.

The meta lists the checkpoint's files with their sha256 ("files") and the hash of the
tokenizer the model was trained with ("tokenizer_hash"); loading verifies both. A step
that already has a complete checkpoint is never overwritten in place: the new files go
beside the old ones under other names (model_{N:06d}_b.pt, ...), the new meta switches
to them in one rename, and only then are the old files removed. So at every instant
(a kill included, with any number of ranks) each complete step on disk stays loadable.
Checkpoints from before checksums (no "files" in the meta) still load, unverified.
"""

import hashlib
import json
import os
import re

import torch

from nanochat.common import atomic_write, get_base_dir, logger
from nanochat.gpt import GPT, GPTConfig

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}


class CheckpointError(ValueError):
    """A checkpoint that can't be used as asked; the message says which file and what to do."""


class CheckpointCorrupt(CheckpointError):
    def __init__(self, path, reason, previous_step=None):
        self.path, self.previous_step = path, previous_step
        hint = (f"; step {previous_step} before it is complete: load or resume that step instead"
                if previous_step is not None else "; there is no complete step before it")
        super().__init__(f"checkpoint file {path} is damaged ({reason}){hint}")


def checkpoint_dir(source, model_tag):
    """Where a stage's checkpoints of one model go; SystemExit for a tag that is not a plain name."""
    if source not in PHASE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; one of {', '.join(PHASE_DIRS)}")
    if not model_tag or model_tag in (".", "..") or os.sep in model_tag or (os.altsep and os.altsep in model_tag):
        # a tag like ../../x would write checkpoints outside the base directory
        raise SystemExit(f"--model_tag={model_tag!r}: must be a plain directory name (no '/' or '..'), e.g. d20")
    return os.path.join(get_base_dir(), PHASE_DIRS[source], model_tag)


def _ddp():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier():
    if _ddp():
        torch.distributed.barrier()


class _HashingWriter:
    """A file wrapper that computes the sha256 of what passes through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _save_hashed(obj, path):
    """torch.save atomically; returns the sha256 of the bytes written."""
    box = []

    def write(f):
        w = _HashingWriter(f)
        torch.save(obj, w)
        box.append(w.sha.hexdigest())
    atomic_write(path, write)
    return box[0]


def file_sha256(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _names(step, variant, world_size):
    """File names of one checkpoint: variant "" (the usual ones) or "_b" (beside them)."""
    return {"model": f"model_{step:06d}{variant}.pt",
            "state": [f"state_{step:06d}_rank{r}{variant}.pt" for r in range(world_size)]}


def _read_meta(directory, step):
    path = os.path.join(directory, f"meta_{step:06d}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(path, f"not valid JSON: {e}", _previous_step(directory, step)) from None


def _referenced(meta, step, directory):
    """The files a meta's checkpoint consists of (old metas: the usual names)."""
    files = meta.get("files")
    if files is None:
        return {f"model_{step:06d}.pt"} | {f for f in _step_files(directory, step)
                                           if re.fullmatch(rf"state_{step:06d}_rank\d+\.pt", f)}
    return {files["model"]["name"]} | {s["name"] for s in files["state"]}


def _listdir(directory):
    """The directory's file names (none if it is missing). Not glob: a directory name may hold
    glob's special characters ([, *, ?), e.g. --model_tag=d20[x]."""
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _step_files(directory, step):
    """Every model/state file of a step in the directory, either variant (exact names: step
    100000's are not step 1000000's)."""
    pattern = re.compile(rf"(model_{step:06d}|state_{step:06d}_rank\d+)(_b)?\.pt")
    return {f for f in _listdir(directory) if pattern.fullmatch(f)}


def clean_checkpoint_dir(directory):
    """Remove what killed saves left: temp files of atomic writes, and the old files of a
    step whose new meta was written just before the kill (the meta no longer lists them).
    Call from one rank, before any rank writes (the first save_checkpoint/resume does)."""
    if not os.path.isdir(directory):
        return
    removed = []
    removed += [os.path.join(directory, f) for f in _listdir(directory) if f.startswith(".") and f.endswith(".tmp")]
    for step in _complete_steps(directory):
        try:
            meta = _read_meta(directory, step)
        except CheckpointCorrupt:
            continue
        if meta is None or meta.get("files") is None:
            continue
        removed += [os.path.join(directory, f) for f in _step_files(directory, step) - _referenced(meta, step, directory)]
    for p in removed:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    if removed:
        logger.info(f"removed {len(removed)} leftover file(s) of interrupted saves from {directory}")


_cleaned = set()  # directories this process has cleaned
_resumed = {}  # directory -> the step this process resumed from


def _open_dir(directory, rank):
    """Clean a checkpoint directory once per process, on rank 0, before anyone writes."""
    directory = os.path.abspath(directory)
    if directory not in _cleaned:
        if rank == 0:
            clean_checkpoint_dir(directory)
        _cleaned.add(directory)
        _barrier()


def _tokenizer_hash(tokenizer):
    if tokenizer is None:
        from nanochat.tokenizer import get_tokenizer
        try:
            tokenizer = get_tokenizer()  # the cached instance: the one the training script uses
        except FileNotFoundError:
            return None
    return tokenizer.hash


def save_checkpoint(directory, step, model_state, rank_state, meta, rank=0, tokenizer=None):
    """model_state and meta are written by rank 0; rank_state by every rank. Call on all
    ranks; rank 0 writes meta last, after every rank's files are on disk, so it marks a
    complete checkpoint. The meta gets each file's sha256 and the hash of `tokenizer`
    (default: nanochat.tokenizer.get_tokenizer(), the one the scripts train with).
    The step this process resumed from is not saved again (it is on disk already)."""
    directory = os.path.abspath(directory)
    if _resumed.get(directory) == step:
        logger.info(f"step {step} is the checkpoint this run resumed from; not saved again")
        return
    os.makedirs(directory, exist_ok=True)
    _open_dir(directory, rank)
    world_size = torch.distributed.get_world_size() if _ddp() else 1
    # a complete checkpoint of this step stays untouched: write the other variant's names
    variant = ""
    if rank == 0:
        try:
            old = _read_meta(directory, step)
        except CheckpointCorrupt:
            old = None
        if old is not None and f"model_{step:06d}.pt" in _referenced(old, step, directory):
            variant = "_b"
    if _ddp():  # rank 0's choice for all
        box = [variant]
        torch.distributed.broadcast_object_list(box, src=0)
        variant = box[0]
    names = _names(step, variant, world_size)
    model_sha = _save_hashed(model_state, os.path.join(directory, names["model"])) if rank == 0 else None
    state_sha = None
    if rank_state is not None:
        state_sha = _save_hashed(rank_state, os.path.join(directory, names["state"][rank]))
    state_shas = [state_sha]
    if _ddp():  # also the barrier: every rank's file is in place before the meta vouches for it
        state_shas = [None] * world_size
        torch.distributed.all_gather_object(state_shas, state_sha)
    if rank == 0:
        files = {"model": {"name": names["model"], "sha256": model_sha},
                 "state": [{"name": n, "sha256": s} for n, s in zip(names["state"], state_shas) if s is not None]}
        meta = dict(meta, files=files)
        tok_hash = _tokenizer_hash(tokenizer)
        if tok_hash is not None:
            meta["tokenizer_hash"] = tok_hash
        atomic_write(os.path.join(directory, f"meta_{step:06d}.json"),
                     lambda f: f.write(json.dumps(meta, indent=2)), mode="w")
        for f in _step_files(directory, step) - _referenced(meta, step, directory):  # the replaced checkpoint's files
            os.remove(os.path.join(directory, f))
        logger.info(f"saved checkpoint step {step} to {directory}")
    _barrier()  # the next save (and a reader on another rank) sees this meta


def _complete_steps(directory):
    return sorted(int(m.group(1)) for f in _listdir(directory) if (m := re.fullmatch(r"meta_(\d+)\.json", f)))


def warn_earlier_run(directory, keep_hint, print_fn=print):
    """A new run (not resuming) saving into a directory that holds another run's checkpoints:
    say so. The earlier run's later steps stay the latest, what the next stage, chat_eval and
    --resume_from_step=0 read, until this run saves past them."""
    steps = _complete_steps(directory)
    if steps:
        print_fn(f"warning: {directory} holds checkpoints of an earlier run (steps {steps[0]} to {steps[-1]}); this run "
                 "replaces the steps it saves, and that run's later steps stay the latest (what the next stage, "
                 f"chat_eval and --resume_from_step=0 read). To continue that run: --resume_from_step=0; {keep_hint}")


def _previous_step(directory, step):
    earlier = [s for s in _complete_steps(directory) if s < step]
    return earlier[-1] if earlier else None


def find_last_step(directory):
    steps = _complete_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return steps[-1]


def _load_verified(directory, step, entry, default_name, **kwargs):
    """torch.load a checkpoint file after checking its sha256 (when the meta has one)."""
    name = entry["name"] if entry else default_name
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise CheckpointCorrupt(path, "missing", _previous_step(directory, step))
    if entry and entry.get("sha256"):
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise CheckpointCorrupt(path, f"sha256 {actual[:16]}... but the meta recorded {entry['sha256'][:16]}...",
                                    _previous_step(directory, step))
    try:
        # loaded to the CPU: load_state_dict copies onto the model's device (XLA can't be a map_location)
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as e:  # truncated or garbage: torch/zipfile/pickle errors of all kinds
        raise CheckpointCorrupt(path, f"{type(e).__name__}: {e}", _previous_step(directory, step)) from None


def check_tokenizer(meta, tokenizer, where):
    """Refuse a model with a tokenizer other than the one it was trained with (by hash when
    the meta has one; older checkpoints: by vocab size only)."""
    from nanochat.tokenizer import check_vocab_size, tokenizer_dir
    want = meta.get("tokenizer_hash")
    if want is None:
        if "vocab_size" in meta.get("model_config", {}):
            check_vocab_size(tokenizer, meta["model_config"]["vocab_size"], where)
    elif tokenizer.hash != want:
        raise CheckpointError(
            f"{where} was trained with tokenizer {want[:12]}, but the tokenizer in {tokenizer_dir()} is "
            f"{tokenizer.hash[:12]} (it was retrained or replaced since): the model's token ids would mean other "
            f"text. Put back the tokenizer this model was trained with, or train the model again with this one.")


def load_checkpoint(directory, step, load_state=False, rank=0, tokenizer=None):
    """Returns (model_state, rank_state or None, meta), all on the CPU. Each file is checked
    against its sha256 in the meta; a damaged one raises CheckpointCorrupt naming it.
    With a tokenizer, a model trained with another tokenizer raises CheckpointError."""
    meta = _read_meta(directory, step)
    if meta is None:
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory} "
                                f"(missing {os.path.join(directory, f'meta_{step:06d}.json')})")
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, f"checkpoint {directory} step {step}")
    files = meta.get("files")
    model_state = _load_verified(directory, step, files and files["model"], f"model_{step:06d}.pt")
    rank_state = None
    if load_state:
        name, entry = f"state_{step:06d}_rank{rank}.pt", None
        if files:
            entry = files["state"][rank] if rank < len(files["state"]) else None
        missing = entry is None if files else not os.path.exists(os.path.join(directory, name))
        if missing:
            raise FileNotFoundError(f"{directory} has no state file of rank {rank} for step {step}: resume with "
                                    f"the same number of processes as the run that saved it")
        rank_state = _load_verified(directory, step, entry, name, weights_only=False)
    return model_state, rank_state, meta


def _agree(ok, device):
    """True when every rank says ok: ranks that read different files (their own state
    files) must still pick the same checkpoint. device None: no vote (same files on all)."""
    if device is None or not _ddp():
        return ok
    t = torch.tensor(float(ok), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.item() == 1.0


def _load_latest_good(directory, step, load, device=None):
    """load(step) for the given step, or (step None) for the latest complete step whose
    files are intact, going back one step at a time with a warning past damaged ones.
    device (under DDP): the ranks try rank 0's list of steps and vote on each, so they load
    the same step even when one of them sees the directory otherwise (a save in progress,
    another disk)."""
    candidates = [step] if step is not None else list(reversed(_complete_steps(directory)))
    if step is None and device is not None and _ddp():
        box = [candidates]
        torch.distributed.broadcast_object_list(box, src=0, device=device)
        candidates = box[0]
    if not candidates:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    first_error = None
    for s in candidates:
        error = fatal = None
        try:
            result = load(s)
        except (CheckpointCorrupt, FileNotFoundError) as e:  # (a file that one rank lacks: the vote, not a hang)
            error, result = e, None
        except Exception as e:  # any other (another tokenizer on this node, a read error): every rank stops
            error = fatal = e
        if device is not None and _ddp() and not _agree(fatal is None, device):
            raise fatal or CheckpointError(f"{directory} step {s}: another rank could not load it (see its error)")
        if fatal is not None:
            raise fatal
        if _agree(error is None, device):
            if first_error is not None:
                logger.warning(f"falling back to step {s}, the latest complete step that is intact")
            return s, result
        error = error or CheckpointCorrupt(os.path.join(directory, f"(another rank's file of step {s})"),
                                           "see that rank's error", _previous_step(directory, s))
        if step is not None:
            raise error
        first_error = first_error or error
        logger.warning(str(error))
    raise first_error


def build_from_checkpoint(directory, step, device, phase, tokenizer=None):
    """Model (eval or train mode) from a checkpoint, plus its metadata."""
    model_state, _, meta = load_checkpoint(directory, step, tokenizer=tokenizer)
    return _build(model_state, meta, device, phase), meta


def _build(model_state, meta, device, phase):
    config = GPTConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) are not in the state dict
    model.load_state_dict(model_state, strict=True)
    model.train(phase == "train")
    return model


# Model config fields that may differ between a model and the checkpoint init_from loads into it:
# the context (positions, windows) and switches that add modules the checkpoint lacks (their
# parameters keep their init). Any other difference could give the loaded weights another meaning
# at the same shapes (n_head at the same n_embd, softcap, qk_scale, a Mamba-3 part), so it is refused.
INIT_FROM_MAY_DIFFER = ("sequence_len", "rope_base", "window_pattern", "short_window_div", "window_tile",
                        "dsa_start_layer", "dsa_top_k", "dsa_heads", "dsa_dim", "mtp", "mtp_lambda", "mtp_depth",
                        "engram_layers", "mhc", "value_embeds", "smear", "backout", "layer_lambdas", "ref_init")


def init_from(model, directory, step=None, tokenizer=None, device=None):
    """Load a checkpoint's weights into a model that may have more parameters: a dense model's
    into the same model with DSA layers, whose indexers it lacks (DeepSeek-V3.2 trains its
    indexers from a dense checkpoint). The configs may differ only in INIT_FROM_MAY_DIFFER's
    fields, and every tensor of the checkpoint must have one of the same name and shape in the
    model (ValueError naming the first that does not); the model's other parameters keep their
    values. device: the ranks' vote under DDP (all load the same step; call on every rank).
    Returns (step, meta, names of the parameters kept)."""
    step, (state, _, meta) = _load_latest_good(
        directory, step, lambda s: load_checkpoint(directory, s, tokenizer=tokenizer), device)
    theirs, ours = GPTConfig.from_dict(meta["model_config"]).to_dict(), model.config.to_dict()
    bad = [k for k in ours if k not in INIT_FROM_MAY_DIFFER and theirs.get(k) != ours[k]]
    if bad:
        raise ValueError(f"{directory} step {step} has {bad[0]}={theirs.get(bad[0])!r} and this model "
                         f"{bad[0]}={ours[bad[0]]!r}: give the checkpoint's model flags (only the context and new "
                         f"modules may differ: {', '.join(INIT_FROM_MAY_DIFFER)})")
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    if extra:
        raise ValueError(f"{directory} step {step} has {len(extra)} tensors this model lacks (first: {extra[0]}): "
                         "give the checkpoint's model flags (depth, pattern, ...) and add only new modules")
    bad = [k for k in state if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{directory} step {step}: {bad[0]} is {tuple(state[bad[0]].shape)} there and "
                         f"{tuple(own[bad[0]].shape)} here: give the checkpoint's model flags")
    model.load_state_dict(state, strict=False)
    return step, meta, [k for k, _ in model.named_parameters() if k not in state]


def load_model(source, device, phase="eval", model_tag=None, step=None):
    """(model, tokenizer, meta) of the latest (or given) checkpoint of a stage.
    model_tag defaults to the largest model of that stage. The latest: if its files are
    damaged, the step before it (with a warning); a given step: CheckpointCorrupt."""
    from nanochat.tokenizer import get_tokenizer
    root = os.path.join(get_base_dir(), PHASE_DIRS[source])
    if model_tag is None:
        tags = [t for t in os.listdir(root)] if os.path.isdir(root) else []
        if not tags:
            raise FileNotFoundError(f"no {source} checkpoints in {root}; train one first")
        model_tag = max(tags, key=lambda t: (int(m.group(1)) if (m := re.match(r"d(\d+)", t)) else -1, t))
    directory = os.path.join(root, model_tag)
    device = torch.device(device) if isinstance(device, str) else device
    tokenizer = get_tokenizer()
    step, (model_state, _, meta) = _load_latest_good(  # (device: under DDP the ranks load the same step)
        directory, step, lambda s: load_checkpoint(directory, s, tokenizer=tokenizer), device)
    model = _build(model_state, meta, device, phase)
    meta = dict(meta, model_tag=model_tag, step=step)
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
    except CheckpointError as e:
        raise SystemExit(f"{e}\n(--model_step picks another step of the {source} checkpoint)") from None


def resume_checkpoint(directory, step, rank=0, device=None):
    """(step, model_state, rank_state, meta) of a stage's own checkpoint to resume from;
    step 0: the latest intact one (with a warning past a damaged latest). Cleans the
    directory of leftovers of killed saves first, checks the tokenizer, and remembers
    the step so that save_checkpoint does not write it again. Call on all ranks."""
    from nanochat.tokenizer import get_tokenizer
    directory = os.path.abspath(directory)
    _open_dir(directory, rank)
    try:
        tokenizer = get_tokenizer()  # the cached instance: the one the training script uses
    except FileNotFoundError:
        tokenizer = None  # (the script fails on its own without one)
    step, (model_state, rank_state, meta) = _load_latest_good(
        directory, None if step == 0 else step,
        lambda s: load_checkpoint(directory, s, load_state=True, rank=rank, tokenizer=tokenizer), device)
    _resumed[directory] = step
    return step, model_state, rank_state, meta


def resume_stage(directory, step, model, optimizers, rank=0, world_size=1, num_iterations=None):
    """Load a stage's own checkpoint (step 0: the latest) into model and optimizers;
    returns (step, rank_state, meta) so the script can restore its data cursor. Refuses
    (SystemExit) a checkpoint that another number of processes saved (each rank's optimizer
    state and data cursor are its own share) and one past num_iterations (the loop would run
    past its end with the learning rate falling below zero)."""
    device = next(model.parameters()).device
    step, model_state, rank_state, meta = resume_checkpoint(directory, step, rank, device)
    saved_ranks = len(meta["files"]["state"]) if meta.get("files") else None
    if saved_ranks not in (None, world_size):
        raise SystemExit(f"{directory} step {step} was saved by {saved_ranks} processes, this run has {world_size}: "
                         f"resume with {saved_ranks} (torchrun --nproc_per_node={saved_ranks}), or start the stage again")
    if num_iterations is not None and step > num_iterations:
        raise SystemExit(f"{directory} step {step} is past this run's {num_iterations} steps: resume with the flags "
                         f"that set the length (--num_iterations, --num_epochs, ...; the checkpoint's run had "
                         f"{meta.get('num_iterations', 'an unrecorded number of')} steps), or start the stage again")
    model.load_state_dict(model_state)
    load_optimizer_states(optimizers, rank_state["optimizers"])
    return step, rank_state, meta


def load_optimizer_states(optimizers, states):
    """Each optimizer's saved state (moments, step counts) back, its groups' hyperparameters
    (lr, initial_lr, betas, ...) kept as this run's flags set them: load_state_dict alone
    restores the saved run's too (a resumed SFT with a new --lr kept the old one)."""
    for opt, s in zip(optimizers, states):
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(s)
        for g, h in zip(opt.param_groups, hyper):
            g.update(h)
