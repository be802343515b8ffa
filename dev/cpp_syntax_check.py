"""
Measured quality of tools/cpp_chunker documents: the fraction that pass
`g++ -fsyntax-only -std=c++20`, per project.

    python dev/cpp_syntax_check.py --debian --mode file --sample 30 --json_out syntax_file.json
    python dev/cpp_syntax_check.py --roots ~/src/fmt ~/src/json --mode crossfile --jobs 4

For each root the tool runs once (its release binary: built with cargo by the rule of
scripts/cpp_data.py when missing or stale, or --binary PATH / $CPP_CHUNKER_BINARY). A
deterministic sample of its documents (--sample per project, --seed) is checked: each
document is written to a temporary .cpp file and compiled with

    g++ -fsyntax-only -std=c++20 -w -iquote DOCDIR -I ROOT -I INC -I INC/.. ... -I ROOT/.. FILE

DOCDIR is the directory of the document's last file (the source in crossfile mode), so
that quoted includes next to it still resolve. INC is every directory named `include`
under the root (ROOT/include first), each followed by its parent. --debian adds roots from
Debian packages (libeigen3-dev, libfmt-dev, libspdlog-dev, nlohmann-json3-dev and the
examples in its /usr/share/doc, googletest, libboost1.74-dev: for boost only four
sub-libraries, to keep a run short), with -I /usr/include for the boost ones and spdlog's
defines from `pkg-config --cflags spdlog`.

A document passes when g++ exits 0 within --timeout seconds. Per project: documents made,
checked, passed, the fraction, the same for whole files and for pieces of split files (a
document is a piece when the tool made several documents with the same `files`), and the
most common first errors (location dropped, quoted names replaced by '...', numbers by N;
"[in an included file]" when the error is not in the document itself), and how many of ALL its
documents (not only the sample) fail the structural check of dev/cpp_structure.py (unbalanced
#if/#endif or braces; "unbalanced" in the JSON, with the first few). Markdown on stdout;
--json_out writes everything, with the first error of every failed document. --mode is
passed to the tool as is (a mode it does not know makes it exit with an error, shown
here). The output is the same for the same inputs, flags and g++.

Whose failure is it? A failed document is the environment's when its first error is a
missing header (`fatal error: X: No such file or directory`) that no file of the project
provides (a generated config header, a third-party or platform header). With --originals the
unit's own file (the last of its `files`) is also compiled alone with the same flags; a
failure whose original fails too is the original's, and the rest are the tool's: the
"tool" column, and "whole passed | original passes", the guarantee that the tool does not make a
compiling file fail.

    python dev/cpp_syntax_check.py --roots $(bash dev/cpp_corpus.sh /tmp/corpus) --mode compilable \
        --sample 40 --originals --cxxflags=-DLEVELDB_PLATFORM_POSIX
"""

import argparse
import collections
import concurrent.futures
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpp_structure import read_output, structure_error  # noqa: E402  (dev/cpp_structure.py)

# label, root, include dirs (None: the generic rule of the docstring), extra flags
SPDLOG_FLAGS = ["-DSPDLOG_SHARED_LIB", "-DSPDLOG_COMPILED_LIB", "-DSPDLOG_FMT_EXTERNAL"]  # pkg-config --cflags spdlog
DEBIAN = [
    ("eigen", "/usr/include/eigen3", None, []),
    ("fmt", "/usr/include/fmt", None, []),
    ("spdlog", "/usr/include/spdlog", None, SPDLOG_FLAGS),
    ("nlohmann-json", "/usr/include/nlohmann", None, []),
    ("nlohmann-json examples", "/usr/share/doc/nlohmann-json3-dev/examples", None, []),
    ("googletest", "/usr/src/googletest", None, []),
    ("boost/smart_ptr", "/usr/include/boost/smart_ptr", ["/usr/include"], []),
    ("boost/container", "/usr/include/boost/container", ["/usr/include"], []),
    ("boost/algorithm", "/usr/include/boost/algorithm", ["/usr/include"], []),
    ("boost/mp11", "/usr/include/boost/mp11", ["/usr/include"], []),
]
DEBIAN_PACKAGES = ["libeigen3-dev", "libfmt-dev", "libspdlog-dev", "nlohmann-json3-dev", "googletest", "libboost1.74-dev"]

