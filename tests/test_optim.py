"""The distributed optimizers give the same result as one process: 2 gloo processes on
CPU, each with half of the batch, against 1 process with all of it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.gpt import GPTConfig, build_model
from nanochat.muon import polar_express

CFG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=32)
STEPS = 3


def train(rank, world, batch):
    torch.manual_seed(0)
    model = build_model(CFG, "cpu")
    with torch.no_grad():  # non-zero output projections so every gradient is non-trivial
        for b in model.blocks:
            b.mixer.c_proj.weight.normal_(0, 0.05)
            b.mlp.c_proj.weight.normal_(0, 0.05)
    opts = model.setup_optimizers(weight_decay=0.1)
    for g in opts[1].param_groups:
        g["ns_dtype"] = torch.float32  # bf16 rounding would hide small differences in the averaging
    x, y = batch
    n = x.size(0) // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    for _ in range(STEPS):
        model(x, y).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}, [o.state_dict() for o in opts]


def _worker(rank, world, init_file, batch, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state, _ = train(rank, world, batch)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process(tmp_path):
    torch.manual_seed(1)
    x = torch.randint(0, 64, (4, 16))
    batch = (x, x.roll(-1, 1))
    single, _ = train(0, 1, batch)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), batch, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        dist_state = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in single.items():
            assert torch.allclose(dist_state[k], v, atol=5e-5, rtol=1e-5), f"rank {rank} differs in {k}"
    # and training really moved the weights
    torch.manual_seed(0)
    init = build_model(CFG, "cpu").state_dict()
    assert not torch.allclose(init["wte.weight"], single["wte.weight"])


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64), (3, 32, 16)])
def test_polar_express_orthogonalizes(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    O = polar_express(G).float()
    s = torch.linalg.svdvals(O)
    # Polar Express drives singular values into roughly [0.7, 1.2] (approximate, bf16)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # and keeps the singular vectors: O is close to U V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (O * (U @ Vh)).sum(dim=(-2, -1)) / (O.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert (cos > 0.97).all()
