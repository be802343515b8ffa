"""
HumanEval: 164 hand-written Python problems, each a function signature plus docstring,
checked by unit tests.

Hub: openai/openai_humaneval, one split "test". Rows are {task_id ("HumanEval/0"),
prompt (imports, signature, docstring), canonical_solution (the body), test (defines
check(candidate) with asserts), entry_point (the function's name)}.

Rendering: the user gives the prompt; the assistant answers with the complete function,
prompt + canonical_solution, as one string. The conversation also carries task_id,
entry_point and test, which evaluate needs.

Scoring (generative): the code is taken from the response (the first ``` fenced block if
there is one, else the whole response), put after the prompt's imports (so names such as
List are defined) and before the tests plus a call check(entry_point), and run in the
sandbox of nanochat.execution. It is right iff the program runs to its end (no failed
assert, no exception, no timeout).
"""

import re

from nanochat.execution import execute_code
from tasks.common import Task, load_rows

# an opening fence (optionally with a language tag), the code, and the closing fence or
# the end of the text (a generation cut off by the token limit still counts)
FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_imports(prompt):
    """The prompt's top-level import lines, as one string."""
    lines = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(lines)


def extract_program(response):
    """The code in a model's response: its first fenced block, else all of it."""
    m = FENCE.search(response)
    return m.group(1) if m else response


class HumanEval(Task):

    eval_type = "generative"
    timeout = 5.0  # seconds per program; a solution that loops forever is simply wrong

    def __init__(self, split="test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split != "test":
            raise ValueError(f"HumanEval has only a 'test' split, got {split!r}")
        self.rows = load_rows("openai/openai_humaneval", None, split, data_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, response):
        prompt = conversation["messages"][0]["content"]
        program = (extract_imports(prompt) + "\n\n" + extract_program(response) + "\n\n"
                   + conversation["test"] + f"\n\ncheck({conversation['entry_point']})\n")
        result = execute_code(program, timeout=self.timeout)
        return int(result.success)
