"""Fill-in-the-middle (nanochat/fim.py and the loader's use of it): the layouts invert to
the document, the rates hold, rows keep their length, and the draws follow the loader's
state (extension doc section 6.3)."""

import math

import numpy as np
import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.dataset import parquets_iter_batched
from nanochat.fim import fim_context, fim_document, fim_prompt, fim_split, fim_tokens, row_rng, sentinel_ids

UNICODE = "naïve café: ünïcödé ✓ 数据 — émojis 🙂 and\ttabs\n  indented(x) -> y;\n"


def parse(tokenizer, ids):
    """(mode, prefix ids or None, middle ids or None, suffix ids, prefix+middle ids) of one
    FIM example; checks each sentinel appears once."""
    pre, suf, mid = sentinel_ids(tokenizer)
    ids = list(ids)
    for s in (pre, suf, mid):
        assert ids.count(s) == 1, ids
    assert ids[0] == pre
    si, mi = ids.index(suf), ids.index(mid)
    assert si < mi
    if si == 1:  # SPM (or PSM with an empty prefix: the same tokens)
        return "SPM", None, None, ids[2:mi], ids[mi + 1:]
    return "PSM", ids[1:si], ids[mi + 1:], ids[si + 1:mi], ids[1:si] + ids[mi + 1:]


@pytest.fixture(scope="module")
def docs(corpus_dir):
    batch = next(parquets_iter_batched("train", corpus_dir))
    return [d[:400] for d in batch if len(d) >= 400] + [UNICODE * 3]


@pytest.mark.parametrize("spm", [False, True])
def test_layout_inverts_to_the_document(tokenizer, docs, spm):
    rng = np.random.default_rng(0)
    dec = tokenizer.decode
    for text in docs[:40]:
        for _ in range(5):
            prefix, middle, suffix = fim_split(text, rng)
            assert prefix + middle + suffix == text
            ids = fim_tokens(tokenizer, prefix, middle, suffix, spm=spm)
            mode, p, m, s, pm = parse(tokenizer, ids)
            if spm:
                assert mode == "SPM"
                assert pm == tokenizer.encode(prefix) + tokenizer.encode(middle)  # pieces encoded apart
            else:
                assert dec(p) == prefix and dec(m) == middle
            assert dec(pm) + dec(s) == text


def test_document_transform_inverts_in_both_orders(tokenizer, docs):
    rng = np.random.default_rng(1)
    modes = []
    for text in docs:
        mode, _, _, s, pm = parse(tokenizer, fim_document(tokenizer, text, rng, spm_rate=0.5))
        assert tokenizer.decode(pm) + tokenizer.decode(s) == text
        modes.append(mode)
    assert {"PSM", "SPM"} <= set(modes)


def test_cut_points_fall_inside_tokens_and_pieces_reencode_apart(tokenizer, docs):
    """Character-level cuts: many land inside a BPE token of the whole text, and each piece
    is then its own encoding (not a slice of the document's tokens)."""
    rng = np.random.default_rng(2)
    inside, total = 0, 0
    for text in docs[:40]:
        ids = tokenizer.encode(text)
        ends = set(np.cumsum([len(tokenizer.decode([t])) for t in ids]).tolist()) | {0}
        if tokenizer.decode(ids) != text or any("\ufffd" in tokenizer.decode([t]) for t in ids):
            continue  # token ends by characters need whole characters per token
        for _ in range(10):
            prefix, middle, suffix = fim_split(text, rng)
            total += 1
            if len(prefix) not in ends:
                inside += 1
                out = fim_tokens(tokenizer, prefix, middle, suffix)
                _, p, m, s, _ = parse(tokenizer, out)
                assert p == tokenizer.encode(prefix) and tokenizer.decode(p) == prefix
                assert p != ids[:len(p)]  # no slice of the document's tokens ends at this cut
                assert tokenizer.decode(m) + tokenizer.decode(s) == middle + suffix
    assert total > 100 and inside > total // 4, (inside, total)


def fragment_rows(tokenizer, docs, T1, n_rows):
    """Rows of T1 tokens packed from the documents (each with <|bos|>); like the loader's,
    each row starts with <|bos|> (a row's first fragment may be a document's continuation)."""
    stream = [t for d in docs for t in tokenizer.encode(d, prepend="<|bos|>")]
    reps = math.ceil(n_rows * T1 / len(stream)) + 1
    stream = np.asarray(stream * reps, dtype=np.int32)
    bos = [tokenizer.get_bos_token_id()]
    return [np.concatenate((bos, stream[i * (T1 - 1):(i + 1) * (T1 - 1)])).astype(np.int32) for i in range(n_rows)]


