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
