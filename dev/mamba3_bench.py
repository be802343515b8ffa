"""
One Mamba-3 layer alone, at a model's shapes (d20: 1280 wide, batch 32 x 2048 tokens), as
training runs it (torch.compile'd, bf16 autocast on CUDA, forward + backward), and its Triton
steps one by one: where a layer's time goes without a whole base_bench run. One JSON line per
measurement:
  mixer: the layer with its steps as Triton kernels (the default on an NVIDIA GPU), all in
         PyTorch (`pytorch`), and with the kernels but its output (norm and gate) in PyTorch
         (`gate_in_pytorch`: what gate_norm replaced), ms per forward + backward, peak memory;
  op:    gate_norm and turn_qk alone (eager), forward and backward ms, at their launch settings
         or, with --sweep, at each of a few (the settings are mamba3_triton's constants).

    python dev/mamba3_bench.py                  # d20 shapes, all Mamba-3 parts on (dev/mamba_bench.sh's AAM)
    python dev/mamba3_bench.py --sweep          # and the ops' launch settings
    python dev/mamba3_bench.py --variants=kernels --set=TURN_HB=64   # one variant, at other launch settings
    python dev/mamba3_bench.py --depth=2 --batch=2 --seq=64 --device_type=cpu --compile=0 --iters=1  # (a test; Triton's interpreter)
"""

import argparse
import json
import time

import torch

from nanochat import mamba3
from nanochat import mamba3_triton as mt
from nanochat.attention import Context
from nanochat.common import autocast_for, autodetect_device_type, max_memory_allocated_mib, synchronize
from nanochat.gpt import GPT, LayerSpec

parser = argparse.ArgumentParser(description="Time one Mamba-3 layer and its Triton steps")
parser.add_argument("--depth", type=int, default=20, help="the model whose layer shapes to use")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--seq", type=int, default=2048)
parser.add_argument("--compile", type=int, default=1, help="torch.compile the layer (as training does)")
parser.add_argument("--iters", type=int, default=20, help="timed calls of each (after 3 untimed)")
parser.add_argument("--sweep", action="store_true", help="also time the ops at several launch settings")
parser.add_argument("--variants", type=str, default="kernels,gate_in_pytorch,pytorch", help="the mixer's variants to time")
parser.add_argument("--set", type=str, default="", help="launch settings to use, e.g. TURN_HB=64,TURN_WARPS=8")
parser.add_argument("--device_type", type=str, default="", help="cuda|cpu (empty: autodetect)")
args = parser.parse_args()
unknown = set(args.variants.split(",")) - {"kernels", "gate_in_pytorch", "pytorch"}
if unknown:
    parser.error(f"--variants: unknown {sorted(unknown)} (kernels, gate_in_pytorch, pytorch)")
device = torch.device(args.device_type or autodetect_device_type())
for kv in filter(None, args.set.split(",")):  # mamba3_triton's module constants (launch settings)
    name, value = kv.split("=")
    assert hasattr(mt, name), f"--set: mamba3_triton has no {name}"
    setattr(mt, name, int(value))
if device.type == "cpu":  # (tests: the kernels in Triton's interpreter)
    mamba3.FUSED_DEVICES.add("cpu")

cfg = GPT.config_for_depth(args.depth, mamba_pattern="AAM", mamba3_qknorm=True, mamba3_bias=True,
                           mamba3_complex_rope=True, mamba3_trapezoidal=True)
torch.manual_seed(0)
layer = mamba3.Mamba3(cfg, 2, LayerSpec("mamba3", 2)).to(device)
layer.init_weights()
with torch.no_grad():
    layer.c_proj.weight.normal_(0, 0.02)  # (zero at init: no gradient would reach the rest)
H, P, N, A = layer.H, layer.P, layer.N, layer.n_angles
B, T = args.batch, args.seq
ctx = Context(None, None, 0, T, {})


