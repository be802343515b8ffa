"""
Fill-in-the-middle (FIM) training data, after Bavarian et al. 2022, "Efficient Training
of Language Models to Fill in the Middle" (arXiv:2207.14255), applied at the context
level as NVIDIA Megatron-LM's FIM dataset does it.

A document's text is cut at two character positions drawn uniformly (so a cut may fall
inside a BPE token) into prefix, middle and suffix. Each piece is tokenized on its own,
and the document becomes one of two layouts:

    PSM:  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
    SPM:  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle

(SPM is the paper's "variant 2"). The loss stays on every token. The document separator
that follows (nanochat's <|bos|>) ends the middle, and inference stops on it.

Context level: the transform runs after the loader has packed a row of T+1 tokens. The
row is split at <|bos|> into fragments, each fragment is turned into FIM with probability
fim_rate (SPM with probability spm_rate, else PSM), and the row is re-packed and cut or
padded back to T+1 tokens. Transforming before packing instead would let packing crop
FIM examples (losing the middle); here only the row's end is cut, as packing always
cut it. Randomness comes from a generator seeded by the loader's position
(row_rng), so a resumed loader makes the same FIM rows.

fim_prompt builds the inference prompt (chat_web's /v1/completions with a suffix) with
the same layout and an empty middle, so prompts match what training showed.
"""

import numpy as np

SENTINELS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def sentinel_ids(tokenizer):
    """(prefix, suffix, middle) sentinel ids, looked up by name."""
    return tuple(tokenizer.encode_special(name) for name in SENTINELS)


def _layout(tokenizer, p, m, s, spm):
    """The FIM layout of the three pieces' token ids: PSM or SPM (no <|bos|>)."""
    pre, suf, mid = sentinel_ids(tokenizer)
    return [pre, suf] + s + [mid] + p + m if spm else [pre] + p + [suf] + s + [mid] + m


def fim_tokens(tokenizer, prefix, middle, suffix, spm=False):
    """The FIM layout of three text pieces, each tokenized separately (no <|bos|>)."""
    enc = tokenizer.encode
    return _layout(tokenizer, enc(prefix), enc(middle), enc(suffix), spm)


def fim_split(text, rng):
    """Two cut points uniform over the text's character positions (0..len, sorted):
    (prefix, middle, suffix)."""
    i, j = sorted(rng.integers(0, len(text) + 1, size=2))
    return text[:i], text[i:j], text[j:]


def fim_document(tokenizer, text, rng, spm_rate=0.5):
    """Document-level transform: one text -> its FIM token ids (PSM or SPM, no <|bos|>)."""
    prefix, middle, suffix = fim_split(text, rng)
    return fim_tokens(tokenizer, prefix, middle, suffix, spm=rng.random() < spm_rate)


def fim_prompt(tokenizer, prefix, suffix, spm=False, max_len=None):
    """The prompt for filling in between prefix and suffix: <|bos|> and the layout with an
    empty middle; the model writes the middle and ends it with <|bos|>. max_len: at most
    this many tokens, cropped away from the middle (the prefix keeps its end, the suffix
    its start), half the room each, or more where the other needs less."""
    p, s = tokenizer.encode(prefix), tokenizer.encode(suffix)
    if max_len is not None:
        room = max_len - 4  # <|bos|> and the three sentinels
        if room < 0:
            raise ValueError(f"max_len={max_len} leaves no room for a FIM prompt (4 tokens are its markers)")
        ns = min(len(s), max(room // 2, room - len(p)))
        p, s = p[max(len(p) - (room - ns), 0):], s[:ns]
    return [tokenizer.get_bos_token_id()] + _layout(tokenizer, p, [], s, spm)


def row_rng(seed, rank, row):
    """The generator for one packed row: a function of the run's seed, the stream's rank
    and the row's index in that stream, so a resumed loader draws the same numbers."""
    return np.random.default_rng([seed, rank, row])


def fim_context(tokenizer, row, rng, fim_rate, spm_rate=0.5):
    """Context-level transform of a packed row (token ids): split it at <|bos|>, turn each
    fragment into FIM with probability fim_rate, re-pack, and cut or pad (with <|bos|>) back
    to len(row). Returns an int32 array of len(row)."""
    row = np.asarray(row)
    if len(row) == 0:
        return row.astype(np.int32)
    bos = tokenizer.get_bos_token_id()
    # special tokens other than <|bos|> decode to their names, which would re-encode as text
    specials = [tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()]
    has_special = np.isin(row, [t for t in specials if t != bos])
    starts = np.flatnonzero(row == bos).tolist()
    bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [len(row)]
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        frag = row[s:e].tolist()
        head, body = (frag[:1], frag[1:]) if frag[0] == bos else ([], frag)
        # one draw per fragment whatever happens next, so the rate is per fragment
        if rng.random() >= fim_rate or has_special[s:e].any():
            out.extend(frag)  # not chosen, or not plain text (already FIM, or chat tokens)
            continue
        try:
            text = tokenizer.decode(body, errors="strict")
        except UnicodeDecodeError:  # a crop inside a UTF-8 character: keep the fragment as is
            out.extend(frag)
            continue
        out.extend(head + fim_document(tokenizer, text, rng, spm_rate))
        if len(out) >= len(row):
            break  # the rest would be cut anyway
    out = out[:len(row)]
    # re-encoding the pieces rarely gives fewer tokens than the 3 sentinels add; pad if so
    out += [bos] * (len(row) - len(out))
    return np.asarray(out, dtype=np.int32)
