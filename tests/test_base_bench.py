"""scripts.base_bench and scripts.engine_bench on the CPU: the JSON line each prints has the
figures docs/benchmarks.md quotes, consistent with each other (base_bench with and without
--fp8, engine_bench for a plain and a hybrid model)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("fp8", [0, 1])
def test_bench_prints_one_consistent_json_line(fp8):
    cmd = [sys.executable, "-m", "scripts.base_bench", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=2", "--total_batch_size=256", "--vocab_size=512", "--steps=2", "--warmup=1",
           "--compile=0", f"--fp8={fp8}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["fp8"] == fp8 and r["depth"] == 2 and r["n_embd"] == 128 and r["grad_accum"] == 2
    assert r["total_batch_size"] == 256 and r["steps"] == 2
    # tok/s is the tokens of the timed steps over their time
    assert r["tok_per_sec"] == pytest.approx(256 / (r["step_ms"] / 1000), rel=0.01)
    assert r["flops_per_token"] > 0 and 0 < r["loss"] < 10  # (MFU is 0 on a CPU: no known peak)


@pytest.mark.parametrize("pattern", ["", "AAM"])
def test_engine_bench_prints_one_consistent_json_line(pattern):
    # (its cache-size estimate builds a cache on the meta device: that once raised inside
    # init_cache, which asked autocast about "meta", and the script failed before any figure)
    # a plain model: its q, k, v stacked, a profile, bf16 Linear weights under autocast; a hybrid: fp32 weights
    extra = ["--weights=fp32", "--pdl=0"] if pattern else ["--stack_qkv=1", "--profile=3", "--weights=bf16_linears",
                                                "--temperature=0.8", "--top_k=50", "--inductor=combo_kernels=True"]
    cmd = [sys.executable, "-m", "scripts.engine_bench", "--device_type=cpu", "--depth=3", "--prompt_len=32",
           "--new_tokens=8", "--batch_sizes=1,2", f"--mamba_pattern={pattern}", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["depth"] == 3 and r["mamba_pattern"] == pattern and r["prompt_len"] == 32 and r["compile_mode"] is None
    assert [row["batch"] for row in r["results"]] == [1, 2]
    assert r["peak_bandwidth"] is None  # a CPU: no known peak, so no utilization figure
    assert r["stack_qkv"] == (not pattern) and r["decode_kernel"] == "sdpa"
    assert r["weights"] == ("fp32" if pattern else "bf16_linears") and r["pdl"] is False  # (a CPU: no PDL either way)
    assert (r["temperature"], r["top_k"], r["inductor"]) == ((0.0, 0, None) if pattern else (0.8, 50, "combo_kernels=True"))
    assert (out.stdout.count("Self CPU time total") == 2) == (not pattern)  # a profile per batch size
    for row in r["results"]:
        assert row["tokens"] == 8 and row["ttft_ms"] > 0 and row["bytes_per_step_mb"] > 0
        assert row["first_call_s"] * 1000 >= row["ttft_ms"]  # (the first call: prefill and all its decode steps)
        assert row["bandwidth_util_percent"] is None
        assert row["decode_tok_per_s"] == pytest.approx(row["batch"] / (row["decode_step_ms"] / 1000), rel=0.02)


def test_long_context_bench_runs_dense_and_dsa(tmp_path):
    """dev/long_context_bench.sh (issue 19's table) on tiny CPU shapes: one prefixed JSON line
    per run, the context, checkpointing and the DSA model (its indexer's parameters) as asked."""
    env = dict(os.environ, OUT=str(tmp_path), DEPTH="2", SEQS="128", MODES="dense dsa", CKPT="1", TOKENS="256",
               STEPS="1", OMP_NUM_THREADS="1",
               EXTRA="--device_type=cpu --compile=0 --vocab_size=512 --dsa_top_k=32 --dsa_start_layer=1")
    out = subprocess.run(["bash", "dev/long_context_bench.sh"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["d2-T128-dense-ckpt1", "d2-T128-dsa-ckpt1"], out.stdout
    dense, dsa = (json.loads(line.split(" ", 1)[1]) for line in lines)
    for r in (dense, dsa):
        assert r["seq_len"] == 128 and r["device_batch_size"] == 1 and r["gradient_checkpointing"] is True
        assert r["tok_per_sec"] > 0
    assert dsa["params"] > dense["params"]  # the indexer's weights
    assert (tmp_path / "long_context_bench.txt").read_text().strip().splitlines() == lines


def test_long_context_bench_says_when_a_run_times_out(tmp_path):
    """A run past RUN_TIMEOUT gets a line that says so (killed by an outer timeout, it printed
    nothing at all: twice on the H200, 2026-12-01)."""
    env = dict(os.environ, OUT=str(tmp_path), DEPTH="2", SEQS="128", MODES="dense", CKPT="1", TOKENS="256",
               STEPS="1", RUN_TIMEOUT="1", EXTRA="--device_type=cpu --compile=0 --vocab_size=512")
    out = subprocess.run(["bash", "dev/long_context_bench.sh"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "d2-T128-dense-ckpt1 timed out after 1 s (RUN_TIMEOUT)"


@pytest.mark.parametrize("value,says", [("no_such_setting=1", "torch._inductor.config has no 'no_such_setting'"),
                                        ("combo_kernels=yes", "give name=value with a Python literal value")])
def test_engine_bench_names_a_bad_inductor_setting(value, says):
    out = subprocess.run([sys.executable, "-m", "scripts.engine_bench", "--device_type=cpu", f"--inductor={value}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and says in out.stderr, out.stderr
