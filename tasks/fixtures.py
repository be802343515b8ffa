"""
A tiny offline stand-in for every chat dataset, in the hub's own row formats, for the
tests and for offline CPU runs (dev/runcpu.sh when the Hugging Face hub is unreachable).
The rows are generated (simple arithmetic, made-up facts), not real data: they exercise
the pipeline, they do not teach anything.

    python -m tasks.fixtures /tmp/task_data        # then: export NANOCHAT_TASK_DATA=/tmp/task_data
                                                   #       export NANOCHAT_WORDS_FILE=/tmp/task_data/words.txt
"""

import json
import os
import random
import sys

WORDS = ["apple", "banana", "cherry", "strawberry", "mississippi", "compiler", "template", "pointer", "vector",
         "iterator", "allocator", "namespace", "lambda", "parser", "kernel", "tensor", "gradient", "rocket",
         "garden", "window", "planet", "bottle", "letter", "summer", "yellow", "hammer", "butter", "coffee"]


def _write(root, parts, split, rows):
    directory = os.path.join(root, *parts)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _arith(rng):
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return a, b, a + b


def _mc_row(rng, i):
    a, b, c = _arith(rng)
    choices = [str(c), str(c + 1), str(c - 1), str(c + 2)]
    rng.shuffle(choices)
    return f"What is {a} plus {b}?", choices, choices.index(str(c))


_CPP_HEAD = "#include<assert.h>\n#include<bits/stdc++.h>\n"

# MultiPL-E C++ rows written for the tests (not taken from the benchmark), with the
# body that solves each one as canonical_solution (a field the hub's rows do not have)
CPP_FIXTURES = {
    "humaneval-cpp": [
        {"name": "HumanEval_0_add_one", "language": "cpp",
         "prompt": _CPP_HEAD + "// Return x plus one.\n// >>> add_one((1))\n// (2)\nlong add_one(long x) {\n",
         "canonical_solution": "    return x + 1;\n",
         "tests": "}\nint main() {\n    auto candidate = add_one;\n    assert(candidate((1)) == (2));\n"
                  "    assert(candidate((-1)) == (0));\n}\n"},
        {"name": "HumanEval_1_sum_vector", "language": "cpp",
         "prompt": _CPP_HEAD + "// The sum of the numbers in the vector (0 when it is empty).\n"
                               "// >>> sum_vector((std::vector<long>({(long)1, (long)2, (long)3})))\n// (6)\n"
                               "long sum_vector(std::vector<long> numbers) {\n",
         "canonical_solution": ("    long total = 0;\n    for (long x : numbers) {\n        total += x;\n    }\n"
                                "    return total;\n"),
         "tests": "}\nint main() {\n    auto candidate = sum_vector;\n"
                  "    assert(candidate((std::vector<long>({(long)1, (long)2, (long)3}))) == (6));\n"
                  "    assert(candidate((std::vector<long>())) == (0));\n}\n"},
        {"name": "HumanEval_2_reverse_words", "language": "cpp",
         "prompt": _CPP_HEAD + "// The words of the sentence (separated by single spaces) in reverse order.\n"
                               "// >>> reverse_words((\"a b c\"))\n// (\"c b a\")\n"
                               "std::string reverse_words(std::string s) {\n",
         "canonical_solution": "    std::vector<std::string> words;\n    std::stringstream in(s);\n    std::string w;\n"
                               "    while (in >> w) {\n        words.push_back(w);\n    }\n"
                               "    std::string out;\n    for (long i = (long)words.size() - 1; i >= 0; i--) {\n"
                               "        out += words[i];\n        if (i > 0) {\n            out += \" \";\n        }\n    }\n"
                               "    return out;\n",
         "tests": "}\nint main() {\n    auto candidate = reverse_words;\n"
                  "    assert(candidate((\"a b c\")) == (\"c b a\"));\n    assert(candidate((\"hello\")) == (\"hello\"));\n"
                  "    assert(candidate((\"\")) == (\"\"));\n}\n"},
    ],
    "mbpp-cpp": [
        {"name": "mbpp_1_is_even", "language": "cpp",
         "prompt": _CPP_HEAD + "// Write a function to check whether a number is even.\nbool is_even(long n) {\n",
         "canonical_solution": "    return n % 2 == 0;\n",
         "tests": "}\nint main() {\n    auto candidate = is_even;\n    assert(candidate((4)) == (true));\n"
                  "    assert(candidate((7)) == (false));\n}\n"},
        {"name": "mbpp_2_max_of_three", "language": "cpp",
         "prompt": _CPP_HEAD + "// Write a function to find the largest of three numbers.\n"
                               "long max_of_three(long a, long b, long c) {\n",
         "canonical_solution": "    return std::max(a, std::max(b, c));\n",
         "tests": "}\nint main() {\n    auto candidate = max_of_three;\n    assert(candidate((1), (5), (3)) == (5));\n"
                  "    assert(candidate((-1), (-5), (-3)) == (-1));\n}\n"},
    ],
}
for _rows in CPP_FIXTURES.values():
    for _row in _rows:
        _row.update(doctests="transform", original=f"fixture/{_row['name']}.py", prompt_terminology="reworded",
                    stop_tokens=["\n}"])


