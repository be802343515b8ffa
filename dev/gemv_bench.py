"""
One row (or a few) times a weight matrix, the linears of a d12 decode step: cuBLAS (F.linear)
against a Triton GEMV at a sweep of tile sizes (rows of W a program, columns a tile, warps),
each timed as one CUDA graph of calls over distinct copies of the weight (over 200 MB, so no
call reads it from L2). This is the script behind docs/benchmarks.md's GEMV table, which chose
nanochat/decode_triton.gemv's tiles; its kernel is that one's predecessor with a batch
dimension (MS rows), without programmatic dependent launch. CUDA only.

    python dev/gemv_bench.py            # 1 and 4 rows
    MS=1 python dev/gemv_bench.py
"""
import itertools
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv(X, W, Y, M, N, sxm, swn, sym, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = n < N
    m = tl.arange(0, BM)
    mm = m < M
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in tl.static_range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < K
        w = tl.load(W + n[:, None].to(tl.int64) * swn + k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        x = tl.load(X + m[:, None] * sxm + k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    tl.store(Y + m[:, None] * sym + n[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def gemv(x, w, BN, BK, warps):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemv[(triton.cdiv(N, BN),)](x, w, y, M, N, x.stride(0), w.stride(0), y.stride(0), K=K,
                                 BM=max(1, triton.next_power_of_2(M)), BN=BN, BK=BK, num_warps=warps)
    return y


def timeit(fn, xs, ws, reps=20):
    # one CUDA graph of len(ws) calls over distinct weights (no L2 reuse), replayed
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, w in zip(xs, ws):
            fn(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x, w in zip(xs, ws):
            fn(x, w)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000 / reps / len(ws)  # us a call


if __name__ == "__main__":
    dev = "cuda"
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (32768, 768), (3432, 768), (768, 1536)]
    Ms = [int(m) for m in os.environ.get("MS", "1,4").split(",")]
    for (N, K) in shapes:
        copies = max(8, int(200e6 // (N * K * 2)))  # > 200 MB of weights: no L2 reuse
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
        for M in Ms:
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            ref = timeit(lambda x, w: torch.nn.functional.linear(x, w), xs, ws)
            best = None
            for BN, BK, warps in itertools.product([2, 4, 8, 16], [256, 512, 1024], [4, 8]):
                if BN * BK * max(1, triton.next_power_of_2(M)) > 32768 or BK > triton.next_power_of_2(K):
                    continue
                try:
                    y = gemv(xs[0], ws[0], BN, BK, warps)
                    err = (y.float() - xs[0].float() @ ws[0].float().T).abs().max().item()
                    t = timeit(lambda x, w: gemv(x, w, BN, BK, warps), xs, ws)
                except Exception as e:
                    print("fail", N, K, M, BN, BK, warps, str(e)[:100])
                    continue
                if best is None or t < best[0]:
                    best = (t, BN, BK, warps, err)
            gbs = N * K * 2 / (best[0] * 1e-6) / 1e9
            print(json.dumps(dict(N=N, K=K, M=M, cublas_us=round(ref, 2), triton_us=round(best[0], 2), BN=best[1], BK=best[2],
                                  warps=best[3], err=best[4], triton_GBps=round(gbs), cublas_GBps=round(N*K*2/(ref*1e-6)/1e9))), flush=True)
        del ws
