"""
Build pretraining shards from C/C++ project trees: runs tools/cpp_chunker (Rust) over
the project roots, then turns its JSONL output into parquet shards that nanochat's
--data_dir reads directly.

    python -m scripts.cpp_data --roots ~/src/fmt ~/src/json --mode compilable --out ~/cpp_data
    python -m scripts.base_train --data_dir=$HOME/cpp_data/tokens_16384 --max_seq_len=16384 ...
    python -m scripts.cpp_data --roots_file roots.txt --mode file --max_tokens 8192 --out ~/cpp_data --threads 8
    python -m scripts.base_train --data_dir=$HOME/cpp_data

Length buckets: --max_tokens takes one budget or several (default 16384,65536: the 16K
and 64K buckets); with several, each goes to its own OUT/tokens_<N>/ with its own
shards and manifest (documents longer than the budget are split at syntax boundaries;
shorter ones are packed into rows by nanochat's dataloader at training time). The tool
runs once for all buckets: it reads and parses every file once and writes one JSONL
directory per budget.

Steps: (1) build the tool with cargo if the binary is missing or older than its
sources; (2) run it once into OUT/.jsonl_tmp (OUT/.jsonl_tmp/tokens_<N>/ per bucket
with several budgets); then per bucket (3) shuffle the documents (seed 42) and
write shard_00000.parquet, ... with columns text, project, files, mode, bytes,
tokens_est; the last shard holds only the validation rows, so nanochat's "last
file is val" rule gives a random validation sample; (4) write manifest.json; finally
remove the temporary JSONL. Every file is written atomically (temp file + rename).
"""

import argparse
import datetime
import glob
import json
import os
import random
import shlex
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATE = os.path.join(REPO, "tools", "cpp_chunker")
BINARY = os.path.join(CRATE, "target", "release", "cpp_chunker")
TMP_NAME = ".jsonl_tmp"
BUILDING = ".building"  # shards are written as shard_N.parquet.building, renamed once all are written
SEED = 42
ROW_GROUP_ROWS = 1024
SCHEMA = pa.schema([("text", pa.string()), ("project", pa.string()), ("files", pa.list_(pa.string())),
                    ("mode", pa.string()), ("bytes", pa.int64()), ("tokens_est", pa.int64())])

parser = argparse.ArgumentParser(description="C/C++ project roots -> parquet pretraining shards (via tools/cpp_chunker)")
parser.add_argument("--roots", nargs="+", default=[], metavar="DIR", help="project roots; each one is a `project`")
parser.add_argument("--roots_file", default=None, help="file with one root per line (# comments; relative to the file's directory)")
parser.add_argument("--mode", choices=["file", "crossfile", "project", "compilable"], required=True,
                    help="file: one document per file; crossfile: a source preceded by the project headers it includes; "
                         "project: crossfile plus definitions used from other files; compilable: the unit reordered "
                         "into near-compilable order (see docs/DATA_PIPELINE.md)")
parser.add_argument("--max_tokens", default="16384,65536",
                    help="token budget per document, or several separated by commas (one output directory each, "
                         "OUT/tokens_N, all from one tool run); the tool estimates tokens as bytes / 3.5")
parser.add_argument("--dedup", choices=["none", "exact", "near"], default="near",
                    help="drop exact duplicates, or exact and near duplicates (MinHash/LSH), across all roots")
parser.add_argument("--near_threshold", type=float, default=0.8, help="Jaccard similarity above which documents are near duplicates")
parser.add_argument("--out", required=True, help="output directory for the parquet shards and manifest.json")
parser.add_argument("--threads", type=int, default=0, help="tool worker threads (0: one per core)")
parser.add_argument("--rows_per_shard", type=int, default=2000, help="documents per training shard")
parser.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents in the validation shard (at least one, at most --rows_per_shard)")
parser.add_argument("--overwrite", action="store_true", help="replace the shards and manifest already in --out")


