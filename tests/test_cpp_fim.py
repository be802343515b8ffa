"""C++ fill-in-the-middle evaluation (tasks/cpp_fim.py, scripts/base_eval --fim): the middles
it cuts, a scripted model that returns the true middle scores 1.0 and garbage scores 0.0,
and base_eval end to end on a tiny model."""

import shutil

import pytest
import torch

from tasks import cpp_fim

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

DOC_A = """#include <vector>
#include <string>

// the sum of a vector
long total(const std::vector<long>& xs) {
    long s = 0;
    for (long x : xs) {
        s += x;
    }
    return s;
}

std::string greet(const std::string& name) {
    if (name.empty()) {
        return "hello, nobody {";
    }
    return "hello, " + name;
}
"""

DOC_B = """#include <cstdio>

struct Point {
    int x;
    int y;
};

int dot(Point a, Point b) {
    return a.x * b.x + a.y * b.y;
}
"""

BROKEN = "int f( {\n  return 1;\n}\n"


@pytest.fixture
def cpp_dir(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.cpp").write_text(DOC_A)
    (d / "b.hpp").write_text(DOC_B)
    (d / "broken.cc").write_text(BROKEN)
    (d / "notes.txt").write_text("not C++")
    return d


def test_documents_and_middles(cpp_dir, tmp_path):
    texts = cpp_fim.load_documents(str(cpp_dir))
    assert texts == [DOC_A, DOC_B, BROKEN]
    assert cpp_fim.usable(texts, workers=2) == [DOC_A, DOC_B]  # the broken file gives no example
    lines = DOC_A.splitlines(keepends=True)
    # both functions, not the loop or the if (and the brace inside the string is not counted)
    assert cpp_fim.function_bodies(lines) == [(5, 10), (13, 17)]
    assert all(not lines[i].startswith("#") and lines[i].strip() not in ("{", "}")
               for i in cpp_fim.candidate_lines(lines))
    examples = cpp_fim.make_examples([DOC_A, DOC_B], seed=3)
    assert [(e["doc"], e["kind"]) for e in examples] == [(0, "line"), (0, "body"), (1, "line"), (1, "body")]
    for e in examples:
        assert e["prefix"] + e["middle"] + e["suffix"] == [DOC_A, DOC_B][e["doc"]]
    assert examples == cpp_fim.make_examples([DOC_A, DOC_B], seed=3)  # deterministic
    import pyarrow as pa
    import pyarrow.parquet as pq
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["int a;"]}), shards / "shard_00000.parquet")
    pq.write_table(pa.table({"text": [DOC_B]}), shards / "shard_00001.parquet")  # the last: validation
    assert cpp_fim.load_documents(str(shards)) == [DOC_B]
    with pytest.raises(ValueError, match="no C\\+\\+ documents"):
        cpp_fim.load_documents(str(tmp_path / "nothing"))


def test_scripted_models_score_one_and_zero():
    examples = cpp_fim.make_examples([DOC_A, DOC_B])
    right = cpp_fim.score(examples, [e["middle"] for e in examples], workers=2)
    assert right["all"] == {"exact": 1.0, "syntax": 1.0, "n": 4}
    wrong = cpp_fim.score(examples, ["this is not C++ at all (\n"] * len(examples), workers=2)
    assert wrong["all"] == {"exact": 0.0, "syntax": 0.0, "n": 4}
    assert set(wrong) == {"line", "body", "all"}
    no_compiler = cpp_fim.score(examples, [e["middle"] for e in examples[:-1]] + ["x"], syntax=False)
    assert no_compiler["all"] == {"exact": 0.75, "syntax": None, "n": 4}


def test_base_eval_fim_end_to_end(cpp_dir, tmp_path, monkeypatch, capsys):
    from scripts import base_eval
    from tests.test_tasks_cpp import tiny_base_checkpoint
    tiny_base_checkpoint(monkeypatch, tmp_path / "base", sequence_len=1024)
    out = base_eval.main(["--device_type", "cpu", "--core=0", f"--fim={cpp_dir}", "--fim_max_tokens=4",
                          "--workers=2"])
    assert out["fim"]["all"]["n"] == 4 and 0.0 <= out["fim"]["all"]["syntax"] <= 1.0
    assert "FIM all: exact" in capsys.readouterr().out
    assert "FIM body exact" in (tmp_path / "base" / "report" / "base-model-c-fim.md").read_text()
    # without the syntax check the broken file gives examples too, scored by exact match only
    out = base_eval.main(["--device_type", "cpu", "--core=0", f"--fim={cpp_dir}", "--fim_max_tokens=4",
                          "--fim_syntax=0"])
    assert out["fim"]["all"]["n"] == 5 and out["fim"]["all"]["syntax"] is None and out["fim"]["all"]["bpb"] > 0
    with pytest.raises(SystemExit, match="no C\\+\\+ documents"):
        base_eval.main(["--device_type", "cpu", "--core=0", f"--fim={tmp_path / 'empty'}"])


def test_middle_bits_scores_the_middle_only():
    """base_eval's FIM middle bpb: the bits of the middle's tokens after the prompt, as the
    model's own log-probabilities give them, and the bytes of those tokens (cropped to
    max_tokens); the prompt's tokens are not scored."""
    import contextlib
    import math

    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer
    from scripts.base_eval import middle_bits
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2,
                                  n_kv_head=2, n_embd=32), "cpu")
    prompt, middle = [tok.get_bos_token_id(), 5, 6, 7], "ab c"
    bits, nbytes = middle_bits(model, tok, prompt, middle, 100, contextlib.nullcontext())
    ids = prompt + tok.encode(middle)
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
    want = -sum(logp[t, ids[t + 1]].item() for t in range(len(prompt) - 1, len(ids) - 1)) / math.log(2)
    assert nbytes == 4 and bits == pytest.approx(want, rel=1e-5)
    bits2, nbytes2 = middle_bits(model, tok, prompt, middle, 2, contextlib.nullcontext())
    assert nbytes2 == 2 and bits2 < bits
