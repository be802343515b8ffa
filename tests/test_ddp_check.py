"""dev/ddp_check.py on CPU: 1 process vs 2 (gloo) on the same batches; the script parses
both logs, reports throughput and the loss difference, and does not re-run a finished run."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ddp_check_on_cpu(tmp_path, tokenizer, corpus_dir):
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "dev/ddp_check.py", "--nprocs=1,2", "--depth=2", "--steps=4", "--skip=1",
           "--device_batch_size=2", "--max_seq_len=64", "--total_batch_size=256", f"--data_dir={corpus_dir}",
           f"--log_dir={tmp_path / 'logs'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    one, two = summary["runs"]["1"], summary["runs"]["2"]
    assert one["scaling_efficiency"] == 1.0 and one["max_abs_loss_diff"] == 0
    assert two["tok_per_sec"] > 0 and two["max_abs_loss_diff"] < 1e-3 * one["final_loss"]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.count("complete, not run again") == 2
