"""C++ tasks (MultiPL-E humaneval-cpp, mbpp-cpp) on the offline fixtures of tasks/fixtures.py,
read through NANOCHAT_TASK_DATA as a local copy of the hub's dataset would be. The
"models" are scripted: one returns the canonical solution, one returns garbage."""

import shutil

import pytest

from tasks.fixtures import CPP_FIXTURES, write_task_fixtures
from tasks.humaneval_cpp import HumanEvalCpp, MBPPCpp, cut_at_stop, strip_closing_brace

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

GARBAGE = "I am not sure, but maybe:\n```cpp\nthis is not C++ at all\n```"


@pytest.fixture
def task_data(tmp_path, monkeypatch):
    write_task_fixtures(str(tmp_path))
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(tmp_path))
    return tmp_path


def test_rows_load_from_the_local_copy(task_data):
    he, mbpp = HumanEvalCpp(), MBPPCpp()
    assert (len(he), len(mbpp)) == (len(CPP_FIXTURES["humaneval-cpp"]), len(CPP_FIXTURES["mbpp-cpp"]))
    assert (task_data / "nuprl" / "MultiPL-E" / "humaneval-cpp" / "test.jsonl").is_file()
    conv = he[0]
    assert conv["entry_point"] == "add_one" and conv["stop_tokens"] == ["\n}"]
    assert "```cpp\n#include<assert.h>" in conv["messages"][0]["content"]
    assert conv["messages"][1]["content"].startswith("```cpp\n#include<assert.h>")
    with pytest.raises(ValueError):
        HumanEvalCpp(split="train")


def test_stop_tokens_and_test_main():
    assert cut_at_stop("    return x;\n}\n\nint main() {}", ["\n}"]) == "    return x;"
    assert cut_at_stop("    return x;", ["\n}"]) == "    return x;"  # cut off by the token limit: kept whole
    assert cut_at_stop("a;\n}b;\n}", ["\n}", "b"]) == "a;"
    assert strip_closing_brace("}\nint main() {\n}\n") == "int main() {\n}\n"


def test_scripted_models_score_one_and_zero(task_data):
    # every fixture problem once with its canonical solution, garbage once per task and
    # style: each compile parses <bits/stdc++.h>, seconds on a small machine
    for task in (HumanEvalCpp(workers=2), MBPPCpp(workers=2)):
        convs = list(task)
        rows = {r["name"]: r for r in CPP_FIXTURES[task.config]}
        canonical_chat = [c["messages"][1]["content"] for c in convs]
        results = task.evaluate_batch(convs + convs[:1], canonical_chat + [GARBAGE])
        assert [r.status for r in results] == ["passed"] * len(convs) + ["compile_error"]
        assert sum(r.passed for r in results[:-1]) / len(convs) == 1.0
    # base-model style: the prompt continued; what comes after the stop token is cut away
    task = HumanEvalCpp(workers=2)
    convs = list(task)
    rows = {r["name"]: r for r in CPP_FIXTURES[task.config]}
    completions = [rows[c["name"]]["canonical_solution"] + "}\n\nint unused() { return 0; }\n" for c in convs]
    results = task.evaluate_batch(convs + convs[:1], completions + ["    return retrun;\n}"], completion=True)
    assert [r.status for r in results] == ["passed"] * len(convs) + ["compile_error"]
    # the one-at-a-time path
    assert task.evaluate(convs[1], "no code here") == 0


def test_wrong_function_is_wrong_answer(task_data):
    task = HumanEvalCpp()
    conv = task[0]
    wrong = "```cpp\nlong add_one(long x) {\n    return x + 2;\n}\n```"
    [r] = task.evaluate_batch([conv], [wrong])
    assert r.status == "wrong_answer" and "Assertion" in r.stderr


class ScriptedEngine:
    """Stands in for Engine + Tokenizer in run_generative: the 'model' answers example i
    (the engine is called with seed=i) with answers(i), one string per sample."""

    device = "cpu"

    def __init__(self, answers):
        self.answers = answers

    # the tokenizer side
    def render_for_completion(self, conversation):
        return [0]

    def decode(self, row):
        return row

    # the engine side: the "tokens" are the answer strings themselves
    def generate_batch(self, prompt, num_samples, seed, **kwargs):
        return self.answers(seed)[:num_samples], None


