"""Generative chat tasks (GSM8K, HumanEval) on small local copies in the hub's format."""

import json
import time

import pytest

from tasks.gsm8k import GSM8K, extract_answer, parse_answer
from tasks.humaneval import HumanEval, extract_imports, extract_program

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shirt costs $1,200 and a hat $300. What do both cost?",
     "answer": "Together they cost 1200+300=<<1200+300=1500>>1500 dollars.\n#### 1,500"},
    {"question": "Tom has 3 apples. How many does he have?", "answer": "He has 3 apples.\n#### 3"},
]

HUMANEVAL_ROWS = [
    {"task_id": "Fixture/0",
     "prompt": "from typing import List\n\n\ndef add_all(xs: List[int], y: int) -> List[int]:\n"
               "    \"\"\" Add y to every element of xs.\n    >>> add_all([1, 2], 3)\n    [4, 5]\n    \"\"\"\n",
     "canonical_solution": "    return [x + y for x in xs]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2], 3) == [4, 5]\n"
             "    assert candidate([], 7) == []\n    assert candidate([-1], 1) == [0]\n",
     "entry_point": "add_all"},
    {"task_id": "Fixture/1",
     "prompt": "def double(x: int) -> int:\n    \"\"\" Twice x. \"\"\"\n",
     "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n",
     "entry_point": "double"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def gsm8k(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    return GSM8K(split="train", data_dir=str(tmp_path))


@pytest.fixture
def humaneval(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", HUMANEVAL_ROWS)
    return HumanEval(data_dir=str(tmp_path))


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_parse_answer_into_tool_calls():
    assert parse_answer(GSM8K_ROWS[0]["answer"]) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # back-to-back annotations give no empty text part; no annotation gives one text part
    assert parse_answer("<<1+1=2>><<2*3=6>>6\n#### 6") == [
        {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"},
        {"type": "python", "text": "2*3"}, {"type": "python_output", "text": "6"},
        {"type": "text", "text": "6\n#### 6"}]
    assert parse_answer("He has 3.\n#### 3") == [{"type": "text", "text": "He has 3.\n#### 3"}]


def test_gsm8k_load_and_slice(gsm8k, tmp_path, monkeypatch):
    assert len(gsm8k) == 3 and gsm8k.eval_type == "generative"
    ex = gsm8k[0]
    assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
    assert ex["messages"][0]["content"] == GSM8K_ROWS[0]["question"]
    assert ex["messages"][1]["content"] == parse_answer(GSM8K_ROWS[0]["answer"])
    # the NANOCHAT_TASK_DATA layout: <root>/openai/gsm8k/<subset>/<split>.jsonl
    root = tmp_path / "root"
    write_jsonl(root / "openai" / "gsm8k" / "socratic" / "test.jsonl", GSM8K_ROWS[1:])
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(root))
    task = GSM8K(subset="socratic", split="test", start=1)
    assert len(task) == 1 and task[0]["messages"][0]["content"] == GSM8K_ROWS[2]["question"]
    with pytest.raises(ValueError):
        GSM8K(subset="nope")


def test_gsm8k_mask_trains_reasoning_and_calls_not_outputs(gsm8k, tokenizer):
    ids, mask = tokenizer.render_conversation(gsm8k[0])
    assert len(ids) == len(mask)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m == 1])
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if m == 0])
    # prose and the calculator calls are trained on ...
    assert "Natalia sold 48/2 = <|python_start|>48/2<|python_end|>24 clips in May." in trained
    assert "<|python_start|>48+24<|python_end|>72 clips altogether" in trained
    assert trained.endswith("#### 72<|assistant_end|>")
    # ... the tool's results and the question are not
    assert "<|output_start|>" not in trained and "<|output_start|>24<|output_end|>" in untrained
    assert "<|output_start|>72<|output_end|>" in untrained
    assert GSM8K_ROWS[0]["question"] in untrained and "April, and then" not in trained