def fail(msg):
    print(f"cpp_data: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_roots_file(path):
    """Same rules as the tool: blank lines and `#` lines ignored, relative to the file's directory."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        lines = [l.strip() for l in f]
    return [os.path.join(base, l) for l in lines if l and not l.startswith("#")]


def ensure_binary():
    """cargo build --release --locked when the binary is missing or older than the crate's sources."""
    sources = glob.glob(os.path.join(CRATE, "src", "**", "*"), recursive=True)
    sources += [os.path.join(CRATE, "Cargo.toml"), os.path.join(CRATE, "Cargo.lock")]
    newest = max(os.path.getmtime(p) for p in sources if os.path.isfile(p))
    if os.path.exists(BINARY) and os.path.getmtime(BINARY) >= newest:
        return
    if shutil.which("cargo") is None:
        fail("cargo is not installed, and tools/cpp_chunker must be built. Install Rust (1.90 or newer) with rustup:\n"
             "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh\n"
             "  source ~/.cargo/env\n"
             "then run this command again (a C compiler is needed too)")
    print(f"building {os.path.relpath(CRATE, REPO)} (cargo build --release --locked) ...", flush=True)
    r = subprocess.run(["cargo", "build", "--release", "--locked"], cwd=CRATE)
    if r.returncode != 0 or not os.path.exists(BINARY):
        fail(f"cargo build failed (exit code {r.returncode}) in {CRATE}; see the cargo output above")


def run_tool(roots, args, budgets, tmp_dir):
    """Run cpp_chunker once, for all budgets, into tmp_dir. Returns {budget: (JSONL directory,
    summary.json content)}; the tool writes into tmp_dir itself for one budget, into
    tmp_dir/tokens_N for each of several."""
    roots_txt = os.path.join(tmp_dir, "roots.txt")  # a file, not argv: a corpus can have many roots
    with open(roots_txt, "w") as f:
        f.write("".join(r + "\n" for r in roots))
    cmd = [BINARY, "--roots-file", roots_txt, "--mode", args.mode, "--max-tokens", ",".join(map(str, budgets)),
           "--out", tmp_dir, "--threads", str(args.threads), "--dedup", args.dedup,
           "--near-threshold", str(args.near_threshold)]
    print(f"running {shlex.join(cmd)}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"cpp_chunker failed (exit code {r.returncode}); the end of its stderr:\n{r.stderr[-3000:]}")
    print(r.stderr.strip())
    outputs = {}
    for b, jsonl_dir in zip(budgets, bucket_dirs(tmp_dir, budgets)):
        with open(os.path.join(jsonl_dir, "summary.json")) as f:
            outputs[b] = (jsonl_dir, json.load(f))
    return outputs


def index_jsonl(tmp_dir):
    """(file, byte offset) of every document, so that shuffling needs no text in memory."""
    index = []
    files = sorted(glob.glob(os.path.join(tmp_dir, "shard_*.jsonl")))
    for path in tqdm(files, desc="indexing", unit="shard"):
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    index.append((path, offset))
                offset += len(line)
    return index


def read_rows(entries):
    rows, handles = [], {}
    for path, offset in entries:
        f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
        f.seek(offset)
        rows.append(json.loads(f.readline()))
    for f in handles.values():
        f.close()
    return rows


def load_tokenizer():
    """nanochat's tokenizer if one has been trained, else None (token counts are then the tool's estimate)."""
    try:
        from nanochat.tokenizer import get_tokenizer
        return get_tokenizer()
    except Exception as e:
        print(f"no nanochat tokenizer ({e}); token counts are the tool's estimate (bytes / 3.5)")
        return None


def write_shard(path, rows):
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    atomic_write(path, lambda f: pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS, compression="zstd"))


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        budgets = [int(b) for b in args.max_tokens.split(",")]
    except ValueError:
        fail(f"--max_tokens must be integers separated by commas, not {args.max_tokens!r}")
    if args.rows_per_shard < 1 or min(budgets) < 1:
        fail("--rows_per_shard and --max_tokens must be at least 1")
    if len(set(budgets)) != len(budgets):
        fail(f"--max_tokens lists a budget twice: {args.max_tokens}")
    if not 0 <= args.val_fraction < 1:
        fail("--val_fraction must be in [0, 1)")
    if args.roots_file and not os.path.isfile(args.roots_file):
        fail(f"--roots_file {args.roots_file} does not exist")
    roots = [os.path.abspath(r) for r in args.roots + (read_roots_file(args.roots_file) if args.roots_file else [])]
    if not roots:
        fail("no project roots: give --roots DIR [DIR ...] and/or --roots_file FILE")
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        fail(f"{len(missing)} of {len(roots)} roots are not directories: " + ", ".join(missing[:20]) +
             (" ..." if len(missing) > 20 else ""))
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file; give a directory (new or empty) for the shards")
    outs = bucket_dirs(out, budgets)

    # 1. the output directories: empty, or emptied of our own files with --overwrite;
    # all checked before anything is removed or the tool runs
    ours = [p for d in outs for p in our_files(d, args.overwrite)]
    tmp_dir = os.path.join(out, TMP_NAME)
    if len(budgets) > 1 and os.path.exists(tmp_dir):  # left by a killed run; in OUT itself, not a bucket
        if not args.overwrite:
            fail(f"{tmp_dir} exists (left by an interrupted run?); pass --overwrite to remove it")
        ours.append(tmp_dir)
    for p in ours:
        if os.path.isdir(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
    os.makedirs(tmp_dir)

    try:
        # 2. build the chunker and run it once for every bucket
        ensure_binary()
        outputs = run_tool(roots, args, budgets, tmp_dir)
        # 3-4. per bucket: parquet shards and manifest
        tokenizer = load_tokenizer()
        for b, bucket_out in zip(budgets, outs):
            jsonl_dir, summary = outputs[b]
            build(args, argv, roots, bucket_out, b, jsonl_dir, summary, tokenizer)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def bucket_dirs(out, budgets):
    """Where each budget's output goes, the tool's layout: out itself for one budget, else out/tokens_N."""
    return [out] if len(budgets) == 1 else [os.path.join(out, f"tokens_{b}") for b in budgets]


def our_files(out, overwrite):
    """The files of ours in `out` that --overwrite replaces; fails if `out` is not empty without
    --overwrite, or holds parquet files that are not ours."""
    existing = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if existing and not overwrite:
        fail(f"--out {out} is not empty ({len(existing)} entries, e.g. {existing[0]}); "
             "pass --overwrite to replace its shards and manifest, or choose another directory")
    ours = [e for e in existing if (e.startswith("shard_") and e.endswith((".parquet", ".parquet" + BUILDING)))
            or e in ("manifest.json", TMP_NAME)]
    foreign = [e for e in existing if e.endswith(".parquet") and e not in ours]
    if foreign:
        fail(f"--out {out} holds other parquet files ({', '.join(foreign[:5])}) that training would read too; "
             "remove them or choose another directory")
    return [os.path.join(out, e) for e in ours]


def build(args, argv, roots, out, max_tokens, jsonl_dir, summary, tokenizer):
    """One bucket: the tool's documents in jsonl_dir -> shuffled parquet shards + manifest in `out`
    (token counts by `tokenizer`, or the tool's estimate when it is None)."""
    os.makedirs(out, exist_ok=True)

    # 3. shuffle the documents; the last, val-only shard is a random sample
    index = index_jsonl(jsonl_dir)
    if not index:
        skipped = {k: v for k, v in summary.get("skipped", {}).items() if v}
        fail(f"the tool wrote no documents: {summary.get('files_seen')} C/C++ files seen, skipped: {skipped} "
             "(crossfile mode makes documents only from source files; header-only projects need --mode file, project or compilable)")
    random.Random(SEED).shuffle(index)
    n = len(index)
    # at most one shard's worth: on a large corpus 1% could be far bigger than a training shard
    n_val = min(max(1, round(args.val_fraction * n)), args.rows_per_shard, n - 1) if n > 1 else 0  # 1 doc: 1 shard for both
    train, val = index[:n - n_val], index[n - n_val:]
    groups = [("train", train[i:i + args.rows_per_shard]) for i in range(0, len(train), args.rows_per_shard)]
    if val:
        groups.append(("val", val))
    shards = []
    for i, (split, entries) in enumerate(tqdm(groups, desc="parquet", unit="shard")):
        rows = read_rows(entries)
        name = f"shard_{i:05d}.parquet"
        # under a name training does not read until every shard is written: a run killed halfway
        # must not leave train shards only, the last of which training would take for validation
        building = os.path.join(out, name + BUILDING)
        write_shard(building, rows)
        tokens = sum(len(ids) for ids in tokenizer.encode([r["text"] for r in rows])) if tokenizer else \
            sum(r["tokens_est"] for r in rows)
        shards.append({"name": name, "split": split, "rows": len(rows), "bytes": sum(r["bytes"] for r in rows),
                       "tokens": tokens, "file_bytes": os.path.getsize(building)})
    for s in reversed(shards):  # the val shard first: a directory cut short between renames still has it last
        os.replace(os.path.join(out, s["name"] + BUILDING), os.path.join(out, s["name"]))

    # 4. the manifest
    def total(key, split=None):
        return sum(s[key] for s in shards if split is None or s["split"] == split)
    manifest = {
        "command": shlex.join(["python", "-m", "scripts.cpp_data"] + (sys.argv[1:] if argv is None else argv)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": args.mode,
        "max_tokens": max_tokens,
        "roots": roots,
        "seed": SEED,
        "val_fraction": args.val_fraction,
        "documents": {"total": total("rows"), "train": total("rows", "train"), "val": total("rows", "val")},
        "bytes": {"total": total("bytes"), "train": total("bytes", "train"), "val": total("bytes", "val")},
        "tokens": {"source": "nanochat tokenizer" if tokenizer else "estimate (bytes / 3.5, from cpp_chunker)",
                   "total": total("tokens"), "train": total("tokens", "train"), "val": total("tokens", "val")},
        "shards": shards,
        "tool_summary": summary,
    }
    atomic_write(os.path.join(out, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=2) + "\n"), mode="w")

    d, t = manifest["documents"], manifest["tokens"]
    print(f"wrote {len(shards)} shards to {out}: {d['train']:,} train + {d['val']:,} val documents, "
          f"{t['total']:,} tokens ({t['source']}); the last shard, {shards[-1]['name']}, is val")
    print(f"train with: python -m scripts.base_train --data_dir={shlex.quote(out)}")


if __name__ == "__main__":
    main()
