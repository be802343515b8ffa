"""dev/cpp_syntax_check.py on tiny projects: one file that compiles and one with a syntax
error; include paths. Needs g++. Runs the script as a subprocess; without
$CPP_CHUNKER_BINARY the first run may build tools/cpp_chunker (1-3 minutes cold)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

TWO_FILES = {
    "good.cpp": "#include <vector>\n\nint sum(const std::vector<int>& xs) {\n  int s = 0;\n  for (int x : xs) s += x;\n  return s;\n}\n",
    "bad.cpp": "int broken( {\n  return 1 +;\n}\n",
}
WITH_INCLUDES = {
    "include/tiny/add.h": "#ifndef TINY_ADD_H\n#define TINY_ADD_H\nnamespace tiny {\ninline int add(int a, int b) { return a + b; }\n}\n#endif\n",
    "src/local.h": "#define LOCAL 1\n",
    "src/use.cpp": "#include <tiny/add.h>\n#include \"local.h\"\n\nint f() { return tiny::add(LOCAL, 2); }\n",
}


def make(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def run_check(*args):
    env = dict(os.environ, CARGO_BUILD_JOBS="1")
    return subprocess.run([sys.executable, "dev/cpp_syntax_check.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_one_of_two_passes(tmp_path):
    root = make(tmp_path / "tiny", TWO_FILES)
    out = tmp_path / "r.json"
    r = run_check("--roots", root, "--mode", "file", "--json_out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    (p,) = res["projects"]
    assert p["project"] == "tiny"
    assert (p["documents"], p["checked"], p["passed"], p["fraction"]) == (2, 2, 1, 0.5)
    assert (res["checked"], res["passed"]) == (2, 1)
    assert [f["files"] for f in p["failed"]] == [["bad.cpp"]]
    assert p["failed"][0]["first_error"].startswith("DOC.cpp:2:3: error: expected primary-expression")
    assert [e["count"] for e in p["top_errors"]] == [1] and p["top_errors"][0]["kind"].startswith("error: ")
    assert "| tiny | 2 | 2 | 1 | 50.0% |" in r.stdout
    # --sample picks the same documents every time
    picks = []
    for k in range(2):
        r = run_check("--roots", root, "--mode", "file", "--sample", 1, "--seed", 3, "--json_out", out)
        assert r.returncode == 0, r.stderr
        picks.append(json.loads(out.read_text())["projects"][0])
    assert picks[0] == picks[1] and picks[0]["checked"] == 1


def test_include_paths(tmp_path):
    root = make(tmp_path / "inc", WITH_INCLUDES)
    out = tmp_path / "r.json"
    # file mode: three documents, each compiled on its own: <tiny/add.h> through ROOT/include,
    # "local.h" through the document's directory
    r = run_check("--roots", root, "--mode", "file", "--json_out", out)
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(out.read_text())["projects"]
    assert (p["documents"], p["passed"]) == (3, 3), p["failed"]
    # crossfile: one document, the headers inlined before the source
    r = run_check("--roots", root, "--mode", "crossfile", "--json_out", out)
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(out.read_text())["projects"]
    assert (p["documents"], p["passed"]) == (1, 1), p["failed"]


def test_clear_errors(tmp_path):
    r = run_check("--roots", tmp_path / "nope")
    assert r.returncode == 2
    assert "not directories" in r.stderr and "nope" in r.stderr
    r = run_check("--roots", tmp_path, "--cxx", "no-such-compiler-xyz")
    assert r.returncode == 2
    assert "no-such-compiler-xyz not found" in r.stderr
    r = run_check("--roots", make(tmp_path / "t", TWO_FILES), "--mode", "no-such-mode")
    assert r.returncode == 2
    assert "cpp_chunker failed" in r.stderr


def test_whose_failure(tmp_path):
    # a missing third-party header is the environment's; a file that does not compile as
    # written fails as the original does; a good file passes, as its original does
    root = make(tmp_path / "owners", {
        "needs_dep.cpp": "#include <no_such_dep/dep.h>\nint f() { return dep(); }\n",
        "not_alone.cpp": "inline Widget make_widget() { return Widget{}; }\n",
        "good.cpp": "#include <vector>\nint g(const std::vector<int>& v) { return (int)v.size(); }\n",
    })
    out = tmp_path / "r.json"
    r = run_check("--roots", root, "--mode", "compilable", "--originals", "--json_out", out)
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(out.read_text())["projects"]
    owners = {tuple(f["files"]): (f["owner"], f["original_passes"]) for f in p["failed"]}
    assert owners == {("needs_dep.cpp",): ("env", False), ("not_alone.cpp",): ("original", False)}, p["failed"]
    assert (p["env_failures"], p["original_failures"], p["tool_failures"]) == (1, 1, 0)
    assert (p["originals_passed"], p["whole_original_passes"], p["whole_passed_original_passes"]) == (1, 1, 1)
    assert "| 1/1/0 | 1/1 |" in r.stdout