parser = argparse.ArgumentParser(description="fraction of cpp_chunker documents that pass g++ -fsyntax-only, per project")
parser.add_argument("--roots", nargs="+", default=[], metavar="DIR", help="project roots (each one is a project)")
parser.add_argument("--debian", action="store_true", help="add the roots of the Debian dev packages (see the docstring)")
parser.add_argument("--mode", default="file", help="tool mode, passed through: file, crossfile, compilable, project")
parser.add_argument("--max_tokens", "--max-tokens", type=int, default=16384, help="tool token budget per document")
parser.add_argument("--sample", type=int, default=200, help="documents checked per project (all if fewer)")
parser.add_argument("--seed", type=int, default=0, help="seed of the per-project sample")
parser.add_argument("--jobs", type=int, default=2, help="g++ processes at a time")
parser.add_argument("--timeout", type=float, default=60, help="seconds per g++ call; a timeout counts as a failure")
parser.add_argument("--std", default="c++20", help="-std= for g++")
parser.add_argument("--cxx", default="g++", help="the compiler")
parser.add_argument("--cxxflags", default="", help="extra compiler flags (one string, shell-split)")
parser.add_argument("--binary", default=os.environ.get("CPP_CHUNKER_BINARY"), help="cpp_chunker binary to use (default: $CPP_CHUNKER_BINARY, else build tools/cpp_chunker if needed)")
parser.add_argument("--threads", type=int, default=2, help="tool worker threads")
parser.add_argument("--top_errors", type=int, default=5, help="error kinds listed per project")
parser.add_argument("--originals", action="store_true", help="also compile each checked document's own file alone (see the docstring)")
parser.add_argument("--json_out", default=None, help="write the full results here")
args = parser.parse_args()


def fail(msg):
    print(f"cpp_syntax_check: error: {msg}", file=sys.stderr)
    sys.exit(2)


# 1. inputs: the compiler, the roots, the tool
if args.sample < 1 or args.jobs < 1 or args.max_tokens < 1:
    fail("--sample, --jobs and --max_tokens must be at least 1")
cxx = shutil.which(args.cxx)
if cxx is None:
    fail(f"{args.cxx} not found; install it (Debian: apt-get install g++) or pass --cxx")
cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
projects = [(os.path.basename(os.path.normpath(r)) or r, os.path.abspath(r), None, []) for r in args.roots]
if args.debian:
    projects += DEBIAN
if not projects:
    fail("no roots: give --roots DIR [DIR ...] and/or --debian")
missing = [root for _, root, _, _ in projects if not os.path.isdir(root)]
if missing:
    hint = (" (install the Debian packages: apt-get install " + " ".join(DEBIAN_PACKAGES) + ")") if args.debian else ""
    fail(f"{len(missing)} root(s) are not directories: {', '.join(missing)}{hint}")
labels = [label for label, *_ in projects]
if len(set(labels)) != len(labels):
    fail(f"two roots have the same name: {sorted(l for l in labels if labels.count(l) > 1)}")
if args.binary:
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        fail(f"--binary {binary} is not an executable file")
else:
    sys.path.insert(0, REPO)
    from scripts.cpp_data import BINARY, ensure_binary  # cargo build --release when missing or stale
    ensure_binary()
    binary = BINARY


def include_flags(root, includes, doc_files):
    """-iquote for the document's own directory, then -I dirs (see the docstring), in order, once each."""
    quote = os.path.join(root, os.path.dirname(doc_files[-1])) if doc_files else root
    if includes is None:
        top = os.path.join(root, "include")
        found = sorted((d for d in glob.glob(os.path.join(root, "**", "include"), recursive=True) if os.path.isdir(d)),
                       key=lambda d: (d != top, d))
        dirs = [root] + [p for d in found for p in (d, os.path.dirname(d))] + [os.path.dirname(root)]
    else:
        dirs = includes
    seen, flags = set(), ["-iquote", quote]
    for d in dirs:
        if d not in seen:
            seen.add(d)
            flags += ["-I", d]
    return flags


FIRST_ERROR = re.compile(r"^(?P<loc>.*?):\d+:(?:\d+:)? (?P<kind>fatal error|error): (?P<msg>.*)$")


