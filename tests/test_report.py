import os
import subprocess
import sys

from nanochat.report import Report, code_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_sections_summary_and_plots(tmp_path):
    r = Report(str(tmp_path / "report"))
    r.reset(root=ROOT)
    # logged out of pipeline order on purpose
    r.log("Base model evaluation", [{"Model": "d4 (step 60)", "CORE metric": 0.1234}])
    r.log("Tokenizer training", [{"vocab_size": 8192}, "a free-text line"])
    r.log("Chat evaluation sft", [{"ARC-Easy": 0.41, "GSM8K": 0.02, "ChatCORE": 0.05}])
    r.log_curve("base", "train loss", [(1, 9.0), (2, 8.0), (3, 7.5)])
    path = r.generate(copy_to=str(tmp_path))
    text = open(path).read()
    assert text.index("## Tokenizer training") < text.index("## Base model evaluation") < text.index("## Chat evaluation sft")
    assert "a free-text line" in text and "- vocab_size: 8192" in text
    assert "| CORE | 0.1234 | - | - | - |" in text
    assert "| ARC-Easy | - | - | 0.4100 | - |" in text and "| GSM8K | - | - | 0.0200 | - |" in text
    assert "| MMLU | - | - | - | - |" in text
    assert "Total wall clock time:" in text and "## Environment" in text and "- Lines:" in text
    png = tmp_path / "report" / "base_train-loss.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![base_train-loss.png](base_train-loss.png)" in text
    assert (tmp_path / "report.md").read_text() == text and (tmp_path / "base_train-loss.png").exists()
    # logging a section again replaces it
    r.log("Tokenizer training", [{"vocab_size": 4096}])
    assert "- vocab_size: 4096" in open(r.generate()).read()
    # reset starts over
    r.reset(root=ROOT)
    assert "## Tokenizer training" not in open(r.generate()).read()


def test_code_stats_counts_this_repo():
    s = code_stats(ROOT)
    assert s["Files"] > 20 and s["Lines"] > 2000 and s["Tokens (approx)"] == s["Characters"] // 4
    assert s["Dependencies (uv.lock lines)"] > 100


def test_cli(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    for cmd in ("reset", "generate"):
        out = subprocess.run([sys.executable, "-m", "nanochat.report", cmd], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "report.md").exists()
    bad = subprocess.run([sys.executable, "-m", "nanochat.report", "nope"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
