"""
Preflight for speedrun.sh, run1000.sh and cpp_speedrun.sh: before hours of pretraining, check every input
a later stage will need, fetch what can be fetched, and stop at once with the list of
what is missing and how to fix each.

    python -m scripts.preflight --depth=20 --num_shards=370            # speedrun's stages
    python -m scripts.preflight --depth=20 --num_shards=370 --rl       # and RL
    python -m scripts.preflight --stages=mid,sft --no_fetch            # only check
    python -m scripts.preflight --stages=cpp,tok --depth=24            # cpp_speedrun's

Checks, per stage that will run:
    tok        the tokenizer trainer (rustbpe, tiktoken) imports
    base       the pretraining shards: NUM_SHARDS already local, or the shard server answers
               (NANOCHAT_DATA_URL); a trained tokenizer if tok does not run first
    base_eval  the CORE eval bundle at $NANOCHAT_BASE_DIR/eval_bundle (fetched now from
               NANOCHAT_EVAL_BUNDLE_URL if missing; base_train's in-training CORE uses it too)
    mid, sft   the word list (tasks/spellingbee.py: fetched now to $NANOCHAT_BASE_DIR if
               missing) and each task dataset split: a local copy under $NANOCHAT_TASK_DATA,
               the Hugging Face cache, or the hub answering for it
    chat_eval  the same for the evaluation tasks
    rl         GSM8K
    cpp        the C++ pipeline (cpp_speedrun.sh): cargo or a built tools/cpp_chunker, g++
               for the C++ evals, and their task data (MultiPL-E humaneval-cpp, mbpp-cpp)
and the free disk space under $NANOCHAT_BASE_DIR against an estimate: the shards still
to download (~100 MB each) plus a checkpoint per training stage (model + optimizer
state, ~12 bytes per parameter, parameters from the depth).
Exit code: 0 when all is there, 1 with the list otherwise.
"""

import argparse
import math
import os
import shutil
import sys
from urllib.parse import urlparse

ALL_STAGES = ("tok", "base", "base_eval", "mid", "sft", "chat_eval")  # speedrun.sh's; --rl adds rl
SHARD_BYTES = 100e6  # a fineweb-edu shard is ~90-100 MB
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + optimizer state (momentum, Adam moments)
TRAINING_STAGES = ("base", "mid", "sft", "rl", "cpp")
KNOWN_STAGES = ALL_STAGES + ("rl", "cpp")

