"""
MMLU: multiple-choice questions on 57 subjects, from high school to professional level.
Hub: cais/mmlu. Subset "all" has splits test/validation/dev; subset "auxiliary_train"
(about 100k questions from other multiple-choice datasets) has split train.
Rows: {question, subject, choices: [4 strings], answer: 0-3}; on the hub the
auxiliary_train rows come wrapped as {"train": {...}}.

Rendered as a multiple-choice prompt (render_mc); the assistant answers with one letter.
The conversation keeps "subject" so evaluation can report per subject.
"""

from tasks.common import Task, load_rows, render_mc

LETTERS = "ABCD"
SPLITS = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, subset="all", split="test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', not {subset!r}")
        if split not in SPLITS[subset]:
            raise ValueError(f"MMLU subset {subset!r} has splits {', '.join(SPLITS[subset])}, not {split!r}")
        rows = load_rows("cais/mmlu", subset, split, data_dir)
        self.rows = [row["train"] if "train" in row else row for row in rows]

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        choices = row["choices"]
        if len(choices) != len(LETTERS):
            raise ValueError(f"MMLU row {index}: expected 4 choices, got {len(choices)}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[row["answer"]]},
            ],
            "letters": LETTERS,
            "subject": row.get("subject", ""),
        }

    def evaluate(self, conversation, response):
        return int(response.strip() == conversation["messages"][-1]["content"])
