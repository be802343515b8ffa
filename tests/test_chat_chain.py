"""The chat stages end to end on CPU, on the generated task fixtures (tasks/fixtures.py):
base_train -> mid_train (with exact resume) -> chat_sft -> chat_rl -> chat_eval, plus
the errors a user meets first: no previous checkpoint, a malformed JSONL line, no hub."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tasks.fixtures import write_task_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tokenizer, corpus_dir):
    base = tmp_path_factory.mktemp("chain")
    shutil.copytree(tokenizer.directory, base / "tokenizer")
    data = write_task_fixtures(str(tmp_path_factory.mktemp("task_data")))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_TASK_DATA=data, OMP_NUM_THREADS="1",
               NANOCHAT_WORDS_FILE=os.path.join(data, "words.txt"), HF_HUB_OFFLINE="1")
    run(env, "scripts.base_train", "--depth=2", "--max_seq_len=128", "--device_batch_size=2",
        "--total_batch_size=256", "--num_iterations=3", "--eval_every=-1", "--eval_tokens=256",
        "--core_metric_every=-1", "--sample_every=-1", f"--data_dir={corpus_dir}")
    return base, env


def run(env, module, *args, ok=True):
    cmd = [sys.executable, "-m", module, "--device_type=cpu", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def losses(stdout):
    return dict(re.findall(r"step (\d+)/\d+ \| loss: ([\d.]+)", stdout))


MID = ["--device_batch_size=2", "--total_batch_size=512", "--num_iterations=4", "--eval_every=2",
       "--eval_tokens=512", "--simple_spelling=20", "--spelling_bee=20"]


def test_chain_base_mid_sft_rl_eval(chain):
    base, env = chain
    # midtraining, checkpointing every 2 steps
    full = run(env, "scripts.mid_train", *MID, "--save_every=2").stdout
    lf = losses(full)
    assert list(lf) == ["00001", "00002", "00003", "00004"], full
    mid_dir = base / "mid_checkpoints" / "d2"
    assert {"meta_000002.json", "meta_000004.json", "state_000002_rank0.pt"} <= set(os.listdir(mid_dir))
    assert re.search(r"step 00004 \| val bpb: [\d.]+", full)
    # resume from step 2: steps 3 and 4 see the same data and give the same losses
    for f in ("meta_000004.json", "model_000004.pt", "state_000004_rank0.pt"):
        os.remove(mid_dir / f)
    resumed = run(env, "scripts.mid_train", *MID, "--resume_from_step=2").stdout
    assert losses(resumed) == {k: lf[k] for k in ("00003", "00004")}

    out = run(env, "scripts.chat_sft", "--device_batch_size=2", "--target_examples_per_step=4", "--num_iterations=3",
              "--eval_every=2", "--eval_steps=2", "--eval_metrics_every=3", "--eval_metrics_max_problems=8",
              "--smoltalk_examples=8", "--simple_spelling=4", "--spelling_bee=4").stdout
    assert re.search(r"step 00003 \| MMLU acc: [\d.]+ \| ARC-Easy acc: [\d.]+", out), out
    assert list(losses(out)) == ["00001", "00002", "00003"]
    meta = json.loads((base / "chatsft_checkpoints" / "d2" / "meta_000003.json").read_text())
    assert meta["source"] == "mid" and meta["source_step"] == 4

    out = run(env, "scripts.chat_rl", "--examples_per_step=2", "--num_samples=3", "--max_new_tokens=12",
              "--device_batch_size=4", "--num_iterations=2", "--eval_every=-1", "--eval_examples=2",
              "--eval_num_samples=2", "--save_every=-1").stdout
    rewards = re.findall(r"step (\d+)/00002 \| mean reward: ([\d.]+)", out)
    assert [s for s, _ in rewards] == ["00001", "00002"] and all(0 <= float(r) <= 1 for _, r in rewards)
    assert re.search(r"pass@1: [\d.]+ \| pass@2: [\d.]+", out), out
    assert (base / "chatrl_checkpoints" / "d2" / "meta_000002.json").exists()

    out = run(env, "scripts.chat_eval", "-i", "rl", "-x", "4", "-m", "12").stdout
    # (ChatCORE centres each accuracy on its chance level: below chance it is negative, as a
    # tiny random model's can be; CI once printed -0.0556)
    table = dict(re.findall(r"^\| (\S+) \| (-?[\d.]+) \|$", out, re.M))
    assert set(table) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE",
                          "HumanEval-cpp", "MBPP-cpp"}, out
    assert -1 <= float(table["ChatCORE"]) <= 1 and all(0 <= float(v) <= 1 for k, v in table.items() if k != "ChatCORE")
    assert re.search(r"^\| C\+\+ pass@1 \| [\d.]+ \|$", out, re.M), out  # the C++ summary beside ChatCORE
    for st in ("passed", "compile_error", "timeout", "crash", "wrong_answer"):  # how the C++ samples ended
        assert re.search(rf"^\| MBPP-cpp samples {st} \| [\d.]+ \|$", out, re.M), out
    assert all(0 <= float(v) <= 1 for k, v in table.items() if k != "ChatCORE")
    section = json.loads((base / "report" / "chat-evaluation-rl.json").read_text())
    assert section["data"][1]["ChatCORE"] == pytest.approx(float(table["ChatCORE"]), abs=1e-4)


def test_missing_previous_stage_is_explained(tmp_path, tokenizer):
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    out = run(env, "scripts.chat_sft", ok=False)
    assert out.returncode != 0 and "run `python -m scripts.mid_train` first" in out.stderr, out.stderr


def test_bad_identity_file_names_file_and_line(chain, tmp_path):
    _, env = chain
    bad = tmp_path / "identity.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) +
                   "\n{not json\n")
    out = run(env, "scripts.mid_train", *MID, f"--identity_file={bad}", ok=False)
    assert out.returncode != 0 and f"{bad}:2" in out.stderr, out.stderr


def test_unreachable_hub_says_how_to_go_local(chain, tmp_path):
    _, env = chain
    env = {k: v for k, v in env.items() if k != "NANOCHAT_TASK_DATA"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "ds"))
    out = run(env, "scripts.mid_train", *MID, ok=False)
    assert out.returncode != 0 and "NANOCHAT_TASK_DATA" in out.stderr and "Hugging Face hub" in out.stderr, out.stderr
