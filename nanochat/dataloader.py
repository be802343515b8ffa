"""
The pretraining data loader: parquet shards -> tokens -> packed (inputs, targets).

- Documents are read one parquet row group at a time; DDP rank r of W takes row
  groups r, r+W, r+2W, ... (counted over the epoch's shards in order), so ranks
  never see the same document.
- A background thread reads and tokenizes ahead (tiktoken's batch encoder runs on
  several threads and releases the GIL), so the training loop only packs.
- Packing is BOS-aligned best fit, as in nanochat: every row starts with a document's
  <|bos|>; to fill a row we repeatedly take the longest buffered document that still
  fits; when none fits, the shortest one is cropped to fill the row exactly and its
  tail is dropped. No padding, so every position trains. The fraction of tokens
  dropped this way is reported (`crop_fraction`).
  One departure from nanochat: a document longer than a whole row is first cut into
  row-sized pieces, each starting with <|bos|>, instead of keeping only its first row.
  Source files are often longer than the context, and dropping their tails would
  throw most of a code corpus away.
- The stream never ends: after the last shard it starts the next epoch, and the shard
  list is re-read as it goes, so shards that appear while training (streaming data,
  e.g. a chunker writing into --data_dir) are picked up in order. With streaming=True
  (base_train --streaming_data) it waits for new shards at the end instead of starting
  another epoch, for a producer that is still writing.
- state_dict() / resume_state restore the loader exactly: the restored loader yields
  the same next batch as the original would have.
- data_order="global" makes the batches independent of the number of processes: every
  rank reads and packs the whole stream and keeps every W-th batch (rank r the r-th),
  so W GPUs with A accumulation steps train each step on exactly the batches that one
  GPU with W*A steps would. It costs W times the tokenization; the default "sharded"
  has each rank read only its own row groups.
- fim_rate > 0 (base_train --fim_rate): each packed row goes through context-level
  fill-in-the-middle (nanochat/fim.py) with a generator seeded by (fim_seed, the stream's
  rank, the row's index), so resume stays exact and the global order stays rank-free.
"""

import bisect
import os
import queue
import threading
import time

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import list_parquet_files, open_shard, read_texts, split_files
from nanochat.fim import fim_context, row_rng


class DocumentStream:
    """Background reader + tokenizer. Yields (position, token_lists) where position =
    (epoch, shard_name, row_group, k) (k: the row group's index in the epoch) and
    token_lists are the row group's documents, each starting with BOS. Starts at
    `start`, a position, if given."""

    def __init__(self, tokenizer, split, data_dir, rank, world_size, start=None, prefetch=4, threads=4,
                 streaming=False, poll_seconds=5.0):
        self.tokenizer, self.split, self.data_dir = tokenizer, split, data_dir
        self.streaming, self.poll_seconds = streaming, poll_seconds
        self.rank, self.world_size, self.threads = rank, world_size, threads
        self.start = start
        self.val_name = os.path.basename(list_parquet_files(data_dir)[-1])  # the val shard when the stream began
        self.queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _shards_after(self, name):
        """The first shard of this split whose name sorts after `name` (None: from the start)."""
        all_files = list_parquet_files(self.data_dir)
        if self.val_name and os.path.basename(all_files[-1]) != self.val_name:
            # the last shard is val, so a shard that sorts after it turns the old val shard into
            # training data and changes what val bpb measures: say so once
            print(f"warning: {os.path.basename(all_files[-1])} arrived in {self.data_dir} after the validation "
                  f"shard {self.val_name}: {self.val_name} is now training data and validation uses the new last "
                  "shard. Name shards written during training to sort before the validation shard", flush=True)
            self.val_name = None
        files = split_files(all_files, self.split)
        for path in files:
            if name is None or os.path.basename(path) > name:
                return path
        return None

    def _run(self):
        try:
            # k counts row groups across the whole epoch; rank r takes those with k % W == r,
            # so even shards with a single row group spread over the ranks
            epoch, name, rg, k = self.start if self.start else (0, None, 0, 0)
            rank, world, shared = self.rank, self.world_size, False
            path = os.path.join(os.path.dirname(list_parquet_files(self.data_dir)[0]), name) if name else None
            produced_this_epoch, epoch_rows, filled = False, 0, []  # filled: this epoch's non-empty row groups' k
            resumed_mid_epoch = self.start is not None  # then this epoch's rows were not all counted
            while not self.stop.is_set():
                if path is None:
                    path = self._shards_after(None)
                pf = open_shard(path)
                for g in range(rg, pf.num_row_groups):
                    rows = pf.metadata.row_group(g).num_rows
                    epoch_rows += rows
                    if rows > 0:
                        filled.append(k)
                    if k % world == rank and rows > 0:  # an empty row group would give the packer nothing, forever
                        docs = read_texts(pf, g, path)
                        ids = self.tokenizer.encode(docs, prepend=self.tokenizer.get_bos_token_id(),
                                                    num_threads=self.threads)
                        produced_this_epoch = True
                        if not self._put(((epoch, os.path.basename(path), g, k), ids)):
                            return
                    k += 1
                rg = 0
                last = os.path.basename(path)
                path = self._shards_after(last)
                if path is None and self.streaming:
                    path = self._wait_for_shard_after(last)
                if path is None:  # end of epoch
                    if epoch_rows == 0 and not resumed_mid_epoch:
                        names = [os.path.basename(f) for f in split_files(list_parquet_files(self.data_dir), self.split)]
                        raise RuntimeError(f"the {self.split} shards in {self.data_dir} ({', '.join(names)}) have no rows: "
                                           "rebuild or remove them (the last shard is validation)")
                    if not produced_this_epoch and self.split == "val" and filled and not shared:
                        # a small val split with fewer row groups than ranks (or this rank's all
                        # empty): each rank reads one non-empty row group, shared (evaluation only
                        # averages, so repeats don't bias it)
                        rank, world, shared = filled[self.rank % len(filled)], k, True
                    elif not produced_this_epoch:
                        raise RuntimeError(f"rank {self.rank} of {self.world_size} got no data from the {self.split} "
                                           f"shards in {self.data_dir}: there are fewer row groups than ranks. "
                                           "Use more shards or smaller row groups")
                    epoch, k, produced_this_epoch, epoch_rows, resumed_mid_epoch = epoch + 1, 0, False, 0, False
                    filled = []
        except BaseException as e:  # hand the error to the consumer instead of hanging it
            self._put(e)

    def _wait_for_shard_after(self, name):
        """Streaming data: poll until a shard sorting after `name` appears (None if stopped)."""
        print(f"data: read every shard in {self.data_dir} up to {name}; waiting for new ones (--streaming_data)",
              flush=True)
        while not self.stop.wait(self.poll_seconds):
            path = self._shards_after(name)
            if path is not None:
                return path
        return None

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