def test_gsm8k_extract_answer():
    assert extract_answer("so 72 in all.\n#### 72") == "72"
    assert extract_answer("#### 1,500") == "1500"
    assert extract_answer("#### $1,234.50") == "1234.5"
    assert extract_answer("####  $ 18 dollars.") == "18"
    assert extract_answer("#### 72.0") == extract_answer("#### 72") == "72"
    assert extract_answer("#### -3") == "-3"
    assert extract_answer("#### 0.25") == "0.25"
    assert extract_answer("#### 5\nwait, no\n#### 6") == "6"  # the last one counts
    assert extract_answer("the answer is 72") is None
    assert extract_answer("#### none") is None
    assert extract_answer("#### 18\n2. Next question") == "18"  # the number ends at whitespace (was 182)
    assert extract_answer("#### - 5") == "-5"


def test_gsm8k_evaluate(gsm8k):
    conv = gsm8k[0]
    assert gsm8k.evaluate(conv, "48/2=24, 48+24=72\n#### 72") == 1
    assert gsm8k.evaluate(conv, "#### 72.00") == 1
    assert gsm8k.evaluate(conv, "#### 71") == 0
    assert gsm8k.evaluate(conv, "The answer is 72.") == 0  # no "####": wrong
    assert gsm8k.reward(conv, "#### 72") == 1.0 and gsm8k.reward(conv, "#### 7") == 0.0
    conv = gsm8k[1]  # reference "#### 1,500"
    assert gsm8k.evaluate(conv, "#### $1500") == 1 and gsm8k.evaluate(conv, "#### 150") == 0


# -----------------------------------------------------------------------------
# HumanEval

def test_humaneval_load_and_render(humaneval, tmp_path, monkeypatch, tokenizer):
    assert len(humaneval) == 2 and humaneval.eval_type == "generative"
    ex = humaneval[0]
    row = HUMANEVAL_ROWS[0]
    assert ex["messages"][0] == {"role": "user", "content": row["prompt"]}
    assert ex["messages"][1] == {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}
    assert (ex["task_id"], ex["entry_point"], ex["test"]) == ("Fixture/0", "add_all", row["test"])
    ids, mask = tokenizer.render_conversation(ex)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m == 1])
    assert trained == row["prompt"] + row["canonical_solution"] + "<|assistant_end|>"
    # the NANOCHAT_TASK_DATA layout (no subset): <root>/openai/openai_humaneval/test.jsonl
    root = tmp_path / "root"
    write_jsonl(root / "openai" / "openai_humaneval" / "test.jsonl", HUMANEVAL_ROWS[1:])
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(root))
    assert [e["task_id"] for e in HumanEval()] == ["Fixture/1"]


def test_humaneval_extract_program():
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nand\n```python\nx = 2\n```") \
        == "def f():\n    return 1\n"
    assert extract_program("```\ndef g(): pass\n```") == "def g(): pass\n"
    assert extract_program("```python\ndef h(): return 3\n") == "def h(): return 3\n"  # cut off
    assert extract_program("def k():\n    return 0\n") == "def k():\n    return 0\n"
    assert extract_imports(HUMANEVAL_ROWS[0]["prompt"]) == "from typing import List"


def test_humaneval_evaluate(humaneval):
    conv = humaneval[0]
    row = HUMANEVAL_ROWS[0]
    assert humaneval.evaluate(conv, conv["messages"][1]["content"]) == 1  # canonical solution
    # the response need not repeat the imports: List comes from the prompt's import lines
    fenced = "Sure!\n```python\ndef add_all(xs: List[int], y: int) -> List[int]:\n" \
             "    return [x + y for x in xs]\n```\nDone."
    assert humaneval.evaluate(conv, fenced) == 1 and humaneval.reward(conv, fenced) == 1.0
    wrong = row["prompt"] + "    return [x - y for x in xs]\n"
    assert humaneval.evaluate(conv, wrong) == 0 and humaneval.reward(conv, wrong) == 0.0
    assert humaneval.evaluate(conv, "def add_all(xs, y):\n    raise ValueError\n") == 0
    assert humaneval.evaluate(conv, "this is not python") == 0
    # a solution that never returns is cut off at the task's timeout and counts as wrong
    humaneval.timeout = 1.0
    t0 = time.time()
    assert humaneval.evaluate(conv, row["prompt"] + "    while True:\n        pass\n") == 0
    assert time.time() - t0 < 10
