"""scripts/preflight.py on a CPU: with nothing there, every missing input is listed with
its fix and the exit code is 1; with everything there (the word list and eval bundle
fetched from a local server / file, task data as local copies) it is 0."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest
from eval_bundle_fixture import make_bundle_zip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSED = "http://127.0.0.1:9"  # nothing listens there: refused at once


def preflight(given, *args):
    """Run it with the caller's settings only: the inputs' variables of this shell are dropped."""
    env = dict(os.environ, HF_HOME="/nonexistent-hf-home")
    for name in ("NANOCHAT_WORDS_FILE", "NANOCHAT_TASK_DATA", "NANOCHAT_DATA_DIR", "HF_HUB_OFFLINE", "HF_HUB_CACHE",
                 "HF_DATASETS_CACHE"):
        env.pop(name, None)
    env.update(given)
    return subprocess.run([sys.executable, "-m", "scripts.preflight", "--timeout", "5", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_missing_inputs_are_listed_and_fail(tmp_path):
    out = preflight({"NANOCHAT_BASE_DIR": str(tmp_path / "base"), "NANOCHAT_WORDS_URL": CLOSED + "/words.txt",
                     "NANOCHAT_EVAL_BUNDLE_URL": str(tmp_path / "no-bundle.zip"), "HF_ENDPOINT": CLOSED,
                     "NANOCHAT_DATA_URL": CLOSED, "NANOCHAT_TASK_DATA": str(tmp_path / "empty")},
                    "--stages", "base,base_eval,mid,sft,chat_eval", "--rl", "--depth", "4", "--num_shards", "2",
                    "--min_free_gb", "1e9")
    assert out.returncode == 1, out.stdout + out.stderr
    err = out.stderr
    for what in ("tokenizer: no", "pretraining data: 0 of 2 shards", "CORE eval bundle", "word list",
                 "task data HuggingFaceTB/smol-smoltalk train", "task data cais/mmlu (auxiliary_train) train",
                 "task data openai/openai_humaneval test", "task data allenai/ai2_arc (ARC-Challenge) test",
                 "disk:"):
        assert what in err, (what, err)
    assert err.count("fix:") == err.count("  - ")  # every item says how to fix it
    assert not os.path.exists(tmp_path / "base" / "words_alpha.txt")


def test_all_present_passes_and_fetches(tmp_path, served, tokenizer):
    root, url = served
    (root / "words_alpha.txt").write_text("apple\nbanana\nstrawberry\n")
    (root / "shard_00000.parquet").write_bytes(b"PAR1")
    base = tmp_path / "base"
    shutil.copytree(tokenizer.directory, base / "tokenizer")
    task_data = tmp_path / "task_data"
    subprocess.run([sys.executable, "-m", "tasks.fixtures", str(task_data)], cwd=ROOT, check=True, capture_output=True)
    env = {"NANOCHAT_BASE_DIR": str(base), "NANOCHAT_WORDS_URL": url + "/words_alpha.txt",
           "NANOCHAT_EVAL_BUNDLE_URL": "file://" + str(make_bundle_zip(tmp_path / "eval_bundle.zip")),
           "HF_ENDPOINT": CLOSED, "NANOCHAT_DATA_URL": url, "NANOCHAT_TASK_DATA": str(task_data)}
    out = preflight(dict(env), "--stages", "base,base_eval,mid,sft,chat_eval", "--rl", "--depth", "4",
                    "--num_shards", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "everything" in out.stdout
    assert (base / "words_alpha.txt").read_text().startswith("apple")  # fetched, so mid_train won't have to
    assert (base / "eval_bundle" / "core.yaml").exists()
    # --no_fetch on a fresh base dir: the same inputs count as missing
    shutil.rmtree(base / "eval_bundle")
    (base / "words_alpha.txt").unlink()
    out = preflight(dict(env), "--stages", "base_eval,mid", "--no_fetch")
    assert out.returncode == 1 and "CORE eval bundle" in out.stderr and "word list" in out.stderr
    # the tok stage runs first: no trained tokenizer needed yet
    shutil.rmtree(base / "tokenizer")
    assert preflight(dict(env), "--stages", "tok,base", "--num_shards", "2", "--depth", "4").returncode == 0


def test_cpp_stage(tmp_path):
    """cpp_speedrun's stage: the MultiPL-E splits from a local copy or the hub, g++ and cargo
    on the PATH; without g++ and cargo (PATH with no compilers) both are named with their fix."""
    base = tmp_path / "base"
    task_data = tmp_path / "task_data"
    subprocess.run([sys.executable, "-m", "tasks.fixtures", str(task_data)], cwd=ROOT, check=True, capture_output=True)
    env = {"NANOCHAT_BASE_DIR": str(base), "HF_ENDPOINT": CLOSED, "NANOCHAT_TASK_DATA": str(task_data)}
    out = preflight(dict(env), "--stages", "cpp,tok", "--depth", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    out = preflight(dict(env, NANOCHAT_TASK_DATA=str(tmp_path / "empty")), "--stages", "cpp,tok", "--depth", "4")
    assert out.returncode == 1 and "nuprl/MultiPL-E (humaneval-cpp) test" in out.stderr
    assert "nuprl/MultiPL-E (mbpp-cpp) test" in out.stderr
    bare = tmp_path / "bin"  # only python itself on the PATH
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    out = preflight(dict(env, PATH=str(bare)), "--stages", "cpp,tok", "--depth", "4")
    assert out.returncode == 1 and "g++ not found" in out.stderr, out.stderr
    built = os.path.isfile(os.path.join(ROOT, "tools", "cpp_chunker", "target", "release", "cpp_chunker"))
    assert ("no cargo" in out.stderr) == (not built)


def test_the_shard_count_covers_base_trains_horizon():
    """The parameter count is base_train's own (value embeddings included: a d20 has 897M, the
    old estimate 561M), so speedrun.sh's and run1000.sh's shard counts cover 20 tokens per
    parameter once at ~4.8 characters a token (they were 240 and 800: some data seen twice)."""
    import re
    from scripts.preflight import model_params, shards_needed
    assert round(model_params(20) / 1e6) == 897 and round(model_params(32) / 1e6) == 2819
    for script, depth in (("speedrun.sh", 20), ("run1000.sh", 32)):
        shards = int(re.search(r"NUM_SHARDS:-(\d+)", open(os.path.join(ROOT, script)).read()).group(1))
        assert shards_needed(depth) <= shards <= 1.15 * shards_needed(depth), (script, shards, shards_needed(depth))
