"""Checkpoints under hostile conditions: a save killed midway (also when it re-saves an
existing step, and when a run resumes at its last step), leftover temp files, flipped
or truncated files, a tokenizer replaced under existing checkpoints, and the sandbox
directories a killed host leaves in /tmp."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPTConfig, build_model
from nanochat.tokenizer import Tokenizer, get_token_bytes, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def weights(v):
    return {"w": torch.full((64, 64), float(v))}


def save(directory, step, v):
    cm.save_checkpoint(str(directory), step, weights(v), {"optimizers": [], "v": v}, {"step": step, "v": v})


def kill_torch_save_after(monkeypatch, n_ok):
    """torch.save works n_ok times, then the process 'dies' halfway into the next file."""
    real, calls = torch.save, []

    def dying_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) > n_ok:
            f.write(b"PK\x03\x04 half a file")
            raise Killed()
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", dying_save)


@pytest.mark.parametrize("n_ok", [0, 1])  # killed in the model file / in the state file
def test_killed_resave_of_a_step_keeps_the_complete_checkpoint(tmp_path, monkeypatch, n_ok):
    save(tmp_path, 3, 1.0)
    kill_torch_save_after(monkeypatch, n_ok)
    with pytest.raises(Killed):
        save(tmp_path, 3, 2.0)
    monkeypatch.undo()
    model, state, meta = cm.load_checkpoint(str(tmp_path), 3, load_state=True)
    assert model["w"][0, 0] == 1.0 and state["v"] == 1.0 and meta["v"] == 1.0
    # a finished re-save switches to the new files and removes the old ones
    save(tmp_path, 3, 2.0)
    model, state, meta = cm.load_checkpoint(str(tmp_path), 3, load_state=True)
    assert model["w"][0, 0] == 2.0 and state["v"] == 2.0 and meta["v"] == 2.0
    assert sorted(os.listdir(tmp_path)) == ["meta_000003.json", "model_000003_b.pt", "state_000003_rank0_b.pt"]
    save(tmp_path, 3, 3.0)  # and back to the usual names
    assert sorted(os.listdir(tmp_path)) == ["meta_000003.json", "model_000003.pt", "state_000003_rank0.pt"]
    assert cm.load_checkpoint(str(tmp_path), 3)[0]["w"][0, 0] == 3.0


def test_leftovers_of_killed_saves_are_removed_when_the_directory_is_opened(tmp_path, monkeypatch):
    save(tmp_path, 2, 1.0)
    save(tmp_path, 4, 1.0)
    # a killed atomic write, and the old files of a re-save killed right after its new meta
    for junk in (".model_000006.pt.k2j3h4.tmp", ".state_000006_rank0.pt.abc.tmp", ".meta_000006.json.x.tmp",
                 "model_000004_b.pt", "state_000004_rank0_b.pt"):
        (tmp_path / junk).write_bytes(b"junk")
    monkeypatch.setattr(cm, "_cleaned", set(), raising=False)  # a new process opening the directory
    save(tmp_path, 6, 1.0)
    assert sorted(os.listdir(tmp_path)) == ["meta_000002.json", "meta_000004.json", "meta_000006.json",
                                            "model_000002.pt", "model_000004.pt", "model_000006.pt",
                                            "state_000002_rank0.pt", "state_000004_rank0.pt", "state_000006_rank0.pt"]
    (tmp_path / ".model_000008.pt.zz.tmp").write_bytes(b"junk")
    monkeypatch.setattr(cm, "_cleaned", set(), raising=False)
    cm.resume_checkpoint(str(tmp_path), 0)  # resuming opens it too
    assert not (tmp_path / ".model_000008.pt.zz.tmp").exists()


def test_steps_that_share_a_prefix_and_glob_characters_in_the_directory(tmp_path, monkeypatch):
    """Step 100000's files are not step 1000000's (a prefix glob took model_1000000.pt for one
    of step 100000's and removed it); a directory named with glob's characters ([x], *) still
    lists its steps (glob read '[x]' as a character class and found none)."""
    for name in ("plain", "d20[x]*"):
        d = tmp_path / name
        save(d, 1000000, 2.0)
        save(d, 100000, 1.0)
        monkeypatch.setattr(cm, "_cleaned", set(), raising=False)
        cm.clean_checkpoint_dir(str(d))
        save(d, 100000, 3.0)  # a re-save of step 100000 removes the files it replaced, only those
        assert (d / "model_1000000.pt").exists() and (d / "state_1000000_rank0.pt").exists()
        assert cm.find_last_step(str(d)) == 1000000
        model, _, meta = cm.load_checkpoint(str(d), 1000000)
        assert meta["v"] == 2.0 and model["w"][0, 0] == 2.0
        assert cm.load_checkpoint(str(d), 100000)[2]["v"] == 3.0


def test_resume_stage_refuses_another_world_size_and_a_step_past_the_end(tmp_path):
    """A chat stage's resume: a checkpoint saved by 1 process refused on 2 (each rank's
    optimizer share and data cursor are its own), and step 5 refused by a run of 3 steps
    (its loop, `step == num_iterations`, would never end, the learning rate going negative)."""
    save(tmp_path, 5, 1.0)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(64, 64))
    with pytest.raises(SystemExit, match="saved by 1 processes, this run has 2"):
        cm.resume_stage(str(tmp_path), 0, model, [], rank=0, world_size=2)
    with pytest.raises(SystemExit, match="step 5 is past this run's 3 steps"):
        cm.resume_stage(str(tmp_path), 0, model, [], num_iterations=3)
    step, rank_state, meta = cm.resume_stage(str(tmp_path), 0, model, [], num_iterations=5)
    assert step == 5 and model.w[0, 0] == 1.0 and rank_state["v"] == 1.0


def test_resume_stage_keeps_this_runs_hyperparameters_and_the_saved_moments(tmp_path):
    """resume_stage loads the optimizer's state (its moments) but the groups' hyperparameters
    stay this run's (lr, initial_lr, betas from the flags), as base_train's resume does:
    load_state_dict alone put back the saved run's learning rate."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(4, 4))
    opt = torch.optim.AdamW([model.w], lr=0.1, betas=(0.8, 0.95))
    opt.param_groups[0]["initial_lr"] = 0.1
    model.w.grad = torch.ones(4, 4)
    opt.step()
    saved = opt.state_dict()
    cm.save_checkpoint(str(tmp_path), 3, model.state_dict(), {"optimizers": [saved]}, {"step": 3})
    new = torch.optim.AdamW([model.w], lr=0.02, betas=(0.9, 0.99))
    new.param_groups[0]["initial_lr"] = 0.02
    cm.resume_stage(str(tmp_path), 0, model, [new])
    g = new.param_groups[0]
    assert (g["lr"], g["initial_lr"], g["betas"]) == (0.02, 0.02, (0.9, 0.99))
    assert torch.equal(new.state[model.w]["exp_avg"], saved["state"][0]["exp_avg"])