def test_run_generative_scores_pass_at_k_over_a_cpp_task(task_data):
    from nanochat.chat_eval import run_generative
    task = HumanEvalCpp(workers=2)
    canonical = [c["messages"][1]["content"] for c in task]
    # sample 0 right, sample 1 garbage: pass@1 = 1/2 and pass@2 = 1 on every problem
    scripted = ScriptedEngine(lambda i: [canonical[i], GARBAGE])
    scores = run_generative(task, scripted, scripted, num_samples=2, progress=False)
    statuses = scores.pop("statuses")
    assert scores == {"pass@1": 0.5, "pass@2": 1.0, "accuracy": 1.0}
    # how the samples ended, told apart: half pass, the garbage half does not compile
    assert statuses == {"passed": 0.5, "compile_error": 0.5, "timeout": 0.0, "crash": 0.0, "wrong_answer": 0.0}


def test_run_generative_completion_style_for_base_models(task_data):
    """Base models (scripts/base_eval --cpp=1): the raw prompt after <|bos|>, the continuation
    cut at the stop token and compiled with the tests."""
    from nanochat.chat_eval import run_generative
    task = HumanEvalCpp(workers=2)
    rows = {r["name"]: r for r in CPP_FIXTURES[task.config]}
    bodies = [rows[c["name"]]["canonical_solution"] + "}\n\nand then some rambling" for c in task]
    prompts = []

    class Base(ScriptedEngine):
        def encode(self, text, prepend=None):
            prompts.append((prepend, text))
            return [0]
    scripted = Base(lambda i: [bodies[i], "    return retrun;\n}"])
    scores = run_generative(task, scripted, scripted, num_samples=2, progress=False, completion=True)
    assert scores.pop("statuses")["compile_error"] == 0.5
    assert scores == {"pass@1": 0.5, "pass@2": 1.0, "accuracy": 1.0}
    assert prompts == [("<|bos|>", c["prompt"]) for c in task]


def tiny_base_checkpoint(monkeypatch, base_dir, sequence_len=512):
    """A tiny random GPT with a byte tokenizer, served by a stand-in checkpoint manager to
    scripts/base_eval (NANOCHAT_BASE_DIR=base_dir for its report)."""
    import sys
    import types

    import torch

    from nanochat.gpt import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=sequence_len, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2,
                                  n_kv_head=2, n_embd=32), "cpu").eval()
    fake = types.ModuleType("nanochat.checkpoint_manager")
    fake.load_model = lambda *a, **kw: (model, tok, {"step": 3})
    monkeypatch.setitem(sys.modules, "nanochat.checkpoint_manager", fake)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))


def test_base_eval_cpp_end_to_end(task_data, tmp_path, monkeypatch, capsys):
    """scripts/base_eval --core=0 --cpp=1 on a tiny random model (its C++ is garbage: 0.0), the
    wiring from checkpoint to pass@k and the report."""
    from scripts import base_eval
    tiny_base_checkpoint(monkeypatch, tmp_path / "base")
    out = base_eval.main(["--device_type", "cpu", "--core=0", "--cpp=1", "-x", "1", "-m", "8", "--workers", "2"])
    statuses = {name: out["cpp"][name].pop("statuses") for name in ("HumanEval-cpp", "MBPP-cpp")}
    assert out["cpp"] == {name: {"pass@1": 0.0, "accuracy": 0.0} for name in ("HumanEval-cpp", "MBPP-cpp")}
    assert all(s["passed"] == 0.0 and sum(s.values()) == 1.0 for s in statuses.values())
    assert "HumanEval-cpp: pass@1 0.0000; samples: passed 0.0%" in capsys.readouterr().out
    report = (tmp_path / "base" / "report" / "base-model-c-evaluation.md")
    assert report.is_file() and "HumanEval-cpp pass@1" in report.read_text()
    assert "MBPP-cpp samples compile_error" in report.read_text()
