"""
A cheap structural check of C/C++ text: do its preprocessor conditionals
(#if/#ifdef/#ifndef ... #elif/#else ... #endif) nest and close, and do its braces
(namespace, class and function bodies) balance? No compiler, no parse: one linear scan
that skips comments, string and character literals (raw strings too, and 1'000 digit
separators) and follows backslash line continuations. A directive is a '#' that starts a
line. Braces are counted in the first branch of each conditional only, as the compiler
would see them with that branch taken, so `#if A namespace a { #else namespace b { #endif`
opens one brace. The same rules as tools/cpp_chunker/src/pp.rs, which drops compilable
documents that fail them; dev/cpp_syntax_check.py reports this check on every document and
tests/test_cpp_structure.py runs it on every compilable document of the test corpora.

    python dev/cpp_structure.py FILE.jsonl ...     # lists the unbalanced documents, exit 1 if any
"""

import glob
import json
import os
import re
import sys

_DIRECTIVE = re.compile(r"[ \t]*([A-Za-z_]\w*)?")


def read_output(out):
    """A cpp_chunker output directory -> (its documents, in shard order; its summary.json)."""
    docs = []
    for shard in sorted(glob.glob(os.path.join(out, "shard_*.jsonl"))):
        with open(shard) as f:
            docs += [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(out, "summary.json")) as f:
        return docs, json.load(f)


def structure_error(text):
    """The first structural problem of `text` in words, or None when it is balanced."""
    n = len(text)
    branches = []  # per open conditional: past its first branch?
    depth_braces = 0
    i = 0
    line_start = True
    in_token = False
    number = False
    while i < n:
        c = text[i]
        if c == "\n":
            line_start, in_token = True, False
            i += 1
        elif c == "\\" and text.startswith("\n", i + 1):
            i += 2
        elif c == "\\" and text.startswith("\r\n", i + 1):
            i += 3
        elif text.startswith("//", i):
            i = _line_end(text, i)
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c in " \t\r\f\v":
            in_token = False
            i += 1
        elif c == "#" and line_start:
            end = _line_end(text, i)
            name = _DIRECTIVE.match(text, i + 1)[1] or ""
            if name in ("if", "ifdef", "ifndef"):
                branches.append(False)
            elif name in ("elif", "elifdef", "elifndef", "else"):
                if not branches:
                    return f"#{name} without #if"
                branches[-1] = True
            elif name == "endif":
                if not branches:
                    return "#endif without #if"
                branches.pop()
            i = end
        else:
            line_start = False
            if c == '"' and i > 0 and text[i - 1] == "R" and in_token:
                open_ = text.find("(", i + 1)
                delim = text[i + 1:open_] if open_ >= 0 else ""
                if open_ >= 0 and len(delim) <= 16:
                    j = text.find(")" + delim + '"', open_ + 1)
                    i = n if j < 0 else j + len(delim) + 2
                else:
                    i += 1
                in_token = False
            elif c == '"' or (c == "'" and not (in_token and number)):
                i = _literal_end(text, i, c)
                in_token = False
            elif c.isalnum() or c == "_" or ord(c) >= 0x80:
                if not in_token:
                    number = c.isdigit()
                in_token = True
                i += 1
            else:
                in_token = c == "." and number
                if c in "{}" and not any(branches):
                    depth_braces += 1 if c == "{" else -1
                    if depth_braces < 0:
                        return "'}' without '{'"
                i += 1
    if branches:
        return f"{len(branches)} unterminated #if"
    if depth_braces > 0:
        return f"{depth_braces} unclosed '{{'"
    return None


def _line_end(text, i):
    """End of the logical line at i (before its newline), following continuations."""
    while True:
        j = text.find("\n", i)
        if j < 0:
            return len(text)
        k = j - 1 if j > 0 and text[j - 1] == "\r" else j
        if k > 0 and text[k - 1] == "\\":
            i = j + 1
            continue
        return j


def _literal_end(text, i, q):
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
        elif ch == "\n":
            return j
        elif ch == q:
            return j + 1
        else:
            j += 1
    return len(text)


if __name__ == "__main__":
    bad = 0
    for path in sys.argv[1:]:
        with open(path) as f:
            for k, line in enumerate(f):
                if line.strip():
                    doc = json.loads(line)
                    err = structure_error(doc["text"])
                    if err:
                        bad += 1
                        print(f"{path}:{k + 1}: {doc.get('mode')} {doc.get('files')}: {err}")
    print(f"{bad} unbalanced document(s)", file=sys.stderr)
    sys.exit(1 if bad else 0)
