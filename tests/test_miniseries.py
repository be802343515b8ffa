"""miniseries.sh and scripts/miniseries.py: the power-law fit, the commands per depth
(DRY_RUN), the guard against continuing a depth with other flags, and the CPU profile end
to end, interrupted and resumed."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from eval_bundle_fixture import make_bundle_zip

from scripts.miniseries import flag_mismatches, plot, power_law_fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(base_dir, **env):
    env = dict({k: v for k, v in os.environ.items() if k != "NANOCHAT_DATA_DIR"}, DRY_RUN="1", NPROC="8",
               NANOCHAT_BASE_DIR=str(base_dir), **env)
    out = subprocess.run(["bash", "miniseries.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def base_trains(cmds):
    return [c for c in cmds if "scripts.base_train" in c]


def test_power_law_fit_recovers_the_exponent():
    flops = np.logspace(15, 19, 7)
    a, b, r2 = power_law_fit(flops, 9.5 * flops ** -0.048)
    assert a == pytest.approx(9.5, rel=1e-9) and b == pytest.approx(-0.048, abs=1e-12) and r2 == pytest.approx(1.0)
    noisy = 9.5 * flops ** -0.048 * np.exp(np.random.default_rng(0).normal(0, 0.005, len(flops)))
    a, b, r2 = power_law_fit(flops, noisy)
    assert abs(b + 0.048) < 0.003 and 0.9 < r2 < 1.0
    assert power_law_fit([1e15], [1.0]) is None and power_law_fit([1e15, 1e15], [1.0, 0.9]) is None


def test_plots_without_core_or_with_one_depth(tmp_path):
    """No eval bundle (CORE not measured for any model) and a single depth: the plots are
    still written (an empty log axis once failed in matplotlib's layout)."""
    row = lambda depth, flops, core: dict(depth=depth, tag=f"miniseries_d{depth}", flops=flops, val_bpb=1.5 - depth / 10,
                                          core=core, tok_per_sec=1000.0, mfu=None)
    for rows, others in (([row(1, 5e10, None)], []), ([row(1, 5e10, None), row(2, 2e11, None)], [row(20, 4e18, 0.2)])):
        out = tmp_path / str(len(rows))
        out.mkdir()
        names = plot(rows, others, power_law_fit([r["flops"] for r in rows], [r["val_bpb"] for r in rows]), str(out))
        assert names == ["miniseries_bpb.png", "miniseries_core.png", "miniseries_throughput.png"]
        assert all((out / n).stat().st_size > 1000 for n in names)


def test_dry_run_one_base_train_per_depth(tmp_path):
    cmds = dry_run(tmp_path, DEPTHS="4 6 8", RATIO="12", MODEL_FLAGS="--param_count=scaling --window_pattern=SSSL")
    trains = base_trains(cmds)
    assert len(trains) == 3
    for d, cmd in zip((4, 6, 8), trains):
        assert cmd.startswith("torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- ")
        # the ratio sets the length (-1: no fixed step count)
        assert f" --depth={d} --model_tag=miniseries_d{d} --target_param_data_ratio=12 --num_iterations=-1 " in cmd
        assert "--resume_from_step" not in cmd
        assert cmd.endswith("--device_batch_size=32 --fp8=0 --param_count=scaling --window_pattern=SSSL")
    assert cmds[0] == "python -m scripts.preflight --stages=tok,base --depth=8 --num_shards=370"
    assert cmds[4] == "python -m scripts.preflight --stages=base_eval --min_free_gb=0"  # after the tokenizer
    assert cmds[-1] == "python -m scripts.miniseries report --series=miniseries --depths=4 6 8"
    assert not any("scripts.base_eval" in c for c in cmds)  # CORE comes from training's last step
    assert os.listdir(tmp_path) == []  # nothing ran

    # the defaults: base_train's ratio (20), deeper than d20 at half the batch; a step cap; own data
    cmds = dry_run(tmp_path, DEPTHS="20 22", NUM_ITERS="50", NANOCHAT_DATA_DIR=str(tmp_path / "shards"),
                   SERIES="hyb", WANDB_RUN="jan")
    trains = base_trains(cmds)
    assert ["--target_param_data_ratio=20 --num_iterations=50" in c for c in trains] == [True, True]
    assert "--device_batch_size=32" in trains[0] and "--device_batch_size=16" in trains[1]
    assert "--model_tag=hyb_d22" in trains[1] and "--run=jan_d22" in trains[1]
    assert not any("nanochat.dataset" in c for c in cmds) and "--num_shards=1" in cmds[0]

    # no eval bundle (offline): base_train does not try for CORE (set by the preflight's check;
    # torchrun would turn base_eval's exit code 3 for it into 1); with one, at the last step
    assert all("--core_metric_every=999999 " in c for c in trains)
    assert all("--core_metric_every=-1 " in c for c in base_trains(dry_run(tmp_path, DEPTHS="4", NO_BUNDLE="1")))

    # the CPU profile: no torchrun; builds the corpus and a tokenizer when there are none
    cmds = dry_run(tmp_path, CPU="1")
    assert cmds[0].startswith("python -m nanochat.corpus") and cmds[1] == "python -m scripts.tok_train --vocab_size=4096"
    assert [c.split()[:4] for c in base_trains(cmds)] == [["python", "-m", "scripts.base_train", f"--depth={d}"]
                                                          for d in (1, 2, 3)]
    assert all("--device_type=cpu" in c and "--num_iterations=30" in c for c in base_trains(cmds))


def test_flag_mismatches():
    ran = {"depth": 8, "target_param_data_ratio": 20.0, "mamba": True, "mhc": False, "data_dir": None,
           "window_pattern": "L", "run": "jan_d8", "fp8": 0, "device_batch_size": 32}
    same = ["--depth=8", "--target_param_data_ratio=20", "--mamba", "--window_pattern", "L", "--run=other", "--fp8=1",
            "--device_batch_size=16"]  # a re-run after an OOM, say
    assert flag_mismatches(ran, same) == []
    bad = flag_mismatches(ran, ["--depth=8", "--target_param_data_ratio=12", "--window_pattern=SSSL", "--fp8=0"])
    assert bad == ["--target_param_data_ratio: 20.0 in the checkpoint's run, 12 now",
                   "--mamba (on in the checkpoint's run, not given now)",
                   "--window_pattern: L in the checkpoint's run, SSSL now"]


def wait_for(path, proc, timeout):
    end = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "the series ended before the file appeared: " + proc.stdout.read()[-3000:]
        assert time.time() < end, f"no {path} after {timeout}s"
        time.sleep(0.05)


def test_cpu_profile_interrupted_resumed_and_reported(tmp_path, corpus_dir, tokenizer):
    """CPU=1 with two depths: killed while d2 trains, the re-run skips d1, resumes d2 from
    its last checkpoint, and writes the table, the fit and the plots into the report."""
    base = tmp_path / "base"
    shutil.copytree(tokenizer.directory, base / "tokenizer")
    env = dict(os.environ, CPU="1", DEPTHS="1 2", NUM_ITERS="12", SAVE_EVERY="4", CORE_MAX_PER_TASK="4",
               NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_DIR=corpus_dir, OMP_NUM_THREADS="1",
               NANOCHAT_EVAL_BUNDLE_URL=f"file://{make_bundle_zip(tmp_path / 'eval_bundle.zip')}")
    ckpt = base / "base_checkpoints"
    proc = subprocess.Popen(["bash", "miniseries.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(ckpt / "miniseries_d2" / "meta_000004.json", proc, 600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # the resume rule: d1 finished (skipped), d2 continues from its last checkpoint
    trains = base_trains(dry_run(base, **{k: env[k] for k in ("CPU", "DEPTHS", "NUM_ITERS", "SAVE_EVERY",
                                                              "CORE_MAX_PER_TASK", "NANOCHAT_DATA_DIR")}))
    assert len(trains) == 1 and "--depth=2 " in trains[0] and trains[0].endswith(" --resume_from_step=0")

    out = subprocess.run(["bash", "miniseries.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "# d1 (miniseries_d1): done" in out.stdout and "--depth=1 " not in out.stdout
    resumed = int(re.search(r"resumed from \S+miniseries_d2 step (\d+)", out.stdout).group(1))
    assert resumed in (4, 8)
    assert sorted(os.listdir(ckpt / "miniseries_d2")) == ["meta_000012.json", "model_000012.pt",
                                                          "state_000012_rank0.pt"]  # pruned
    # throughput of the steps after each process's first 10: d1's last 2 (no peak FLOP/s on a CPU: no MFU);
    # d2 ran 12 steps in two processes, so none of its steps were timed
    meta = json.loads((ckpt / "miniseries_d1" / "meta_000012.json").read_text())
    assert meta["timed_steps"] == 2 and meta["tok_per_sec"] > 0 and meta["mfu"] is None
    assert meta["core_metric"] is not None and meta["num_params"] > 0 and meta["flops_per_token"] > 0
    meta = json.loads((ckpt / "miniseries_d2" / "meta_000012.json").read_text())
    assert meta["timed_steps"] == 0 and meta["tok_per_sec"] is None

    report = base / "report"
    section = json.loads((report / "scaling-miniseries.json").read_text())["data"][0]
    assert section["models"] == 2 and section["not finished (or saved by an older base_train)"] == "none"
    assert math.isfinite(section["fit_exponent"]) and section["fit_r2"] == pytest.approx(1.0)  # two points
    rows = (report / "miniseries.csv").read_text().splitlines()
    assert rows[0].startswith("tag,depth,params,tokens") and [r.split(",")[0] for r in rows[1:]] == [
        "miniseries_d1", "miniseries_d2"]
    assert all(r.split(",")[7] != "" for r in rows[1:])  # CORE measured (the fixture bundle)
    for png in ("miniseries_bpb.png", "miniseries_core.png", "miniseries_throughput.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "report.md").read_text()
    assert "## Scaling miniseries" in md and "![miniseries_bpb.png](miniseries_bpb.png)" in md
    assert "power law fit: val bpb = " in md and "| miniseries_d2 | 2 |" in md
    # each model's own sections went to its own report directory, not the series'
    assert (base / "miniseries" / "miniseries_d2" / "base-model-training.json").exists()
    assert not (report / "base-model-training.json").exists()
    # a third run has nothing left to train; one that asks for other models stops, naming the flag
    same = dict(CPU="1", DEPTHS="1 2", NUM_ITERS="12", SAVE_EVERY="4", CORE_MAX_PER_TASK="4", NANOCHAT_DATA_DIR=corpus_dir)
    assert base_trains(dry_run(base, **same)) == []
    other = subprocess.run(["bash", "miniseries.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, DRY_RUN="1", NANOCHAT_BASE_DIR=str(base), **dict(same, NUM_ITERS="24")))
    assert other.returncode != 0 and "--num_iterations: 12 in the checkpoint's run, 24 now" in other.stderr
    assert "SERIES=" in other.stderr and "scripts.base_train" not in other.stdout
