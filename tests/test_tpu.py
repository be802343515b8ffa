"""
TPU training (nanochat/tpu.py) on CPU XLA: 8 virtual devices (PJRT_DEVICE=CPU,
CPU_NUM_DEVICES=8). torch_xla reads those at import and SPMD mode holds for a whole
process, so the XLA side runs once in a subprocess (tests/xla_spmd_worker.py) and these
tests assert on what it reports. The Pallas flash kernel itself needs a TPU; its call
(the scale above all) is checked against SDPA through a reference of its signature.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import tpu
from nanochat.gpt import GPT, GPTConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
# XLA's CPU compiles dominate the worker's time; its backend optimizations buy nothing here
XLA_ENV = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "8",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}


def reference_flash_attention(q, k, v, causal=False, q_segment_ids=None, kv_segment_ids=None, sm_scale=1.0, *,
                              ab=None, partition_spec=None, mesh=None):
    """torch_xla.experimental.custom_kernel.flash_attention's signature and math (the
    Pallas kernel computes softmax(sm_scale * q k^T, causal) v on equal heads), in PyTorch."""
    assert q.shape == k.shape == v.shape, "the kernel takes as many kv heads as query heads"
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if causal:
        T = q.size(-2)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.fixture(scope="module")
def xla_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xla")
    env = dict(os.environ, **XLA_ENV, NANOCHAT_BASE_DIR=str(tmp / "base"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "xla_spmd_worker.py"), str(tmp / "out.json"),
                          str(tmp / "ckpt")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, ("the CPU XLA worker failed (torch_xla is the tpu extra: uv sync --extra tpu)\n"
                                 + out.stdout[-3000:] + out.stderr[-5000:])
    return json.loads((tmp / "out.json").read_text())


def test_eight_virtual_xla_devices(xla_run):
    assert xla_run["devices"] == 8


@pytest.mark.parametrize("run", ["plain 2x4", "plain 4x2", "full 2x4"])
def test_sharded_training_matches_one_device(xla_run, run):
    """3 steps (loss, backward, Muon + AdamW) at TP x DP give the one-device CPU losses;
    "full" has every extension on and gradient checkpointing through torch_xla's."""
    cpu, xla = xla_run["cpu"][run.split()[0]], xla_run["runs"][run]["losses"]
    assert len(xla) == 3 and cpu[0] != cpu[2]  # the model trains: the steps differ
    assert max(abs(a - b) for a, b in zip(cpu, xla)) < 1e-4, (cpu, xla)


@pytest.mark.parametrize("run", ["plain 2x4", "plain 4x2", "full 2x4"])
def test_parameters_have_the_plans_sharding_before_and_after_the_optimizer(xla_run, run):
    r = xla_run["runs"][run]
    tp = int(run.split("x")[1])
    assert r["before"] == r["expected"] and r["after"] == r["expected"]
    plan = r["plan"]
    sharded = {n for n, s in plan.items() if s}
    # column: q, MLP in, lm_head (vocab); row: the output projections; kv heads (2) only when tp divides them
    assert plan["blocks.0.mixer.c_q.weight"] == ["model", None] and plan["lm_head.weight"] == ["model", None]
    assert plan["blocks.0.mlp.c_fc.weight"] == ["model", None] and plan["blocks.0.mlp.c_proj.weight"] == [None, "model"]
    assert plan["blocks.0.mixer.c_proj.weight"] == [None, "model"]
    assert plan["blocks.0.mixer.c_k.weight"] == (["model", None] if 2 % tp == 0 else None)
    assert plan["wte.weight"] is None and "blocks.0.mlp.c_fc.weight" in sharded
    # value embeddings: split by heads as c_v's output where the kv heads divide (plain 4x2), else replicated
    assert plan["blocks.1.mixer.ve.weight"] == ([None, "model"] if 2 % tp == 0 else None)
    assert r["expected"]["blocks.0.mixer.c_q.weight"] != r["expected"]["wte.weight"]  # the specs are not all alike
    if run.startswith("full"):
        assert plan["blocks.2.mixer.z_proj.weight"] == ["model", None] == plan["blocks.2.mixer.x_proj.weight"]
        assert plan["blocks.2.mixer.c_proj.weight"] == [None, "model"]
        assert plan["mtp.blocks.0.mlp.c_fc.weight"] == ["model", None]
        for replicated in ("blocks.0.engram.table.weight", "blocks.0.hc_mixer.phi.weight",
                           "blocks.1.mixer.indexer.wq.weight", "blocks.2.mixer.bc_proj.weight", "mtp.proj.0.weight"):
            assert plan[replicated] is None, replicated


