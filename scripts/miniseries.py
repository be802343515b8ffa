"""
The scaling miniseries' bookkeeping and report; miniseries.sh calls it for each depth.

    python -m scripts.miniseries status --tag=miniseries_d8 -- BASE_TRAIN_FLAGS  # fresh|resume|evaluate|done
    python -m scripts.miniseries prune --tag=miniseries_d8     # a finished depth keeps only its last checkpoint
    python -m scripts.miniseries report --series=miniseries --depths="8 10 12" [--compare=d20]  # + report.md

The series follows the reference nanochat's miniseries.sh (January 2026): base models of
increasing depth, each trained at the same tokens:params ratio, so that loss and CORE can
be read against training compute. Everything the report shows comes from the checkpoints
(meta_<step>.json: parameters, FLOPs per token, tokens, val bpb, CORE at the last step,
mean tok/s and MFU, as base_train saves them; CORE from base_eval's CSV where training
could not measure it), never from parsing logs; so a re-run knows what is done without
having seen it happen.

The fit is a pure power law, bpb = a * C^b with C the training FLOPs, by least squares on
log bpb against log C (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", fit
L(C) this way). b < 0; each 10x of compute multiplies bpb by 10^b. A law with an
irreducible term, L = E + A C^-alpha (Hoffmann et al. 2022), needs more points than a
miniseries has to pin E down, so it is not fitted here.
"""

import argparse
import csv
import glob
import io
import json
import os
import re
import sys

# base_train flags that change how a run goes, not what it trains: they may differ between a
# depth's checkpoint and a re-run of the series (e.g. a smaller DEVICE_BATCH_SIZE after an OOM)
FREE_FLAGS = {"run", "resume_from_step", "device_batch_size", "fp8", "compile", "no_compile", "kernel",
              "gradient_checkpointing", "eval_every", "eval_tokens", "save_every", "sample_every",
              "core_metric_every", "core_metric_max_per_task"}


def base_dir():
    """nanochat.common.get_base_dir without importing torch: status runs once per depth,
    in DRY_RUN too, where the environment may not be installed yet."""
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")


def ckpt_dir(tag):
    return os.path.join(base_dir(), "base_checkpoints", tag)  # checkpoint_manager.checkpoint_dir's layout


def last_meta(directory):
    """(step, meta) of the newest complete checkpoint (meta None if its JSON is damaged), or (None, None)."""
    steps = sorted(int(m.group(1)) for f in glob.glob(os.path.join(directory, "meta_*.json"))
                   if (m := re.search(r"meta_(\d+)\.json$", f)))
    if not steps:
        return None, None
    try:
        with open(os.path.join(directory, f"meta_{steps[-1]:06d}.json")) as f:
            return steps[-1], json.load(f)
    except ValueError:
        return steps[-1], None


def read_core(tag, step, meta):
    """The model's CORE: base_train's at its last step (in the meta), else base_eval's CSV; or None."""
    if meta.get("core_metric") is not None:
        return meta["core_metric"]
    path = os.path.join(base_dir(), "base_eval", f"{tag}_{step}.csv")  # where scripts/base_eval writes it
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row["task"] == "CORE":
                    return float(row["centered"])
    return None


def finished(meta):
    return meta is not None and meta.get("num_iterations") is not None and meta["step"] >= meta["num_iterations"]


def depth_state(tag):
    """fresh (no checkpoint), resume (an unfinished run), evaluate (trained, no CORE yet), done."""
    step, meta = last_meta(ckpt_dir(tag))
    if step is None:
        return "fresh", None
    if not finished(meta):  # a damaged latest meta too: base_train resumes from the step before it
        return "resume", meta
    return ("done" if read_core(tag, step, meta) is not None else "evaluate"), meta


def parse_flags(argv):
    """{name: value} of --name=value, --name value and bare --name (True) flags."""
    flags, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise SystemExit(f"unexpected argument {a!r}: base_train flags are --name=value")
        name, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = True
        flags[name] = value
        i += 1
    return flags


def flag_mismatches(user_config, argv):
    """The base_train flags of argv whose value differs from the checkpoint's run (its
    user_config), and the switches (--mamba, ...) that run had on and argv leaves out. A
    valued flag that argv leaves out is not compared (its default is base_train's to know):
    miniseries.sh gives every flag it varies, and a model changed by dropping a flag from
    MODEL_FLAGS needs a new SERIES name."""
    flags = parse_flags(argv)
    out = []
    for name, old in user_config.items():
        if name in FREE_FLAGS:
            continue
        if name not in flags:
            if old is True:
                out.append(f"--{name} (on in the checkpoint's run, not given now)")
            continue
        new = flags[name]
        try:
            if isinstance(old, bool):
                same = old == (new is True or str(new).lower() in ("1", "true"))
            elif old is None or isinstance(old, str):
                same = str(old) == str(new)
            else:
                same = type(old)(new) == old
        except ValueError:
            same = False
        if not same:
            out.append(f"--{name}: {old} in the checkpoint's run, {new} now")
    return out


