"""
HumanEval and MBPP in C++, as translated by MultiPL-E (Cassano et al. 2022): each
problem is a C++ function signature with the task as a comment, checked by a main() of
asserts. HumanEval-cpp has 161 problems, MBPP-cpp about 400.

Hub: nuprl/MultiPL-E, configs "humaneval-cpp" and "mbpp-cpp", one split "test". What
this module relies on in a row (the fields of the dataset card; MultiPL-E's C++
translator, dataset_builder/humaneval_to_cpp.py, makes them so):
- prompt: "#include<assert.h>\\n#include<bits/stdc++.h>\\n" (sometimes union declarations),
  the task as // comment lines, then the signature ending in "{\\n": an open body.
- tests: "}\\nint main() {\\n    auto candidate = NAME;\\n    assert(candidate(...) == ...);\\n}\\n".
  It starts by closing the prompt's function, so prompt + body + tests is the program.
- stop_tokens: ["\\n}"]: a completion ends where the function's closing brace would be.
- name ("HumanEval_0_has_close_elements", "mbpp_3_is_not_prime"), language ("cpp"),
  doctests, original, prompt_terminology: read but not needed.
MultiPL-E ships no reference solutions. Rows of a local copy may carry one more field,
canonical_solution (the body, without the closing brace), as the offline fixtures of
tasks/fixtures.py do; it becomes the reference answer of the conversation.

Two ways to ask:
- Chat models (evaluate): the user gives the prompt in a ```cpp fence and asks for the
  function; the answer's code (its first fenced block, else all of it) goes after the
  prompt's #include lines and before the test main. So the answer must be the complete
  function (signature and body), and nothing that clashes with the tests (no main()).
- Base models (evaluate_completion): the model continues the prompt text itself; the
  continuation is cut at the first stop token, and prompt + body + tests is compiled.

Scoring: the program is compiled with g++ -std=c++17 -O0 and run in the sandbox by
nanochat.cpp_exec; a problem is solved iff the status is "passed". evaluate_batch
compiles and runs many candidates in parallel over the CPU cores and returns the
CppResults, so a caller can report compile errors, timeouts, crashes and wrong answers.
"""

import re

from nanochat.cpp_exec import compile_and_run, run_many
from tasks.common import Task, load_rows
from tasks.humaneval import extract_program

HUB_PATH = "nuprl/MultiPL-E"
ENTRY_POINT = re.compile(r"auto\s+candidate\s*=\s*([A-Za-z_]\w*)\s*;")


def cut_at_stop(completion, stop_tokens):
    """The completion up to (not including) the first stop token, as MultiPL-E does."""
    cut = min((i for i in (completion.find(s) for s in stop_tokens if s) if i >= 0), default=len(completion))
    return completion[:cut]


def extract_includes(prompt):
    """The prompt's #include lines, as one string."""
    return "\n".join(line for line in prompt.splitlines() if line.lstrip().startswith("#include"))


def strip_closing_brace(tests):
    """The tests without the "}" that closes the prompt's open function."""
    return re.sub(r"\A\s*}\s*\n", "", tests, count=1)


class MultiPLECpp(Task):

    eval_type = "generative"
    config = None  # the hub config, set by the subclasses
    timeout = 10.0  # seconds per run; compilation has its own limit in cpp_exec

    def __init__(self, split="test", data_dir=None, workers=None, **kwargs):
        super().__init__(**kwargs)
        if split != "test":
            raise ValueError(f"{type(self).__name__} has only a 'test' split, got {split!r}")
        self.rows = load_rows(HUB_PATH, self.config, split, data_dir)
        self.workers = workers  # parallel compiles/runs in evaluate_batch (None: every core)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        m = ENTRY_POINT.search(row["tests"])
        solution = row.get("canonical_solution")
        reference = row["prompt"] + solution + "}\n" if solution is not None else ""
        user = ("Complete this C++ function. Answer with the whole function in a ```cpp block.\n\n"
                f"```cpp\n{row['prompt']}```")
        return {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": f"```cpp\n{reference}```" if reference else ""},
            ],
            "name": row["name"],
            "entry_point": m.group(1) if m else None,
            "prompt": row["prompt"],
            "tests": row["tests"],
            "stop_tokens": list(row.get("stop_tokens") or ["\n}"]),
        }

    # the program a response stands for
    def chat_program(self, conversation, response):
        return (extract_includes(conversation["prompt"]) + "\n\n" + extract_program(response).strip("\n") + "\n\n"
                + strip_closing_brace(conversation["tests"]))

    def completion_program(self, conversation, completion):
        return conversation["prompt"] + cut_at_stop(completion, conversation["stop_tokens"]) + conversation["tests"]

    # scoring
    def evaluate(self, conversation, response):
        return int(compile_and_run(self.chat_program(conversation, response), timeout=self.timeout).passed)

    def evaluate_completion(self, conversation, completion):
        return int(compile_and_run(self.completion_program(conversation, completion), timeout=self.timeout).passed)

    def evaluate_batch(self, conversations, responses, completion=False):
        """CppResults for (conversation, response) pairs, compiled and run in parallel."""
        build = self.completion_program if completion else self.chat_program
        programs = [build(c, r) for c, r in zip(conversations, responses, strict=True)]
        return run_many(programs, workers=self.workers, timeout=self.timeout)


class HumanEvalCpp(MultiPLECpp):
    config = "humaneval-cpp"


class MBPPCpp(MultiPLECpp):
    config = "mbpp-cpp"
