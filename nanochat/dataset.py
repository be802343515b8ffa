"""
Pretraining data: parquet shards with a `text` column, one document per row.

Three sources, one format:
- nanochat's web-text shards (FineWeb-Edu, reshuffled), downloaded with
  `python -m nanochat.dataset -n N` (parallel, retried with backoff, resumable,
  atomic: a shard appears under its final name only once it is whole and readable);
- any local directory of parquet shards (--data_dir or NANOCHAT_DATA_DIR), e.g. C++
  documents made by `python -m scripts.cpp_data` (tools/cpp_chunker);
- the embedded corpus (nanochat/corpus.py), built from source code on this machine.

In every directory the shards are read in sorted filename order and the last one
is the validation split.
"""

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir

# The reshuffled FineWeb-Edu 100B shards nanochat trains on (~250M chars each).
BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822
CHUNK = 1 << 14  # small, so a cut-off transfer keeps most of what arrived


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def default_download_dir():
    return os.path.join(get_base_dir(), "base_data")


def resolve_data_dir(data_dir=None):
    """--data_dir flag, else NANOCHAT_DATA_DIR, else the download directory."""
    return data_dir or os.environ.get("NANOCHAT_DATA_DIR") or default_download_dir()


def list_parquet_files(data_dir=None):
    """Sorted full paths of the shards in a data directory; a clear error if there are none."""
    data_dir = resolve_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"data directory {data_dir} does not exist. Download shards with `python -m nanochat.dataset -n 8`, "
            f"or build the embedded corpus with `python -m nanochat.corpus` and pass "
            f"--data_dir={os.path.join(get_base_dir(), 'embedded_data')} (or set NANOCHAT_DATA_DIR), or point "
            f"--data_dir / NANOCHAT_DATA_DIR at any directory of parquet files")
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet") and not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"data directory {data_dir} has no .parquet files; download or build shards first "
                                f"(see `python -m nanochat.dataset --help`)")
    return [os.path.join(data_dir, f) for f in files]


_warned_single = set()


def split_files(files, split):
    """All shards but the last are train; the last is val. One shard serves as both, with a
    warning (once per directory): validation then measures training data."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if len(files) == 1:
        if files[0] not in _warned_single:
            _warned_single.add(files[0])
            print(f"warning: {files[0]} is the only shard, so it is both training and validation data: val bpb "
                  "will measure memorisation. Add shards (the last one is validation)", flush=True)
        return files
    return files[:-1] if split == "train" else files[-1:]


def open_shard(path):
    """Open a shard and check that it is a parquet file with a text column."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable parquet file ({e}); delete it and download or rebuild it") from e
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                         "nanochat shards need one document per row in a string column named 'text'")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column 'text' holds {kind}, not strings; nanochat shards need one document "
                         "per row as a string")
    return pf


def read_texts(pf, rg, path):
    """Row group rg's documents (a list of str), refusing null cells (a None reached the
    tokenizer as a TypeError that named no file)."""
    column = pf.read_row_group(rg, columns=["text"]).column("text")
    if column.null_count:
        raise ValueError(f"{path}: row group {rg} has {column.null_count} null 'text' cell(s); nanochat shards need "
                         "a string in every row: drop or fill those rows")
    return column.to_pylist()


def verify_shard(path):
    """Readable end to end: metadata, schema and every row group's text column (no nulls)."""
    pf = open_shard(path)
    for i in range(pf.num_row_groups):
        read_texts(pf, i, path)
    return pf.metadata.num_rows


def parquets_iter_batched(split, data_dir=None, start=0, step=1):
    """Yield lists of documents, one row group at a time (rank-strided by start/step)."""
    for path in split_files(list_parquet_files(data_dir), split):
        pf = open_shard(path)
        for rg in range(start, pf.num_row_groups, step):
            yield read_texts(pf, rg, path)

# -----------------------------------------------------------------------------
# Download


def download_shard(index, out_dir, base_url=BASE_URL, max_attempts=5, backoff=2.0, timeout=60):
    """Download one shard to out_dir. Resumes a cut-off transfer from its .part file
    with an HTTP Range request, verifies the result, then renames it into place.
    Returns the final path. Raises after max_attempts failures."""
    import requests
    name = shard_name(index)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        return path
    part = path + ".part"
    url = f"{base_url.rstrip('/')}/{name}"
    last_error = None
    for attempt in range(1, max_attempts + 1):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # we already have every byte
                    pass
                elif r.status_code == 206 and have:
                    if not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                        os.remove(part)  # not the bytes after ours: start over
                        raise IOError(f"{url}: asked for bytes from {have}, got {r.headers.get('Content-Range')!r}")
                    _append(r, part, "ab")
                elif r.status_code == 200:
                    _append(r, part, "wb")  # server ignored Range: start over
                else:
                    r.raise_for_status()
                    raise IOError(f"unexpected HTTP status {r.status_code} for {url}")
            try:
                verify_shard(part)
            except Exception:  # (ValueError, or pyarrow's OSError for damaged pages): every byte is here
                os.remove(part)  # but unreadable, so the next attempt starts over instead of resuming from garbage
                raise
            os.replace(part, path)
            return path
        except Exception as e:  # network errors, truncated or corrupt files
            last_error = e
            if attempt < max_attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    raise RuntimeError(f"failed to download {url} after {max_attempts} attempts: {last_error}")


def _append(response, part, mode):
    with open(part, mode) as f:
        for chunk in response.iter_content(chunk_size=CHUNK):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    expected = response.headers.get("Content-Length")
    if expected is not None and mode == "wb" and os.path.getsize(part) != int(expected):
        raise IOError(f"transfer cut off: got {os.path.getsize(part)} of {expected} bytes")


def download(indices, out_dir, base_url=BASE_URL, workers=4, **kwargs):
    """Download several shards in parallel; prints progress; returns failures."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, out_dir, base_url, **kwargs): i for i in indices}
        for fut in tqdm(futures, desc="shards", unit="shard"):
            try:
                fut.result()
            except Exception as e:
                failures.append((futures[fut], str(e)))
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description="Download nanochat's pretraining shards (parquet, ~100MB each). "
                                "Already-downloaded shards are skipped and cut-off ones resumed.")
    p.add_argument("-n", "--num_files", type=int, default=-1,
                   help=f"number of shards to download (default: all {MAX_SHARD + 1}); the last one you have is val")
    p.add_argument("-w", "--num_workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--data_dir", default=None, help="where to put them (default: $NANOCHAT_DATA_DIR, else "
                   "$NANOCHAT_BASE_DIR/base_data: where training reads them)")
    p.add_argument("--base_url", default=os.environ.get("NANOCHAT_DATA_URL", BASE_URL),
                   help="where shards are served (env NANOCHAT_DATA_URL)")
    args = p.parse_args(argv)
    n = MAX_SHARD + 1 if args.num_files < 0 else min(args.num_files, MAX_SHARD + 1)
    out_dir = resolve_data_dir(args.data_dir)  # the directory training will read
    print(f"downloading {n} shards from {args.base_url} to {out_dir} with {args.num_workers} workers")
    failures = download(range(n), out_dir, args.base_url, workers=args.num_workers)
    for idx, err in failures:
        print(f"FAILED {shard_name(idx)}: {err}")
    print(f"done: {n - len(failures)}/{n} shards in {out_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
