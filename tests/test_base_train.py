"""CPU smoke runs of scripts.base_train on the embedded corpus: it trains, checkpoints
atomically, and a resumed run continues exactly like an uninterrupted one."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from eval_bundle_fixture import FIXTURE, make_bundle_zip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("base")
    shutil.copytree(tokenizer.directory, d / "tokenizer")
    return d


def train_command(corpus_dir, *extra):  # (a flag given twice: the last one counts)
    return [sys.executable, "-m", "scripts.base_train", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
            "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=6", "--eval_every=3",
            "--eval_tokens=256", "--core_metric_every=-1", "--sample_every=-1", "--run=dummy",
            f"--data_dir={corpus_dir}", *extra]


def run_train(base_dir, corpus_dir, *extra):
    cmd = train_command(corpus_dir, *extra)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def losses(stdout):
    return dict(re.findall(r"step (\d+)/\d+ .*?\| loss: ([\d.]+)", stdout))


def val_bpbs(stdout):
    return dict(re.findall(r"step (\d+) \| val bpb: ([\d.]+)", stdout))


def test_train_checkpoint_and_exact_resume(base_dir, corpus_dir):
    full = run_train(base_dir, corpus_dir, "--save_every=3", "--model_tag=full")
    lf = losses(full)
    assert list(lf) == [f"{i:05d}" for i in range(1, 7)]
    assert float(lf["00006"]) < float(lf["00001"])  # it learns
    ckpt = base_dir / "base_checkpoints" / "full"
    files = sorted(os.listdir(ckpt))
    assert files == ["meta_000003.json", "meta_000006.json", "model_000003.pt", "model_000006.pt",
                     "state_000003_rank0.pt", "state_000006_rank0.pt"]  # nothing half-written left over
    meta = json.loads((ckpt / "meta_000006.json").read_text())
    assert meta["step"] == 6 and meta["model_config"]["n_layer"] == 2

    # resume the same run from step 3 into a copy, and compare steps 4..6
    shutil.copytree(ckpt, base_dir / "base_checkpoints" / "resumed")
    for f in ("meta_000006.json", "model_000006.pt", "state_000006_rank0.pt"):
        os.remove(base_dir / "base_checkpoints" / "resumed" / f)
    resumed = run_train(base_dir, corpus_dir, "--resume_from_step=3", "--model_tag=resumed")
    lr = losses(resumed)
    assert list(lr) == ["00004", "00005", "00006"]
    for s in lr:
        assert lr[s] == lf[s], f"step {s}: resumed loss {lr[s]} != uninterrupted {lf[s]}"
    assert val_bpbs(resumed)["00006"] == val_bpbs(full)["00006"]


def test_schedule_ends_at_final_lr_and_resume_past_the_end_is_refused(base_dir, corpus_dir):
    out = run_train(base_dir, corpus_dir, "--num_iterations=5", "--warmdown_ratio=0.4", "--eval_every=-1",
                    "--model_tag=sched")
    # 2 warmdown steps, the last one at --final_lr_frac (0); flags win over a checkpoint's
    assert re.findall(r"lrm: ([\d.-]+)", out) == ["1.00", "1.00", "1.00", "0.50", "0.00"]
    cmd = [sys.executable, "-m", "scripts.base_train", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=3", "--eval_every=-1",
           "--core_metric_every=-1", "--sample_every=-1", f"--data_dir={corpus_dir}", "--model_tag=sched",
           "--resume_from_step=0"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "checkpoint step 5 is past this run's 3 steps" in r.stderr, r.stdout + r.stderr
    # a fresh run into the same directory says it will replace the earlier run's checkpoints
    out = run_train(base_dir, corpus_dir, "--num_iterations=2", "--eval_every=-1", "--model_tag=sched")
    assert "holds checkpoints of an earlier run (steps " in out and " to 5); this run replaces" in out


def test_fp8_training_runs_and_learns(base_dir, corpus_dir):
    out = run_train(base_dir, corpus_dir, "--fp8=1", "--model_tag=fp8")
    assert "fp8: 12 linear layers train with FP8 matmuls" in out  # 2 blocks x 6
    lf = losses(out)
    assert float(lf["00006"]) < float(lf["00001"])
    assert "00006" in val_bpbs(out)


def test_bad_batch_flags_are_explained(base_dir, corpus_dir):
    cmd = [sys.executable, "-m", "scripts.base_train", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=3", "--total_batch_size=256", f"--data_dir={corpus_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "must be a multiple of" in out.stderr


def test_base_loss_reports_bpb(base_dir, corpus_dir):
    run_train(base_dir, corpus_dir, "--model_tag=d2")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    out = subprocess.run([sys.executable, "-m", "scripts.base_loss", "--device_type=cpu", "--device_batch_size=2",
                          "--split_tokens=512", f"--data_dir={corpus_dir}", "--model_tag=d2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    bpb = dict(re.findall(r"(train|val) bpb: ([\d.]+)", out.stdout))
    assert set(bpb) == {"train", "val"} and all(0 < float(v) < 20 for v in bpb.values())
    assert "sample" in out.stdout


def test_base_eval_on_a_real_checkpoint(base_dir, corpus_dir):
    """CORE on the fixture bundle with the d2 checkpoint trained above (real loading path)."""
    if not (base_dir / "base_checkpoints" / "d2").exists():
        run_train(base_dir, corpus_dir, "--model_tag=d2")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    out = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--device_type=cpu", "--model_tag=d2",
                          f"--bundle_dir={FIXTURE}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    core = float(re.search(r"CORE\D*?(-?\d+\.\d+)", out.stdout).group(1))
    assert -1.0 <= core <= 1.0
    rows = (base_dir / "base_eval" / "d2_6.csv").read_text().splitlines()
    assert rows[0] == "task,accuracy,centered" and rows[-1].startswith("CORE,,")


def test_torchrun_two_processes_train_and_resume(base_dir, corpus_dir):
    """DDP on CPU (gloo): two ranks train, each saves its own optimizer/loader state, and
    resuming with two ranks continues exactly."""
    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "scripts.base_train", "--", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
               "--device_batch_size=2", "--total_batch_size=512", "--num_iterations=4", "--eval_every=-1",
               "--eval_tokens=256", "--core_metric_every=-1", "--sample_every=-1", f"--data_dir={corpus_dir}", *extra]
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout
    full = losses(torchrun("--save_every=2", "--model_tag=ddp"))
    ckpt = base_dir / "base_checkpoints" / "ddp"
    assert {"state_000002_rank0.pt", "state_000002_rank1.pt"} <= set(os.listdir(ckpt))
    for f in ("meta_000004.json", "model_000004.pt", "state_000004_rank0.pt", "state_000004_rank1.pt"):
        os.remove(ckpt / f)
    resumed = losses(torchrun("--resume_from_step=2", "--model_tag=ddp"))
    assert list(resumed) == ["00003", "00004"]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)


def step_losses(stdout):
    return [float(v) for v in re.findall(r"\(step: ([\d.]+)\)", stdout)]


def test_global_data_order_two_processes_match_one(base_dir, corpus_dir):
    """--data_order=global: 2 ranks x 1 micro-step train on the same batches as 1 rank x 2
    micro-steps, so the per-step losses agree (fp32 on CPU: up to summation order)."""
    common = ["--device_type=cpu", "--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
              "--num_iterations=5", "--eval_every=-1", "--eval_tokens=128", "--core_metric_every=-1",
              "--sample_every=-1", "--data_order=global", f"--data_dir={corpus_dir}", "--model_tag=order",
              "--grad_clip=0.5"]  # clipping active: the norm must be the averaged gradient's on 2 ranks too
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    outs = []
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        cmd = [sys.executable, *launcher, "-m", "scripts.base_train", *(["--"] if launcher else []), *common]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        outs.append(out.stdout)
    assert "1 accumulation steps" in outs[1] and "2 accumulation steps" in outs[0]
    one, two = step_losses(outs[0]), step_losses(outs[1])
    assert len(one) == len(two) == 5 and one[-1] < one[0]
    assert one == pytest.approx(two, rel=1e-4, abs=0), (one, two)
    norms = [[float(v) for v in re.findall(r"grad norm: ([\d.]+)", o)] for o in outs]
    assert len(norms[0]) == 5 and min(norms[0]) > 0.5  # the clip acted
    assert norms[0] == pytest.approx(norms[1], rel=1e-3), norms


def test_core_metric_during_training(base_dir, corpus_dir, tmp_path):
    """--core_metric_every fetches the bundle (here a file:// zip of the fixture) and logs
    CORE; when the bundle can't be had, training goes on without it."""
    zpath = make_bundle_zip(tmp_path / "eval_bundle.zip")
    os.environ["NANOCHAT_EVAL_BUNDLE_URL"] = f"file://{zpath}"
    try:
        out = run_train(base_dir, corpus_dir, "--core_metric_every=3", "--core_metric_max_per_task=4", "--model_tag=core")
        assert re.search(r"step 00003 \| CORE: -?\d+\.\d+", out) and re.search(r"step 00006 \| CORE:", out)
        os.environ["NANOCHAT_EVAL_BUNDLE_URL"] = f"file://{tmp_path}/missing.zip"
        shutil.rmtree(base_dir / "eval_bundle")
        out = run_train(base_dir, corpus_dir, "--core_metric_every=3", "--model_tag=core2")
        assert "CORE metric turned off" in out and "step 00006/00006" in out
    finally:
        os.environ.pop("NANOCHAT_EVAL_BUNDLE_URL", None)


def test_core_metric_with_two_processes(base_dir, corpus_dir, tmp_path):
    """Under torchrun rank 0 fetches the bundle while rank 1 waits, and both evaluate
    (their collectives line up: the run finishes); without a bundle both turn CORE off."""
    zpath = make_bundle_zip(tmp_path / "eval_bundle.zip")
    for url, expect in ((f"file://{zpath}", "step 00002 | CORE:"), (f"file://{tmp_path}/missing.zip", "CORE metric turned off")):
        base = tmp_path / ("b" + str(len(expect)))
        shutil.copytree(base_dir / "tokenizer", base / "tokenizer")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "scripts.base_train", "--", "--device_type=cpu", "--depth=2", "--max_seq_len=64",
               "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=2", "--eval_every=-1",
               "--eval_tokens=256", "--core_metric_every=1", "--core_metric_max_per_task=4", "--sample_every=-1", f"--data_dir={corpus_dir}"]
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", NANOCHAT_EVAL_BUNDLE_URL=url)
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and expect in out.stdout + out.stderr and "step 00002/00002" in out.stdout, \
            out.stdout[-3000:] + out.stderr[-3000:]


