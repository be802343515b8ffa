"""
The embedded default corpus: pretraining shards built from real source code that is
present wherever nanochat is installed, so the CPU pipeline and the tests need no
download.

Sources (each used if present):
- C++: the C++ standard library headers shipped with the compiler (g++/clang++), and
  the C++ headers shipped inside the installed torch package (torch/include);
- Python: the Python standard library's sources (site-packages excluded).

Deterministic: files are listed in order of their path relative to their source
(independent of where the venv or compiler live), filtered by fixed rules (UTF-8 text,
size between 200 bytes and 200 KB), shuffled with a fixed seed, capped at a byte
budget per language, and written in a fixed order. The same machine (same compiler,
torch and Python versions) always gives the same shards. Documents are whole files.

    python -m nanochat.corpus            # -> $NANOCHAT_BASE_DIR/embedded_data/*.parquet
"""

import argparse
import glob
import os
import random
import shutil
import subprocess
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_write, get_base_dir

MIN_BYTES, MAX_BYTES = 200, 200_000
CPP_EXTS = ("", ".h", ".hpp", ".hh", ".tcc", ".cuh", ".inl")  # libstdc++ headers have no extension
ROW_GROUP_DOCS = 128  # small row groups so that several ranks get work even from one shard


def default_corpus_dir():
    return os.path.join(get_base_dir(), "embedded_data")


def compiler_include_dirs():
    """The C++ standard library headers of whichever compiler is installed."""
    dirs = []
    for cxx in ("g++", "clang++", "c++"):
        if shutil.which(cxx) is None:
            continue
        try:
            out = subprocess.run([cxx, "-x", "c++", "-E", "-v", "-"], input="", capture_output=True,
                                 text=True, timeout=30).stderr
        except (OSError, subprocess.SubprocessError):
            continue
        lines = out.splitlines()
        if "#include <...> search starts here:" in lines:
            start = lines.index("#include <...> search starts here:") + 1
            for line in lines[start:]:
                if line.startswith("End of search list"):
                    break
                d = os.path.realpath(line.strip())
                # only the C++ library dirs (e.g. /usr/include/c++/12), not all of /usr/include
                if "c++" in d and os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
        if dirs:
            break
    return dirs


def torch_include_dirs():
    import torch
    d = os.path.join(os.path.dirname(torch.__file__), "include")
    return [d] if os.path.isdir(d) else []


def python_stdlib_dirs():
    return [sysconfig.get_paths()["stdlib"]]


def _walk(root, accept):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(filenames):
            if accept(f):
                out.append(os.path.join(dirpath, f))
    return out


def _is_cpp(name):
    base, ext = os.path.splitext(name)
    return ext in CPP_EXTS and (ext or base.replace("_", "").isalnum())


def _is_py(name):
    return name.endswith(".py")


def _sorted_by_relpath(sources, accept):
    """Files of (label, root) sources, ordered by label/relative path, so the order (and
    so the corpus) does not depend on where the compiler, Python or the venv live."""
    keyed, seen = {}, set()
    for label, root in sources:
        for p in _walk(root, accept):
            real = os.path.realpath(p)
            if real not in seen:  # include dirs can nest (c++/12 and c++/12/backward)
                seen.add(real)
                keyed[f"{label}/{os.path.relpath(p, root)}"] = p
    return [keyed[k] for k in sorted(keyed)]


