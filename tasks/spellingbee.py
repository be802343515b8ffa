"""
Spelling tasks, generated on the fly from a word list (no dataset download).
Small models see words as a few tokens, not letters, so they are poor at spelling and
letter counting; these tasks teach both, and teach reaching for the Python tool.

SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".
SpellingBee: "How many r are in the word strawberry?" -> the assistant spells the word,
counts by hand, checks with the Python tool ('strawberry'.count('r')), and ends with
"#### 3". Evaluated (generative) on the number after the last "####".

Example i is the same on every run (its random generator is seeded by i and the split;
train and test use disjoint seeds). The word list comes from load_words().
"""

import os
import random
import re

from tasks.common import Task

WORDS_ENV = "NANOCHAT_WORDS_FILE"
SYSTEM_WORDS = "/usr/share/dict/words"
TEST_SEED_OFFSET = 10_000_000
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def load_words(words_file=None):
    """Sorted unique lowercase a-z words of 3 to 15 letters, from words_file, else
    $NANOCHAT_WORDS_FILE, else the system dictionary."""
    path = words_file or os.environ.get(WORDS_ENV) or (SYSTEM_WORDS if os.path.isfile(SYSTEM_WORDS) else None)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"no word list{f' at {path}' if path else ''}: pass words_file or set {WORDS_ENV} to a file with "
            f"one word per line, or install a system dictionary at {SYSTEM_WORDS} (e.g. `apt install wamerican`)")
    with open(path, encoding="utf-8", errors="replace") as f:
        words = {w for w in (line.strip() for line in f) if re.fullmatch(r"[a-z]{3,15}", w)}
    if not words:
        raise ValueError(f"{path}: no lowercase a-z words of 3 to 15 letters")
    return sorted(words)


class _WordTask(Task):
    """Shared by both tasks: a word list and a seeded generator per example."""

    def __init__(self, size=1000, split="train", words_file=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, not {split!r}")
        self.size, self.split = size, split
        self.words = load_words(words_file)

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(index + (TEST_SEED_OFFSET if self.split == "test" else 0))


class SimpleSpelling(_WordTask):

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}


# the user's question, in a few phrasings so the model doesn't latch onto one
QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the letter {letter} in the word {word}.",
    "how many {letter}s are in {word}",
    "In the word \"{word}\", how many times does {letter} occur?",
    "What is the number of '{letter}' characters in {word}?",
]


class SpellingBee(_WordTask):
    eval_type = "generative"

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word; sometimes any letter, so "0" is a possible answer
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        question = rng.choice(QUESTIONS).format(letter=letter, word=word)

        # count by hand first (the model's own reasoning), then check with the tool
        lines = [f"Spelling out '{word}' and counting the letter '{letter}':"]
        running = 0
        for i, ch in enumerate(word, 1):
            if ch == letter:
                running += 1
                lines.append(f"{i}. {ch} <- match ({running})")
            else:
                lines.append(f"{i}. {ch}")
        lines.append(f"Counting by hand gives {running}. Let me check with Python.")
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [
                {"type": "text", "text": "\n".join(lines) + "\n"},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(count)},
                {"type": "text", "text": f"\nPython agrees: '{letter}' appears {count} "
                                         f"time{'' if count == 1 else 's'} in '{word}'.\n\n#### {count}"},
            ]},
        ]}

    def evaluate(self, conversation, response):
        # reward() (Task's default) is this outcome as a float
        answer = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return int(answer is not None and extract_answer(response) == answer)


def extract_answer(text):
    """The number after the last '####' (commas allowed, as in '1,000'), or None."""
    if "####" not in text:
        return None
    m = re.match(r"\s*(-?[\d,]*\d)", text.rsplit("####", 1)[1])
    return m.group(1).replace(",", "") if m else None
