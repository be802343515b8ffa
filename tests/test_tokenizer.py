import os
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, check_vocab_size, get_token_bytes


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_roundtrip_arbitrary_bytes(tokenizer, data):
    # byte-level BPE: any byte string (as latin-1 text, or as the raw bytes of tokens) survives
    text = data.decode("latin-1")
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.enc.decode_single_token_bytes(i) for i in ids) == text.encode("utf-8")


def test_special_tokens_are_not_produced_by_text(tokenizer):
    ids = tokenizer.encode("<|bos|> hello <|assistant_end|>")
    specials = {tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    # special ids are the last ones of the vocabulary, in order
    n = tokenizer.get_vocab_size()
    assert [tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n - len(SPECIAL_TOKENS), n))


def test_unknown_special_token_is_a_clear_error(tokenizer):
    with pytest.raises(KeyError, match="unknown special token '<\\|nope\\|>'"):
        tokenizer.encode_special("<|nope|>")


def test_encode_batch_prepend_append(tokenizer):
    bos = tokenizer.get_bos_token_id()
    end = tokenizer.encode_special("<|assistant_end|>")
    out = tokenizer.encode(["ab", "int x;"], prepend="<|bos|>", append=end)
    assert [o[0] for o in out] == [bos, bos] and [o[-1] for o in out] == [end, end]
    assert tokenizer.decode(out[1][1:-1]) == "int x;"


def test_save_load_roundtrip(tokenizer):
    loaded = Tokenizer.from_directory(tokenizer.directory)
    text = "template <class T> struct S { T x; };\n\tdef f(): pass"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size() == 1024


def test_missing_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        Tokenizer.from_directory(str(tmp_path))


def test_vocab_size_mismatch_is_a_clear_error(tokenizer):
    check_vocab_size(tokenizer, 1024, "model")
    with pytest.raises(ValueError, match="expects vocab size 32768.*not the tokenizer this model was trained with"):
        check_vocab_size(tokenizer, 32768, "model")


def test_token_bytes(tokenizer):
    tb = get_token_bytes(directory=tokenizer.directory)
    assert tb.shape == (tokenizer.get_vocab_size(),) and tb.dtype == torch.int32
    for s in SPECIAL_TOKENS:
        assert tb[tokenizer.encode_special(s)] == 0
    text = "Some text, with bytes: é 😀"
    ids = tokenizer.encode(text)
    assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_conversation_mask(tokenizer):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tokenizer.render_conversation(conv)
    assert len(ids) == len(mask)
    t = tokenizer.encode_special
    assert ids[0] == tokenizer.get_bos_token_id() and mask[0] == 0
    # the system prompt is merged into the first user turn
    first_user = ids[ids.index(t("<|user_start|>")) + 1: ids.index(t("<|user_end|>"))]
    assert tokenizer.decode(first_user) == "Be brief.\n\nWhat is 2+2?"
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert trained == ("Let me compute.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>"
                       "You're welcome.<|assistant_end|>")
    assert "<|output_start|>4<|output_end|>" in untrained and "What is 2+2?" in untrained
    assert "<|assistant_start|>" in untrained  # the prompt token is given, not predicted
    view = tokenizer.visualize_tokenization(ids, mask)
    assert "\033[92m" in view and "\033[91m" in view
    # truncation keeps ids and mask aligned
    ids8, mask8 = tokenizer.render_conversation(conv, max_tokens=8)
    assert ids8 == ids[:8] and mask8 == mask[:8]


def test_conversation_errors(tokenizer):
    with pytest.raises(ValueError, match="alternate"):
        tokenizer.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError, match="unknown content part type 'image'"):
        tokenizer.render_conversation({"messages": [{"role": "user", "content": "x"},
                                                    {"role": "assistant", "content": [{"type": "image", "text": ""}]}]})


def test_render_for_completion(tokenizer):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ids = tokenizer.render_for_completion(conv)
    assert ids[-1] == tokenizer.encode_special("<|assistant_start|>")
    assert "hello" not in tokenizer.decode(ids)


@pytest.mark.parametrize("case", ["doc_cap0", "empty_shards", "too_few_pairs", "null_cell"])
def test_tok_train_refuses_to_make_a_bytes_only_tokenizer(tmp_path, case):
    """--doc_cap=0 or zero-row shards gave rc 0 and a tokenizer with no merges; a text with
    fewer distinct pairs than the vocabulary needs gave a smaller vocabulary, saved with rc 0;
    a null text cell gave a TypeError naming no file. Each is refused, nothing saved."""
    import subprocess
    import sys
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = tmp_path / "data"
    data.mkdir()
    texts = {"empty_shards": [], "null_cell": ["some text to train on", None]}.get(case, ["some text to train on"] * 10)
    for i in range(2):
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), data / f"shard_{i:05d}.parquet")
    flags = ["--doc_cap=0"] if case == "doc_cap0" else []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vocab = 1000 if case == "too_few_pairs" else 300
    out = subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--data_dir={data}", f"--vocab_size={vocab}",
                          f"--out_dir={tmp_path / 'tok'}", *flags], cwd=root, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path)))
    assert out.returncode != 0, out.stdout + out.stderr
    assert {"doc_cap0": "--doc_cap=0: must be a positive", "empty_shards": "no text to train on",
            "too_few_pairs": "not the 1,000 asked for", "null_cell": "shard_00000.parquet: row group 0 has 1 null"}[case] \
        in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "tok" / "tokenizer.pkl").exists()
