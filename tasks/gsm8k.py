"""
GSM8K: grade-school math word problems, answered with worked reasoning.

Hub: openai/gsm8k, subsets "main" and "socratic" (the latter adds a sub-question before
each step), splits "train" (7473) and "test" (1319). Rows are {question, answer}; the
answer is the reasoning with calculator annotations and a final line "#### <number>":

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    ...
    #### 72

Rendering: the user asks the question; the assistant's reply is a list of parts in which
every annotation <<expr=result>> becomes a tool call {"type": "python", "text": expr}
followed by the tool's answer {"type": "python_output", "text": result}, and the prose in
between (the final "#### 72" included) stays {"type": "text"}. So the model learns to
call the calculator, while the result, written by the tool, is not trained on.

Scoring (generative): the number after the last "####" of the response must equal the
reference's. Both are normalized by extract_answer: commas, "$" and whitespace removed,
then compared as decimal numbers, so "1,000" == "1000" and "72" == "72.0" == "$72.00";
a response without "####" (or without a number after it) is wrong.
"""

import re
from decimal import Decimal, InvalidOperation

from tasks.common import Task, load_rows

ANNOTATION = re.compile(r"<<(.*?)>>", re.DOTALL)
NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_answer(answer):
    """The hub's answer string as assistant content parts (see the module docstring)."""
    parts = []

    def text(s):
        if s:  # no empty text parts around back-to-back annotations
            parts.append({"type": "text", "text": s})

    pos = 0
    for m in ANNOTATION.finditer(answer):
        text(answer[pos:m.start()])
        expr, eq, result = m.group(1).rpartition("=")
        if eq:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:  # a malformed annotation (no "="): keep what it says as prose
            text(m.group(1))
        pos = m.end()
    text(answer[pos:])
    return parts


def extract_answer(text):
    """The number after the last "####" in text, normalized (commas and "$" dropped, the
    number ends at whitespace; integral values without a decimal point, others without trailing zeros),
    or None if there is no "####" or no number after it."""
    if "####" not in text:
        return None
    rest = re.sub(r"[,$]", "", text.rsplit("####", 1)[1]).lstrip()
    rest = re.sub(r"^-\s+", "-", rest)  # "- 5"; other whitespace ends the number: "#### 18\n2. ..." is 18, not 182
    m = NUMBER.match(rest)
    if not m:
        return None
    try:
        value = Decimal(m.group(0))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # "72.0" -> "72", "-0" -> "0"
    return format(value.normalize(), "f")  # "0.50" -> "0.5", never "5E-1"


class GSM8K(Task):

    eval_type = "generative"

    def __init__(self, subset="main", split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be 'main' or 'socratic', got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.rows = load_rows("openai/gsm8k", subset, split, data_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": parse_answer(row["answer"])},
        ]}

    def evaluate(self, conversation, response):
        # the reference number lives in the prose of the last assistant message ("#### 72")
        content = conversation["messages"][-1]["content"]
        if isinstance(content, list):
            content = "".join(p["text"] for p in content if p["type"] == "text")
        reference = extract_answer(content)
        predicted = extract_answer(response)
        return int(predicted is not None and predicted == reference)
