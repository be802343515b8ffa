import os

import pyarrow as pa
import pyarrow.parquet as pq
import threading
import time

import pytest
import torch

from nanochat.common import atomic_write
from nanochat.dataloader import DataLoader, DocumentStream
from nanochat.dataset import list_parquet_files, parquets_iter_batched


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_and_bos_aligned(tokenizer, corpus_dir):
    loader = DataLoader(tokenizer, B=4, T=64, data_dir=corpus_dir, buffer_size=50)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
    for _ in range(20):
        next(loader)
    assert 0.0 <= loader.crop_fraction < 0.5
    loader.close()


def test_determinism(tokenizer, corpus_dir):
    a = DataLoader(tokenizer, B=2, T=128, data_dir=corpus_dir, buffer_size=30)
    b = DataLoader(tokenizer, B=2, T=128, data_dir=corpus_dir, buffer_size=30)
    for (xa, ya), (xb, yb) in zip(take(a, 15), take(b, 15)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.close(), b.close()


@pytest.mark.parametrize("warm", [0, 1, 7, 60])
def test_resume_yields_the_same_next_batches(tokenizer, corpus_dir, warm):
    ref = DataLoader(tokenizer, B=2, T=96, data_dir=corpus_dir, buffer_size=20)
    take(ref, warm)
    state = ref.state_dict()
    expected = take(ref, 10)
    ref.close()
    state = torch.load(_roundtrip(state), weights_only=False)  # as a checkpoint would store it
    resumed = DataLoader(tokenizer, B=2, T=96, data_dir=corpus_dir, buffer_size=20, resume_state=state)
    for (xe, ye), (xr, yr) in zip(expected, take(resumed, 10)):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    resumed.close()


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_resume_state_must_match(tokenizer, corpus_dir):
    ref = DataLoader(tokenizer, B=2, T=96, data_dir=corpus_dir)
    next(ref)
    state = ref.state_dict()
    ref.close()
    with pytest.raises(ValueError, match="world_size=1 but this run has world_size=2"):
        DataLoader(tokenizer, B=2, T=96, data_dir=corpus_dir, rank=0, world_size=2, resume_state=state)


def test_ranks_read_disjoint_row_groups(tokenizer, corpus_dir):
    world = 3
    seen = []
    for rank in range(world):
        stream = DocumentStream(tokenizer, "train", corpus_dir, rank, world)
        positions = set()
        while True:
            (epoch, shard, rg, _), _ = stream.get()
            if epoch > 0:
                break
            positions.add((shard, rg))
        stream.close()
        seen.append(positions)
    for i in range(world):
        for j in range(i + 1, world):
            assert not seen[i] & seen[j]
    all_rgs = {(os.path.basename(p), g) for p in list_parquet_files(corpus_dir)[:-1]
               for g in range(pq.ParquetFile(p).num_row_groups)}
    assert set().union(*seen) == all_rgs  # together the ranks read everything once


def test_rank_batches_differ(tokenizer, corpus_dir):
    r0 = DataLoader(tokenizer, B=2, T=64, data_dir=corpus_dir, rank=0, world_size=2)
    r1 = DataLoader(tokenizer, B=2, T=64, data_dir=corpus_dir, rank=1, world_size=2)
    assert not torch.equal(next(r0)[0], next(r1)[0])
    r0.close(), r1.close()


def test_global_order_does_not_depend_on_world_size(tokenizer, corpus_dir):
    """data_order=global: rank r of W yields global batches r, r+W, ... of the one-process
    stream, so any number of ranks together train on the same batches; and it resumes."""
    kw = dict(B=2, T=64, data_dir=corpus_dir, buffer_size=30, data_order="global")
    one = DataLoader(tokenizer, rank=0, world_size=1, **kw)
    ref = [x for x, _ in take(one, 9)]
    for world in (2, 3):
        ranks = [DataLoader(tokenizer, rank=r, world_size=world, **kw) for r in range(world)]
        got = [next(ranks[i % world])[0] for i in range(9)]
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), f"world_size={world}"
        state = ranks[1].state_dict()
        again = DataLoader(tokenizer, rank=1, world_size=world, resume_state=state, **kw)
        assert torch.equal(next(again)[0], next(ranks[1])[0])
        for r in ranks + [again]:
            r.close()
    with pytest.raises(ValueError, match="data order"):
        DataLoader(tokenizer, rank=0, world_size=1, B=2, T=64, data_dir=corpus_dir, resume_state=one.state_dict())
    one.close()