@pytest.mark.parametrize("run", ["plain 2x4", "plain 4x2", "full 2x4"])
def test_a_resumed_optimizer_state_is_sharded_as_its_parameters(xla_run, run):
    """base_train's resume on XLA: the optimizers' state loaded from a CPU checkpoint lands
    unannotated (replicated: a whole copy on every chip); tpu.shard_optimizer_states gives
    each AdamW moment its parameter's sharding and each Muon momentum stack its matrices'."""
    r = xla_run["runs"][run]
    moments = [k for k in r["state_resumed"] if k.endswith((".exp_avg", ".exp_avg_sq"))]
    split = [k for k in moments if r["plan"][k.rsplit(".", 1)[0]]]
    assert moments and split  # (lm_head's at least)
    for k in moments:
        assert r["state_resumed"][k][0] == r["expected"][k.rsplit(".", 1)[0]], k
    assert all(r["state_loaded"][k][0] == "" for k in split)  # what the resume left without it
    stacks = {k: v for k, v in r["state_resumed"].items() if k.endswith(".momentum_buffer")}
    annotated = [k for k, (sharding, shape) in stacks.items() if sharding]
    assert any(r["plan"][k.rsplit(".", 1)[0]] for k in annotated), stacks  # (the MLP's: each c_fc has one spec)
    for k in annotated:
        assert stacks[k][0] == r["stack_expected"][k.rsplit(".", 1)[0]], k


def test_checkpoint_from_sharded_training_loads_on_the_cpu(xla_run):
    r = xla_run["runs"]["full 2x4"]
    assert r["state_devices"] == ["cpu"]  # whole CPU tensors, as GPU runs write them
    assert r["logits_diff"] < 1e-4 * max(1.0, r["logits_scale"]), r


def test_uneven_heads_are_padded_by_spmd(xla_run):
    """6 heads over tp=4: no divisibility is needed for correctness (SPMD pads the shards)."""
    r = xla_run["uneven"]
    assert r["heads"] == 6 and r["tp"] == 4 and r["logits_diff"] < 1e-4, r


def test_evaluate_bpb_on_xla_equals_the_cpu_and_compiles_once(xla_run):
    """evaluate_bpb on a sharded XLA model: the CPU model's bits per byte over 2 and 3 batches,
    and the 3-batch call compiles no new graph (it ran each batch's graph as it went; one graph
    of all the batches was compiled anew for every number of them)."""
    r = xla_run["bpb"]
    assert abs(r["xla"] - r["cpu"]) < 1e-4 * r["cpu"] and abs(r["xla_2"] - r["cpu_2"]) < 1e-4 * r["cpu_2"], r
    assert r["cpu"] != r["cpu_2"] and r["new_compiles"] == 0, r


def test_flash_attention_call_on_xla(xla_run):
    """Our call has the kernel's signature, partitions over the mesh, and the CPU XLA
    backend says why the kernel cannot run there (then SDPA serves)."""
    f = xla_run["flash"]
    assert f["signature"] == str(__import__("inspect").signature(reference_flash_attention))
    assert f["partition_spec"] == ["data", "model", None, None] and f["logits_diff"] < 1e-4, f
    assert "runs only on a TPU" in f["unavailable"]


