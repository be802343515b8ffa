"""
BPE tokenizer in the style of GPT-4: trained with rustbpe, run with tiktoken.

Split pattern. Before BPE, text is cut into chunks by a regex and merges never
cross chunk boundaries. We use the GPT-4 (cl100k) pattern with one change made by
nanochat: numbers split into runs of at most 2 digits instead of 3, which wastes
fewer of a small (32K) vocabulary's slots on number tokens. For source code the
GPT-4 pattern is already a good fit and we keep it as is: `\\s+(?!\\S)` keeps runs of
indentation whitespace together (so 4, 8, 12 spaces become single tokens),
punctuation runs like `::`, `->`, `);` stay one chunk with their neighbours'
punctuation, and identifiers split at case/letter boundaries only where letters
stop, so `std`, `vector`, `size_t` are learned as whole words.

Special tokens mark documents, chat turns, tool calls and fill-in-the-middle:
they are never produced by encoding ordinary text (a string "<|bos|>" in a
document encodes as plain characters), only by encode_special / render_*.
"""

import codecs
import hashlib
import os
import pickle
from functools import cached_property, lru_cache

import tiktoken

from nanochat.common import atomic_write, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",              # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",    # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",    # the tool's output, written back into the stream
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",  # fill-in-the-middle (PSM order)
]

# the reference nanochat's models (and so its published checkpoints) have the first 9 only;
# such a tokenizer (scripts.import_hf) loads, and only the FIM features miss their tokens
REFERENCE_SPECIAL = 9

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

DEFAULT_VOCAB_SIZE = 32768
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