def read_docs(paths):
    """(path, text) for files that are UTF-8 text of a sensible size."""
    docs = []
    for p in paths:
        try:
            size = os.path.getsize(p)
            if not (MIN_BYTES <= size <= MAX_BYTES):
                continue
            with open(p, "rb") as f:
                raw = f.read()
            if b"\x00" in raw:
                continue
            docs.append((p, raw.decode("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return docs


def collect(cpp_budget, py_budget, seed=0):
    """Pick documents for each language up to its byte budget; returns (texts, stats)."""
    cpp_paths = _sorted_by_relpath([("compiler", d) for d in compiler_include_dirs()] +
                                   [("torch", d) for d in torch_include_dirs()], _is_cpp)
    py_paths = _sorted_by_relpath([("stdlib", d) for d in python_stdlib_dirs()], _is_py)
    stats, texts = {}, []
    for lang, paths, budget in (("cpp", cpp_paths, cpp_budget), ("python", py_paths, py_budget)):
        rng = random.Random(seed)
        rng.shuffle(paths)
        chosen, total = [], 0
        for path, text in read_docs(paths):
            if total + len(text) > budget:
                continue
            chosen.append(text)
            total += len(text)
        texts.extend(chosen)
        stats[lang] = {"files_found": len(paths), "docs": len(chosen), "chars": total}
    random.Random(seed + 1).shuffle(texts)  # mix languages across shards
    return texts, stats


def write_shards(texts, out_dir, shard_chars):
    """Write shard_00000.parquet ... of about shard_chars characters each. A rebuild replaces
    the whole set: the new shards are written under hidden names first (readers skip
    dot-files) and only then renamed over the old ones, so an interrupted rebuild leaves the
    old set whole, not a partial set whose last file (val) is a training shard."""
    os.makedirs(out_dir, exist_ok=True)
    for f in glob.glob(os.path.join(out_dir, ".shard_*.parquet.new")):
        os.remove(f)  # left by a killed rebuild
    shards, cur, cur_chars = [], [], 0
    for t in texts:
        cur.append(t)
        cur_chars += len(t)
        if cur_chars >= shard_chars:
            shards.append(cur)
            cur, cur_chars = [], 0
    if cur:
        shards.append(cur)
    paths = [os.path.join(out_dir, f"shard_{i:05d}.parquet") for i in range(len(shards))]
    hidden = [os.path.join(out_dir, f".shard_{i:05d}.parquet.new") for i in range(len(shards))]
    try:
        for docs, tmp in zip(shards, hidden):
            table = pa.table({"text": docs})
            atomic_write(tmp, lambda f: pq.write_table(table, f, row_group_size=ROW_GROUP_DOCS, compression="zstd"))
    except BaseException:
        for tmp in hidden:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for f in glob.glob(os.path.join(out_dir, "shard_*.parquet")):
        if f not in paths:
            os.remove(f)  # an old set with more shards
    for tmp, path in zip(hidden, paths):
        os.replace(tmp, path)
    return paths


def build(out_dir=None, cpp_mb=24, py_mb=24, shard_mb=8, seed=0):
    out_dir = out_dir or default_corpus_dir()
    texts, stats = collect(int(cpp_mb * 1e6), int(py_mb * 1e6), seed)
    if not texts:
        raise RuntimeError("found no source files for the embedded corpus (no C++ headers, torch headers "
                           "or Python standard library sources); use --data_dir with your own parquet shards")
    paths = write_shards(texts, out_dir, int(shard_mb * 1e6))
    return paths, stats


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the embedded default corpus: parquet shards of C++ headers "
                                "(compiler + torch) and Python standard library sources found on this machine.")
    p.add_argument("--out_dir", default=None, help="default: $NANOCHAT_BASE_DIR/embedded_data")
    p.add_argument("--cpp_mb", type=float, default=24, help="megabytes (of characters) of C++ to take")
    p.add_argument("--py_mb", type=float, default=24, help="megabytes of Python to take")
    p.add_argument("--shard_mb", type=float, default=8, help="characters per shard, in millions")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths, stats = build(args.out_dir, args.cpp_mb, args.py_mb, args.shard_mb, args.seed)
    for lang, s in stats.items():
        print(f"{lang:7s}: {s['docs']:6d} docs, {s['chars'] / 1e6:6.1f}M chars (of {s['files_found']} files found)")
    print(f"wrote {len(paths)} shards to {os.path.dirname(paths[0])} (the last, {os.path.basename(paths[-1])}, is val)")


if __name__ == "__main__":
    main()
