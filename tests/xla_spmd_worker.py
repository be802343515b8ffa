"""
The CPU XLA side of tests/test_tpu.py, run in a subprocess with PJRT_DEVICE=CPU and
CPU_NUM_DEVICES=8 (torch_xla reads them at import, and SPMD mode is per process):

    python tests/xla_spmd_worker.py OUT.json CKPT_DIR

Trains tiny models for 3 steps on the plain CPU and on 8 virtual XLA devices: the
plain model (GQA, the quality recipe) at TP=4 x DP=2 and TP=2 x DP=4, and one with every
extension on (Mamba-3, Engram, mHC, MTP, DSA) at TP=4 x DP=2 with gradient
checkpointing through torch_xla's. It writes what the tests assert on: the losses, every
parameter's sharding before and after the optimizer steps and the plan's expected one,
and the logits of a checkpoint written from the sharded extension model, loaded back on
the CPU path. XLA's CPU compiles dominate the time (the optimizer step's graph most): the
test runs this with XLA_FLAGS that skip the backend's optimization passes.
"""

import copy
import inspect
import json
import os
import sys
import time

import torch

from nanochat import tpu
from nanochat.checkpoint_manager import build_from_checkpoint, load_optimizer_states, save_checkpoint
from nanochat.gpt import GPTConfig, build_model

STEPS, ROWS, T = 3, 8, 32
PLAIN = GPTConfig(sequence_len=T, vocab_size=200, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, value_embeds=True,
                  smear=True, backout=True, layer_lambdas=True, qk_scale=1.2, pad_vocab_to=64)
FULL = GPTConfig(sequence_len=T, vocab_size=200, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                 mamba_pattern="AAM", mamba3_qknorm=True, mamba3_bias=True, mamba3_complex_rope=True,
                 mamba3_trapezoidal=True, mamba3_headdim=16, mamba3_d_state=16, mamba3_chunk=16,
                 engram_layers="0,2", engram_dim=32, engram_table=61, mhc=True, mhc_streams=2, mtp=True,
                 dsa_start_layer=1, dsa_top_k=8, dsa_heads=2, dsa_dim=16, value_embeds=True, smear=True,
                 backout=True, layer_lambdas=True, qk_scale=1.2, pad_vocab_to=64)
# every optimizer option of base_train's defaults on; the learning rates a tenth of the defaults, which on
# random tokens make a 64-wide model's loss climb, a regime that amplifies float differences of any backend
OPT = dict(unembedding_lr=0.0008, embedding_lr=0.03, matrix_lr=0.002, scalar_lr=0.05, weight_decay=0.1,
           cautious_wd=True, normuon_beta2=0.9, muon_eq=True, muon_plus=True, adam_per_group=True)