class DataLoader:
    """Yields (inputs, targets), each (B, T) int64 on `device`.

    resume_state: a dict from state_dict() to continue exactly where that loader was."""

    def __init__(self, tokenizer, B, T, split="train", device="cpu", data_dir=None,
                 rank=None, world_size=None, buffer_size=1000, tokenizer_threads=4, resume_state=None,
                 data_order="sharded", streaming=False, fim_rate=0.0, fim_spm_rate=0.5, fim_seed=0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if data_order not in ("sharded", "global"):
            raise ValueError(f"data_order must be 'sharded' or 'global', not {data_order!r}")
        for name, rate in (("fim_rate", fim_rate), ("fim_spm_rate", fim_spm_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name}={rate}: must be in [0, 1]")
        self.data_order = data_order
        self.fim_rate, self.fim_spm_rate, self.fim_seed = fim_rate, fim_spm_rate, fim_seed
        ddp_rank, ddp_world = get_dist_info()[1], get_dist_info()[3]
        self.rank = ddp_rank if rank is None else rank
        self.world_size = ddp_world if world_size is None else world_size
        self.tokenizer, self.B, self.T, self.split = tokenizer, B, T, split
        self.device = torch.device(device) if isinstance(device, str) else device
        self.data_dir, self.buffer_size, self.threads = data_dir, buffer_size, tokenizer_threads
        self.bos = tokenizer.get_bos_token_id()
        list_parquet_files(data_dir)  # fail now, with a clear message, if there is no data
        # the buffer: sorted keys (length, seq) and the token arrays by seq
        self.keys, self.docs, self.next_seq = [], {}, 0
        self.cropped_tokens, self.emitted_tokens = 0, 0
        # the document stream and where we are in it
        self.pos, self.rg_docs, self.doc_idx = None, [], 0
        start, skip = None, 0
        if resume_state is not None:
            self._check_state(resume_state)
            if resume_state["pos"] is not None:
                start, skip = tuple(resume_state["pos"]), resume_state["doc_idx"]
            for seq, arr in resume_state["buffer"]:
                self._add(np.asarray(arr, dtype=np.int32), seq)
            self.next_seq = resume_state["next_seq"]
            self.cropped_tokens, self.emitted_tokens = resume_state["cropped_tokens"], resume_state["emitted_tokens"]
        # the global order reads the whole stream on every rank (as rank 0 of 1 would)
        stream_rank, stream_world = (self.rank, self.world_size) if data_order == "sharded" else (0, 1)
        self.stream = DocumentStream(tokenizer, split, data_dir, stream_rank, stream_world, start=start,
                                     threads=tokenizer_threads, streaming=streaming)
        if start is not None:
            self.pos, self.rg_docs = self.stream.get()
            self.doc_idx = skip

    def _check_state(self, state):
        state = {"data_order": "sharded", **state}  # states saved before data_order existed
        mine = {"rank": self.rank, "world_size": self.world_size, "T": self.T, "split": self.split,
                "data_order": self.data_order}
        for k, v in mine.items():
            if state.get(k) != v:
                raise ValueError(f"dataloader resume state has {k}={state.get(k)} but this run has {k}={v}; "
                                 "resume with the same number of processes, sequence length, split and data order")

    # ---- the document buffer ----------------------------------------------

    def _add(self, arr, seq=None):
        if seq is None:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        bisect.insort(self.keys, (len(arr), seq))
        self.docs[seq] = arr

    def _take(self, i):
        _, seq = self.keys.pop(i)
        return self.docs.pop(seq)

    def _next_doc(self):
        while self.doc_idx >= len(self.rg_docs):
            self.pos, self.rg_docs = self.stream.get()
            self.doc_idx = 0
        ids = self.rg_docs[self.doc_idx]
        self.doc_idx += 1
        return ids

    def _refill(self):
        cap = self.T + 1
        while len(self.keys) < self.buffer_size:
            ids = np.asarray(self._next_doc(), dtype=np.int32)
            if len(ids) <= cap:
                self._add(ids)
                continue
            # cut a long document into row-sized pieces, each starting with BOS
            self._add(ids[:cap])
            for k in range(cap, len(ids), cap - 1):
                self._add(np.concatenate(([self.bos], ids[k:k + cap - 1])).astype(np.int32))

    def _next_row(self):
        cap = self.T + 1
        pieces, remaining = [], cap
        while remaining > 0:
            self._refill()
            i = bisect.bisect_right(self.keys, (remaining, float("inf"))) - 1
            if i >= 0:  # the longest document that still fits
                doc = self._take(i)
            else:       # none fits: crop the shortest one to fill the row
                doc = self._take(0)
                self.cropped_tokens += len(doc) - remaining
                doc = doc[:remaining]
            pieces.append(doc)
            remaining -= len(doc)
        row = np.concatenate(pieces)
        if self.fim_rate > 0:
            # the row's index in this stream (restored by resume_state) seeds its FIM draws
            rng = row_rng(self.fim_seed, self.stream.rank, self.emitted_tokens // cap)
            row = fim_context(self.tokenizer, row, rng, self.fim_rate, self.fim_spm_rate)
        self.emitted_tokens += cap
        return row

    # ---- iteration ---------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        if self.data_order == "global":  # pack the whole group of W batches, keep the rank-th
            group = [[self._next_row() for _ in range(self.B)] for _ in range(self.world_size)]
            rows = np.stack(group[self.rank]).astype(np.int64)
        else:
            rows = np.stack([self._next_row() for _ in range(self.B)]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    @property
    def crop_fraction(self):
        total = self.cropped_tokens + self.emitted_tokens
        return self.cropped_tokens / total if total else 0.0

    def state_dict(self):
        """Everything needed to continue exactly: where we are in the document stream,
        and the buffered documents (token arrays) not yet packed."""
        return {"rank": self.rank, "world_size": self.world_size, "T": self.T, "split": self.split,
                "data_order": self.data_order, "pos": self.pos, "doc_idx": self.doc_idx, "next_seq": self.next_seq,
                "buffer": [(seq, self.docs[seq]) for _, seq in self.keys],  # arrays are never modified: no copy
                "cropped_tokens": self.cropped_tokens, "emitted_tokens": self.emitted_tokens}

    def close(self):
        self.stream.close()


def measure_throughput(tokenizer, B=32, T=2048, data_dir=None, seconds=10.0, tokenizer_threads=2):
    """Tokens per second this loader delivers on the CPU (one rank)."""
    loader = DataLoader(tokenizer, B, T, data_dir=data_dir, tokenizer_threads=tokenizer_threads)
    next(loader)  # warm up the background thread
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        x, _ = next(loader)
        n += x.numel()
    rate = n / (time.time() - t0)
    crop = loader.crop_fraction
    loader.close()
    return rate, crop


if __name__ == "__main__":
    import argparse
    from nanochat.tokenizer import get_tokenizer
    p = argparse.ArgumentParser(description="Measure the data loader's tokens/s on this CPU (one rank)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--device_batch_size", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tokenizer threads")
    a = p.parse_args()
    rate, crop = measure_throughput(get_tokenizer(), a.device_batch_size, a.max_seq_len, a.data_dir, a.seconds, a.threads)
    print(f"dataloader: {rate:,.0f} tokens/s per rank on {os.cpu_count()} CPU cores "
          f"(B={a.device_batch_size}, T={a.max_seq_len}, {a.threads} tokenizer threads); cropped {crop:.2%} of tokens")
