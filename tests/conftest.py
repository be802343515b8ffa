"""Shared fixtures: a small embedded corpus and a small tokenizer, built once per session
in a temporary NANOCHAT_BASE_DIR (tests never touch the user's ~/.cache/nanochat)."""

import os

import pytest
import torch

os.environ.setdefault("NANOCHAT_BASE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nanochat-tests-{os.getpid()}"))
# Without a GPU, Triton kernels (tests/test_mamba3_triton.py) run in Triton's CPU interpreter. It
# must be on before anything imports triton (torch's inductor does, early): triton.language's own
# helpers (tl.cumsum's combine function) are defined interpreted or compiled at that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On pytest-xdist workers (dev/test.sh runs two on CI's two cores): one thread each, in the
# worker and in the scripts its tests start. Two workers each spinning two OpenMP threads on
# two cores ran a torch-heavy test 5.6x slower than alone (192 s against 34 s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# The slowest files first (CI's durations, 2026-11-30): the workers take whole files in this
# order, so the run does not end with one worker on a long file and the other idle.
SLOW_FILES = ["test_runs.py", "test_base_train.py", "test_tpu.py", "test_chat_web.py", "test_mtp.py",
              "test_checkpoint.py", "test_chat_chain.py", "test_cpp_data.py", "test_chat_cli.py", "test_miniseries.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: in-file order kept


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from nanochat.corpus import build
    out = tmp_path_factory.mktemp("corpus")
    paths, _ = build(str(out), cpp_mb=1.0, py_mb=1.0, shard_mb=0.25, seed=0)
    assert len(paths) >= 4
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(corpus_dir, tmp_path_factory):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import Tokenizer
    texts = (d[:5000] for batch in parquets_iter_batched("train", corpus_dir) for d in batch)
    tok = Tokenizer.train_from_iterator(texts, vocab_size=1024)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out))
    tok.directory = str(out)
    return tok