def test_val_split_is_the_last_shard(tokenizer, corpus_dir):
    files = list_parquet_files(corpus_dir)
    val_docs = next(parquets_iter_batched("val", corpus_dir))
    assert val_docs == pq.ParquetFile(files[-1]).read_row_group(0).column("text").to_pylist()
    loader = DataLoader(tokenizer, B=2, T=64, split="val", data_dir=corpus_dir)
    x, _ = next(loader)
    assert x.shape == (2, 64)
    loader.close()


def test_stream_picks_up_new_shards(tokenizer, tmp_path):
    d = tmp_path / "stream"
    d.mkdir()
    for i, word in enumerate(["alpha", "beta", "val"]):
        pq.write_table(pa.table({"text": [f"{word} {k}" for k in range(4)]}), d / f"shard_{i:05d}.parquet")
    stream = DocumentStream(tokenizer, "train", str(d), 0, 1, prefetch=1)
    first = [stream.get()[0] for _ in range(2)]
    # a new shard arrives while we train; the stream reads ahead a little, so it shows
    # up within an epoch or two, always in sorted order within its epoch
    # written the way corpus/cpp_data write shards (temp file + rename): a plain write could be
    # listed and opened half-written by the read-ahead thread (it failed CI once that way)
    atomic_write(str(d / "shard_00001b.parquet"), lambda f: pq.write_table(pa.table({"text": ["gamma"]}), f))
    later = [stream.get()[0] for _ in range(8)]
    stream.close()
    assert [p[1] for p in first] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert "shard_00001b.parquet" in [p[1] for p in later]
    last_epoch = max(p[0] for p in later)
    assert [p[1] for p in later if p[0] == last_epoch - 1] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00001b.parquet"] \
        or [p[1] for p in later if p[0] == last_epoch][:3] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00001b.parquet"]


def test_streaming_waits_for_new_shards_instead_of_a_new_epoch(tokenizer, tmp_path, capsys):
    d = tmp_path / "stream"
    d.mkdir()
    for i, word in enumerate(["alpha", "beta", "val"]):
        pq.write_table(pa.table({"text": [f"{word} {k}" for k in range(4)]}), d / f"shard_{i:05d}.parquet")
    stream = DocumentStream(tokenizer, "train", str(d), 0, 1, prefetch=1, streaming=True, poll_seconds=0.05)
    got = [stream.get()[0] for _ in range(2)]
    time.sleep(0.5)  # the stream has reached the end of the shards and waits (no second epoch)
    assert stream.queue.empty() and "waiting for new ones" in capsys.readouterr().out
    atomic_write(str(d / "shard_00001b.parquet"), lambda f: pq.write_table(pa.table({"text": ["gamma"]}), f))
    got.append(stream.get()[0])
    stream.close()
    assert [(p[0], p[1]) for p in got] == [(0, "shard_00000.parquet"), (0, "shard_00001.parquet"),
                                           (0, "shard_00001b.parquet")]


def test_stream_warns_when_a_shard_lands_after_val(tokenizer, tmp_path, capsys):
    d = tmp_path / "stream"
    d.mkdir()
    for i, word in enumerate(["alpha", "val"]):
        pq.write_table(pa.table({"text": [f"{word} {k}" for k in range(4)]}), d / f"shard_{i:05d}.parquet")
    stream = DocumentStream(tokenizer, "train", str(d), 0, 1, prefetch=1)
    stream.get()
    atomic_write(str(d / "shard_00002.parquet"), lambda f: pq.write_table(pa.table({"text": ["late"]}), f))
    names = [stream.get()[0][1] for _ in range(4)]
    stream.close()
    assert "shard_00001.parquet" in names  # the old val shard now trains...
    out = capsys.readouterr().out
    assert out.count("arrived in") == 1 and "shard_00001.parquet is now training data" in out  # ...and it says so, once


