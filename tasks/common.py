"""
What every chat task shares: the Task base class (a list of conversations, sliceable),
mixtures and sequences of tasks, the multiple-choice prompt, and one loader for
Hugging Face datasets that can be pointed at a local copy.

A conversation is {"messages": [{"role": "user" | "assistant" | "system", "content": ...}]}
(see Tokenizer.render_conversation). Categorical tasks add "letters": the answer letters
the model chooses among; the last assistant message holds the right one.

Local copies (offline use). A task that reads the dataset `owner/name` (subset `sub`,
split `split`) looks, in this order, for
    <data_dir>/<split>.{jsonl,json,parquet}                         when data_dir is given
    $NANOCHAT_TASK_DATA/<owner>/<name>/<sub>/<split>.{jsonl,json,parquet}
    ($NANOCHAT_TASK_DATA/<owner>/<name>/<split>.* when there is no subset)
and only then asks the Hugging Face hub through `datasets.load_dataset`. Rows of a
local copy have the same fields as the hub's.
"""

import json
import os
import random

TASK_DATA_ENV = "NANOCHAT_TASK_DATA"


class Task:
    """A dataset of conversations, seen through the slice [start:stop:step] (so a
    script can take, e.g., the first 500 examples or every 8th for one rank).

    Subclasses define num_examples() and get_example(i); evaluated tasks also define
    eval_type ("categorical" or "generative") and evaluate(conversation, response)."""

    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__} index {i} out of range (length {len(self)})")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation, response):
        """1 if the model's response (a string) is right for this conversation, else 0."""
        raise NotImplementedError

    def reward(self, conversation, response):
        """RL reward; by default the evaluation outcome as a float."""
        return float(self.evaluate(conversation, response))


class TaskMixture(Task):
    """Several tasks' examples interleaved in one fixed random order (seed 42), so
    training sees them mixed rather than one dataset after another. A task listed
    twice is sampled twice as often."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another, in the order given (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(t) for t in tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(index)


def render_mc(question, letters, choices):
    """The multiple-choice prompt nanochat uses. The letter comes right after each
    choice ("- Paris=A"), so that a small model reads the choice before its label, and
    the answer is a single letter token."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Loading datasets: a local copy if there is one, else the Hugging Face hub

def _read_rows(path):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            return rows
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return data


def find_local_copy(hf_path, subset, split, data_dir=None):
    """The local file for this dataset split, or None."""
    candidates = []
    if data_dir:
        candidates.append(data_dir)
    root = os.environ.get(TASK_DATA_ENV)
    if root:
        parts = [root, *hf_path.split("/")] + ([subset] if subset else [])
        candidates.append(os.path.join(*parts))
    for directory in candidates:
        for ext in ("jsonl", "json", "parquet"):
            path = os.path.join(directory, f"{split}.{ext}")
            if os.path.isfile(path):
                return path
    if data_dir:
        raise FileNotFoundError(f"no {split}.jsonl, {split}.json or {split}.parquet in {data_dir}")
    return None


def load_rows(hf_path, subset, split, data_dir=None):
    """All rows (dicts) of one split of a Hugging Face dataset: from a local copy if
    there is one (see the module docstring), else from the hub via `datasets`."""
    local = find_local_copy(hf_path, subset, split, data_dir)
    if local:
        return _read_rows(local)
    where = os.path.join(f"${TASK_DATA_ENV}", *hf_path.split("/"), *([subset] if subset else []), f"{split}.jsonl")
    try:
        from datasets import load_dataset
        ds = load_dataset(hf_path, subset, split=split)
    except Exception as e:  # offline, hub down, gated dataset: say what to do instead
        raise RuntimeError(
            f"could not load {hf_path}" + (f" ({subset})" if subset else "") + f" split {split!r} from the "
            f"Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). If the hub is unreachable, put a local "
            f"copy at {where} (rows with the hub's fields; .jsonl, .json or .parquet) or pass the "
            f"task's data_dir.") from e
    return ds.to_list()