def cmd_status(args, train_flags):
    state, meta = depth_state(args.tag)
    if meta is not None and "user_config" in meta:
        bad = flag_mismatches(meta["user_config"], train_flags)
        if bad:
            raise SystemExit(f"{ckpt_dir(args.tag)} holds a run with other flags than this series asks for:\n  "
                             + "\n  ".join(bad) + "\nTo keep it, give this series another name (SERIES=...); "
                             f"to train this depth again, remove that directory.")
    print(state)


def cmd_prune(args):
    """Remove a finished depth's checkpoints before its last (metas first, so a step on
    disk is always either complete or not listed at all)."""
    directory = ckpt_dir(args.tag)
    step, meta = last_meta(directory)
    if not finished(meta):
        print(f"{directory}: not finished, nothing pruned")
        return
    removed = 0
    for path in glob.glob(os.path.join(directory, "meta_*.json")):
        s = int(re.search(r"meta_(\d+)\.json$", path).group(1))
        if s < step:
            os.remove(path)
            for f in glob.glob(os.path.join(directory, f"model_{s:06d}*.pt")) + \
                    glob.glob(os.path.join(directory, f"state_{s:06d}_rank*.pt")):
                os.remove(f)
            removed += 1
    print(f"{directory}: kept step {step}, removed {removed} earlier checkpoint(s)")


# -----------------------------------------------------------------------------
# the report


