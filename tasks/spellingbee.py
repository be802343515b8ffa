"""
Spelling tasks, generated on the fly from a word list (no dataset download).
Small models see words as a few tokens, not letters, so they are poor at spelling and
letter counting; these tasks teach both, and teach reaching for the Python tool.

SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e".
SpellingBee: "How many r are in the word strawberry?" -> the assistant spells the word,
counts by hand, checks with the Python tool ('strawberry'.count('r')), and ends with
"#### 3". Evaluated (generative) on the number after the last "####".

Example i is the same on every run (its random generator is seeded by i and the split;
train and test use disjoint seeds). The word list comes from load_words(): in order,
the words_file argument, $NANOCHAT_WORDS_FILE, the list nanochat uses (dwyl's
words_alpha.txt, ~370k words) cached at $NANOCHAT_BASE_DIR/words_alpha.txt and
downloaded there once (atomically) from $NANOCHAT_WORDS_URL or WORDS_URL, and only if
that download fails the system dictionary /usr/share/dict/words (with a warning: a
different list gives different examples). `python -m scripts.preflight` fetches it
before a run starts.
"""

import os
import random
import re
import sys
import time

from tasks.common import Task
from tasks.gsm8k import extract_answer  # GSM8K's reading of '#### N' ('3.0' is 3; '3.5' is not 3)

WORDS_ENV = "NANOCHAT_WORDS_FILE"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORDS_URL_ENV = "NANOCHAT_WORDS_URL"
WORDS_CACHE_NAME = "words_alpha.txt"  # under $NANOCHAT_BASE_DIR
SYSTEM_WORDS = "/usr/share/dict/words"
_failed_downloads = {}  # url -> why: a process that builds several spelling tasks offline tries once
TEST_SEED_OFFSET = 10_000_000
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def words_cache_path():
    from nanochat.common import get_base_dir
    return os.path.join(get_base_dir(), WORDS_CACHE_NAME)


def download_words(url=None, dest=None, max_attempts=3, backoff=1.0, timeout=30):
    """Fetch the word list to dest (default $NANOCHAT_BASE_DIR/words_alpha.txt) unless it
    is there; written atomically (a temp file renamed into place), so a cut-off transfer
    never leaves a half list behind. Returns dest; raises RuntimeError if it can't."""
    import requests

    from nanochat.common import atomic_write
    url = url or os.environ.get(WORDS_URL_ENV) or WORDS_URL
    dest = dest or words_cache_path()
    if os.path.isfile(dest):
        return dest
    last = None
    for attempt in range(1, max_attempts + 1):
        try:
            r = requests.get(url, timeout=timeout)
            r.raise_for_status()
            if not re.search(r"^[a-z]{3,15}\r?$", r.text, re.M):
                raise ValueError(f"{url} is not a word list (no lowercase words in it)")
            atomic_write(dest, lambda f: f.write(r.content))
            return dest
        except Exception as e:  # offline, server error, not a list
            last = e
            if isinstance(e, ValueError) or 400 <= getattr(getattr(e, "response", None), "status_code", 0) < 500:
                break
            if attempt < max_attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    raise RuntimeError(f"could not download the word list from {url}: {type(last).__name__}: {last}")


def find_words_file(download=True):
    """The word list to use (see the module docstring for the order); raises
    FileNotFoundError saying how to provide one."""
    path = os.environ.get(WORDS_ENV)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{WORDS_ENV}={path}: no such file")
        return path
    cached = words_cache_path()
    if os.path.isfile(cached):
        return cached
    url = os.environ.get(WORDS_URL_ENV) or WORDS_URL
    problem = _failed_downloads.get(url, "downloading it was not tried")
    if download and url not in _failed_downloads:
        try:
            return download_words(url, dest=cached)
        except RuntimeError as e:
            problem = _failed_downloads[url] = str(e)
    if os.path.isfile(SYSTEM_WORDS):
        print(f"warning: {problem}; using the system dictionary {SYSTEM_WORDS} instead", file=sys.stderr)
        return SYSTEM_WORDS
    raise FileNotFoundError(
        f"no word list: {problem}. Put one at {cached} (e.g. curl -Lo {cached} {WORDS_URL}), or set {WORDS_ENV} "
        f"to a file with one word per line (or {WORDS_URL_ENV} to a mirror), or install a system dictionary at "
        f"{SYSTEM_WORDS} (e.g. `apt install wamerican`)")


def load_words(words_file=None):
    """Sorted unique lowercase a-z words of 3 to 15 letters, from words_file, else
    find_words_file() (env, cached/downloaded list, system dictionary)."""
    if words_file is not None and not os.path.isfile(words_file):
        raise FileNotFoundError(f"no word list at {words_file}: pass another words_file or set {WORDS_ENV}, "
                                f"or install a system dictionary at {SYSTEM_WORDS} (e.g. `apt install wamerican`)")
    path = words_file or find_words_file()
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