def test_warn_earlier_run_names_its_steps_even_under_a_glob_like_name(tmp_path):
    said = []
    d = tmp_path / "d12[x]"
    cm.warn_earlier_run(str(d), "keep", said.append)  # no directory yet: nothing to say
    save(d, 3, 1.0)
    save(d, 7, 1.0)
    cm.warn_earlier_run(str(d), "to keep it: move it", said.append)
    assert len(said) == 1 and "(steps 3 to 7)" in said[0] and said[0].endswith("to keep it: move it")


def flip_two_bytes(path):
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0xFF
    data[i + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_files_are_named_and_latest_falls_back(tmp_path, caplog):
    save(tmp_path, 2, 1.0)
    save(tmp_path, 4, 2.0)
    flip_two_bytes(tmp_path / "model_000004.pt")
    with pytest.raises(ValueError, match=r"model_000004\.pt is damaged \(sha256.*step 2 before it"):
        cm.load_checkpoint(str(tmp_path), 4)
    # --resume_from_step=0 ("the latest") takes the step before, with a warning
    caplog.set_level("WARNING")
    step, model, _, _ = cm.resume_checkpoint(str(tmp_path), 0)
    assert step == 2 and model["w"][0, 0] == 1.0
    assert "model_000004.pt is damaged" in caplog.text and "falling back to step 2" in caplog.text
    # an explicit step is not swapped silently
    with pytest.raises(cm.CheckpointCorrupt, match="model_000004.pt"):
        cm.resume_checkpoint(str(tmp_path), 4)
    # truncated or garbage files (also without checksums) name the file
    save(tmp_path, 6, 3.0)
    meta = json.loads((tmp_path / "meta_000006.json").read_text())
    del meta["files"]
    (tmp_path / "meta_000006.json").write_text(json.dumps(meta))
    p = tmp_path / "state_000006_rank0.pt"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(cm.CheckpointCorrupt, match=r"(?s)state_000006_rank0\.pt is damaged.*step 4 before it"):
        cm.load_checkpoint(str(tmp_path), 6, load_state=True)
    (tmp_path / "meta_000006.json").write_text("{garbage")
    with pytest.raises(cm.CheckpointCorrupt, match=r"meta_000006\.json is damaged"):
        cm.load_checkpoint(str(tmp_path), 6)


def test_checkpoints_without_checksums_still_load(tmp_path):
    """The format before this change: the usual file names, no "files" or tokenizer hash."""
    torch.save(weights(5.0), tmp_path / "model_000007.pt")
    torch.save({"optimizers": []}, tmp_path / "state_000007_rank0.pt")
    (tmp_path / "meta_000007.json").write_text(json.dumps({"step": 7}))
    model, state, meta = cm.load_checkpoint(str(tmp_path), 7, load_state=True)
    assert model["w"][0, 0] == 5.0 and meta["step"] == 7
    save(tmp_path, 7, 6.0)  # re-saving it goes beside, then replaces the old files
    assert sorted(os.listdir(tmp_path)) == ["meta_000007.json", "model_000007_b.pt", "state_000007_rank0_b.pt"]
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        cm.load_checkpoint(str(tmp_path), 7, load_state=True, rank=1)


def other_tokenizer(tok):
    """A tokenizer of the same vocab size that is not the same tokenizer (two merges swapped)."""
    ranks = dict(tok.enc._mergeable_ranks)
    a, b = [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1])[-2:]]
    ranks[a], ranks[b] = ranks[b], ranks[a]
    return Tokenizer.from_ranks(ranks, tok.enc._pat_str)