def test_missing_and_empty_data_dir(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nanochat.dataset -n"):
        DataLoader(tokenizer, B=1, T=8, data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no .parquet files"):
        DataLoader(tokenizer, B=1, T=8, data_dir=str(tmp_path))


def test_corrupt_shard_names_the_file(tokenizer, tmp_path):
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    (tmp_path / "shard_00001.parquet").write_bytes(b"")
    loader = DataLoader(tokenizer, B=1, T=8, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="shard_00000.parquet is not a readable parquet file"):
        next(loader)
    loader.close()


def test_shard_without_text_column(tokenizer, tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "a.parquet")
    loader = DataLoader(tokenizer, B=1, T=8, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no 'text' column"):
        next(loader)
    loader.close()


def test_throughput_is_reported(tokenizer, corpus_dir):
    from nanochat.dataloader import measure_throughput
    rate, crop = measure_throughput(tokenizer, B=8, T=512, data_dir=corpus_dir, seconds=1.0)
    assert rate > 10_000 and 0 <= crop < 1


def test_small_val_split_is_shared_by_ranks(tokenizer, corpus_dir):
    n_rg = pq.ParquetFile(list_parquet_files(corpus_dir)[-1]).num_row_groups
    world = n_rg + 1  # more ranks than val row groups
    stream = DocumentStream(tokenizer, "val", corpus_dir, world - 1, world)
    (_, shard, rg, _), ids = stream.get()
    stream.close()
    assert shard == os.path.basename(list_parquet_files(corpus_dir)[-1]) and rg == (world - 1) % n_rg and ids
    # the train split keeps its clear error instead
    stream = DocumentStream(tokenizer, "train", corpus_dir, 999, 1000)
    with pytest.raises(RuntimeError, match="fewer row groups than ranks"):
        stream.get()
    stream.close()


def test_a_rank_whose_val_row_groups_are_empty_reads_a_filled_one(tokenizer, tmp_path):
    """Val row groups of 5 and 0 rows, 2 ranks: rank 1's only row group is empty, and the
    sharing of a small val split sent it back to itself, so it re-read the shard forever
    (and the other ranks hung in evaluation's all-reduce). It now reads the filled one."""
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"text": ["alpha one", "alpha two"]}), d / "shard_00000.parquet")
    with pq.ParquetWriter(d / "shard_00001.parquet", pa.schema([("text", pa.string())])) as w:  # val
        w.write_table(pa.table({"text": [f"beta {i}" for i in range(5)]}))
        w.write_table(pa.table({"text": pa.array([], type=pa.string())}))
    assert pq.ParquetFile(d / "shard_00001.parquet").metadata.row_group(1).num_rows == 0
    stream = DocumentStream(tokenizer, "val", str(d), 1, 2)
    out = []
    t = threading.Thread(target=lambda: out.append(stream.get()), daemon=True)
    t.start()
    t.join(10)
    stream.close()
    assert out, "no val documents within 10 s: the rank spun"
    (_, shard, rg, _), ids = out[0]
    assert shard == "shard_00001.parquet" and rg == 0 and len(ids) == 5


def test_zero_row_shards_error_instead_of_spinning(tokenizer, tmp_path):
    """A zero-row train or val shard made base_train spin forever at 90% CPU; an empty
    train shard among others is skipped, an empty split is an error naming the shards."""
    empty = pa.table({"text": pa.array([], type=pa.string())})
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"text": ["alpha one", "alpha two"]}), d / "shard_00000.parquet")
    pq.write_table(empty, d / "shard_00001.parquet")
    pq.write_table(empty, d / "shard_00002.parquet")  # val
    train = DataLoader(tokenizer, B=1, T=4, split="train", data_dir=str(d), buffer_size=4)
    x, _ = next(train)  # the empty train shard is skipped
    train.close()
    val = DataLoader(tokenizer, B=1, T=4, split="val", data_dir=str(d))
    t0 = time.time()
    with pytest.raises(RuntimeError, match="val shards .*shard_00002.parquet.* have no rows"):
        next(val)
    assert time.time() - t0 < 10
    val.close()


def test_text_column_must_hold_strings(tokenizer, tmp_path):
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "shard_00000.parquet")
    pq.write_table(pa.table({"text": [4]}), tmp_path / "shard_00001.parquet")
    loader = DataLoader(tokenizer, B=1, T=4, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="shard_00000.parquet: column 'text' holds int64, not strings"):
        next(loader)
    loader.close()


def test_a_single_shard_is_train_and_val_with_a_warning(tokenizer, tmp_path, capsys):
    pq.write_table(pa.table({"text": ["only shard"] * 3}), tmp_path / "shard_00000.parquet")
    loader = DataLoader(tokenizer, B=1, T=4, split="val", data_dir=str(tmp_path))
    next(loader)
    loader.close()
    assert "is the only shard, so it is both training and validation data" in capsys.readouterr().out
