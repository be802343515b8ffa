import os

import pytest
import torch

from nanochat import common


def test_device_autodetect_and_override():
    assert common.autodetect_device_type("cpu") == "cpu"
    assert common.autodetect_device_type() in common.DEVICE_TYPES
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        common.autodetect_device_type("tpu")


def test_scripts_without_the_tpu_path_refuse_xla_and_skip_it_when_detecting(monkeypatch):
    """mid_train, chat_sft and chat_rl have no SPMD mesh and no graph sync per step: on XLA they
    built one lazy graph for the whole run. --device_type=xla is refused, naming the script
    (before anything starts), and autodetection on a TPU host (torch_xla present, no CUDA)
    gives the CPU there instead of xla."""
    import subprocess
    import sys
    monkeypatch.setattr(common, "xla_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.autodetect_device_type() == "xla"
    assert common.autodetect_device_type(xla=False) == "cpu"
    with pytest.raises(SystemExit, match="chat_sft does not run on XLA"):
        common.autodetect_device_type("xla", xla=False, script="chat_sft")
    for script in ("mid_train", "chat_sft", "chat_rl"):
        out = subprocess.run([sys.executable, "-m", f"scripts.{script}", "--device_type=xla"], capture_output=True,
                             text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 1 and f"{script} does not run on XLA" in out.stderr, out.stderr[-2000:]


def test_peak_flops_table():
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.get_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.get_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.get_peak_flops("TPU v6e") == 918e12
    # first match wins: the longer names must not be read as the shorter ones they contain
    assert common.get_peak_flops("NVIDIA GB200") == 2500e12 and common.get_peak_flops("NVIDIA B200") == 2250e12
    assert common.get_peak_flops("NVIDIA L40") == 181e12 and common.get_peak_flops("NVIDIA L4") == 121e12
    assert common.get_peak_flops("NVIDIA L40S") == 362e12 and common.get_peak_flops("NVIDIA H100 NVL") == 835e12
    assert common.get_peak_flops("some new chip") == float("inf")  # MFU shows 0, never a made-up number


def test_peak_bandwidth_table():
    """engine_bench's bandwidth utilization: each GPU against its own memory (it once divided
    an H200's bytes/s by an H100's 3.35 TB/s)."""
    assert common.get_peak_bandwidth("NVIDIA H200") == 4.8e12
    assert common.get_peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert common.get_peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert common.get_peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert common.get_peak_bandwidth("NVIDIA A100 80GB PCIe") == 1.935e12
    assert common.get_peak_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert common.get_peak_bandwidth("NVIDIA L4") == 0.3e12 and common.get_peak_bandwidth("NVIDIA L40S") == 0.864e12
    assert common.get_peak_bandwidth("cpu") is None  # no made-up utilization


def test_compute_dtype(monkeypatch):
    assert common.compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert common.compute_dtype("xla") == torch.bfloat16
    monkeypatch.setenv("PJRT_DEVICE", "CPU")  # XLA's CPU backend (the tests' 8 virtual devices) computes as the CPU
    assert common.compute_dtype("xla") == torch.float32


def test_base_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert common.get_base_dir() == str(tmp_path / "nc") and os.path.isdir(tmp_path / "nc")


def test_atomic_write_fsyncs_the_file_then_its_directory_after_the_rename(tmp_path, monkeypatch):
    """The new file's data, then (after the rename) the directory entry: without the second, a
    crash could keep a later rename (a checkpoint's meta) and lose an earlier one (its model)."""
    import stat
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    common.atomic_write(str(tmp_path / "x.txt"), lambda f: f.write("new"), mode="w")
    assert events == ["file", "rename", "dir"] and (tmp_path / "x.txt").read_text() == "new"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    common.atomic_write(str(p), lambda f: f.write("old"), mode="w")

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        common.atomic_write(str(p), boom, mode="w")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_ddp_env_detection(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert common.get_dist_info() == (False, 0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert common.get_dist_info() == (True, 3, 1, 8)
