"""
Attention kernels alone, forward + backward, at the shapes base_train uses: which SDPA
backend (flash, cuDNN, efficient) and how flex_attention with a sliding-window block
mask compare on this GPU. Prints one JSON line per case. GPU only.

    python dev/attn_bench.py                 # d12 and d20 shapes, B=32, T=2048, D=128
    python dev/attn_bench.py --heads=10 --batch=32
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

parser = argparse.ArgumentParser(description="Time attention kernels (fwd+bwd) on the GPU")
parser.add_argument("--heads", default="6,10", help="comma-separated head counts (d12=6, d20=10)")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--seq_len", type=int, default=2048)
parser.add_argument("--head_dim", type=int, default=128)
parser.add_argument("--iters", type=int, default=20)
args = parser.parse_args()
assert torch.cuda.is_available(), "attn_bench needs a CUDA GPU"
B, T, D = args.batch, args.seq_len, args.head_dim


def timeit(fn, q, k, v):
    for _ in range(3):
        fn(q, k, v).sum().backward()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(args.iters):
        fn(q, k, v).backward(gout)
    torch.cuda.synchronize()
    return (time.time() - t0) / args.iters


compiled_flex = torch.compile(flex_attention, dynamic=False)
for H in (int(h) for h in args.heads.split(",")):
    # (B, T, H, D) storage seen as (B, H, T, D), as the model makes it
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    gout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    causal_flops = 4 * B * H * T * T * D / 2 * 3.5  # fwd 2 matmuls, bwd 5 (2.5x fwd); causal half
    cases = {}
    for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def fn(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cases[name] = (fn, 1.0)
    for window, frac in [(T, 1.0), (T // 2, 0.75)]:
        mask = create_block_mask(lambda b, h, qi, ki, w=window: (ki <= qi) & (qi - ki < w), None, None, T, T,
                                 device="cuda")
        cases[f"flex_window{window}"] = (lambda q, k, v, m=mask: compiled_flex(q, k, v, block_mask=m), frac)
    for name, (fn, frac) in cases.items():
        try:
            dt = timeit(fn, q, k, v)
            print(json.dumps({"case": name, "B": B, "H": H, "T": T, "D": D, "ms": round(1000 * dt, 2),
                              "tflops": round(causal_flops * frac / dt / 1e12, 1)}), flush=True)
        except Exception as e:  # a backend that can't serve this shape says so and the rest go on
            print(json.dumps({"case": name, "H": H, "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)