# The seed's launch command (shared/ARCHITECTURE.md), scaled down to a CPU: depth 4, short
# sequences, a few steps. Its TPU flags must stop it at once on the CPU (tests/test_tpu.py runs them on CPU XLA).
SEED_FLAGS = ["--tensor_parallel=4", "--kernel=current", "--no_compile", "--xla_flash_attn", "--window_pattern=L",
              "--mamba", "--mamba_pattern=AAM", "--mamba3_qknorm", "--mamba3_bias", "--mamba3_complex_rope",
              "--mamba3_trapezoidal", "--engram", "--engram_layers=0,3,6", "--mhc", "--mtp", "--mtp_lambda=0.3",
              "--dsa", "--dsa_start_layer=7", "--gradient_checkpointing", "--fim_rate=0.5", "--streaming_data",
              "--run=dummy", "--core_metric_every=5000", "--save_every=5000", "--sample_every=5000"]
TPU_ONLY = {"--tensor_parallel=4": "--tensor_parallel=4", "--xla_flash_attn": "--xla_flash_attn"}


def seed_command(corpus_dir, flags):
    return [sys.executable, "-m", "scripts.base_train", "--depth=4", "--num_iterations=3", "--device_batch_size=1",
            "--max_seq_len=128", "--total_batch_size=256", "--eval_tokens=256", "--device_type=cpu",
            f"--data_dir={corpus_dir}", *flags]