def power_law_fit(flops, bpb):
    """(a, b, r2) of bpb = a * flops^b, least squares in log-log space; None with fewer than
    two distinct compute budgets."""
    import numpy as np
    x, y = np.log10(np.asarray(flops, dtype=float)), np.log10(np.asarray(bpb, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    b, log_a = np.polyfit(x, y, 1)
    resid = y - (log_a + b * x)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
    return float(10 ** log_a), float(b), r2


def model_row(tag):
    """The table row of a finished base model, or None if it is not finished."""
    step, meta = last_meta(ckpt_dir(tag))
    if not finished(meta) or "flops_per_token" not in meta:
        return None
    tokens = meta["total_batch_size"] * step
    return {"tag": tag, "depth": meta["model_config"]["n_layer"], "params": meta["num_params"],
            "scaling_params": meta["num_scaling_params"], "steps": step, "tokens": tokens,
            "tokens_per_param": tokens / meta["num_params"], "flops": meta["flops_per_token"] * tokens,
            "val_bpb": meta["val_bpb"], "core": read_core(tag, step, meta),
            "train_min": meta["train_time"] / 60, "tok_per_sec": meta["tok_per_sec"], "mfu": meta["mfu"]}


COLUMNS = [("depth", "depth", "{}"), ("params", "params", "{:,}"), ("tokens", "tokens", "{:,}"),
           ("tokens/param", "tokens_per_param", "{:.3g}"), ("training FLOPs", "flops", "{:.2e}"),
           ("val bpb", "val_bpb", "{:.4f}"), ("CORE", "core", "{:.4f}"), ("train min", "train_min", "{:.1f}"),
           ("tok/s", "tok_per_sec", "{:,.0f}"), ("MFU %", "mfu", "{:.1f}")]


def table_markdown(rows):
    lines = ["| model | " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = ["-" if r[k] is None else fmt.format(r[k]) for _, k, fmt in COLUMNS]
        lines.append(f"| {r['tag']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, others, fit, out_dir):
    """miniseries_bpb.png, miniseries_core.png, miniseries_throughput.png in out_dir; their names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter
    from nanochat.common import atomic_write

    def save(fig, name):
        fig.tight_layout()
        atomic_write(os.path.join(out_dir, name), lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        return name

    def scatter(ax, key):
        for group, style in ((rows, dict(marker="o", color="C0")), (others, dict(marker="*", s=150, color="C3"))):
            pts = [r for r in group if r[key] is not None]
            ax.scatter([r["flops"] for r in pts], [r[key] for r in pts], zorder=3, **style)
            for r in pts:
                ax.annotate(f"d{r['depth']}" if group is rows else r["tag"], (r["flops"], r[key]),
                            textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        if not any(r[key] is not None for r in rows + others):  # e.g. no CORE without the eval bundle:
            flops = [r["flops"] for r in rows + others]      # empty log axes would keep limits (0, 1) and fail
            ax.set_xlim(min(flops) / 2, max(flops) * 2)
        ax.xaxis.set_minor_formatter(NullFormatter())  # within a decade they overlap
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3, which="both")

    names = []
    fig, ax = plt.subplots(figsize=(6, 4))
    scatter(ax, "val_bpb")
    if fit:
        a, b, r2 = fit
        c = np.logspace(*np.log10([min(r["flops"] for r in rows + others), max(r["flops"] for r in rows + others)]), 50)
        ax.plot(c, a * c ** b, "--", color="C1", label=f"bpb = {a:.3g} C^{b:.4f}  (R² {r2:.3f})")
        ax.legend(fontsize=8)
    ax.set_ylabel("val bpb")
    ax.set_title("val bits per byte vs training compute")
    names.append(save(fig, "miniseries_bpb.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    scatter(ax, "core")
    ax.set_ylabel("CORE")
    ax.set_title("CORE vs training compute" + ("" if any(r["core"] is not None for r in rows) else " (not measured)"))
    names.append(save(fig, "miniseries_core.png"))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"d{r['depth']}" for r in rows] + [r["tag"] for r in others]
    ax1.bar(labels, [r["tok_per_sec"] or 0 for r in rows + others], color="C0")
    ax1.set_ylabel("tokens/s (mean over timed steps)")
    ax2.bar(labels, [r["mfu"] or 0 for r in rows + others], color="C2")
    ax2.set_ylabel("MFU %")
    if not any(r["mfu"] for r in rows + others):
        ax2.text(0.5, 0.5, "no MFU: the device's peak FLOP/s is unknown", ha="center", transform=ax2.transAxes)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("training throughput per model")
    names.append(save(fig, "miniseries_throughput.png"))
    return names


def cmd_report(args):
    from nanochat.common import atomic_write
    from nanochat.report import get_report
    tags = [f"{args.series}_d{d}" for d in args.depths.split()]
    rows = [r for r in map(model_row, tags) if r is not None]
    missing = [t for t in tags if t not in {r["tag"] for r in rows}]
    others = [r for r in map(model_row, args.compare.split()) if r is not None]
    if not rows:
        raise SystemExit(f"no finished model of the series {args.series!r} (depths {args.depths}): "
                         "run miniseries.sh first")
    rows.sort(key=lambda r: r["flops"])
    fit = power_law_fit([r["flops"] for r in rows], [r["val_bpb"] for r in rows])
    report = get_report()
    os.makedirs(report.dir, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["tag"] + [k for _, k, _ in COLUMNS])
    for r in rows + others:
        w.writerow([r["tag"]] + ["" if r[k] is None else r[k] for _, k, _ in COLUMNS])
    atomic_write(os.path.join(report.dir, "miniseries.csv"), lambda f: f.write(buf.getvalue()), mode="w")
    images = plot(rows, others, fit, report.dir)
    fit_line = ("power law: fewer than two compute budgets, no fit" if fit is None else
                f"power law fit: val bpb = {fit[0]:.4g} * FLOPs^{fit[1]:.4f} (R² {fit[2]:.3f}); "
                f"each 10x of compute multiplies bpb by {10 ** fit[1]:.3f}")
    print(table_markdown(rows + others) + "\n" + fit_line)
    report.log(section="Scaling miniseries", data=[
        {"series": args.series, "models": len(rows), "not finished (or saved by an older base_train)": " ".join(missing) or "none",
         "fit_a": fit[0] if fit else None, "fit_exponent": fit[1] if fit else None, "fit_r2": fit[2] if fit else None},
        "", table_markdown(rows + others), "", fit_line, ""] + [f"![{n}]({n})" for n in images])
    path = report.generate(copy_to=os.getcwd())
    print(f"wrote the table (miniseries.csv), {', '.join(images)} and the section to {report.dir}; "
          f"then {path} (and ./report.md)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_flags = []
    if "--" in argv:  # status: the depth's base_train flags follow
        i = argv.index("--")
        argv, train_flags = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="The scaling miniseries: per-depth state, pruning and the report")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="print fresh|resume|evaluate|done for a model tag (then -- its base_train flags)")
    s.add_argument("--tag", required=True)
    s = sub.add_parser("prune", help="a finished model keeps only its last checkpoint")
    s.add_argument("--tag", required=True)
    s = sub.add_parser("report", help="table, power-law fit and plots of the finished models, into the report")
    s.add_argument("--series", required=True, help="the models are base_checkpoints/<series>_d<depth>")
    s.add_argument("--depths", required=True, help="space-separated depths, e.g. '8 10 12'")
    s.add_argument("--compare", default="", help="other base model tags to mark on the plots (e.g. d20 of "
                   "speedrun.sh); not part of the fit")
    args = p.parse_args(argv)
    if args.cmd == "status":
        cmd_status(args, train_flags)
    elif args.cmd == "prune":
        cmd_prune(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
