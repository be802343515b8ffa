"""
SmolTalk: general chat conversations, the bulk of nanochat's midtraining and SFT data.
Hub: HuggingFaceTB/smol-smoltalk (no subset), splits train/test.
Rows: {"messages": [{"role", "content"}, ...]}, sometimes starting with a system message.

Rendered as is (render_conversation merges a system message into the first user turn).
Not evaluated: it is training data only.
"""

from tasks.common import Task, load_rows
from tasks.customjson import check_messages


class SmolTalk(Task):

    def __init__(self, split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, not {split!r}")
        self.rows = load_rows("HuggingFaceTB/smol-smoltalk", None, split, data_dir)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        # checked here rather than at load: 460k rows would take a while up front
        messages = self.rows[index].get("messages")
        problem = check_messages(messages)
        if problem:
            raise ValueError(f"SmolTalk row {index}: {problem}")
        return {"messages": messages}
