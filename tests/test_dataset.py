"""The real download path, against a local HTTP server serving fixture shards."""

import http.server
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.corpus import build


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves files from `root` with Range support. `cut` maps a file name to a number
    of requests whose body is cut off halfway (the connection just closes)."""

    def __init__(self, root):
        self.root, self.cut, self.requests, self.from_zero = root, {}, [], 0  # from_zero: 206s of the whole file
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        name = self.path.rsplit("/", 1)[-1]
        path = os.path.join(srv.root, name)
        srv.requests.append((name, self.headers.get("Range")))
        if not os.path.exists(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if srv.from_zero > 0:  # a server (or proxy) that answers a range from the wrong place
                srv.from_zero -= 1
                start = 0
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut.get(name, 0) > 0:
            srv.cut[name] -= 1
            self.wfile.write(body[: len(body) // 2])  # then hang up mid-transfer
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    # fixture shards in the real shard naming scheme
    paths, _ = build(str(tmp_path / "built"), cpp_mb=0.3, py_mb=0.3, shard_mb=0.2)
    for i, p in enumerate(paths):
        os.replace(p, root / dataset.shard_name(i))
    srv = ShardServer(str(root))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/datasets/shards", len(paths)
    srv.shutdown()


def test_download_parallel_and_verified(server, tmp_path):
    srv, url, n = server
    out = tmp_path / "data"
    failures = dataset.download(range(n), str(out), base_url=url, workers=3, backoff=0.01)
    assert failures == []
    files = dataset.list_parquet_files(str(out))
    assert [os.path.basename(f) for f in files] == [dataset.shard_name(i) for i in range(n)]
    for f in files:
        assert open(f, "rb").read() == open(os.path.join(srv.root, os.path.basename(f)), "rb").read()
    assert not [f for f in os.listdir(out) if f.endswith(".part")]
    # a second run downloads nothing
    before = len(srv.requests)
    assert dataset.download(range(n), str(out), base_url=url, backoff=0.01) == []
    assert len(srv.requests) == before


def test_cut_off_transfer_resumes_with_range(server, tmp_path):
    srv, url, _ = server
    name = dataset.shard_name(0)
    srv.cut[name] = 1
    path = dataset.download_shard(0, str(tmp_path), base_url=url, backoff=0.01)
    assert open(path, "rb").read() == open(os.path.join(srv.root, name), "rb").read()
    ranges = [r for n, r in srv.requests if n == name]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0  # resumed, not restarted


def test_interrupted_download_leaves_no_final_file(server, tmp_path):
    srv, url, _ = server
    name = dataset.shard_name(1)
    srv.cut[name] = 100  # every attempt is cut off
    with pytest.raises(RuntimeError, match=f"failed to download .*{name} after 2 attempts"):
        dataset.download_shard(1, str(tmp_path), base_url=url, max_attempts=2, backoff=0.01)
    assert not (tmp_path / name).exists()  # only the .part file, which a later run resumes
    srv.cut[name] = 0
    dataset.download_shard(1, str(tmp_path), base_url=url, backoff=0.01)
    assert dataset.verify_shard(str(tmp_path / name)) > 0


def test_corrupt_download_is_rejected(server, tmp_path):
    srv, url, _ = server
    bad = os.path.join(srv.root, dataset.shard_name(99))
    with open(bad, "wb") as f:
        f.write(b"not parquet at all" * 100)
    with pytest.raises(RuntimeError, match="not a readable parquet file"):
        dataset.download_shard(99, str(tmp_path / "dl"), base_url=url, max_attempts=2, backoff=0.01)
    assert os.listdir(tmp_path / "dl") == []


def test_a_complete_but_damaged_part_is_downloaded_again(server, tmp_path):
    """A .part of the full size whose pages are damaged (the file changed on the server between
    attempts, say) fails verification with pyarrow's OSError, not a ValueError: it is deleted
    and the shard downloaded whole (before, every attempt asked for the bytes past its end, got
    416 and failed on the same file, run after run)."""
    srv, url, _ = server
    name = dataset.shard_name(0)
    data = bytearray(open(os.path.join(srv.root, name), "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    out = tmp_path / "dl"
    out.mkdir()
    (out / (name + ".part")).write_bytes(bytes(data))
    with pytest.raises(Exception) as e:
        dataset.verify_shard(str(out / (name + ".part")))
    assert not isinstance(e.value, ValueError)  # the case the old code kept
    path = dataset.download_shard(0, str(out), base_url=url, max_attempts=2, backoff=0.01)
    assert open(path, "rb").read() == open(os.path.join(srv.root, name), "rb").read()
    assert [r for n, r in srv.requests if n == name] == [f"bytes={len(data)}-", None]


def test_a_partial_reply_from_the_wrong_offset_is_not_appended(server, tmp_path):
    """A 206 whose Content-Range does not start where the .part ends is not appended (the file
    would hold its first bytes twice): the .part goes and the next attempt starts over."""
    srv, url, _ = server
    name = dataset.shard_name(0)
    data = open(os.path.join(srv.root, name), "rb").read()
    out = tmp_path / "dl"
    out.mkdir()
    (out / (name + ".part")).write_bytes(data[:1000])
    srv.from_zero = 1
    path = dataset.download_shard(0, str(out), base_url=url, max_attempts=2, backoff=0.01)
    assert open(path, "rb").read() == data
    assert [r for n, r in srv.requests if n == name] == ["bytes=1000-", None]


def test_missing_shard_fails_cleanly(server, tmp_path):
    _, url, _ = server
    with pytest.raises(RuntimeError, match="404"):
        dataset.download_shard(500, str(tmp_path), base_url=url, max_attempts=1)


def test_cli(server, tmp_path, capsys, monkeypatch):
    _, url, _ = server
    rc = dataset.main(["-n", "2", "--data_dir", str(tmp_path / "cli"), "--base_url", url])
    assert rc == 0
    assert len(dataset.list_parquet_files(str(tmp_path / "cli"))) == 2
    assert "done: 2/2 shards" in capsys.readouterr().out
    # without --data_dir it downloads where training will read: $NANOCHAT_DATA_DIR first
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "env"))
    assert dataset.main(["-n", "1", "--base_url", url]) == 0
    assert [os.path.basename(p) for p in dataset.list_parquet_files()] == ["shard_00000.parquet"]
    assert dataset.list_parquet_files()[0].startswith(str(tmp_path / "env"))


def test_corpus_is_deterministic(tmp_path):
    a, stats = build(str(tmp_path / "a"), cpp_mb=0.3, py_mb=0.3, shard_mb=0.2)
    b, _ = build(str(tmp_path / "b"), cpp_mb=0.3, py_mb=0.3, shard_mb=0.2)
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    assert stats["python"]["docs"] > 0  # the Python standard library is always there
    texts = [t for p in a for t in pq.read_table(p).column("text").to_pylist()]
    assert any("def " in t for t in texts)


def test_interrupted_corpus_rebuild_keeps_the_old_set(tmp_path, monkeypatch):
    from nanochat import corpus
    texts = [f"doc {i} " * 50 for i in range(40)]
    old = corpus.write_shards(texts, str(tmp_path), 2000)
    before = {p: open(p, "rb").read() for p in old}
    assert len(old) > 3
    real, calls = corpus.atomic_write, []

    def failing(path, fn, *a, **kw):  # the 3rd shard of the rebuild fails (disk full, Ctrl-C, ...)
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path, fn, *a, **kw)
    monkeypatch.setattr(corpus, "atomic_write", failing)
    with pytest.raises(OSError):
        corpus.write_shards([t.upper() for t in texts], str(tmp_path), 2000)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in old)  # no temp files either
    assert {p: open(p, "rb").read() for p in old} == before
    monkeypatch.setattr(corpus, "atomic_write", real)
    new = corpus.write_shards(texts[:10], str(tmp_path), 2000)  # a smaller set replaces all of the old one
    assert dataset.list_parquet_files(str(tmp_path)) == new and len(new) < len(old)


def test_local_dir_env_var(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "x.parquet")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    assert dataset.list_parquet_files() == [str(tmp_path / "x.parquet")]
    assert dataset.split_files(dataset.list_parquet_files(), "val") == [str(tmp_path / "x.parquet")]