@pytest.fixture
def base_dir(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    get_tokenizer.cache_clear()
    yield tmp_path
    get_tokenizer.cache_clear()


def small_model(vocab_size):
    return build_model(GPTConfig(n_layer=1, n_head=1, n_kv_head=1, n_embd=64, vocab_size=vocab_size,
                                 sequence_len=32), "cpu")


def test_a_replaced_tokenizer_is_refused_at_load_and_resume(base_dir, tokenizer):
    model = small_model(tokenizer.get_vocab_size())
    optimizers = model.setup_optimizers()
    d = cm.checkpoint_dir("mid", "d1")
    cm.save_checkpoint(d, 5, model.state_dict(), {"optimizers": [o.state_dict() for o in optimizers]},
                       {"step": 5, "model_config": model.config.to_dict()})  # the tokenizer in base_dir
    cm.load_model("mid", "cpu")  # the right tokenizer loads
    other = other_tokenizer(tokenizer)
    assert other.get_vocab_size() == tokenizer.get_vocab_size()
    assert other.enc._mergeable_ranks != tokenizer.enc._mergeable_ranks
    other.save(str(base_dir / "tokenizer"))  # what tok_train did without asking
    get_tokenizer.cache_clear()
    with pytest.raises(ValueError, match="retrained or replaced") as e:
        cm.load_model("mid", "cpu")
    assert f"trained with tokenizer {tokenizer.hash[:12]}" in str(e.value) and f"is {other.hash[:12]}" in str(e.value)
    with pytest.raises(SystemExit, match="retrained or replaced"):
        cm.load_previous_stage("mid", "cpu")
    with pytest.raises(ValueError, match="retrained or replaced"):
        cm.resume_stage(d, 0, model, optimizers)
    assert json.loads(open(os.path.join(d, "meta_000005.json")).read())["tokenizer_hash"] == tokenizer.hash


def test_token_bytes_of_another_tokenizer_is_refused(tmp_path, tokenizer):
    tokenizer.save(str(tmp_path))
    assert get_token_bytes(directory=str(tmp_path)).shape == (tokenizer.get_vocab_size(),)
    other_dir = tmp_path / "other"
    other_tokenizer(tokenizer).save(str(other_dir))
    shutil.copy(other_dir / "tokenizer.pkl", tmp_path / "tokenizer.pkl")  # a save killed between the two files
    get_tokenizer.cache_clear()
    with pytest.raises(ValueError, match="token_bytes.pt belongs to another tokenizer"):
        get_token_bytes(directory=str(tmp_path))
    get_tokenizer.cache_clear()


def test_tok_train_does_not_overwrite_without_flag(tmp_path, corpus_dir, tokenizer):
    out = tmp_path / "tok"
    shutil.copytree(tokenizer.directory, out)
    before = (out / "tokenizer.pkl").read_bytes()
    cmd = [sys.executable, "-m", "scripts.tok_train", f"--data_dir={corpus_dir}", f"--out_dir={out}",
           "--vocab_size=300", "--max_chars=20000"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already holds a tokenizer" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (out / "tokenizer.pkl").read_bytes() == before
    r = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert Tokenizer.from_directory(str(out)).get_vocab_size() == 300


def test_resume_at_the_last_step_killed_while_saving_keeps_the_checkpoint(tmp_path, corpus_dir, tokenizer):
    """The tester's case: resume (latest) of a finished run re-saved the loaded step, its
    meta deleted first; a SIGKILL during that save left no complete checkpoint."""
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    args = ["--device_type=cpu", "--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
            "--num_iterations=2", "--eval_every=-1", "--eval_tokens=256", "--core_metric_every=-1",
            "--sample_every=-1", "--run=dummy", f"--data_dir={corpus_dir}"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # the resumed run dies (SIGKILL) in the middle of any torch.save
    killer = ("import os, runpy, signal, sys, torch\n"
              "def save(obj, f, *a, **k):\n"
              "    f.write(b'PK half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "torch.save = save\n"
              "sys.argv = ['base_train'] + sys.argv[1:]\n"
              "runpy.run_module('scripts.base_train', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", killer, *args, "--resume_from_step=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    ckpt = str(tmp_path / "base_checkpoints" / "d2")
    assert cm.find_last_step(ckpt) == 2, (r.returncode, os.listdir(ckpt))
    cm.load_checkpoint(ckpt, 2, load_state=True)
    assert r.returncode == 0 and "not saved again" in r.stderr, r.stdout + r.stderr


def test_stale_sandbox_dirs_are_removed_live_ones_kept(tmp_path):
    from nanochat.common import clean_stale_exec_dirs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dirs = {name: tmp_path / name for name in (
            f"nanochat-exec-{dead.pid}-abc", f"nanochat-exec-{live.pid}-def", f"nanochat-exec-{os.getpid()}-me",
            "nanochat-exec-old12345", "nanochat-exec-new12345", "nanochat-exec-oldbusy", "other-dir")}
        for d in dirs.values():
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "f.py").write_text("x")
        os.chmod(dirs[f"nanochat-exec-{dead.pid}-abc"] / "sub", 0)  # sandboxed code may do that
        old = time.time() - 7 * 3600
        for name in ("nanochat-exec-old12345", "nanochat-exec-oldbusy"):
            os.utime(dirs[name], (old, old))
        busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                cwd=dirs["nanochat-exec-oldbusy"] / "sub")
        try:
            time.sleep(0.2)
            removed = clean_stale_exec_dirs(str(tmp_path))
        finally:
            busy.kill()
            busy.wait()
        assert sorted(os.path.basename(p) for p in removed) == sorted([f"nanochat-exec-{dead.pid}-abc",
                                                                       "nanochat-exec-old12345"])
        assert sorted(os.listdir(tmp_path)) == sorted(set(dirs) - {f"nanochat-exec-{dead.pid}-abc",
                                                                   "nanochat-exec-old12345"})
    finally:
        live.kill()
        live.wait()


def test_two_ranks_killed_while_replacing_a_step_keep_it(tmp_path, corpus_dir, tokenizer):
    """torchrun x2: a fresh run into a directory replaces the steps it saves; rank 1 is
    SIGKILLed halfway into its state file of step 2. The earlier run's step 2 (model and
    both ranks' states) stays complete and loadable."""
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    args = ["--device_type=cpu", "--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
            "--num_iterations=2", "--eval_every=-1", "--eval_tokens=256", "--core_metric_every=-1",
            "--sample_every=-1", "--run=dummy", f"--data_dir={corpus_dir}"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    killer = tmp_path / "killer.py"
    killer.write_text("import os, runpy, signal, sys, torch\n"
                      "real = torch.save\n"
                      "def save(obj, f, *a, **k):\n"
                      "    if os.environ.get('KILL') and os.environ['RANK'] == '1':\n"
                      "        f.write(b'PK half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
                      "    return real(obj, f, *a, **k)\n"
                      "torch.save = save\n"
                      "sys.path.insert(0, os.getcwd())  # this checkout, not an installed one\n"
                      "sys.argv = ['base_train'] + sys.argv[1:]\n"
                      "runpy.run_module('scripts.base_train', run_name='__main__')\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(killer), "--"]
    r = subprocess.run(torchrun + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = str(tmp_path / "base_checkpoints" / "d2")
    before = [cm.load_checkpoint(ckpt, 2, load_state=True, rank=k) for k in (0, 1)]
    r = subprocess.run(torchrun + args + ["--seed=7"], cwd=ROOT, env=dict(env, KILL="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    for k in (0, 1):
        model, state, meta = cm.load_checkpoint(ckpt, 2, load_state=True, rank=k)
        assert all(torch.equal(model[n], before[k][0][n]) for n in model)
        assert meta["files"] == before[k][2]["files"]


def test_random_checkpoint_loads_and_never_picks_a_special_token(tokenizer, tmp_path, monkeypatch):
    """dev/random_checkpoint.py writes a checkpoint that load_model finds, whose special
    tokens' logits are 0 (so a sampled answer runs to max_tokens)."""
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "dev/random_checkpoint.py", "--depth=2", "--device_type=cpu"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "chatsft_checkpoints" / "d2").is_dir()
    model, tok, _ = cm.load_model("sft", "cpu")
    assert model.config.n_layer == 2 and model.config.vocab_size == tok.get_vocab_size()
    with torch.no_grad():
        logits = model(torch.tensor([[tok.get_bos_token_id(), 5, 6, 7]]))[0, -1]
    special = [tok.encode_special(name) for name in tok.get_special_tokens()]
    assert torch.all(logits[special] == 0) and logits.abs().max() > 0


def _latest_worker(rank, world, init_file, directory, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == 1:  # this rank sees a newer step (a save in progress, another disk): rank 0's list wins
            real = cm._complete_steps
            cm._complete_steps = lambda d: real(d) + [9]
        step, (state, _, _) = cm._load_latest_good(directory, None, lambda s: cm.load_checkpoint(directory, s),
                                                   torch.device("cpu"))
        torch.save((step, state["w"][0, 0].item()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_that_list_different_latest_steps_load_rank_0s(tmp_path):
    """Under DDP the latest step is rank 0's pick (broadcast), and every rank loads it: before,
    each rank listed the directory itself, and a rank that saw another step loaded it (or,
    for a file it then lacked, raised while the others went on)."""
    import torch.multiprocessing as mp
    ckpt = tmp_path / "ckpt"
    save(ckpt, 3, 1.0)
    save(ckpt, 5, 2.0)
    mp.spawn(_latest_worker, args=(2, str(tmp_path / "init"), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)] == [(5, 2.0), (5, 2.0)]


def _fatal_worker(rank, world, init_file, directory, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def load(s):
            if rank == 1:  # e.g. another tokenizer on this node: not a damaged file, not a vote to fall back on
                raise cm.CheckpointError("refused here")
            return cm.load_checkpoint(directory, s)
        try:
            cm._load_latest_good(directory, None, load, torch.device("cpu"))
            outcome = "loaded"
        except cm.CheckpointError as e:
            outcome = str(e)
        torch.save(outcome, os.path.join(out_dir, f"fatal{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """An error other than a damaged or missing file on one rank: it skipped the vote, and the
    other ranks waited in it forever. Now every rank raises (mp.spawn's join would hang)."""
    import torch.multiprocessing as mp
    ckpt = tmp_path / "ckpt"
    save(ckpt, 3, 1.0)
    mp.spawn(_fatal_worker, args=(2, str(tmp_path / "init"), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"fatal{r}.pt") for r in (0, 1)]
    assert got[1] == "refused here" and "another rank could not load it" in got[0], got