def timed(f):
    """ms per call of f (3 untimed first), and the peak memory of those calls in GiB."""
    for _ in range(3):
        f()
    synchronize(device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        f()
    synchronize(device.type)
    return 1e3 * (time.perf_counter() - t0) / args.iters, max_memory_allocated_mib(device.type) / 1024


def mixer(variant):
    fused, saved = set(mamba3.FUSED_DEVICES), mamba3._fused
    if variant == "pytorch":
        mamba3.FUSED_DEVICES.clear()
    elif variant == "gate_in_pytorch":
        assert mamba3.fused_ok(device, torch.float32)  # (imports the kernels)
        reference = lambda y, x, z, D, w: layer._output(y[:, :, None], None if x is None else x[:, :, None], z,
                                                        x is not None).unflatten(-1, (H, P))
        mamba3._fused = mamba3._fused[:4] + (reference,)
    torch._dynamo.reset()
    run = torch.compile(layer) if args.compile else layer
    u = torch.randn(B, T, cfg.n_embd, device=device, requires_grad=True)

    def step():
        with autocast_for(device.type):
            out = run(u, ctx)
        out.float().square().mean().backward()
    try:
        ms, peak = timed(step)
    finally:
        mamba3.FUSED_DEVICES.clear()
        mamba3.FUSED_DEVICES.update(fused)
        mamba3._fused = saved
    print(json.dumps({"what": "mixer", "variant": variant, "set": args.set, "depth": args.depth, "tokens": B * T,
                      "compile": bool(args.compile), "fwd_bwd_ms": round(ms, 3), "peak_gib": round(peak, 2)}), flush=True)


def op(name, settings, fwd, inputs):
    """fwd(*inputs) alone, then its backward alone (from a saved forward), at each launch
    setting (module constants of mamba3_triton, put back after)."""
    saved = {k: getattr(mt, k) for s in settings for k in s}
    for s in settings:
        for k, v in s.items():
            setattr(mt, k, v)
        with torch.no_grad():
            fwd_ms, _ = timed(lambda: fwd(*inputs))
        outs = fwd(*inputs)
        outs = [outs] if torch.is_tensor(outs) else list(outs)
        grads = [torch.randn_like(o) for o in outs]
        bwd_ms, _ = timed(lambda: torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads,
                                                      retain_graph=True))
        print(json.dumps({"what": "op", "op": name, "settings": s, "fwd_ms": round(fwd_ms, 3),
                          "bwd_ms": round(bwd_ms, 3)}), flush=True)
    for k, v in saved.items():
        setattr(mt, k, v)


for variant in args.variants.split(","):
    mixer(variant)
dt = torch.bfloat16 if device.type == "cuda" else torch.float32
leaf = lambda *s, scale=1.0: (scale * torch.randn(*s, device=device)).to(dt).requires_grad_()
f32 = lambda *s, scale=1.0: (scale * torch.randn(*s, device=device)).requires_grad_()
sweep = args.sweep
op("gate_norm", [dict(GATE_BT=bt, GATE_WARPS=w) for bt, w in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 8))] if sweep
   else [dict(GATE_BT=mt.GATE_BT, GATE_WARPS=mt.GATE_WARPS)],
   mt.gate_norm, (leaf(B, T, H, P), leaf(B, T, H, P), leaf(B, T, H, P), f32(H), f32(H, P)))
op("turn_qk", [dict(TURN_BT=bt, TURN_HB=hb, TURN_WARPS=w) for bt, hb, w in ((16, 8, 4), (16, 8, 8), (16, 64, 4),
                                                                              (16, 64, 8), (8, 64, 4), (32, 64, 8))] if sweep
   else [dict(TURN_BT=mt.TURN_BT, TURN_HB=mt.TURN_HB, TURN_WARPS=mt.TURN_WARPS)],
   lambda Bm, Cm, bB, bC, phi: mt.turn_qk(Bm, Cm, bB, bC, phi, dt),
   (leaf(B, T, N), leaf(B, T, N), f32(H, N), f32(H, N), (6 * torch.rand(B, T, H, A, device=device)).requires_grad_()))
