"""
Multi-GPU check: run scripts.base_train on 1 GPU and on N GPUs (torchrun) with the same
total batch and --data_order=global, so every step of every run trains on the same
batches (N GPUs use 1/N of the accumulation steps). Prints the step losses side by
side, tokens/s per GPU, the scaling efficiency, and one JSON line at the end.

    python dev/ddp_check.py --nprocs=1,8 --depth=20 --steps=40

Each run's log goes to --log_dir; a run whose log is complete is not run again, so the
check can be split over several sessions (e.g. `--nprocs=1`, later `--nprocs=1,2`).
Timing leaves out the first --skip steps (compilation, warmup).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

p = argparse.ArgumentParser(description="1 GPU vs N GPUs: same batches, compare losses and throughput")
p.add_argument("--nprocs", default="1,2", help="process counts to run, comma separated; the first is the reference")
p.add_argument("--depth", type=int, default=20)
p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
p.add_argument("--skip", type=int, default=5, help="steps left out of the timing (compilation)")
p.add_argument("--device_batch_size", type=int, default=32)
p.add_argument("--max_seq_len", type=int, default=2048)
p.add_argument("--total_batch_size", type=int, default=524288)
p.add_argument("--window_pattern", default="L")
p.add_argument("--data_dir", default=None)
p.add_argument("--log_dir", default="ddp_check_logs")
args = p.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.makedirs(args.log_dir, exist_ok=True)
STEP = re.compile(r"step (\d+)/\d+ .*?\(step: ([\d.]+)\) .*?\| dt: ([\d.]+)ms")


def run(nproc):
    log = os.path.join(args.log_dir, f"d{args.depth}_{args.window_pattern}_{nproc}gpu.log")
    if os.path.exists(log) and len(STEP.findall(open(log).read())) == args.steps:
        print(f"{log}: complete, not run again")
        return log
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "scripts.base_train", *(["--"] if nproc > 1 else []),
           f"--depth={args.depth}", f"--max_seq_len={args.max_seq_len}", f"--window_pattern={args.window_pattern}",
           f"--device_batch_size={args.device_batch_size}", f"--total_batch_size={args.total_batch_size}",
           f"--num_iterations={args.steps}", "--eval_every=-1", "--eval_tokens=1", "--core_metric_every=-1",
           "--sample_every=-1", "--data_order=global", f"--model_tag=ddp_check_{nproc}gpu", "--run=dummy",
           *([f"--data_dir={args.data_dir}"] if args.data_dir else [])]
    print("+ " + " ".join(cmd), flush=True)
    with open(log + ".tmp", "w") as f:  # a log only counts once the run finished
        rc = subprocess.run(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"run on {nproc} GPU(s) failed (exit {rc}); see {log}.tmp")
    os.replace(log + ".tmp", log)
    return log


results = {}
for n in [int(x) for x in args.nprocs.split(",")]:
    rows = STEP.findall(open(run(n)).read())
    losses = [float(l) for _, l, _ in rows]
    dts = [float(dt) / 1000 for _, _, dt in rows][args.skip:]
    tok_s = args.total_batch_size / statistics.mean(dts)
    results[n] = {"losses": losses, "step_ms": round(1000 * statistics.mean(dts), 1), "tok_per_sec": round(tok_s),
                  "tok_per_sec_per_gpu": round(tok_s / n)}

ref_n = next(iter(results))
ref = results[ref_n]
print(f"{'step':>5} " + " ".join(f"{f'{n} GPU loss':>12}" for n in results))
for i in range(len(ref["losses"])):
    print(f"{i + 1:>5} " + " ".join(f"{r['losses'][i]:>12.6f}" for r in results.values()))
summary = {"depth": args.depth, "window_pattern": args.window_pattern, "steps": args.steps,
           "total_batch_size": args.total_batch_size, "timed_steps": args.steps - args.skip, "runs": {}}
for n, r in results.items():
    diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
    summary["runs"][n] = {k: r[k] for k in ("step_ms", "tok_per_sec", "tok_per_sec_per_gpu")} | {
        "scaling_efficiency": round(r["tok_per_sec_per_gpu"] / ref["tok_per_sec_per_gpu"] * ref_n, 4),
        "final_loss": r["losses"][-1], "max_abs_loss_diff": round(max(diffs), 6),
        "mean_abs_loss_diff": round(statistics.mean(diffs), 6)}
    print(f"{n} GPU(s): {r['tok_per_sec']:,} tok/s ({r['tok_per_sec_per_gpu']:,} per GPU, "
          f"{summary['runs'][n]['scaling_efficiency']:.1%} of linear), step {r['step_ms']} ms, "
          f"loss vs {ref_n} GPU: max |diff| {max(diffs):.5f}, mean {statistics.mean(diffs):.5f}")
print(json.dumps(summary))
