"""
Fill-in-the-middle on C++ (issue 22): held-out C++ documents with a middle cut out, filled
in by a base model from the prompt chat_web's /v1/completions builds for a "suffix"
(nanochat/fim.fim_prompt, PSM order), scored two ways:
- exact: the completion equals the true middle (whitespace at both ends ignored);
- syntax: the document with the completion in place still passes g++ -fsyntax-only
  -std=c++17 (nanochat/cpp_exec.syntax_check, in the sandbox).

Documents: the last parquet shard of a directory (cpp_data's validation shard; column
"text"), or the C++ sources (.cpp .cc .cxx .h .hpp) under a directory. Only documents
that pass the syntax check as they are give examples, so a failure is the model's, not
the file's (its includes must resolve with the system's headers alone). Without the
syntax check (base_eval --fim_syntax=0: exact match only) every document gives examples,
e.g. library headers that do not compile on their own (the embedded corpus).

Two kinds of middle, drawn per document from a generator seeded by (seed, document index):
- line: one whole line (with its newline) that is not blank, a preprocessor line or a
  lone brace;
- body: the body of a function: from after the line that opens it (a line ending in "{"
  after a ")" that does not start with if/for/while/switch/catch/do/else) to before the
  line of its matching "}" (braces counted, ignoring those in strings, chars and // comments).
"""

import glob
import os
import re

import numpy as np

CPP_EXTENSIONS = (".cpp", ".cc", ".cxx", ".h", ".hpp")
CONTROL = re.compile(r"^\s*(if|for|while|switch|catch|do|else|return)\b")
STRIP_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|//.*$')


def load_documents(path, max_docs=None):
    """C++ texts from PATH: the last *.parquet shard's "text" column, else the sources under it."""
    shards = sorted(glob.glob(os.path.join(path, "*.parquet")))
    if shards:
        import pyarrow.parquet as pq
        texts = pq.read_table(shards[-1], columns=["text"]).column("text").to_pylist()
    else:
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.endswith(CPP_EXTENSIONS) and os.path.isfile(f))
        texts = []
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
    if not texts:
        raise ValueError(f"no C++ documents in {path} (want *.parquet with a 'text' column, or C++ sources)")
    return texts[:max_docs] if max_docs else texts


def candidate_lines(lines):
    """Indices of lines that can be a 'line' middle."""
    return [i for i, line in enumerate(lines)
            if line.strip() and not line.lstrip().startswith("#") and line.strip() not in ("{", "}", "};")]


def function_bodies(lines):
    """(first, last) line indices of function bodies: lines first..last-1 are the body, line
    `last` holds the closing brace."""
    out = []
    for i, line in enumerate(lines):
        code = STRIP_LITERALS.sub("", line).rstrip()
        if not code.endswith("{") or ")" not in code or CONTROL.match(code):
            continue
        depth = 0
        for j in range(i, len(lines)):
            code_j = STRIP_LITERALS.sub("", lines[j])
            depth += code_j.count("{") - code_j.count("}")
            if depth == 0:
                if j > i + 1:
                    out.append((i + 1, j))
                break
    return out


def make_examples(texts, kinds=("line", "body"), seed=0):
    """[{"doc", "kind", "prefix", "middle", "suffix"}]: at most one example of each kind per text."""
    examples = []
    for d, text in enumerate(texts):
        rng = np.random.default_rng([seed, d])
        lines = text.splitlines(keepends=True)
        for kind in kinds:
            if kind == "line":
                spans = [(i, i + 1) for i in candidate_lines(lines)]
            elif kind == "body":
                spans = function_bodies(lines)
            else:
                raise ValueError(f"unknown FIM kind {kind!r} (line, body)")
            if not spans:
                continue
            a, b = spans[rng.integers(len(spans))]
            examples.append({"doc": d, "kind": kind, "prefix": "".join(lines[:a]), "middle": "".join(lines[a:b]),
                             "suffix": "".join(lines[b:])})
    return examples


def score(examples, completions, workers=None, syntax=True):
    """{kind: {"exact", "syntax", "n"}} and "all", the fractions over the examples.
    syntax=False: exact match only ("syntax" None), no compiler needed."""
    from nanochat.cpp_exec import syntax_check_many
    filled = [e["prefix"] + c + e["suffix"] for e, c in zip(examples, completions, strict=True)]
    ok = syntax_check_many(filled, workers=workers) if syntax else None
    out = {}
    for kind in sorted({e["kind"] for e in examples}) + ["all"]:
        idx = [i for i, e in enumerate(examples) if kind in ("all", e["kind"])]
        exact = sum(completions[i].strip() == examples[i]["middle"].strip() for i in idx)
        out[kind] = {"exact": exact / len(idx), "syntax": sum(ok[i] for i in idx) / len(idx) if syntax else None,
                     "n": len(idx)}
    return out


def usable(texts, workers=None):
    """The texts that pass the syntax check as they are."""
    from nanochat.cpp_exec import syntax_check_many
    return [t for t, ok in zip(texts, syntax_check_many(texts, workers=workers)) if ok]