def tiny_model(n_kv_head):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                       window_pattern="L", qk_scale=1.2)
    return build_model(config, "cpu").eval()


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_flash_attention_scale_matches_sdpa(n_kv_head):
    """The flash path's logits equal SDPA's (softmax scale 1/sqrt(head_dim), causal, GQA
    expanded); torch_xla's default sm_scale=1.0, which the fork used, does not."""
    model = tiny_model(n_kv_head)
    with torch.no_grad():
        for block in model.blocks:  # c_proj starts at zero: give attention a say in the logits
            block.mixer.c_proj.weight.normal_(0, 0.2)
    idx = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa = model(idx)
        calls = []

        def kernel(*a, **kw):
            calls.append(kw)
            return reference_flash_attention(*a, **kw)
        model.flash = tpu.FlashAttention(kernel=kernel)
        flash = model(idx)
        assert len(calls) == 2 and calls[0]["causal"] and calls[0]["sm_scale"] == 1 / math.sqrt(16)
        assert (flash - sdpa).abs().max() < 1e-5
        model.flash = tpu.FlashAttention(kernel=lambda q, k, v, **kw: reference_flash_attention(q, k, v, causal=True))
        assert (model(idx) - sdpa).abs().max() > 1e-2  # sm_scale 1.0: another model


def test_flash_attention_takes_sdpa_for_a_batch_the_data_axis_does_not_divide():
    """CORE (one row per choice) and a sampling prefill (batch 1) on a mesh with data > 1:
    SDPA, not the kernel (its shard_map returned a batch of 2 for 1 on a 2 x 4 mesh)."""
    from types import SimpleNamespace
    calls = []
    mesh = SimpleNamespace(axis_names=(tpu.DATA, tpu.MODEL), mesh_shape=(2, 4))
    flash = tpu.FlashAttention(mesh, kernel=lambda *a, **kw: calls.append(kw) or reference_flash_attention(*a, **kw))
    for B in (1, 3, 2, 4):
        q, k, v = (torch.randn(B, 4, 8, 16) for _ in range(3))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert (flash(q, k, v) - want).abs().max() < 1e-5
    assert len(calls) == 2 and calls[0]["partition_spec"] == (tpu.DATA, tpu.MODEL, None, None)  # B = 2 and 4 only


def test_sampling_on_xla_equals_the_cpu(xla_run):
    """GPT.generate on XLA (base_train's samples): it made a torch.Generator on the XLA device,
    which torch refuses, and the run died before its last checkpoint; its greedy tokens now equal
    the CPU model's, under the flash path with data 1 and data 2 (batch 1: SDPA)."""
    g = xla_run["generate"]
    assert g["xla"] == [g["cpu"], g["cpu"]] and len(g["cpu"]) == 4
    assert len(g["sampled"]) == 4 and all(0 <= t < 200 for t in g["sampled"])


def test_flash_path_is_not_taken_for_windows_or_decoding():
    """Sliding-window layers and cached decoding keep SDPA (the kernel has no windows)."""
    model = tiny_model(4)
    model.flash = tpu.FlashAttention(kernel=lambda *a, **kw: pytest.fail("flash called"))
    q = torch.randn(1, 4, 8, 16)
    ctx = model._context(torch.zeros(1, 8, dtype=torch.long), 0)
    attn = model.blocks[0].mixer
    attn.window = 4  # a windowed layer
    attn.attend(q, q, q, ctx)
    ctx.pos0 = 3  # a chunk after cached positions
    attn.window = 64
    attn.attend(q, torch.randn(1, 4, 11, 16), torch.randn(1, 4, 11, 16), ctx)


