"""Chat tasks on small local fixtures in the hub's row formats (no network), rendered
with the test tokenizer to check that only the assistant's tokens are trained on."""

import json
import sys

import pytest

from tasks.arc import ARC
from tasks.common import TaskMixture, TaskSequence, load_rows
from tasks.customjson import IDENTITY_FILE, CustomJSON
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee, load_words

WORDS = ["apple", "banana", "strawberry", "cat", "mississippi", "zebra", "Capital", "a", "x-ray", "apple"]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def words_file(tmp_path):
    p = tmp_path / "words.txt"
    p.write_text("\n".join(WORDS) + "\n")
    return str(p)


def arc_rows():
    return [
        {"id": "q1", "question": "Which is a planet?",
         "choices": {"text": ["Sun", "Mars", "Moon", "Comet"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "q2", "question": "What do plants need to make food?",
         "choices": {"text": ["sunlight", "sand", "rocks"], "label": ["1", "2", "3"]}, "answerKey": "1"},
        {"id": "q3", "question": "Water freezes at what temperature in Celsius?",
         "choices": {"text": ["100", "50", "10", "0"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
    ]


def mmlu_rows():
    return [
        {"question": "What is 7 * 6?", "subject": "elementary_mathematics",
         "choices": ["36", "42", "48", "54"], "answer": 1},
        {"question": "Who wrote Hamlet?", "subject": "high_school_literature",
         "choices": ["Shakespeare", "Dickens", "Austen", "Twain"], "answer": 0},
    ]


def smoltalk_rows():
    return [
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Name a primary colour."},
                      {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": "Say hi in French."},
                      {"role": "assistant", "content": "Bonjour!"},
                      {"role": "user", "content": "And in Spanish?"},
                      {"role": "assistant", "content": "Hola!"}]},
    ]


def trained_text(conversation):
    """What render_conversation should put under mask == 1: every assistant text and
    tool call with its delimiters, never tool outputs, then <|assistant_end|>."""
    out = []
    for msg in conversation["messages"]:
        if msg["role"] != "assistant":
            continue
        parts = [{"type": "text", "text": msg["content"]}] if isinstance(msg["content"], str) else msg["content"]
        for p in parts:
            if p["type"] == "text":
                out.append(p["text"])
            elif p["type"] == "python":
                out.append("<|python_start|>" + p["text"] + "<|python_end|>")
        out.append("<|assistant_end|>")
    return "".join(out)


def check_mask(tokenizer, conversation):
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**6)
    assert len(ids) == len(mask)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    expected = trained_text(conversation)
    assert trained == expected
    for msg in conversation["messages"]:
        if msg["role"] in ("user", "system") and msg["content"] not in expected:  # (unless the assistant echoes it)
            assert msg["content"] not in trained
    # user turns (system merged in) and tool outputs, delimiters included, are never trained
    for start, end in (("<|user_start|>", "<|user_end|>"), ("<|output_start|>", "<|output_end|>")):
        start, end = tokenizer.encode_special(start), tokenizer.encode_special(end)
        inside = False
        for t, m in zip(ids, mask):
            inside = (inside or t == start) and t != end
            if inside or t == end:
                assert m == 0
    return trained


# -----------------------------------------------------------------------------
# categorical tasks

def test_arc_from_data_dir(tmp_path, tokenizer):
    write_jsonl(tmp_path / "arc" / "validation.jsonl", arc_rows())
    task = ARC("ARC-Challenge", "validation", data_dir=str(tmp_path / "arc"))
    assert task.eval_type == "categorical" and len(task) == 3
    ex = [task[i] for i in range(3)]
    assert [e["letters"] for e in ex] == ["ABCD", "ABC", "ABCD"]
    assert [e["messages"][-1]["content"] for e in ex] == ["B", "A", "D"]  # "1".."4" re-lettered
    assert "- sunlight=A" in ex[1]["messages"][0]["content"]
    for e in ex:
        assert check_mask(tokenizer, e) == e["messages"][-1]["content"] + "<|assistant_end|>"
    assert task.evaluate(ex[0], "B") == 1 and task.evaluate(ex[0], " B\n") == 1
    assert task.evaluate(ex[0], "A") == 0 and task.evaluate(ex[0], "B is right") == 0
    with pytest.raises(ValueError, match="ARC-Easy or ARC-Challenge"):
        ARC("ARC-Hard", data_dir=str(tmp_path / "arc"))


def test_mmlu_env_layout_and_auxiliary_train(tmp_path, monkeypatch, tokenizer):
    root = tmp_path / "taskdata"
    write_jsonl(root / "cais" / "mmlu" / "all" / "dev.jsonl", mmlu_rows())
    write_jsonl(root / "cais" / "mmlu" / "auxiliary_train" / "train.jsonl", [{"train": r} for r in mmlu_rows()])
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(root))
    for task in (MMLU("all", "dev"), MMLU("auxiliary_train", "train")):
        assert len(task) == 2 and task.eval_type == "categorical"
        ex = task[0]
        assert ex["letters"] == "ABCD" and ex["subject"] == "elementary_mathematics"
        assert ex["messages"][-1]["content"] == "B" and "- 42=B" in ex["messages"][0]["content"]
        assert check_mask(tokenizer, ex) == "B<|assistant_end|>"
        assert task.evaluate(ex, "B") == 1 and task.evaluate(ex, "C") == 0
    with pytest.raises(ValueError, match="has splits train"):
        MMLU("auxiliary_train", "test")


# -----------------------------------------------------------------------------
# conversation tasks

def test_smoltalk_and_validation(tmp_path, tokenizer):
    rows = smoltalk_rows() + [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi?"}]}]
    write_jsonl(tmp_path / "test.jsonl", rows)
    task = SmolTalk("test", data_dir=str(tmp_path))
    assert len(task) == 3 and task.eval_type is None
    assert check_mask(tokenizer, task[0]) == "Red.<|assistant_end|>"
    assert check_mask(tokenizer, task[1]) == "Bonjour!<|assistant_end|>Hola!<|assistant_end|>"
    with pytest.raises(ValueError, match="SmolTalk row 2: .*expected 'assistant'"):
        task[2]


def test_identity_conversations(tokenizer):
    task = CustomJSON(IDENTITY_FILE)
    assert 30 <= len(task) <= 60
    assert any("nanochat" in m["content"] for m in task[0]["messages"] if m["role"] == "assistant")
    texts = [" ".join(m["content"] for m in conv["messages"]) for conv in task]
    assert sum("nanochat" in t for t in texts) >= 0.6 * len(texts)
    assert any("Python tool" in t for t in texts) and any("mistakes" in t for t in texts)
    for conv in task:
        check_mask(tokenizer, conv)


def test_customjson_formats_and_errors(tmp_path, tokenizer):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps([{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]) + "\n\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be kind."},
                                               {"role": "user", "content": "hello"},
                                               {"role": "assistant", "content": "hi!"}]}) + "\n")
    task = CustomJSON(str(good))
    assert len(task) == 2 and task[0]["messages"][1]["content"] == "pong"
    assert check_mask(tokenizer, task[1]) == "hi!<|assistant_end|>"

    ok = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    cases = {
        "{not json": "invalid JSON",
        '"just a string"': "expected a list of messages",
        "[]": "empty",
        json.dumps([{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]): "bad role 'robot'",
        json.dumps([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]): "must be a string",
        json.dumps([{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]): "alternate",
        json.dumps([{"role": "assistant", "content": "a"}]): "expected 'user'",
        json.dumps([{"role": "user", "content": "q"}]): "end with an assistant",
        json.dumps({"msgs": []}): "no 'messages'",
    }
    for i, (bad, why) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_text(ok + "\n" + ok + "\n" + bad + "\n")
        with pytest.raises(ValueError) as e:
            CustomJSON(str(p))
        assert str(e.value).startswith(f"{p}:3: ") and why in str(e.value), str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        CustomJSON(str(tmp_path / "nope.jsonl"))


# -----------------------------------------------------------------------------
# spelling

def test_load_words(words_file, tmp_path, monkeypatch):
    assert load_words(words_file) == ["apple", "banana", "cat", "mississippi", "strawberry", "zebra"]
    monkeypatch.setenv("NANOCHAT_WORDS_FILE", words_file)
    assert load_words() == load_words(words_file)
    monkeypatch.delenv("NANOCHAT_WORDS_FILE")
    monkeypatch.setattr("tasks.spellingbee.SYSTEM_WORDS", str(tmp_path / "no-dict"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_WORDS_URL", "http://127.0.0.1:9/words.txt")  # nothing listens there
    monkeypatch.setattr("tasks.spellingbee.time.sleep", lambda s: None)
    for kwargs in ({}, {"words_file": str(tmp_path / "missing.txt")}):
        with pytest.raises(FileNotFoundError, match="NANOCHAT_WORDS_FILE.*apt install wamerican"):
            SpellingBee(size=3, **kwargs)


@pytest.fixture
def words_server(tmp_path):
    """A local HTTP server for the word list download: serves tmp_path/served, counts GETs."""
    import functools
    import http.server
    import threading
    root = tmp_path / "served"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()


def test_word_list_is_downloaded_once_and_cached(words_server, tmp_path, monkeypatch):
    from tasks import spellingbee
    root, url, hits = words_server
    (root / "words_alpha.txt").write_bytes(b"apple\r\nbanana\r\nzebra\r\nok\r\n")  # CRLF, as the real one
    monkeypatch.delenv("NANOCHAT_WORDS_FILE", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_WORDS_URL", url + "/words_alpha.txt")
    monkeypatch.setattr("tasks.spellingbee.SYSTEM_WORDS", str(tmp_path / "no-dict"))
    assert load_words() == ["apple", "banana", "zebra"]
    cached = tmp_path / "base" / "words_alpha.txt"
    assert cached.exists() and [p.name for p in (tmp_path / "base").iterdir()] == ["words_alpha.txt"]  # no temp left
    assert load_words() == ["apple", "banana", "zebra"] and len(hits) == 1  # from the cache the second time
    # NANOCHAT_WORDS_FILE comes first
    own = tmp_path / "own.txt"
    own.write_text("cherry\n")
    monkeypatch.setenv("NANOCHAT_WORDS_FILE", str(own))
    assert load_words() == ["cherry"]
    # a download that fails (404; not a word list) leaves nothing behind; the system dictionary is the fallback
    monkeypatch.delenv("NANOCHAT_WORDS_FILE")
    cached.unlink()
    monkeypatch.setenv("NANOCHAT_WORDS_URL", url + "/missing.txt")
    with pytest.raises(FileNotFoundError, match="404"):
        load_words()
    (root / "page.html").write_text("<html>Not Found</html>")
    with pytest.raises(RuntimeError, match="not a word list"):
        spellingbee.download_words(url + "/page.html", str(cached))
    assert not cached.exists() and list((tmp_path / "base").iterdir()) == []
    system = tmp_path / "dict"
    system.write_text("grape\n")
    monkeypatch.setattr("tasks.spellingbee.SYSTEM_WORDS", str(system))
    assert load_words() == ["grape"]


def test_simple_spelling(words_file, tokenizer):
    train, test = SimpleSpelling(50, "train", words_file), SimpleSpelling(50, "test", words_file)
    assert len(train) == 50 and train[7] == SimpleSpelling(50, "train", words_file)[7]  # deterministic
    assert [train[i] for i in range(50)] != [test[i] for i in range(50)]
    for ex in (train[0], test[0]):
        word = ex["messages"][0]["content"].removeprefix("Spell the word: ")
        assert ex["messages"][1]["content"] == word + ":" + ",".join(word)
        check_mask(tokenizer, ex)


def test_spelling_bee(words_file, tokenizer):
    task = SpellingBee(200, "train", words_file)
    assert task.eval_type == "generative" and len(task) == 200
    counts, questions = [], set()
    for ex in task:
        user, parts = ex["messages"][0]["content"], ex["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert word in user and parts[1]["text"] == f"'{word}'.count('{letter}')"
        assert parts[2]["text"] == str(word.count(letter)) and parts[3]["text"].endswith(f"#### {word.count(letter)}")
        assert task.evaluate(ex, parts[3]["text"]) == 1
        counts.append(word.count(letter))
        questions.add(user.replace(word, "W").replace(letter, "L", 1))
    assert 0 in counts and max(counts) >= 2 and len(questions) >= 3  # absent letters and varied phrasings

    ex = task[0]
    trained = check_mask(tokenizer, ex)
    call = ex["messages"][1]["content"][1]["text"]
    assert "<|python_start|>" + call + "<|python_end|>" in trained and "<|output_start|>" not in trained

    n = int(ex["messages"][1]["content"][-1]["text"].rsplit("####", 1)[1])
    assert task.evaluate(ex, f"I counted.\n#### {n}") == 1
    assert task.reward(ex, f"#### 9 then #### {n}") == 1.0
    assert task.evaluate(ex, f"#### {n + 1}") == 0
    assert task.evaluate(ex, f"#### {n} then #### {n + 1}") == 0
    assert task.evaluate(ex, f"#### {n}.5") == 0 and task.evaluate(ex, f"#### {n}.0") == 1  # (3.5 was read as 3)
    assert task.evaluate(ex, f"the answer is {n}") == 0  # no "####"


# -----------------------------------------------------------------------------
# slicing, mixtures, sequences, loading

def test_slicing_mixture_sequence(words_file):
    full = SimpleSpelling(10, "train", words_file)
    assert len(SimpleSpelling(10, "train", words_file, start=2, stop=8)) == 6
    sliced = SimpleSpelling(10, "train", words_file, start=1, stop=9, step=3)
    assert len(sliced) == 3 and [sliced[i] for i in range(3)] == [full[1], full[4], full[7]]
    assert len(SimpleSpelling(10, "train", words_file, start=5, stop=50)) == 5
    with pytest.raises(IndexError):
        sliced[3]
    with pytest.raises(ValueError):
        SimpleSpelling(10, "train", words_file, step=0)

    a, b = SimpleSpelling(6, "train", words_file), SpellingBee(4, "test", words_file)
    mix = TaskMixture([a, b])
    items = [json.dumps(x, sort_keys=True) for x in mix]
    expected = [json.dumps(x, sort_keys=True) for x in list(a) + list(b)]
    assert len(mix) == 10 and sorted(items) == sorted(expected) and items != expected  # shuffled, each once
    assert items == [json.dumps(x, sort_keys=True) for x in TaskMixture([a, b])]  # same order every time

    seq = TaskSequence([b, a])
    assert len(seq) == 10 and list(seq) == list(b) + list(a)


def test_load_rows_offline_error(tmp_path, monkeypatch):
    empty = tmp_path / "hf"
    empty.mkdir()
    for var in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(empty))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)
    # the libraries read these at import; if another test imported them, patch them too
    for mod, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)), ("datasets.config", ("HF_HUB_OFFLINE",))):
        if mod in sys.modules:
            for name in names:
                if hasattr(sys.modules[mod], name):
                    monkeypatch.setattr(sys.modules[mod], name, True)
    with pytest.raises(RuntimeError, match="NANOCHAT_TASK_DATA") as e:
        load_rows("allenai/ai2_arc", "ARC-Easy", "test")
    assert "allenai/ai2_arc/ARC-Easy/test.jsonl" in str(e.value)
    # an explicit data_dir without the split file is a plain FileNotFoundError
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_rows("allenai/ai2_arc", "ARC-Easy", "test", data_dir=str(empty))
