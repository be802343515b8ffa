"""speedrun.sh and run1000.sh in dry-run mode: every stage's command, with the flags
set at the top of the script, and nothing executed."""

import json
import os
import shutil
import subprocess
import sys

from eval_bundle_fixture import make_bundle_zip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script, **env):
    out = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, DRY_RUN="1", NPROC="8", **env))
    assert out.returncode == 0, out.stderr
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_speedrun_dry_run(tmp_path):
    cmds = dry_run("speedrun.sh", NANOCHAT_BASE_DIR=str(tmp_path))
    # the preflight first, for the stages and size this run will have; then the report
    assert cmds[0] == "python -m scripts.preflight --depth=20 --num_shards=370"
    assert cmds[1] == "python -m nanochat.report reset" and cmds[-1] == "python -m nanochat.report generate"
    joined = "\n".join(cmds)
    for expected in ["python -m nanochat.dataset -n 8", "python -m nanochat.dataset -n 370",
                     "python -m scripts.tok_train --max_chars=2000000000", "python -m scripts.tok_eval",
                     "torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --device_batch_size=32 --run=dummy",
                     "torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --model_tag=d20",
                     "torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size=32 --run=dummy --model_tag=d20",
                     "torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i mid -g d20",
                     "torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=dummy --model_tag=d20",
                     "torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft -g d20"]:
        assert expected in joined
    assert "chat_rl" not in joined  # optional, as in nanochat
    assert "chat_rl" not in "\n".join(dry_run("speedrun.sh", NANOCHAT_BASE_DIR=str(tmp_path), RL="0"))  # (RL=0 ran it)
    rl = dry_run("speedrun.sh", NANOCHAT_BASE_DIR=str(tmp_path), RL="1")
    assert "scripts.chat_rl -- --run=dummy --model_tag=d20" in "\n".join(rl)
    assert rl[0] == "python -m scripts.preflight --depth=20 --num_shards=370 --rl"
    assert os.listdir(tmp_path) == []  # nothing ran
    # the GPUs CUDA_VISIBLE_DEVICES allows, not every GPU of the node
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    out = subprocess.run(["bash", "speedrun.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(env, DRY_RUN="1", CUDA_VISIBLE_DEVICES="2,5", NANOCHAT_BASE_DIR=str(tmp_path)))
    assert "--nproc_per_node=2 " in out.stdout, out.stdout + out.stderr
    # a base directory holding another run's models: stop before a new tokenizer orphans them
    (tmp_path / "base_checkpoints" / "d32").mkdir(parents=True)
    out = subprocess.run(["bash", "speedrun.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, DRY_RUN="1", NPROC="8", NANOCHAT_BASE_DIR=str(tmp_path)))
    assert out.returncode == 1 and "(d32) that a new tokenizer would orphan" in out.stdout
    assert "--model_tag=d20" in "\n".join(dry_run("speedrun.sh", NANOCHAT_BASE_DIR=str(tmp_path), REPLACE_RUNS="1"))


def test_run1000_dry_run_and_overrides():
    cmds = "\n".join(dry_run("run1000.sh"))
    assert "--depth=32 --device_batch_size=16" in cmds and "nanochat.dataset -n 1150" in cmds
    assert cmds.startswith("python -m scripts.preflight --depth=32 --num_shards=1150\n")
    cmds = "\n".join(dry_run("speedrun.sh", DEPTH="26", WANDB_RUN="d26"))
    assert "--depth=26 --device_batch_size=32 --run=d26 --fp8=0" in cmds
    assert "--run=dummy --fp8=1" in "\n".join(dry_run("speedrun.sh", FP8="1"))


def test_runcpu_short_profile(tmp_path):
    """README's main command, end to end, in a short profile (same stages, fewer steps,
    smaller corpus), with CORE on the fixture bundle served as a file:// zip."""
    zpath = make_bundle_zip(tmp_path / "eval_bundle.zip")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), ITERS="4", CORPUS_MB="1",
               CHAT_ITERS="4", NANOCHAT_EVAL_BUNDLE_URL=f"file://{zpath}",
               # the chat stages on the stand-in the script generates, even where the hub is
               # reachable: a test must not depend on the network or a shared HF cache
               NANOCHAT_TASK_DATA=str(tmp_path / "base" / "task_fixtures"), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    env.pop("NANOCHAT_DATA_DIR", None)
    out = subprocess.run(["bash", "dev/runcpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "base" / "report" / "report.md").read_text()
    for section in ("## Tokenizer training", "## Tokenizer evaluation", "## Base model training",
                    "## Base model loss", "## Base model evaluation", "## Midtraining", "## Chat evaluation mid",
                    "## Chat SFT", "## Chat evaluation sft", "## Chat RL", "## Chat evaluation rl", "## Summary"):
        assert section in report
    core_row = next(line for line in report.splitlines() if line.startswith("| CORE |"))
    assert core_row.split("|")[2].strip() != "-"  # measured, not missing
    arc_row = next(line for line in report.splitlines() if line.startswith("| ARC-Easy |"))
    assert [c.strip() != "-" for c in arc_row.split("|")[2:6]] == [False, True, True, False]  # mid, sft; not rl
    gsm_row = next(line for line in report.splitlines() if line.startswith("| GSM8K |"))
    assert gsm_row.split("|")[5].strip() != "-"  # rl
    assert (tmp_path / "base" / "report" / "base_train-loss.png").exists()
    assert "step 00004/00004" in out.stdout
    assert "python -m scripts.chat_web" in out.stdout.splitlines()[-2]  # where to go next


def test_cpp_speedrun_dry_run(tmp_path):
    """The C++ pipeline: preflight, cpp_data over the roots, a tokenizer on that C++, the seed's
    model flags (the TPU and streaming ones named as left out), bpb, the C++ evals, the report."""
    cmds = dry_run("cpp_speedrun.sh", NANOCHAT_BASE_DIR=str(tmp_path), ROOTS="/src/fmt /src/json")
    data = f"{tmp_path}/cpp_data"
    assert cmds[0] == "python -m scripts.preflight --stages=cpp,tok --depth=24"
    assert cmds[1] == "python -m nanochat.report reset" and cmds[-1] == "python -m nanochat.report generate"
    assert cmds[2] == f"python -m scripts.cpp_data --roots /src/fmt /src/json --mode=compilable --max_tokens=65536 --out={data}"
    assert cmds[3] == f"python -m scripts.tok_train --data_dir={data} --vocab_size=32768 --max_chars=2000000000 --overwrite"
    train = next(c for c in cmds if "scripts.base_train" in c)
    assert train.startswith("torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24 "
                            "--max_seq_len=65536 --device_batch_size=1 --total_batch_size=524288 --num_iterations=50000")
    seed = ("--window_pattern=L --mamba --mamba_pattern=AAM --mamba3_qknorm --mamba3_bias --mamba3_complex_rope "
            "--mamba3_trapezoidal --engram --engram_layers=0,3,6 --mhc --mtp --mtp_lambda=0.3 --dsa --dsa_start_layer=7 "
            "--gradient_checkpointing --fim_rate=0.5 --rope_base=10000000")
    assert seed in train and f"--data_dir={data}" in train and "--model_tag=cpp_d24" in train
    assert "--tensor_parallel" not in train and "--streaming_data" not in train
    assert any(c.endswith(f"scripts.base_eval -- --model_tag=cpp_d24 --core=0 --cpp=1 --fim={data} -n 10 -t 0.8")
               for c in cmds)
    assert os.listdir(tmp_path) == []  # nothing ran
    roots = tmp_path / "roots.txt"
    cmds = dry_run("cpp_speedrun.sh", NANOCHAT_BASE_DIR=str(tmp_path), ROOTS_FILE=str(roots), DEPTH="12", MODE="file")
    assert f"--roots_file {roots} --mode=file" in cmds[2] and "--model_tag=cpp_d12" in "\n".join(cmds)
    out = subprocess.run(["bash", "cpp_speedrun.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k not in ("ROOTS", "ROOTS_FILE")} | {"DRY_RUN": "1"})
    assert out.returncode == 1 and "set ROOTS" in out.stderr


def test_cpp_runcpu_profile(tmp_path):
    """dev/cpp_runcpu.sh end to end: C++ shards from the compiler's own headers, a tokenizer,
    a 4-layer model with every built extension of the seed's, bpb, HumanEval-cpp / MBPP-cpp
    through g++, FIM on held-out documents, the report card."""
    base = tmp_path / "base"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), ITERS="3", NANOCHAT_TASK_DATA=str(base / "task_fixtures"),
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(["bash", "dev/cpp_runcpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (base / "report" / "report.md").read_text()
    for section in ("## Tokenizer training", "## Base model training", "## Base model loss",
                    "## Base model C++ evaluation", "## Base model C++ FIM"):
        assert section in report, section
    assert "HumanEval-cpp pass@2" in report and "MBPP-cpp pass@1" in report
    n_fim = int(next(line for line in report.splitlines() if line.startswith("- FIM all n:")).split(":")[1])
    assert n_fim > 0  # held-out documents that compile on their own gave examples
    meta = json.loads((base / "base_checkpoints" / "cpp_d4" / "meta_000003.json").read_text())
    cfg = meta["model_config"]
    assert cfg["mamba_pattern"] == "AAM" and cfg["engram_layers"] == "0,3" and cfg["mhc"] and cfg["mtp"]
    assert cfg["dsa_start_layer"] == 3 and meta["user_config"]["fim_rate"] == 0.5
    assert json.loads((base / "cpp_data" / "manifest.json").read_text())["mode"] == "compilable"
    assert "python -m scripts.chat_web -i base -g cpp_d4" in out.stdout.splitlines()[-1]


def _setup_in(tmp_path, python_body):
    """Source dev/setup.sh with NANOCHAT_SYSTEM_PYTHON=1, a PATH whose python3 is the given
    script (no `python` on it) and a `uv` that records that it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\n" + python_body)
    (bin_dir / "uv").write_text(f"#!/bin/sh\ntouch {tmp_path}/uv_called\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    for tool in ("sh", "dirname", "touch"):  # the PATH is this folder alone: no other python on it
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, NANOCHAT_SYSTEM_PYTHON="1", HOME=str(tmp_path), PATH=str(bin_dir))
    return subprocess.run([shutil.which("bash"), "-c", "source dev/setup.sh && python -c 'print(\"which python: ok\")'"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_system_python_mode_uses_the_environment_as_it_is(tmp_path):
    """A container whose python3 has the dependencies and no `python`: no uv, no .venv,
    and `python` in the scripts runs that python3."""
    out = _setup_in(tmp_path, f'exec {sys.executable} "$@"\n')
    assert out.returncode == 0, out.stderr
    assert "which python: ok" in out.stdout
    assert not (tmp_path / "uv_called").exists()


def test_system_python_mode_names_what_is_missing(tmp_path):
    # a python3 that lacks rustbpe and pyarrow (a meta-path hook hides them)
    hide = ("import sys, importlib.abc\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name in ('rustbpe', 'pyarrow'): raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Hide())\n")
    (tmp_path / "sitecustomize.py").write_text(hide)
    out = _setup_in(tmp_path, f'PYTHONPATH={tmp_path} exec {sys.executable} "$@"\n')
    assert out.returncode == 1
    assert "NANOCHAT_SYSTEM_PYTHON=1" in out.stderr and "rustbpe pyarrow" in out.stderr
    assert "unset NANOCHAT_SYSTEM_PYTHON" in out.stderr
    assert not (tmp_path / "uv_called").exists()