def test_layout_rules():
    """Divisibility by tp: reported (SPMD pads), an error only where a layout cannot run."""
    d24 = GPT.config_for_depth(24)
    table = {what: ok for what, _, ok, _ in tpu.layout(d24, 8)}
    assert table["query heads (c_q, c_proj)"] is False and table["MLP width (c_fc, c_proj)"] is True
    assert all(ok for _, _, ok, _ in tpu.layout(d24, 4))
    with pytest.raises(ValueError, match="12 heads must divide by 8"):
        tpu.layout(d24, 8, flash=True)
    tpu.layout(d24, 4, flash=True)
    with pytest.raises(ValueError, match="3 rows per micro-batch"):
        tpu.layout(d24, 4, data=2, rows=3)
    hybrid = GPT.config_for_depth(24, mamba_pattern="AAM")
    assert ("Mamba-3 heads (z/x_proj, c_proj)", 48, True, "") in tpu.layout(hybrid, 8)


def test_docs_table_is_the_codes():
    doc = (ROOT / "docs" / "TENSOR_PARALLELISM.md").read_text()
    assert tpu.markdown_table() in doc


def test_tpu_flags_stop_on_other_devices():
    import argparse
    from nanochat.flags import add_model_args, check_tpu_flags
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    for flags, name in ((["--tensor_parallel=4"], "--tensor_parallel=4"), (["--xla_flash_attn"], "--xla_flash_attn")):
        with pytest.raises(SystemExit, match=f"{name} is for TPUs"):
            check_tpu_flags(parser.parse_args(flags), "cpu")
        check_tpu_flags(parser.parse_args(flags), "xla")


def test_to_cpu_keeps_structure():
    state = {"a": torch.ones(2), "b": [torch.zeros(1), 3], "c": (torch.ones(1),)}
    out = tpu.to_cpu(state)
    assert out["b"][1] == 3 and isinstance(out["c"], tuple) and torch.equal(out["a"], state["a"])


def test_base_train_on_xla_spmd_matches_the_cpu_run(tmp_path, tokenizer, corpus_dir):
    """scripts.base_train end to end (with --gradient_checkpointing) at --tensor_parallel=4 on 8 CPU XLA devices (DP=2, so
    --device_batch_size=1 gives the micro-batch of 2 rows that the CPU run has): the same
    step losses and val bpb, and its checkpoint loads on the CPU. The per-layer scalars
    and backout are off: at the init their gradients are float noise (tests/xla_spmd_worker.py)."""
    import re
    import shutil
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    common = ["-m", "scripts.base_train", "--depth=2", "--max_seq_len=64", "--total_batch_size=256",
              "--num_iterations=1", "--eval_every=-1", "--eval_tokens=256", "--core_metric_every=-1",
              "--sample_every=-1", "--layer_lambdas=0", "--backout=0", f"--data_dir={corpus_dir}"]
    runs = {}
    for name, extra, env in (("cpu", ["--device_type=cpu", "--device_batch_size=2", "--model_tag=cpu"], {}),
                             ("xla", ["--device_type=xla", "--device_batch_size=1", "--tensor_parallel=4",
                                      "--gradient_checkpointing", "--model_tag=xla"], XLA_ENV)):
        out = subprocess.run([sys.executable, *common, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, **env, NANOCHAT_BASE_DIR=str(tmp_path), OMP_NUM_THREADS="1"))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs[name] = out.stdout
    assert "mesh: (data, model) = (2, 4)" in runs["xla"] and "accumulation" in runs["xla"]
    # one step of 2 accumulated micro-batches: its loss, then val bpb after the optimizer step
    for pattern in (r"step 0000(\d)/00001 .*?\(step: ([\d.]+)\)", r"step 0000(\d) \| val bpb: ([\d.]+)"):
        cpu, xla = (dict(re.findall(pattern, runs[n])) for n in ("cpu", "xla"))
        assert len(cpu) >= 1 and cpu.keys() == xla.keys(), (cpu, xla)
        assert all(abs(float(cpu[k]) - float(xla[k])) < 1e-4 for k in cpu), (cpu, xla)
    from nanochat.checkpoint_manager import build_from_checkpoint
    model, meta = build_from_checkpoint(str(tmp_path / "base_checkpoints" / "xla"), 1, torch.device("cpu"), "eval")
    assert meta["user_config"]["tensor_parallel"] == 4 and model.config.n_layer == 2