def test_seed_launch_command_on_the_cpu_stops_at_once_naming_a_tpu_flag(base_dir, corpus_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    flags = SEED_FLAGS + ["--engram_layers=0,3", "--dsa_start_layer=3"]  # the layers depth 4 has
    out = subprocess.run(seed_command(corpus_dir, flags), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tensor_parallel=4 is for TPUs" in lines[0], out.stderr
    assert out.stdout == ""  # stopped before any work


@pytest.mark.parametrize("flag", list(TPU_ONLY))
def test_each_tpu_flag_names_itself_off_xla(flag):
    import argparse
    from nanochat.flags import add_model_args, check_tpu_flags, config_from_args
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    built = [f for f in SEED_FLAGS if f.split("=")[0] in {a for o in parser._actions for a in o.option_strings}
             and f not in TPU_ONLY]
    check_tpu_flags(parser.parse_args(built), "cpu")  # the rest runs anywhere
    config_from_args(parser.parse_args(built + [flag]), 100)  # and every flag is a valid model flag
    with pytest.raises(SystemExit, match=f"{TPU_ONLY[flag]} is for TPUs"):
        check_tpu_flags(parser.parse_args(built + [flag]), "cpu")
    with pytest.raises(SystemExit, match="add --mamba"):
        config_from_args(parser.parse_args(["--mamba3_bias"]), 100)


def test_fim_training_learns_and_resumes_exactly(base_dir, corpus_dir):
    """--fim_rate=0.5 (the seed's): the loader's FIM rows follow its state, so a run resumed
    at step 3 trains on the same rows as the uninterrupted one."""
    full = run_train(base_dir, corpus_dir, "--fim_rate=0.5", "--save_every=3", "--model_tag=fim")
    lf = losses(full)
    assert list(lf) == [f"{i:05d}" for i in range(1, 7)] and float(lf["00006"]) < float(lf["00001"])
    meta = json.loads((base_dir / "base_checkpoints" / "fim" / "meta_000006.json").read_text())
    assert meta["user_config"]["fim_rate"] == 0.5 and meta["user_config"]["fim_spm_rate"] == 0.5
    plain = losses(run_train(base_dir, corpus_dir, "--model_tag=nofim"))  # the same run without FIM
    assert plain["00006"] != lf["00006"]  # FIM changed the rows (step 1 is ln(vocab) either way)
    os.remove(base_dir / "base_checkpoints" / "fim" / "meta_000006.json")
    resumed = losses(run_train(base_dir, corpus_dir, "--fim_rate=0.5", "--resume_from_step=3", "--model_tag=fim"))
    assert resumed == {s: lf[s] for s in ("00004", "00005", "00006")}


def test_seed_launch_command_without_tpu_flags_trains(base_dir, corpus_dir):
    """Everything of the seed's command that is built, Mamba-3, Engram, mHC, MTP, DSA and gradient
    checkpointing included (depth 4: AAM gives layer 2 to Mamba-3, DSA from layer 3): it trains,
    and the checkpoint alone rebuilds the hybrid and samples."""
    built = [f for f in SEED_FLAGS if f not in TPU_ONLY
             and f != "--streaming_data"]  # streaming would wait for new shards after the small corpus
    out = run_train(base_dir, corpus_dir, *built, "--depth=4", "--engram_layers=0,3", "--dsa_start_layer=3",
                    "--model_tag=seed")
    assert "step 00006/00006" in out and "mtp_loss: " in out and "indexer_loss: " in out
    meta = json.loads((base_dir / "base_checkpoints" / "seed" / "meta_000006.json").read_text())
    cfg = meta["model_config"]
    assert cfg["mamba_pattern"] == "AAM" and cfg["mamba3_trapezoidal"] and cfg["mamba3_complex_rope"]
    assert cfg["engram_layers"] == "0,3" and cfg["dsa_start_layer"] == 3 and cfg["mhc"]
    assert cfg["mtp"] and cfg["mtp_lambda"] == 0.3 and cfg["mtp_depth"] == 1
    assert meta["user_config"]["kernel"] == "current" and meta["user_config"]["no_compile"]
    assert meta["user_config"]["gradient_checkpointing"] and "gradient_checkpointing" not in cfg
    from nanochat.checkpoint_manager import build_from_checkpoint
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    model, _ = build_from_checkpoint(str(base_dir / "base_checkpoints" / "seed"), 6, torch.device("cpu"), "eval")
    assert [s.mixer for s in model.plan] == ["attn", "attn", "mamba3", "dsa"]
    assert [i for i, s in enumerate(model.plan) if "engram" in s.extras] == [0, 3]
    tokenizer = get_tokenizer(str(base_dir / "tokenizer"))
    rows, _ = Engine(model, tokenizer).generate_batch(tokenizer.encode("int main", prepend="<|bos|>"), num_samples=2,
                                                      max_tokens=5, temperature=1.0)
    assert len(rows) == 2


def test_checkpoint_from_before_the_extension_fields_loads(base_dir, corpus_dir):
    run_train(base_dir, corpus_dir, "--model_tag=old")
    path = base_dir / "base_checkpoints" / "old" / "meta_000006.json"
    meta = json.loads(path.read_text())
    from nanochat.checkpoint_manager import build_from_checkpoint
    extension_fields = ("mamba_pattern", "mamba3_qknorm", "mamba3_bias", "mamba3_complex_rope", "mamba3_trapezoidal",
                        "mamba3_mimo_rank", "mamba3_d_state", "mamba3_headdim", "mamba3_expand", "mamba3_chunk",
                        "mamba3_outproj_norm", "engram_layers", "engram_order", "engram_heads", "engram_dim",
                        "engram_table", "mhc", "mhc_streams", "mtp", "mtp_lambda", "mtp_depth", "dsa_start_layer")
    old = {k: v for k, v in meta["model_config"].items() if k not in extension_fields}
    path.write_text(json.dumps(dict(meta, model_config=old)))
    model, _ = build_from_checkpoint(str(base_dir / "base_checkpoints" / "old"), 6, torch.device("cpu"), "eval")
    assert model.config.n_layer == 2 and model.config.mamba_pattern == ""


def test_dsa_warmup_from_a_dense_run_moves_only_the_indexers(base_dir, corpus_dir):
    """DeepSeek-V3.2's order: a dense run, then --dsa from its weights (--init_from), whose
    warm-up trains only the new indexers; its MFU counts a forward's FLOPs, not a training
    step's. Then the bad --init_from command lines."""
    run_train(base_dir, corpus_dir, "--model_tag=dense")
    dsa = ["--dsa", "--dsa_start_layer=1", "--dsa_top_k=16"]
    out = run_train(base_dir, corpus_dir, *dsa, "--init_from=dense", "--dsa_warmup_steps=12", "--num_iterations=12",
                    "--eval_every=-1", "--model_tag=warm")
    assert "initialized from base checkpoint dense step 6; 3 parameters of this model are not in it" in out, out
    ckpts = base_dir / "base_checkpoints"
    dense = torch.load(ckpts / "dense" / "model_000006.pt")
    warm = torch.load(ckpts / "warm" / "model_000012.pt")
    new = set(warm) - set(dense)  # layer 1's indexer: query, key and head-weight projections
    assert new == {f"blocks.1.mixer.indexer.{w}.weight" for w in ("wq", "wk", "ww")}, new
    for name, t in dense.items():  # twelve warm-up steps left every weight of the dense run as it was
        assert torch.equal(warm[name], t), name
    meta = json.loads((ckpts / "warm" / "meta_000012.json").read_text())
    assert meta["user_config"]["init_from"] == "dense:6"  # the step loaded, not only the tag given
    assert meta["timed_steps"] == 2  # (steps 11 and 12: the first ten of a process are not timed)
    assert meta["timed_flops"] == pytest.approx(2 * 256 * meta["flops_per_token"] / 3)
    # its sparse stage, continued from the warm-up's checkpoint, trains the whole model
    resumed = run_train(base_dir, corpus_dir, *dsa, "--dsa_warmup_steps=12", "--num_iterations=14",
                        "--eval_every=-1", "--model_tag=warm", "--resume_from_step=12")
    assert list(losses(resumed)) == ["00013", "00014"]
    after = torch.load(ckpts / "warm" / "model_000014.pt")
    assert not torch.equal(after["blocks.0.mixer.c_q.weight"], warm["blocks.0.mixer.c_q.weight"])
    assert json.loads((ckpts / "warm" / "meta_000014.json").read_text())["user_config"]["init_from"] == "dense:6"

    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    for flags, says in [(["--init_from=nothing"], "--init_from=nothing: no complete checkpoint in"),
                        (["--init_from=dense:x"], "give a base checkpoint's model tag, or TAG:STEP"),
                        (["--init_from=dense:5"], "--init_from=dense:5: "),
                        (["--init_from=dense", "--resume_from_step=0"], "give one of them"),
                        (["--init_from=dense", "--depth=3"], "give the checkpoint's model flags"),
                        # the same shapes, another meaning: two heads of 64 where the checkpoint has one of 128
                        (["--init_from=dense", "--head_dim=64"], "has n_head=1 and this model n_head=2: give the"),
                        (["--init_from=dense", "--model_tag=dense"], "the run it starts from: give it another --model_tag"),
                        (["--init_from=warm"], "tensors this model lacks (first: blocks.1.mixer.indexer.")]:
        out = subprocess.run(train_command(corpus_dir, *flags), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode != 0 and says in out.stderr.strip().splitlines()[-1], (flags, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("flag,says", [("--depth=0", "--depth=0: must be a positive"),
                                       ("--depth=-2", "--depth=-2: must be a positive"),
                                       ("--device_batch_size=0", "--device_batch_size=0: must be a positive"),
                                       ("--max_seq_len=0", "--max_seq_len=0: must be a positive"),
                                       ("--aspect_ratio=0", "--aspect_ratio=0: must be a positive"),
                                       ("--num_iterations=0", "--num_iterations=0: a positive number"),
                                       ("--num_iterations=-5", "--num_iterations=-5: a positive number"),
                                       ("--model_tag=../../x", "must be a plain directory name"),
                                       ("--fim_rate=1.5", "--fim_rate=1.5: must be in [0, 1]"),
                                       ("--fim_spm_rate=-0.1", "--fim_spm_rate=-0.1: must be in [0, 1]")])
def test_bad_command_lines_give_one_line_errors(base_dir, corpus_dir, flag, says):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    out = subprocess.run(seed_command(corpus_dir, [flag]), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert says in out.stderr, out.stderr
    assert not (base_dir.parent / "x").exists()


def test_ablation_defaults_set_is_base_train_defaults():
    """dev/quality_ablation.sh's spelled-out set for today's defaults sets every flag to
    base_train's default, so docs/benchmarks.md's table names the defaults truly."""
    import argparse
    from nanochat import flags
    cmd = subprocess.run(["bash", "dev/quality_ablation.sh", "new-minus-window-sched-ratio-lrs-adam-muoneq"], cwd=ROOT,
                         env=dict(os.environ, DRY="1"), capture_output=True, text=True, check=True).stdout
    spelled = dict(f[2:].split("=", 1) for f in cmd.split("--data_dir=DATA --model_tag=")[1].split()[1:])
    parser = argparse.ArgumentParser()
    flags.add_model_args(parser)
    flags.add_optimizer_args(parser)
    defaults = vars(parser.parse_args([]))
    source = open(os.path.join(ROOT, "scripts", "base_train.py")).read()
    for k, v in spelled.items():
        if k in defaults:
            assert float(defaults[k]) == float(v), (k, defaults[k], v)
        else:
            m = re.search(r'"--%s",[^)]*?default=("?[\w.-]+"?)' % k, source)
            assert m, k
            got = m.group(1).strip('"')
            assert got == v or float(got) == float(v), (k, got, v)
    assert len(spelled) > 20


def test_quality_recipe_trains_resumes_exactly_and_samples(base_dir, corpus_dir):
    """The new-recipe flag set of dev/quality_ablation.sh (all of it): it learns, a resumed
    run continues exactly (NorMuon state, per-group AdamW), and sampling with the smear cache works."""
    listing = subprocess.run(["bash", "dev/quality_ablation.sh", "list"], cwd=ROOT, capture_output=True, text=True)
    recipe = re.search(r"new recipe: (.*)", listing.stdout).group(1).split()
    assert "--value_embeds=1" in recipe and "--cautious_wd=1" in recipe
    full = run_train(base_dir, corpus_dir, *recipe, "--warmup_steps=2", "--save_every=3", "--sample_every=6",
                     "--model_tag=recipe")
    lf = losses(full)
    assert float(lf["00006"]) < float(lf["00001"]) and "sample: " in full
    meta = json.loads((base_dir / "base_checkpoints" / "recipe" / "meta_000006.json").read_text())
    assert meta["model_config"]["value_embeds"] and meta["model_config"]["rope_base"] == 100000
    ckpt = base_dir / "base_checkpoints" / "recipe"
    shutil.copytree(ckpt, base_dir / "base_checkpoints" / "recipe_resumed")
    for f in ("meta_000006.json", "model_000006.pt", "state_000006_rank0.pt"):
        os.remove(base_dir / "base_checkpoints" / "recipe_resumed" / f)
    resumed = run_train(base_dir, corpus_dir, *recipe, "--warmup_steps=2", "--resume_from_step=3",
                        "--model_tag=recipe_resumed")
    lr = losses(resumed)
    assert lr == {s: lf[s] for s in ("00004", "00005", "00006")}
