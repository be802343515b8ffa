"""
CustomJSON: your own conversations from a JSONL file, e.g. to teach the model who it is.
One conversation per line, either a JSON list of messages or {"messages": [...]};
each message is {"role": "system" | "user" | "assistant", "content": str}.
An optional leading system message, then user and assistant turns alternating,
ending with the assistant.

The whole file is checked when loaded, so a typo fails at startup with its line number
instead of hours into a training run. IDENTITY_FILE holds the conversations nanochat
uses to know its own name and maker.
"""

import json
import os

from tasks.common import Task

IDENTITY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_conversations.jsonl")


def check_messages(messages):
    """What is wrong with this list of messages, or None if it is a well-formed
    conversation (optional system, then user/assistant alternating, ending with assistant)."""
    if not isinstance(messages, list):
        return f"messages must be a list, not {type(messages).__name__}"
    if not messages:
        return "conversation is empty"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            return f"message {i} must be an object with 'role' and 'content'"
        if msg["role"] not in ("system", "user", "assistant"):
            return f"message {i} has bad role {msg['role']!r} (system, user or assistant)"
        if not isinstance(msg["content"], str):
            return f"message {i} content must be a string, not {type(msg['content']).__name__}"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, msg in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            n = i + len(messages) - len(turns)
            return f"message {n} has role {msg['role']!r}, expected {want!r} (turns must alternate user/assistant)"
    if not turns or turns[-1]["role"] != "assistant":
        return "conversation must end with an assistant message"
    return None


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"CustomJSON: no such file {filepath}")
        self.filepath = filepath
        self.conversations = []
        with open(filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue  # blank lines are harmless
                where = f"{filepath}:{lineno}"
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
                if isinstance(data, dict):
                    if "messages" not in data:
                        raise ValueError(f"{where}: object has no 'messages' key")
                    messages = data["messages"]
                elif isinstance(data, list):
                    messages = data
                else:
                    raise ValueError(f"{where}: expected a list of messages or an object with 'messages', "
                                     f"not {type(data).__name__}")
                problem = check_messages(messages)
                if problem:
                    raise ValueError(f"{where}: {problem}")
                self.conversations.append(messages)

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
