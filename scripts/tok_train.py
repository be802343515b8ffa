"""
Train the BPE tokenizer with rustbpe on pretraining text and save it (tiktoken format)
to $NANOCHAT_BASE_DIR/tokenizer/, with token_bytes.pt for bits-per-byte.

    python -m scripts.tok_train                       # 32768 tokens on the default data
    python -m scripts.tok_train --vocab_size=4096 --max_chars=20000000

An existing tokenizer is replaced only with --overwrite: checkpoints record the hash of
the tokenizer they were trained with and refuse to load with another one.
"""

import argparse
import logging
import os
import time

from nanochat.common import print0, require_positive
from nanochat.dataset import parquets_iter_batched, resolve_data_dir
from nanochat.tokenizer import DEFAULT_VOCAB_SIZE, TOKENIZER_FILE, Tokenizer, tokenizer_dir
from nanochat.report import get_report

parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer (rustbpe) on the train shards")
parser.add_argument("--max_chars", type=int, default=2_000_000_000, help="stop after this many characters of text")
parser.add_argument("--doc_cap", type=int, default=10_000, help="use at most this many characters of each document")
parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary size, special tokens included")
parser.add_argument("--data_dir", default=None, help="directory of parquet shards (default: $NANOCHAT_DATA_DIR or the downloaded shards)")
parser.add_argument("--out_dir", default=None, help="where to save (default: $NANOCHAT_BASE_DIR/tokenizer)")
parser.add_argument("--overwrite", action="store_true",
                    help="replace an existing tokenizer (checkpoints trained with it will no longer load)")
args = parser.parse_args()
require_positive(args, ("max_chars", "doc_cap", "vocab_size"))
out_dir = args.out_dir or tokenizer_dir()
if os.path.exists(os.path.join(out_dir, TOKENIZER_FILE)) and not args.overwrite:
    raise SystemExit(f"{out_dir} already holds a tokenizer; models trained with it only work with it, and "
                     "checkpoints refuse any other. To replace it anyway (then train the models again): "
                     "--overwrite; to keep it: --out_dir=ELSEWHERE")
logging.getLogger("rustbpe").setLevel(logging.WARNING)  # its per-percent progress lines drown the output
print0(f"data: {resolve_data_dir(args.data_dir)}  max_chars={args.max_chars:,}  doc_cap={args.doc_cap:,}  vocab_size={args.vocab_size:,}")

n_chars = 0


def text_iterator():
    """Documents from the train split, each capped at doc_cap chars, until max_chars."""
    global n_chars
    for batch in parquets_iter_batched("train", args.data_dir):
        for doc in batch:
            doc = doc[:args.doc_cap]
            n_chars += len(doc)
            yield doc
            if n_chars >= args.max_chars:
                return


t0 = time.time()
tokenizer = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
train_time = time.time() - t0
if n_chars == 0:  # rustbpe would return a bytes-only tokenizer, and rc 0
    raise SystemExit(f"no text to train on: the train shards in {resolve_data_dir(args.data_dir)} have no rows "
                     "(or only empty documents); rebuild them (the last shard is validation and is not used here)")
if tokenizer.get_vocab_size() < args.vocab_size:  # rustbpe stops when no pair is left to merge
    raise SystemExit(f"the text gave only {tokenizer.get_vocab_size():,} tokens, not the {args.vocab_size:,} asked for "
                     f"({n_chars:,} characters have too few distinct pairs): train on more text (--max_chars, more "
                     f"shards) or ask for --vocab_size={tokenizer.get_vocab_size()} or less. Nothing was saved.")
# sanity check before anything is replaced: a round trip on a mixed string
sample = "Hello world! 12345 int main() { std::vector<int> v{1, 2}; return 0; }\n    def f(x):\n        return x ** 2\n"
if tokenizer.decode(tokenizer.encode(sample)) != sample:
    raise SystemExit("tokenizer round trip failed on a sample string; nothing was saved")
tokenizer.save(out_dir)
print0(f"trained on {n_chars:,} chars in {train_time:.1f}s; saved to {out_dir}")

token_bytes = tokenizer.token_bytes_list()
nonzero = [b for b in token_bytes if b > 0]
print0(f"vocab: {tokenizer.get_vocab_size():,} tokens ({len(token_bytes) - len(nonzero)} special); "
       f"bytes/token min {min(nonzero)}, mean {sum(nonzero) / len(nonzero):.2f}, max {max(nonzero)}")

get_report().log(section="Tokenizer training", data=[vars(args), {
        "train_time_s": round(train_time, 2), "chars_trained_on": n_chars,
        "vocab_size": tokenizer.get_vocab_size(),
        "token_bytes_mean": round(sum(nonzero) / len(nonzero), 3)}])