# (stage) -> task dataset splits it reads: (hub path, subset, split); see scripts/*.py
DATASETS = {
    "mid": [("HuggingFaceTB/smol-smoltalk", None, "train"), ("HuggingFaceTB/smol-smoltalk", None, "test"),
            ("cais/mmlu", "auxiliary_train", "train"), ("cais/mmlu", "all", "test"),
            ("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")],
    "sft": [("allenai/ai2_arc", "ARC-Easy", "train"), ("allenai/ai2_arc", "ARC-Challenge", "train"),
            ("openai/gsm8k", "main", "train"), ("HuggingFaceTB/smol-smoltalk", None, "train"),
            ("HuggingFaceTB/smol-smoltalk", None, "test"), ("cais/mmlu", "all", "test"),
            ("allenai/ai2_arc", "ARC-Easy", "test")],
    "chat_eval": [("allenai/ai2_arc", "ARC-Easy", "test"), ("allenai/ai2_arc", "ARC-Challenge", "test"),
                  ("cais/mmlu", "all", "test"), ("openai/gsm8k", "main", "test"),
                  ("openai/openai_humaneval", None, "test"), ("nuprl/MultiPL-E", "humaneval-cpp", "test"),
                  ("nuprl/MultiPL-E", "mbpp-cpp", "test")],
    "rl": [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")],
    "cpp": [("nuprl/MultiPL-E", "humaneval-cpp", "test"), ("nuprl/MultiPL-E", "mbpp-cpp", "test")],
}
WORD_STAGES = ("mid", "sft", "chat_eval")  # SimpleSpelling / SpellingBee


SHARD_CHARS = 250e6     # characters of text in a fineweb-edu shard
CHARS_PER_TOKEN = 4.8   # about what a 32K-vocab BPE tokenizer gets on fineweb-edu (nanochat's estimate)


def shards_needed(depth, ratio=20):
    """Shards that hold base_train's default horizon once (ratio tokens per parameter), + the val shard."""
    return math.ceil(ratio * model_params(depth) * CHARS_PER_TOKEN / SHARD_CHARS) + 1


def model_params(depth, vocab_size=32768):
    """The parameter count of base_train's model at this depth with its default flags (value
    embeddings included: a d20 has 897M, not the 561M of the blocks and two tables), counted
    on a meta-device model."""
    import argparse
    import torch
    from nanochat.flags import add_model_args, config_from_args
    from nanochat.gpt import GPT
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args([f"--depth={depth}"])
    with torch.device("meta"):
        return GPT(config_from_args(args, vocab_size)).num_params()


class Reach:
    """Is a URL's server reachable? One failure per host is remembered, so an offline
    machine waits for one timeout per host, not one per dataset."""

    def __init__(self, timeout=10):
        self.timeout, self.down = timeout, {}

    def status(self, url):
        """The HTTP status of a HEAD request (redirects followed), or an error string."""
        import requests
        host = urlparse(url).netloc
        if host in self.down:
            return self.down[host]
        try:
            return requests.head(url, timeout=self.timeout, allow_redirects=True).status_code
        except requests.RequestException as e:
            self.down[host] = f"unreachable ({type(e).__name__})"
            return self.down[host]


def check_tokenizer(stages):
    from nanochat.tokenizer import TOKENIZER_FILE, tokenizer_dir
    if "tok" in stages:
        missing = [m for m in ("rustbpe", "tiktoken") if not _imports(m)]
        if missing:
            return [(f"tokenizer training: python module(s) {', '.join(missing)} not importable",
                     "source dev/setup.sh (uv sync installs them)")]
        return []
    if any(s in stages for s in ("base", "mid", "sft", "rl", "chat_eval", "base_eval", "cpp")):
        path = os.path.join(tokenizer_dir(), TOKENIZER_FILE)
        if not os.path.isfile(path):
            return [(f"tokenizer: no {path}", "train it first: python -m scripts.tok_train (or run the tok stage)")]
    return []


def _imports(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def check_cpp_tools():
    """cpp_data builds tools/cpp_chunker with cargo (unless built); the C++ evals compile with g++."""
    from scripts.cpp_data import BINARY
    problems = []
    if shutil.which("cargo") is None and not os.path.isfile(BINARY):
        problems.append(("cpp_data: no cargo to build tools/cpp_chunker (and no built binary)",
                         "install Rust: curl https://sh.rustup.rs -sSf | sh -s -- -y && source ~/.cargo/env"))
    if shutil.which("g++") is None:
        problems.append(("C++ evals: g++ not found", "apt-get install g++"))
    return problems


def check_shards(num_shards, reach):
    from nanochat import dataset
    data_dir = dataset.resolve_data_dir()
    have = len([f for f in os.listdir(data_dir) if f.endswith(".parquet")]) if os.path.isdir(data_dir) else 0
    if have >= num_shards:
        return [], 0
    base_url = os.environ.get("NANOCHAT_DATA_URL", dataset.BASE_URL)
    status = reach.status(f"{base_url}/{dataset.shard_name(0)}")
    if status != 200:
        return [(f"pretraining data: {have} of {num_shards} shards in {data_dir}, and {base_url} answers {status}",
                 "check the network, set NANOCHAT_DATA_URL to a mirror, or put the shards in NANOCHAT_DATA_DIR")], 0
    return [], num_shards - have


def check_eval_bundle(fetch):
    from nanochat.core_eval import EVAL_BUNDLE_URL, default_bundle_dir, ensure_eval_bundle, is_eval_bundle
    dest, url = default_bundle_dir(), os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", EVAL_BUNDLE_URL)
    if is_eval_bundle(dest):
        return []
    problem = "not fetched (--no_fetch)"
    if fetch:
        try:
            ensure_eval_bundle(url, dest, max_attempts=2, backoff=1.0)
            print(f"preflight: fetched the CORE eval bundle to {dest}")
            return []
        except Exception as e:
            problem = f"{type(e).__name__}: {str(e)[:200]}"
    return [(f"CORE eval bundle: none at {dest} ({problem})",
             f"download {EVAL_BUNDLE_URL} and set NANOCHAT_EVAL_BUNDLE_URL to its path (or a mirror's URL), "
             f"or unzip it at {dest}")]


def check_words(fetch):
    from tasks import spellingbee
    try:
        path = spellingbee.find_words_file(download=fetch)
        spellingbee.load_words(path)
        return []
    except (FileNotFoundError, ValueError) as e:
        return [("word list (SimpleSpelling, SpellingBee): " + str(e).split(". ")[0],
                 f"curl -Lo {spellingbee.words_cache_path()} {spellingbee.WORDS_URL}; or set "
                 f"{spellingbee.WORDS_ENV} to a file of words (or {spellingbee.WORDS_URL_ENV} to a mirror); "
                 f"or apt install wamerican")]


def hf_cached(hf_path):
    """Does the Hugging Face cache hold this dataset (hub or datasets cache)?"""
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    hub = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    ds = os.environ.get("HF_DATASETS_CACHE", os.path.join(home, "datasets"))
    owner, name = hf_path.split("/")
    return (os.path.isdir(os.path.join(hub, f"datasets--{owner}--{name}"))
            or os.path.isdir(os.path.join(ds, f"{owner}___{name}")))


def check_datasets(stages, reach):
    from tasks.common import TASK_DATA_ENV, find_local_copy
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0")
    problems, seen = [], set()
    for stage in stages:
        for hf_path, subset, split in DATASETS.get(stage, []):
            if (hf_path, subset, split) in seen:
                continue
            seen.add((hf_path, subset, split))
            if find_local_copy(hf_path, subset, split) or hf_cached(hf_path):
                continue
            status = "not tried (HF_HUB_OFFLINE)" if offline else reach.status(f"{endpoint}/api/datasets/{hf_path}")
            if status == 200:
                continue
            where = os.path.join(f"${TASK_DATA_ENV}", *hf_path.split("/"), *([subset] if subset else []),
                                 f"{split}.jsonl")
            problems.append((f"task data {hf_path}" + (f" ({subset})" if subset else "") + f" {split}: no local "
                             f"copy, not in the Hugging Face cache, and the hub ({endpoint}) answers {status}",
                             f"check the network (or HF_ENDPOINT), or put a copy at {where} (the hub's rows as "
                             f".jsonl/.json/.parquet)"))
    return problems


def check_disk(args, new_shards):
    from nanochat.common import get_base_dir
    base = get_base_dir()
    stages = [s for s in TRAINING_STAGES if s in args.stages]
    need = new_shards * SHARD_BYTES + len(stages) * model_params(args.depth) * CHECKPOINT_BYTES_PER_PARAM
    if args.min_free_gb is not None:
        need = args.min_free_gb * 1e9
    free = shutil.disk_usage(base).free
    if free < need:
        return [(f"disk: {free / 1e9:.1f} GB free under {base}, about {need / 1e9:.1f} GB needed "
                 f"({new_shards} shards to download, checkpoints of {', '.join(stages) or 'no stage'} at depth "
                 f"{args.depth})", "free some space, or set NANOCHAT_BASE_DIR to a larger disk")]
    return []


def run_checks(args):
    stages = list(args.stages) + (["rl"] if args.rl and "rl" not in args.stages else [])
    args.stages = stages
    reach = Reach(args.timeout)
    problems = check_tokenizer(stages)
    new_shards = 0
    if "base" in stages:
        shard_problems, new_shards = check_shards(args.num_shards, reach)
        problems += shard_problems
        need = shards_needed(args.depth)
        if args.num_shards < need:  # a warning: the loader goes round again, it does not fail
            print(f"warning: {args.num_shards} shards hold ~{(args.num_shards - 1) * SHARD_CHARS / CHARS_PER_TOKEN / 1e9:.1f}B "
                  f"tokens, and base_train at depth {args.depth} trains ~{20 * model_params(args.depth) / 1e9:.1f}B "
                  f"(20 per parameter): it would see some data twice; ~{need} shards hold it once")
    if "base_eval" in stages:
        problems += check_eval_bundle(args.fetch)
    if any(s in stages for s in WORD_STAGES):
        problems += check_words(args.fetch)
    if "cpp" in stages:
        problems += check_cpp_tools()
    problems += check_datasets(stages, reach)
    problems += check_disk(args, new_shards)
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description="Check, before a run, everything its later stages will need")
    p.add_argument("--stages", default=",".join(ALL_STAGES),
                   help=f"comma-separated stages that will run (default: {','.join(ALL_STAGES)})")
    p.add_argument("--rl", action="store_true", help="RL runs too (speedrun.sh with RL=1)")
    p.add_argument("--depth", type=int, default=20, help="model depth (for the checkpoint size)")
    p.add_argument("--num_shards", type=int, default=370, help="pretraining shards the run downloads")
    p.add_argument("--no_fetch", dest="fetch", action="store_false",
                   help="only check; don't download the word list and eval bundle")
    p.add_argument("--min_free_gb", type=float, default=None, help="free disk needed (default: estimated)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per network check")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in KNOWN_STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; known: {', '.join(KNOWN_STAGES)}")
    problems = run_checks(args)
    if problems:
        print(f"preflight: {len(problems)} thing(s) missing; fix them before the run starts:", file=sys.stderr)
        for what, fix in problems:
            print(f"  - {what}\n      fix: {fix}", file=sys.stderr)
        return 1
    print(f"preflight: everything the stages {','.join(args.stages)} need is here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
