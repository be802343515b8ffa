"""dev/cpp_structure.py, the cheap structural checker (balanced #if/#endif and braces), and
the guarantee it stands for: every compilable-mode document of every C++ test corpus the
project ships is balanced (the crate's test inputs in tools/cpp_chunker/fuzz/seeds, the
projects of tests/test_cpp_data.py and tests/test_cpp_syntax_check.py, and a leveldb-like
project with guards, #pragma once and #if groups around #include lines); and, where the
Debian packages of dev/cpp_corpus.sh are installed, their small header trees (the synthetic
corpora above are the coverage that always runs). Runs the tool's release binary (built by
scripts/cpp_data.py's rule when missing or stale)."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
from cpp_structure import read_output, structure_error  # noqa: E402

from scripts.cpp_data import BINARY, ensure_binary  # noqa: E402
from tests.test_cpp_data import PROJECT as GEO  # noqa: E402
from tests.test_cpp_syntax_check import TWO_FILES, WITH_INCLUDES  # noqa: E402

LDB = {
    "port/port.h": "#ifndef LDB_PORT_H_\n#define LDB_PORT_H_\n#include <string.h>\n#if defined(POSIX) || defined(WIN)\n"
                   "#include \"port/port_stdcxx.h\"\n#elif defined(CHROMIUM)\n#include \"port/port_chromium.h\"\n#endif\n"
                   "#endif  // LDB_PORT_H_\n",
    "port/port_stdcxx.h": "#ifndef LDB_STDCXX_H_\n#define LDB_STDCXX_H_\n#if HAVE_CRC32C\n#include <crc32c/crc32c.h>\n#endif\n"
                          "#include <mutex>\nnamespace ldb {\nnamespace port {\nclass Mutex {\n public:\n  void Lock() LOCK() "
                          "{ mu_.lock(); }\n private:\n  std::mutex mu_;\n};\n}  // namespace port\n}  // namespace ldb\n"
                          "#endif  // LDB_STDCXX_H_\n",
    "util/coding.h": "#pragma once\n#include \"port/port.h\"\nnamespace ldb {\ninline int Decode(const char* p) { return p[0]; }\n}\n",
    "db/db.cc": "#include \"util/coding.h\"\nnamespace ldb {\nclass DB {\n int Get() REQUIRES(m_) { return Decode(b_); }\n"
                " char b_[4] GUARDED_BY(m_);\n port::Mutex m_;\n};\n#ifdef NDEBUG\nconst bool kDebug = false;\n#else\n"
                "const bool kDebug = true;\n#endif\n}  // namespace ldb\n",
}


@pytest.mark.parametrize("text,error", [
    ("#if A\nint x;\n#elif B\n#else\n#endif\nnamespace n {\n}\n", None),
    ("#endif  // X_H_\n", "#endif without #if"),
    ("#else\n", "#else without #if"),
    ("#ifndef X_H_\n#define X_H_\n", "1 unterminated #if"),
    ("namespace a {\nint x;\n", "1 unclosed '{'"),
    ("int x;\n}  // namespace a\n", "'}' without '{'"),
    # comments, literals, raw strings, digit separators, continuations and later branches
    ("// {\n/* }\n#endif */\nconst char* s = \"{\\\"\";\nchar c = '}';\nint n = 1'000;\n"
     "auto r = R\"d({)\")d\";\n#define M(x) \\\n  #endif {\n#if A\nnamespace a {\n#else\nnamespace b {\n#endif\n}\n", None),
    ("  #  if A\n  #  endif\n", None),
])
def test_structure_error(text, error):
    assert structure_error(text) == error


def write(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return root


def documents(root, out, mode, max_tokens):
    r = subprocess.run([BINARY, "--roots", root, "--mode", mode, "--max-tokens", str(max_tokens), "--out", out,
                        "--overwrite", "--dedup", "none", "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return read_output(out)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    ensure_binary()
    tmp = tmp_path_factory.mktemp("corpora")
    seeds = os.path.join(REPO, "tools", "cpp_chunker", "fuzz", "seeds")
    return {
        "seeds": seeds,
        "geo": write(str(tmp / "geo"), GEO),
        "two_files": write(str(tmp / "two_files"), TWO_FILES),
        "with_includes": write(str(tmp / "with_includes"), WITH_INCLUDES),
        "ldb": write(str(tmp / "ldb"), LDB),
    }


@pytest.mark.parametrize("max_tokens", [16384, 100])
def test_every_compilable_document_is_balanced(corpora, tmp_path, max_tokens):
    total = 0
    for name, root in corpora.items():
        docs, summary = documents(root, str(tmp_path / name), "compilable", max_tokens)
        assert docs, name
        total += len(docs)
        bad = [(d["files"], structure_error(d["text"])) for d in docs if structure_error(d["text"])]
        assert not bad, f"{name}: {bad}"
        if name == "ldb":
            text = "".join(d["text"] for d in docs)
            assert "LDB_PORT_H_" not in text and "#pragma once" not in text
            if max_tokens == 16384:
                assert "#if defined(POSIX) || defined(WIN)\n#elif defined(CHROMIUM)\n" in text
    assert total >= 20


def test_whole_files_stay_as_balanced_as_written(corpora, tmp_path):
    # file mode copies a file within budget as it is: balanced exactly when the file is
    root = corpora["seeds"]
    docs, _ = documents(root, str(tmp_path / "file"), "file", 16384)
    whole = [d for d in docs if len(d["files"]) == 1 and sum(e["files"] == d["files"] for e in docs) == 1]
    assert len(whole) >= 20
    for d in whole:
        with open(os.path.join(root, d["files"][0]), encoding="utf-8", errors="replace") as f:
            original = f.read().lstrip("\ufeff")
        assert (structure_error(d["text"]) is None) == (structure_error(original) is None), d["files"]


# installed header trees of dev/cpp_corpus.sh's packages, small enough to check every document:
# Google-style guards (yaml-cpp, re2, leveldb), #pragma once (spdlog), namespace-opening macros
# (fmt), C-with-classes (tinyxml2, pugixml, jsoncpp), a generated config header (snappy)
PACKAGED = ["/usr/include/yaml-cpp", "/usr/include/re2", "/usr/include/leveldb", "/usr/include/spdlog",
            "/usr/include/fmt", "/usr/include/tinyxml2.h", "/usr/include/pugixml.hpp", "/usr/include/jsoncpp/json",
            "/usr/include/snappy.h", "/usr/include/snappy-stubs-public.h"]


def test_packaged_headers_are_balanced(tmp_path):
    present = [p for p in PACKAGED if os.path.exists(p)]
    if len(present) < len(PACKAGED) // 2:
        pytest.skip("the Debian packages of dev/cpp_corpus.sh are not installed (bash dev/cpp_corpus.sh DIR installs them)")
    ensure_binary()
    root = tmp_path / "packaged"
    root.mkdir()
    for p in present:
        dest = root / os.path.basename(p)
        (shutil.copytree if os.path.isdir(p) else shutil.copy)(p, dest)
    for max_tokens in (16384, 2000):
        docs, summary = documents(str(root), str(tmp_path / f"out{max_tokens}"), "compilable", max_tokens)
        assert len(docs) >= 20 and summary["compilable_units"] >= 10, (len(docs), summary["compilable_units"])
        bad = [(d["files"], structure_error(d["text"])) for d in docs if structure_error(d["text"])]
        assert not bad, bad
