"""
Import a transformers NanoChat checkpoint (a local directory, or a Hugging Face hub id that
huggingface_hub downloads) as a checkpoint of one of our stages, and its tokenizer.json as
our tokenizer, so chat_cli, chat_web, chat_eval and the chat stages run on it:

    python -m scripts.import_hf --repo_or_dir karpathy/nanochat-d32 --model_tag d32      # -> sft
    python -m scripts.import_hf --repo_or_dir ./my-export --model_tag d12 --source base
    python -m scripts.chat_cli --source sft --model_tag d32

Our scripts read one tokenizer, $NANOCHAT_BASE_DIR/tokenizer. If a different one is there
the import stops, unless --replace_tokenizer (the old one is kept beside it as
tokenizer.replaced-TIME): models trained with it stop loading until it is put back, so a
separate NANOCHAT_BASE_DIR per imported model family is usually the better choice.
The reference nanochat's tokenizers have 9 special tokens, ours 12 (the FIM ones added):
such a tokenizer is kept as it is, and only the FIM features are unavailable on it.
Format and differences: docs/serving.md.
"""

import argparse
import os
import shutil
import time

import torch

from nanochat import hf
from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
from nanochat.gpt import GPT
from nanochat.tokenizer import TOKENIZER_FILE, Tokenizer, tokenizer_dir


def resolve(repo_or_dir, revision=None):
    """A local directory as is; anything else is a hub id, downloaded (json, safetensors, md)."""
    if os.path.isdir(repo_or_dir):
        return repo_or_dir
    if os.path.exists(repo_or_dir) or repo_or_dir.startswith((".", "/")) or repo_or_dir.count("/") != 1:
        raise FileNotFoundError(f"--repo_or_dir {repo_or_dir!r} is neither a directory nor a hub id like owner/name")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_or_dir, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "README.md", "*.jinja"])
    except Exception as e:  # no network, no such repo, a gated one: say which and why
        raise FileNotFoundError(f"could not download {repo_or_dir} from the Hugging Face hub ({type(e).__name__}: "
                                f"{e}); download it elsewhere and pass its directory") from None


def install_tokenizer(tokenizer, replace=False):
    """Put `tokenizer` where our scripts read it; True if it changed anything."""
    directory = tokenizer_dir()
    if os.path.exists(os.path.join(directory, TOKENIZER_FILE)):
        current = Tokenizer.from_directory(directory)
        if current.hash == tokenizer.hash:
            return False
        if not replace:
            raise SystemExit(f"{directory} holds another tokenizer ({current.hash[:12]}, this model's is "
                             f"{tokenizer.hash[:12]}). Import into a fresh base directory (NANOCHAT_BASE_DIR=... "
                             "python -m scripts.import_hf ...), or pass --replace_tokenizer (your models trained with "
                             "the current one then stop loading until it is put back).")
        backup = f"{directory}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(directory, backup)
        print(f"the previous tokenizer is now in {backup}")
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(directory)
    return True


def import_checkpoint(directory, model_tag, source="sft", step=None, replace_tokenizer=False, origin=None):
    """Write the checkpoint (and the tokenizer); returns (checkpoint directory, step)."""
    cfg = hf.read_json(os.path.join(directory, "config.json"))
    tok_path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{tok_path} is missing: nanochat needs the model's tokenizer.json")
    tokenizer = hf.tokenizer_from_json(tok_path)
    from tokenizers import Tokenizer as HFTokenizer
    hf.check_tokenizer_json(HFTokenizer.from_file(tok_path), tokenizer)  # the conversion back is faithful
    config = hf.config_from_hf(cfg, tokenizer.get_vocab_size())
    state = hf.from_hf_state(hf.load_safetensors(directory), config, remote=cfg.get("model_type") == "nanochat_recipe")
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)  # every shape checked against the config
    ckpt = checkpoint_dir(source, model_tag)
    install_tokenizer(tokenizer, replace_tokenizer)
    step = 0 if step is None else step
    meta = {"step": step, "model_config": config.to_dict(), "imported_from": origin or directory,
            "hf_config": cfg}
    save_checkpoint(ckpt, step, state, None, meta, tokenizer=tokenizer)
    return ckpt, step


def main(argv=None):
    parser = argparse.ArgumentParser(description="Import a transformers NanoChat checkpoint as a nanochat checkpoint")
    parser.add_argument("--repo_or_dir", required=True, help="local directory or hub id (owner/name)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--model_tag", required=True, help="our model tag to save under, e.g. d32")
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which stage's checkpoint it becomes (default sft: a chat model)")
    parser.add_argument("--step", type=int, default=None, help="step number to save as (default 0)")
    parser.add_argument("--replace_tokenizer", action="store_true",
                        help="replace a different tokenizer in $NANOCHAT_BASE_DIR/tokenizer (kept as a backup)")
    args = parser.parse_args(argv)
    try:
        directory = resolve(args.repo_or_dir, args.revision)
        ckpt, step = import_checkpoint(directory, args.model_tag, args.source, args.step, args.replace_tokenizer,
                                       origin=args.repo_or_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"import_hf: {e}")
    print(f"imported {args.repo_or_dir} as {args.source}/{args.model_tag} step {step} in {ckpt}")
    print(f"try it: python -m scripts.chat_cli --source {args.source} --model_tag {args.model_tag}")
    return ckpt


if __name__ == "__main__":
    main()