def write_task_fixtures(root, n=24, seed=0):
    """Write every dataset split the chat stages read under root (the layout of
    $NANOCHAT_TASK_DATA) plus root/words.txt; returns root."""
    rng = random.Random(seed)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        for split in ("train", "validation", "test"):
            rows = []
            for i in range(n):
                q, choices, ans = _mc_row(rng, i)
                rows.append({"id": f"{subset}-{split}-{i}", "question": q, "answerKey": "ABCD"[ans],
                             "choices": {"text": choices, "label": list("ABCD")}})
            _write(root, ["allenai", "ai2_arc", subset], split, rows)
    for split in ("test", "validation", "dev"):
        rows = []
        for i in range(n):
            q, choices, ans = _mc_row(rng, i)
            rows.append({"question": q, "subject": "elementary_mathematics", "choices": choices, "answer": ans})
        _write(root, ["cais", "mmlu", "all"], split, rows)
    rows = []
    for i in range(n):
        q, choices, ans = _mc_row(rng, i)
        rows.append({"train": {"question": q, "subject": "misc", "choices": choices, "answer": ans}})
    _write(root, ["cais", "mmlu", "auxiliary_train"], "train", rows)
    for split in ("train", "test"):
        rows = []
        for i in range(n):
            a, b, c = _arith(rng)
            rows.append({"question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have now?",
                         "answer": f"Sam has {a} + {b} = <<{a}+{b}={c}>>{c} apples.\n#### {c}"})
        _write(root, ["openai", "gsm8k", "main"], split, rows)
    rows = []
    for i in range(min(n, 6)):
        k = i + 1
        rows.append({"task_id": f"Fixture/{i}", "entry_point": f"add_{k}",
                     "prompt": f"def add_{k}(x: int) -> int:\n    \"\"\"Return x plus {k}.\"\"\"\n",
                     "canonical_solution": f"    return x + {k}\n",
                     "test": f"def check(candidate):\n    assert candidate(1) == {1 + k}\n    assert candidate(-{k}) == 0\n"})
    _write(root, ["openai", "openai_humaneval"], "test", rows)
    for config, cpp_rows in CPP_FIXTURES.items():
        _write(root, ["nuprl", "MultiPL-E", config], "test", cpp_rows)
    for split in ("train", "test"):
        rows = []
        for i in range(n):
            a, b, c = _arith(rng)
            messages = [{"role": "user", "content": f"Can you add {a} and {b}?"},
                        {"role": "assistant", "content": f"Sure: {a} + {b} = {c}."}]
            if i % 3 == 0:
                messages = [{"role": "system", "content": "You are a helpful assistant."}] + messages
            if i % 4 == 0:
                messages += [{"role": "user", "content": "Thanks!"},
                             {"role": "assistant", "content": "You're welcome."}]
            rows.append({"messages": messages})
        _write(root, ["HuggingFaceTB", "smol-smoltalk"], split, rows)
    with open(os.path.join(root, "words.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tasks.fixtures OUTPUT_DIR")
    out = write_task_fixtures(sys.argv[1])
    print(f"wrote chat task fixtures to {out}\n  export NANOCHAT_TASK_DATA={out}\n"
          f"  export NANOCHAT_WORDS_FILE={os.path.join(out, 'words.txt')}")