def complete_fragments(tokenizer, row):
    """The fragments of a row (split at <|bos|>) but the last, which may be cut."""
    bos = tokenizer.get_bos_token_id()
    starts = np.flatnonzero(row == bos).tolist()
    return [row[s + 1:e].tolist() for s, e in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("fim_rate,spm_rate", [(0.5, 0.5), (0.2, 0.8)])
def test_rates_within_three_sigma(tokenizer, docs, fim_rate, spm_rate):
    pre, suf, _ = sentinel_ids(tokenizer)
    T1 = 1025
    n_frag = n_fim = n_spm = 0
    for i, row in enumerate(fragment_rows(tokenizer, docs, T1, 250)):
        out = fim_context(tokenizer, row, row_rng(0, 0, i), fim_rate, spm_rate)
        assert len(out) == T1
        for frag in complete_fragments(tokenizer, out):
            n_frag += 1
            if frag and frag[0] == pre:
                n_fim += 1
                n_spm += frag[1] == suf
    assert n_frag > 1500
    sigma = math.sqrt(fim_rate * (1 - fim_rate) / n_frag)
    assert abs(n_fim / n_frag - fim_rate) < 3 * sigma, (n_fim, n_frag)
    # a PSM example with an empty prefix reads as SPM (chance ~2/400 per document here)
    sigma = math.sqrt(spm_rate * (1 - spm_rate) / n_fim)
    assert abs(n_spm / n_fim - spm_rate) < 3 * sigma + 0.01, (n_spm, n_fim)


def test_rows_keep_length_rate_zero_is_identity_and_one_fim_per_fragment(tokenizer, docs):
    pre, suf, mid = sentinel_ids(tokenizer)
    for i, row in enumerate(fragment_rows(tokenizer, docs, 257, 20)):
        same = fim_context(tokenizer, row, row_rng(0, 0, i), 0.0)
        assert np.array_equal(same, row) and not np.isin(same, [pre, suf, mid]).any()
        out = fim_context(tokenizer, row, row_rng(0, 0, i), 1.0)
        assert out.shape == row.shape and out.dtype == np.int32 and out[0] == row[0]
        for frag in complete_fragments(tokenizer, out):
            assert [frag.count(s) for s in (pre, suf, mid)] == [1, 1, 1]
        again = fim_context(tokenizer, out, row_rng(1, 0, i), 1.0)  # already FIM: left alone
        assert np.array_equal(again, out)
    chat = np.asarray(tokenizer.encode("hi", prepend="<|bos|>", append="<|user_end|>") * 3, dtype=np.int32)
    assert np.array_equal(fim_context(tokenizer, chat, row_rng(0, 0, 0), 1.0), chat)  # special tokens: left alone


def test_fragment_cut_inside_a_utf8_character_is_kept(tokenizer):
    bos = tokenizer.get_bos_token_id()
    body = tokenizer.encode("🙂🙂🙂")  # a small vocabulary spells each emoji in several byte tokens
    cut = next(k for k in range(1, len(body) + 1) if "\ufffd" in tokenizer.decode(body[:k]))
    row = np.asarray([bos] + body[:cut], dtype=np.int32)
    assert np.array_equal(fim_context(tokenizer, row, np.random.default_rng(0), 1.0), row)


def test_same_seed_same_rows_other_seed_other_rows(tokenizer, docs):
    rows = fragment_rows(tokenizer, docs, 513, 5)
    a = [fim_context(tokenizer, r, row_rng(7, 0, i), 0.5) for i, r in enumerate(rows)]
    b = [fim_context(tokenizer, r, row_rng(7, 0, i), 0.5) for i, r in enumerate(rows)]
    c = [fim_context(tokenizer, r, row_rng(8, 0, i), 0.5) for i, r in enumerate(rows)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_prompt_is_the_start_of_a_training_example(tokenizer):
    """Inference sees what training showed: the prompt is <|bos|> plus the training layout
    up to where the middle starts (PSM) or the prefix ends (SPM)."""
    bos = tokenizer.get_bos_token_id()
    pre, suf, mid = sentinel_ids(tokenizer)
    prefix, middle, suffix = "int add(int a, int b) {\n", "    return a + b;", "\n}\n"
    psm = fim_prompt(tokenizer, prefix, suffix)
    assert psm == [bos, pre] + tokenizer.encode(prefix) + [suf] + tokenizer.encode(suffix) + [mid]
    assert fim_tokens(tokenizer, prefix, middle, suffix)[:len(psm) - 1] == psm[1:]
    spm = fim_prompt(tokenizer, prefix, suffix, spm=True)
    assert spm == [bos, pre, suf] + tokenizer.encode(suffix) + [mid] + tokenizer.encode(prefix)
    assert fim_tokens(tokenizer, prefix, middle, suffix, spm=True)[:len(spm) - 1] == spm[1:]


@pytest.mark.parametrize("spm", [False, True])
def test_prompt_cropped_to_max_len_keeps_the_code_nearest_the_middle(tokenizer, spm):
    prefix = "".join(f"int f{i}(int x) {{ return x + {i}; }}\n" for i in range(60)) + "int g() {\n"
    suffix = "\n}\n" + "".join(f"int h{i}() {{ return {i}; }}\n" for i in range(3))
    p, s = tokenizer.encode(prefix), tokenizer.encode(suffix)
    assert len(p) > 100 > len(s)
    pre, suf, mid = sentinel_ids(tokenizer)
    bos = tokenizer.get_bos_token_id()
    full = fim_prompt(tokenizer, prefix, suffix, spm=spm)
    assert fim_prompt(tokenizer, prefix, suffix, spm=spm, max_len=len(full)) == full  # fits: unchanged
    for max_len in (100, 40, 4):
        out = fim_prompt(tokenizer, prefix, suffix, spm=spm, max_len=max_len)
        assert len(out) == max_len
        room = max_len - 4
        ns = min(len(s), max(room // 2, room - len(p)))  # the short suffix whole when there is room
        kept_p, kept_s = p[len(p) - (room - ns):], s[:ns]
        assert ns == (len(s) if max_len == 100 else room // 2)
        body = [pre, suf] + kept_s + [mid] + kept_p if spm else [pre] + kept_p + [suf] + kept_s + [mid]
        assert out == [bos] + body
    with pytest.raises(ValueError, match="no room"):
        fim_prompt(tokenizer, prefix, suffix, max_len=3)


# ---- the loader ----------------------------------------------------------------

def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_loader_rows_have_sentinels_and_keep_shapes(tokenizer, corpus_dir):
    sentinels = torch.tensor(sentinel_ids(tokenizer))
    plain = DataLoader(tokenizer, B=4, T=128, data_dir=corpus_dir, buffer_size=30)
    fim = DataLoader(tokenizer, B=4, T=128, data_dir=corpus_dir, buffer_size=30, fim_rate=0.5)
    n_plain = n_fim = 0
    for (xp, yp), (xf, yf) in zip(take(plain, 10), take(fim, 10)):
        assert xf.shape == yf.shape == xp.shape == (4, 128) and xf.dtype == torch.int64
        assert torch.equal(xf[:, 1:], yf[:, :-1])
        assert (xf[:, 0] == tokenizer.get_bos_token_id()).all()
        n_plain += torch.isin(yp, sentinels).sum().item()
        n_fim += torch.isin(yf, sentinels).sum().item()
    assert n_plain == 0 and n_fim > 0
    plain.close(), fim.close()
    with pytest.raises(ValueError, match="fim_spm_rate=1.5"):
        DataLoader(tokenizer, B=1, T=8, data_dir=corpus_dir, fim_rate=0.5, fim_spm_rate=1.5)


@pytest.mark.parametrize("warm", [0, 5])
def test_loader_resume_mid_epoch_gives_the_same_fim_rows(tokenizer, corpus_dir, warm):
    kw = dict(B=2, T=96, data_dir=corpus_dir, buffer_size=20, fim_rate=0.5, fim_seed=3)
    ref = DataLoader(tokenizer, **kw)
    take(ref, warm)
    state = ref.state_dict()
    expected = take(ref, 6)
    ref.close()
    resumed = DataLoader(tokenizer, resume_state=state, **kw)
    got = take(resumed, 6)
    resumed.close()
    for (xe, ye), (xr, yr) in zip(expected, got):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    sentinels = torch.tensor(sentinel_ids(tokenizer))
    assert any(torch.isin(x, sentinels).any() for x, _ in expected)