def batches():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, PLAIN.vocab_size, (STEPS, ROWS, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def train(model, device, mesh=None, checkpointing=False, sync=lambda: None):
    """STEPS base_train steps (loss with its parts, backward, both optimizers): (losses, optimizers)."""
    model.gradient_checkpointing = checkpointing
    optimizers = model.setup_optimizers(**OPT)
    losses = []
    for x, y in batches():
        x, y = x.to(device), y.to(device)
        if mesh is not None:
            x, y = tpu.shard_batch(x, mesh), tpu.shard_batch(y, mesh)
        loss, _, _ = model(x, y, return_parts=True)  # as base_train calls it
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        losses.append(loss.item())
    return losses, optimizers


def main(out_path, ckpt_dir):
    import torch_xla
    import torch_xla.runtime as xr
    xr.use_spmd()
    inits, result = {}, {"devices": xr.global_runtime_device_count(), "cpu": {}, "runs": {}}
    for name, config in (("plain", PLAIN), ("full", FULL)):
        torch.manual_seed(0)
        ref = build_model(config, "cpu")
        # away from the init, where the output projections are zero: there the per-layer scalars'
        # gradients are 0 in exact math (the final norm is scale-invariant) and float noise in
        # practice, which AdamW (eps 1e-10) turns into full steps of either sign on any backend
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n.endswith("c_proj.weight"):
                    p.normal_(0, 0.02)
        inits[name] = copy.deepcopy(ref.state_dict())
        result["cpu"][name] = train(ref, "cpu")[0]
    probe = batches()[0][0]
    for name, config, tp in (("plain", PLAIN, 4), ("plain", PLAIN, 2), ("full", FULL, 4)):
        t0 = time.time()
        mesh = tpu.make_mesh(tp)
        model = build_model(config, "cpu")
        model.load_state_dict(inits[name])
        model = model.to(torch_xla.device())
        full = name == "full"
        if full:  # gradient checkpointing through torch_xla's (tpu.checkpoint_block)
            model.checkpoint_block = tpu.checkpoint_block
        plan = tpu.shard_model(model, mesh, tp)
        before = {n: tpu.sharding_of(p) for n, p in model.named_parameters()}
        losses, optimizers = train(model, torch_xla.device(), mesh, full, torch_xla.sync)
        after = {n: tpu.sharding_of(p) for n, p in model.named_parameters()}
        expected = {n: tpu.expected_sharding(mesh, plan[n], p.dim()) for n, p in model.named_parameters()}
        # a resume (as base_train: the state loaded, then annotated): each moment shaped as its parameter
        # gets the parameter's sharding, each Muon momentum stack its group's where the specs agree
        resumed = model.setup_optimizers(**OPT)
        load_optimizer_states(resumed, tpu.to_cpu([o.state_dict() for o in optimizers]))
        names = {p: n for n, p in model.named_parameters()}

        def state_shardings(opts):
            return {f"{names[p]}.{k}": [tpu.sharding_of(t), list(t.shape)] for o in opts for p, st in o.state.items()
                    for k, t in st.items() if torch.is_tensor(t) and t.dim() > 0}
        loaded = state_shardings(resumed)
        tpu.shard_optimizer_states(resumed, model, mesh, plan)
        entry = {"losses": losses, "plan": {n: list(s) if s else None for n, s in plan.items()},
                 "state_loaded": loaded, "state_resumed": state_shardings(resumed),
                 "stack_expected": {n: tpu.expected_sharding(mesh, (None, *(plan[n] or (None, None))), 3) for n in plan},
                 "before": before, "after": after, "expected": expected,
                 "layout": tpu.layout(config, tp, data=8 // tp, rows=ROWS)}
        if full:  # a checkpoint of the sharded model, in the GPU/CPU format, read back on the CPU path
            model.eval()
            with torch.no_grad():
                logits = model(tpu.shard_batch(probe.to(torch_xla.device()), mesh)).cpu()
            meta = {"step": STEPS, "model_config": config.to_dict()}
            state = tpu.to_cpu({"optimizers": [o.state_dict() for o in optimizers]})
            save_checkpoint(ckpt_dir, STEPS, tpu.to_cpu(model.state_dict()), state, meta)
            cpu_model, _ = build_from_checkpoint(ckpt_dir, STEPS, torch.device("cpu"), "eval")
            with torch.no_grad():
                cpu_logits = cpu_model(probe)
            entry["logits_diff"] = (logits - cpu_logits).abs().max().item()
            entry["logits_scale"] = cpu_logits.abs().max().item()
            entry["state_devices"] = sorted({str(v.device) for v in torch.load(
                f"{ckpt_dir}/model_{STEPS:06d}.pt", weights_only=True).values()})
        entry["seconds"] = time.time() - t0
        result["runs"][f"{name} {8 // tp}x{tp}"] = entry
    # 6 heads (and 6 kv heads) over tp=4: SPMD pads the uneven shards; forward only
    config = GPTConfig(sequence_len=T, vocab_size=200, n_layer=2, n_head=6, n_kv_head=6, n_embd=96)
    torch.manual_seed(0)
    ref = build_model(config, "cpu").eval()
    for b in ref.blocks:  # c_proj starts at zero: give attention a say in the logits
        torch.nn.init.normal_(b.mixer.c_proj.weight, 0, 0.1)
    mesh = tpu.make_mesh(4)
    model = copy.deepcopy(ref).to(torch_xla.device())
    tpu.shard_model(model, mesh, 4)
    with torch.no_grad():
        diff = (model(tpu.shard_batch(probe.to(torch_xla.device()), mesh)).cpu() - ref(probe)).abs().max().item()
        result["uneven"] = {"heads": config.n_head, "tp": 4, "logits_diff": diff,
                            "c_q": tpu.sharding_of(model.blocks[0].mixer.c_q.weight)}
        # the flash path as base_train calls it, partitioned over the mesh, with a reference kernel
        # (tests/test_tpu.py's) in place of the Pallas one that needs a TPU
        sys.path.insert(0, os.path.dirname(__file__))
        from test_tpu import reference_flash_attention
        from torch_xla.experimental.custom_kernel import flash_attention
        specs = []

        def kernel(*a, **kw):
            specs.append(kw["partition_spec"])
            return reference_flash_attention(*a, **kw)
        model.flash = tpu.FlashAttention(mesh, kernel)
        diff = (model(tpu.shard_batch(probe.to(torch_xla.device()), mesh)).cpu() - ref(probe)).abs().max().item()
        result["flash"] = {"signature": str(inspect.signature(flash_attention)), "partition_spec": specs[0],
                           "logits_diff": diff, "unavailable": tpu.flash_unavailable()}
        # base_train's samples on XLA (no torch.Generator there; batch 1 under the flash path on a 1 x 4 mesh,
        # data 1, and on a 2 x 2 one, data 2: the kernel cannot take a batch of 1 there)
        result["generate"] = {"cpu": list(ref.generate([1, 2, 3], 4, temperature=0)), "xla": [], "sampled": []}
        for tp in (4, 2):
            model.flash = tpu.FlashAttention(tpu.make_mesh(tp), kernel)
            result["generate"]["xla"].append(list(model.generate([1, 2, 3], 4, temperature=0)))
        result["generate"]["sampled"] = list(model.generate([1, 2, 3], 4, temperature=1.0, seed=5))
        # evaluate_bpb on XLA (base_train's validation): bits per byte as on the CPU, and a
        # later call over more batches compiles nothing new (each batch's graph is run and reused, not one
        # graph of all the batches unrolled)
        import torch_xla.debug.metrics as met
        from nanochat.loss_eval import evaluate_bpb
        token_bytes = torch.arange(config.vocab_size) % 4  # (0: special-token-like, counted in neither sum)
        data = [(x[:2], y[:2]) for x, y in batches()]  # (2 rows: the 2 x 2 mesh's data axis)
        compiles = lambda: (met.metric_data("CompileTime") or [0])[0]
        xla_bpb = evaluate_bpb(model, iter([(tpu.shard_batch(x.to(torch_xla.device()), mesh),
                                             y.to(torch_xla.device())) for x, y in data]), 2,
                               token_bytes.to(torch_xla.device()))
        before = compiles()
        xla_bpb3 = evaluate_bpb(model, iter([(tpu.shard_batch(x.to(torch_xla.device()), mesh),
                                              y.to(torch_xla.device())) for x, y in data]), 3,
                                token_bytes.to(torch_xla.device()))
        result["bpb"] = {"cpu": evaluate_bpb(ref, iter(data), 3, token_bytes), "xla": xla_bpb3, "xla_2": xla_bpb,
                         "cpu_2": evaluate_bpb(ref, iter(data), 2, token_bytes), "new_compiles": compiles() - before}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