def normalize(msg):
    """The kind of an error: quoted names -> '...', numbers -> N."""
    msg = re.sub(r"'[^']*'", "'...'", msg)
    return re.sub(r"\b\d+\b", "N", msg).strip()


def check(path, root, includes, flags, doc_files):
    """(passed, first error line or '', error kind or '')"""
    cmd = [cxx, "-fsyntax-only", f"-std={args.std}", "-w", *flags, *shlex.split(args.cxxflags),
           *include_flags(root, includes, doc_files), path]
    # its own process group, so that a timeout ends cc1plus too, not only the g++ driver
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                          env=dict(os.environ, LC_ALL="C"), start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, f"timeout after {args.timeout:g} s", "timeout"
    r = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
    if r.returncode == 0:
        return True, "", ""
    for line in r.stderr.splitlines():
        m = FIRST_ERROR.match(line)
        if m:
            where = "" if m["loc"] == path else " [in an included file]"
            return False, line.replace(path, "DOC.cpp"), f"{m['kind']}: {normalize(m['msg'])}{where}"
    return False, (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[0], f"exit code {r.returncode}"


def run_tool(root, out):
    cmd = [binary, "--roots", root, "--mode", args.mode, "--max-tokens", str(args.max_tokens), "--out", out,
           "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"cpp_chunker failed on {root} (exit code {r.returncode}): {shlex.join(cmd)}\n{r.stderr[-3000:]}")
    return read_output(out)


MISSING = re.compile(r"fatal error: (?P<header>[^:]+): No such file or directory")


def project_files(root):
    """Every path under root, relative, for 'does the project provide this header?'."""
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def provided(header, files):
    return any(f == header or f.endswith("/" + header) for f in files)


# 2. per project: run the tool, sample its documents, compile each sample
results = []
with tempfile.TemporaryDirectory(prefix="cpp_syntax_check_") as tmp, \
        concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    for i, (label, root, includes, flags) in enumerate(projects):
        docs, summary = run_tool(root, os.path.join(tmp, f"out_{i}"))
        per_files = collections.Counter(tuple(d["files"]) for d in docs)  # > 1: the pieces of a split text
        rng = random.Random(f"{args.seed}/{label}")
        picked = sorted(rng.sample(range(len(docs)), min(args.sample, len(docs))))
        paths = []
        for j in picked:
            path = os.path.join(tmp, f"p{i}_doc{j}.cpp")
            with open(path, "w") as f:
                f.write(docs[j]["text"])
            paths.append(path)
        outcomes = list(pool.map(lambda a: check(a[0], root, includes, flags, docs[a[1]]["files"]), zip(paths, picked)))
        piece = [per_files[tuple(docs[j]["files"])] > 1 for j in picked]
        # whose failure: the environment's (a header the project does not have), the original's, or the tool's
        files = project_files(root)
        env = [not ok and bool(m := MISSING.search(line)) and not provided(m["header"], files) for ok, line, _ in outcomes]
        original = [None] * len(picked)  # does the document's own file pass alone?
        if args.originals:
            own = sorted({docs[j]["files"][-1] for j in picked})
            alone = dict(zip(own, pool.map(lambda f: check(os.path.join(root, f), root, includes, flags, [f])[0], own)))
            original = [alone[docs[j]["files"][-1]] for j in picked]
        owner = ["" if ok else "env" if e else "original" if o is False else "tool"
                 for (ok, _, _), e, o in zip(outcomes, env, original)]
        for path in paths:
            os.remove(path)
        passed = sum(ok for ok, _, _ in outcomes)
        unbalanced = [(d["files"], err) for d in docs if (err := structure_error(d["text"]))]
        kinds = collections.Counter(kind for ok, _, kind in outcomes if not ok)
        results.append({
            "project": label, "root": root, "documents": len(docs), "checked": len(picked), "passed": passed,
            "fraction": round(passed / len(picked), 4) if picked else None,
            "whole_checked": piece.count(False), "whole_passed": sum(ok for (ok, _, _), p in zip(outcomes, piece) if not p),
            "pieces_checked": piece.count(True), "pieces_passed": sum(ok for (ok, _, _), p in zip(outcomes, piece) if p),
            "env_failures": owner.count("env"), "original_failures": owner.count("original"),
            "tool_failures": owner.count("tool"), "originals_passed": sum(o is True for o in original),
            "whole_original_passes": sum(o is True and not p for o, p in zip(original, piece)),
            "whole_passed_original_passes": sum(ok and o is True and not p for (ok, _, _), o, p in zip(outcomes, original, piece)),
            "tool_errors": [{"kind": k, "count": c} for k, c in collections.Counter(
                kind for (_, _, kind), w in zip(outcomes, owner) if w == "tool").most_common()],
            "unbalanced": len(unbalanced), "unbalanced_first": [{"files": f, "error": e} for f, e in unbalanced[:5]],
            "files_used": summary["files_used"], "documents_split": summary["documents_split"],
            "top_errors": [{"kind": k, "count": c} for k, c in sorted(kinds.items(), key=lambda kc: (-kc[1], kc[0]))],
            "failed": [{"files": docs[j]["files"], "piece": p, "first_error": line, "owner": w, "original_passes": o}
                       for j, (ok, line, _), p, w, o in zip(picked, outcomes, piece, owner, original) if not ok],
        })
        print(f"{label}: {passed}/{len(picked)} passed ({len(docs)} documents)", file=sys.stderr, flush=True)

# 3. report
def given(r):
    """whole units passed where the original passes, '-' without --originals"""
    return f"{r['whole_passed_original_passes']}/{r['whole_original_passes']}" if args.originals else "-"


checked = sum(r["checked"] for r in results)
passed = sum(r["passed"] for r in results)
print(f"g++ -fsyntax-only -std={args.std}: mode {args.mode}, max_tokens {args.max_tokens}, sample {args.sample} "
      f"per project (seed {args.seed}); {cxx_version}\n")
print("| project | documents | checked | passed | fraction | whole files passed | pieces passed | failures env/original/tool "
      "| whole passed \\| original passes | most common first error |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for r in results:
    top = r["top_errors"][0] if r["top_errors"] else None
    frac = f"{r['fraction']:.1%}" if r["fraction"] is not None else "-"
    err = f"{top['kind']} ({top['count']})".replace("|", "\\|") if top else ""
    print(f"| {r['project']} | {r['documents']} | {r['checked']} | {r['passed']} | {frac} | "
          f"{r['whole_passed']}/{r['whole_checked']} | {r['pieces_passed']}/{r['pieces_checked']} | "
          f"{r['env_failures']}/{r['original_failures']}/{r['tool_failures']} | {given(r)} | {err} |")
total = {k: sum(r[k] for r in results) for k in ("documents", "whole_checked", "whole_passed", "pieces_checked", "pieces_passed",
                                                  "env_failures", "original_failures", "tool_failures",
                                                  "whole_original_passes", "whole_passed_original_passes")}
print(f"| **all** | {total['documents']} | {checked} | {passed} | {(f'{passed / checked:.1%}' if checked else '-')} | "
      f"{total['whole_passed']}/{total['whole_checked']} | {total['pieces_passed']}/{total['pieces_checked']} | "
      f"{total['env_failures']}/{total['original_failures']}/{total['tool_failures']} | {given(total)} | |")
print(f"\nDocuments with unbalanced #if/#endif or braces (dev/cpp_structure.py, all documents): "
      f"{sum(r['unbalanced'] for r in results)} of {total['documents']}")
print("\nMost common first errors (tool: those of the tool's failures):")
for r in results:
    if r["top_errors"]:
        print(f"\n- {r['project']}:")
        for e in r["top_errors"][:args.top_errors]:
            print(f"  - {e['count']} x `{e['kind']}`")
        for e in r["tool_errors"][:args.top_errors]:
            print(f"  - tool: {e['count']} x `{e['kind']}`")
if args.json_out:
    with open(args.json_out, "w") as f:
        json.dump({"command": shlex.join(["python", "dev/cpp_syntax_check.py", *sys.argv[1:]]), "mode": args.mode, "max_tokens": args.max_tokens,
                   "sample": args.sample, "seed": args.seed, "std": args.std, "cxx": cxx_version,
                   "cxxflags": args.cxxflags, "originals": args.originals, "checked": checked, "passed": passed, "projects": results}, f, indent=2)
        f.write("\n")
