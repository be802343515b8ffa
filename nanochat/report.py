"""
The report card: every stage appends a section, `generate` assembles report.md.

    python -m nanochat.report reset      # start a new report (system info, code stats, start time)
    ... run the stages; each calls get_report().log(section=..., data=[...]) ...
    python -m nanochat.report generate   # -> $NANOCHAT_BASE_DIR/report/report.md and ./report.md

A section is stored twice in $NANOCHAT_BASE_DIR/report/ ($NANOCHAT_REPORT_DIR if set:
miniseries.sh gives each of its models its own): as markdown (what the report
shows) and as JSON (what the summary table reads). Stages may also log curves
(log_curve: (step, value) points), which generate plots as PNG next to report.md.

The summary table reads these keys: "CORE metric" from the section "Base model
evaluation"; "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE" and
the C++ ones "HumanEval-cpp", "MBPP-cpp", "C++ pass@1" (their mean) from "Chat evaluation
mid", "Chat evaluation sft" and "Chat evaluation rl".
"""

import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from nanochat.common import atomic_write, get_base_dir, get_dist_info

# the order sections appear in, whatever order the stages ran in
SECTION_ORDER = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                 "Base model evaluation", "Base model C++ evaluation", "Base model C++ FIM", "Midtraining",
                 "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
                 "Chat RL", "Chat evaluation rl"]
SUMMARY_METRICS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE",
                   "HumanEval-cpp", "MBPP-cpp", "C++ pass@1"]
STAGES = ["BASE", "MID", "SFT", "RL"]
CODE_EXTENSIONS = (".py", ".md", ".html", ".toml", ".sh", ".rs")