class Tokenizer:
    """A tiktoken Encoding plus the chat-format helpers. Build one with
    Tokenizer.train_from_iterator(...) or Tokenizer.from_directory(...)."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")

    # ---- construction -----------------------------------------------------

    @classmethod
    def from_ranks(cls, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        offset = len(mergeable_ranks)
        special = {name: offset + i for i, name in enumerate(special_tokens)}
        enc = tiktoken.Encoding(name="nanochat", pat_str=pattern,
                                mergeable_ranks=mergeable_ranks, special_tokens=special)
        return cls(enc)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size=DEFAULT_VOCAB_SIZE):
        """Train byte-level BPE with rustbpe. vocab_size counts the special tokens too."""
        import rustbpe
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: it needs 256 byte tokens "
                             f"+ {len(SPECIAL_TOKENS)} special tokens at least")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, n_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        return cls.from_ranks(ranks, bpe.get_pattern())

    @cached_property
    def hash(self):
        """sha256 of what defines the tokenizer (split pattern, merges, special tokens): the
        same for the same tokenizer however it was saved. Checkpoints record it."""
        sha = hashlib.sha256()
        for part in (self.enc._pat_str, *self.special_tokens):
            sha.update(part.encode() + b"\0")
        for token, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            sha.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        return sha.hexdigest()

    def save(self, directory):
        """Saves tokenizer.pkl (ranks + pattern; plain data, no tiktoken objects) and
        token_bytes.pt (bytes per token id, for bits-per-byte). Each is written atomically;
        token_bytes.pt records the tokenizer's hash, so a pair from two different trainings
        (a save killed between the two files) is refused by get_token_bytes."""
        import torch
        state = {"pattern": self.enc._pat_str, "mergeable_ranks": self.enc._mergeable_ranks,
                 "special_tokens": self.special_tokens}
        atomic_write(os.path.join(directory, TOKENIZER_FILE), lambda f: pickle.dump(state, f))
        tb = {"token_bytes": torch.tensor(self.token_bytes_list(), dtype=torch.int32), "tokenizer_hash": self.hash}
        atomic_write(os.path.join(directory, TOKEN_BYTES_FILE), lambda f: torch.save(tb, f))

    @classmethod
    def from_directory(cls, directory):
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; train one first: python -m scripts.tok_train")
        with open(path, "rb") as f:
            state = pickle.load(f)
        special = state["special_tokens"]
        if special != SPECIAL_TOKENS[:len(special)] or len(special) < REFERENCE_SPECIAL:
            raise ValueError(f"{path} was trained with other special tokens ({special}); "
                             "retrain it with python -m scripts.tok_train")
        return cls.from_ranks(state["mergeable_ranks"], state["pattern"], special)

    # ---- basic encode / decode --------------------------------------------

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    @property
    def special_tokens(self):
        """The special token names in id order."""
        return sorted(self.enc._special_tokens, key=self.enc._special_tokens.get)

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def encode_special(self, text):
        try:
            return self.enc.encode_single_token(text)
        except KeyError:
            raise KeyError(f"unknown special token {text!r}; known: {', '.join(self.special_tokens)}") from None

    def id_to_token(self, token_id):
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string or a list of strings (batched, multi-threaded in tiktoken).
        prepend/append: a special token name or id added to each sequence."""
        pre = self._as_id(prepend)
        app = self._as_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ([pre] if pre is not None else []) + ids + ([app] if app is not None else [])
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            for ids in batch:
                if pre is not None:
                    ids.insert(0, pre)
                if app is not None:
                    ids.append(app)
            return batch
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    __call__ = encode

    def _as_id(self, token):
        if token is None or isinstance(token, int):
            return token
        return self.encode_special(token)

    def decode(self, ids, errors="replace"):
        """errors="strict" raises UnicodeDecodeError on ids that end inside a UTF-8 character."""
        return self.enc.decode(ids, errors=errors)

    def stream_decoder(self):
        """For text that arrives one token at a time (chat_cli, chat_web): returns
        feed(token) -> the new text, "" while a UTF-8 character is split across tokens;
        feed(None) flushes what is left. Each token is decoded once, so streaming an
        answer costs its length, not its length squared."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(token):
            if token is None:
                return utf8.decode(b"", final=True)
            return utf8.decode(self.enc.decode_single_token_bytes(token))
        return feed

    def token_bytes_list(self):
        """Length in bytes of each token id; 0 for special tokens (they are not text,
        so they must not count towards bits per byte)."""
        special = set(self.enc._special_tokens.values())
        return [0 if i in special else len(self.enc.decode_single_token_bytes(i))
                for i in range(self.enc.n_vocab)]

    # ---- chat format -------------------------------------------------------

    def render_conversation(self, conversation, max_tokens=2048):
        """Turn {"messages": [...]} into (ids, mask). mask[i] = 1 where the model is
        trained to predict token i: the assistant's own tokens (text, tool calls and
        <|assistant_end|>), never the user's, the system's or the tool's outputs.

        Message content is a string, or (for the assistant) a list of parts
        {"type": "text" | "python" | "python_output", "text": str}. A leading system
        message is merged into the first user message, as nanochat does."""
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
            messages = [merged] + list(messages[2:])
        if not messages:
            raise ValueError("conversation has no messages")
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        tok = self.encode_special
        add(self.bos_token_id, 0)
        for i, msg in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if msg["role"] != want:
                raise ValueError(f"message {i} has role {msg['role']!r}, expected {want!r}: "
                                 "turns must alternate user/assistant")
            content = msg["content"]
            if want == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message {i} must have string content")
                add(tok("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(tok("<|user_end|>"), 0)
                continue
            add(tok("<|assistant_start|>"), 0)  # given as the prompt at inference, so not trained
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = part["type"], part["text"]
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add(tok("<|python_start|>"), 1)
                    add(self.encode(text), 1)
                    add(tok("<|python_end|>"), 1)
                elif kind == "python_output":
                    # produced by the tool, not the model: no loss on it
                    add(tok("<|output_start|>"), 0)
                    add(self.encode(text), 0)
                    add(tok("<|output_end|>"), 0)
                else:
                    raise ValueError(f"unknown content part type {kind!r} in message {i}")
            add(tok("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt for sampling: the conversation without its last (assistant) message,
        ending in <|assistant_start|>. Used by RL and chat evaluation."""
        messages = list(conversation["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion expects a conversation ending in an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=10**9)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Readable debug view: trained tokens in green, the rest in red, '|' between tokens."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        out = []
        for t, m in zip(ids, mask):
            s = self.decode([t])
            if with_token_id:
                s = f"{s}({t})"
            out.append(f"{green if m else red}{s}{reset}")
        return "|".join(out)


def tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


@lru_cache(maxsize=None)
def get_tokenizer(directory=None):
    return Tokenizer.from_directory(directory or tokenizer_dir())


def get_token_bytes(device="cpu", directory=None):
    import torch
    path = os.path.join(directory or tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {TOKEN_BYTES_FILE} at {path}; train a tokenizer first: python -m scripts.tok_train")
    with open(path, "rb") as f:
        tb = torch.load(f, map_location="cpu")  # XLA can't be a map_location
    if isinstance(tb, dict):  # older files are the bare tensor
        if tb["tokenizer_hash"] != get_tokenizer(directory).hash:
            raise ValueError(f"{path} belongs to another tokenizer than {TOKENIZER_FILE} beside it (a tokenizer "
                             "save was interrupted between the two files?): save the tokenizer again")
        tb = tb["token_bytes"]
    return tb.to(device)


def check_vocab_size(tokenizer, vocab_size, where):
    """A model and a tokenizer of different vocab sizes silently produce garbage; stop early."""
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"{where} expects vocab size {vocab_size} but the tokenizer in {tokenizer_dir()} "
                         f"has {tokenizer.get_vocab_size()}: it is not the tokenizer this model was trained with. "
                         "Put that tokenizer back, or use a model trained with this one (training a new tokenizer "
                         "of the same size does not help: its token ids mean other text)")
