"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 answer choices.
Hub: allenai/ai2_arc, subsets ARC-Easy and ARC-Challenge, splits train/validation/test.
Rows: {id, question, choices: {text: [...], label: [...]}, answerKey}.

Rendered as a multiple-choice prompt (render_mc); the assistant answers with one letter.
"""

from tasks.common import Task, load_rows, render_mc

LETTERS = "ABCDEFGH"


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset="ARC-Easy", split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, not {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, not {split!r}")
        self.rows = load_rows("allenai/ai2_arc", subset, split, data_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        choices, labels = row["choices"]["text"], row["choices"]["label"]
        # a few rows are labelled "1".."4" instead of "A".."D": re-letter by position
        letters = LETTERS[:len(choices)]
        answer = letters[labels.index(row["answerKey"])]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
        }

    def evaluate(self, conversation, response):
        return int(response.strip() == conversation["messages"][-1]["content"])