def slug(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 1e4:
        return f"{v:,}"
    return str(v)


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def system_info():
    import psutil
    import torch
    info = {"Date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "Platform": platform.platform(), "Python": platform.python_version(), "PyTorch": torch.__version__,
            "CPUs": os.cpu_count(), "Memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB"}
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["GPUs"] = f"{len(names)} x {names[0]}"
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = bool(_run(["git", "status", "--porcelain"]))
        info["Git"] = f"{_run(['git', 'rev-parse', '--abbrev-ref', 'HEAD'])} @ {commit}" + (" (dirty)" if dirty else "")
    return info


def code_stats(root):
    """Characters, lines, files and approximate tokens (chars / 4) of the project's code
    and docs (git-tracked files when in a git checkout), and uv.lock's size."""
    files = _run(["git", "-C", root, "ls-files"]).splitlines()
    if not files:
        files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
    files = [f for f in files if f.endswith(CODE_EXTENSIONS) and "fixtures" not in f]
    chars = lines = 0
    for f in files:
        try:
            with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        chars += len(text)
        lines += text.count("\n")
    lock = os.path.join(root, "uv.lock")
    deps = sum(1 for _ in open(lock)) if os.path.exists(lock) else 0
    return {"Characters": chars, "Lines": lines, "Files": len(files), "Tokens (approx)": chars // 4,
            "Dependencies (uv.lock lines)": deps}


class Report:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def log(self, section, data):
        """Append (or replace) a section. data: a list of dicts and strings."""
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        md = [f"## {section}", f"timestamp: {now}", ""]
        for item in data:
            if isinstance(item, dict):
                md += [f"- {k}: {_fmt(v)}" for k, v in item.items()]
            else:
                md.append(str(item))
        atomic_write(os.path.join(self.dir, slug(section) + ".md"), lambda f: f.write("\n".join(md) + "\n"), mode="w")
        atomic_write(os.path.join(self.dir, slug(section) + ".json"),
                     lambda f: json.dump({"section": section, "timestamp": now, "data": data}, f, default=str), mode="w")

    def log_curve(self, stage, name, points):
        """points: [(step, value), ...]; plotted by generate() as <stage>_<name>.png."""
        atomic_write(os.path.join(self.dir, f"curve_{slug(stage)}_{slug(name)}.json"),
                     lambda f: json.dump({"stage": stage, "name": name, "points": points}, f), mode="w")

    def reset(self, root=None):
        for f in glob.glob(os.path.join(self.dir, "*")):
            os.remove(f)
        header = {"system": system_info(), "code": code_stats(root or os.getcwd()),
                  "start": datetime.datetime.now().timestamp()}
        atomic_write(os.path.join(self.dir, "header.json"), lambda f: json.dump(header, f), mode="w")

    def _sections(self):
        out = {}
        for path in glob.glob(os.path.join(self.dir, "*.json")):
            name = os.path.basename(path)
            if name == "header.json" or name.startswith("curve_"):
                continue
            with open(path) as f:
                j = json.load(f)
            out[j["section"]] = j
        return out

    def summary(self, sections):
        """{metric: {stage: value}} from the sections' JSON."""
        def lookup(section, key):
            for item in sections.get(section, {}).get("data", []):
                if isinstance(item, dict) and key in item:
                    return item[key]
            return None
        table = {m: {s: None for s in STAGES} for m in SUMMARY_METRICS}
        table["CORE"]["BASE"] = lookup("Base model evaluation", "CORE metric")
        for stage in ("MID", "SFT", "RL"):
            for m in SUMMARY_METRICS[1:]:
                table[m][stage] = lookup(f"Chat evaluation {stage.lower()}", m)
        return table

    def plot_curves(self):
        """One PNG per logged curve; returns their file names."""
        paths = sorted(glob.glob(os.path.join(self.dir, "curve_*.json")))
        if not paths:
            return []
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        out = []
        for path in paths:
            with open(path) as f:
                c = json.load(f)
            if not c["points"]:
                continue
            steps, values = zip(*c["points"])
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(steps, values)
            ax.set_xlabel("step")
            ax.set_ylabel(c["name"])
            ax.set_title(f"{c['stage']}: {c['name']}")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            name = f"{slug(c['stage'])}_{slug(c['name'])}.png"
            fig.savefig(os.path.join(self.dir, name), dpi=100)
            plt.close(fig)
            out.append(name)
        return out

    def generate(self, copy_to=None):
        """Write report.md (header, sections in pipeline order, plots, summary table)."""
        header_path = os.path.join(self.dir, "header.json")
        header = json.load(open(header_path)) if os.path.exists(header_path) else None
        sections = self._sections()
        lines = ["# nanochat training report", ""]
        if header:
            lines += ["## Environment", ""] + [f"- {k}: {v}" for k, v in header["system"].items()] + [""]
            lines += ["## Code", ""] + [f"- {k}: {_fmt(v)}" for k, v in header["code"].items()] + [""]
        order = SECTION_ORDER + sorted(s for s in sections if s not in SECTION_ORDER)
        for name in order:
            if name in sections:
                with open(os.path.join(self.dir, slug(name) + ".md")) as f:
                    lines += [f.read().rstrip(), ""]
        plots = self.plot_curves()
        if plots:
            lines += ["## Curves", ""] + [f"![{p}]({p})" for p in plots] + [""]
        table = self.summary(sections)
        lines += ["## Summary", "", "| Metric | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
        for m in SUMMARY_METRICS:
            cells = ["-" if table[m][s] is None else f"{float(table[m][s]):.4f}" for s in STAGES]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        if header:
            secs = datetime.datetime.now().timestamp() - header["start"]
            lines += ["", f"Total wall clock time: {int(secs // 3600)}h{int(secs % 3600 // 60)}m{int(secs % 60)}s"]
        text = "\n".join(lines) + "\n"
        path = os.path.join(self.dir, "report.md")
        atomic_write(path, lambda f: f.write(text), mode="w")
        if copy_to:
            dest = os.path.join(copy_to, "report.md")
            atomic_write(dest, lambda f: f.write(text), mode="w")
            for p in sorted(glob.glob(os.path.join(self.dir, "*.png"))):  # so ./report.md's images resolve too
                shutil.copy(p, os.path.join(copy_to, os.path.basename(p)))
        return path


class DummyReport:
    """What ranks other than 0 get: logging is a no-op, so sections are written once."""

    def log(self, *args, **kwargs):
        pass

    def log_curve(self, *args, **kwargs):
        pass


def report_dir():
    return os.environ.get("NANOCHAT_REPORT_DIR") or os.path.join(get_base_dir(), "report")


def get_report():
    return Report(report_dir()) if get_dist_info()[1] == 0 else DummyReport()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("generate", "reset"):
        print("usage: python -m nanochat.report generate|reset", file=sys.stderr)
        return 2
    report = get_report()
    if argv[0] == "reset":
        report.reset()
        print(f"new report started in {report.dir}")
    else:
        path = report.generate(copy_to=os.getcwd())
        print(f"wrote {path} (and ./report.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
