"""
Registers and spills of our Triton kernels on an H100/H200 (sm_90), from any machine: no GPU
needed. Each kernel is compiled ahead of time for sm_90 with the d20 sizes it runs at, and
ptxas (shipped in Triton's wheel) reports what one thread uses. A kernel that spills (its
"stack frame" and spill bytes > 0) keeps tiles in local memory: the first chunk-parallel
Mamba-3 kernels spilled 7.5 KB a thread and ran 15x slower than their arithmetic allows
(docs/benchmarks.md, Mamba-3). Use it before spending GPU time on a kernel change.

    python dev/triton_regs.py                    # every kernel below, 4 and 8 warps
    python dev/triton_regs.py --only=mhc --warps=4
"""

import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanochat import decode_triton as dec
from nanochat import dsa_triton as dsa
from nanochat import mamba3_triton as m3
from nanochat import mhc_triton as mhc

bf, f32 = "*bf16", "*fp32"
# name -> (kernel, pointer arguments' types, constexprs); other arguments are int32 (eps, norm, scale, a_floor: fp32).
# d20: P 64, N 128, chunk 64 (Mamba-3); n 4 streams of C 1280 (mHC).
M3_BLOCKS = dict(CHUNK=64, BT=64, BP=64, BN2=64)
KERNELS = {
    "mamba3_fwd": (m3._fwd, dict(X=bf, Bm=bf, Cm=bf, bB=f32, bC=f32, PHI=f32, AA=f32, W=f32, WN=f32, S0=f32, Y=bf,
                                 SF=f32, SCH=f32), M3_BLOCKS),
    "mamba3_bwd": (m3._bwd, dict(X=bf, Bm=bf, Cm=bf, bB=f32, bC=f32, PHI=f32, AA=f32, W=f32, WN=f32, SCH=f32, DY=bf,
                                 DSF=f32, DX=f32, DKB=f32, DQB=f32, DPHI=f32, DA=f32, DW=f32, DWN=f32, DS0=f32),
                   M3_BLOCKS),
    "mamba3_turn_fwd": (m3._turn_fwd, dict(Bm=bf, Cm=bf, bB=f32, bC=f32, PHI=f32, K=bf, Q=bf),
                        dict(HAS_BIAS=True, BT=m3.TURN_BT, BN2=64)),
    "mamba3_turn_bwd": (m3._turn_bwd, dict(Bm=bf, Cm=bf, bB=f32, bC=f32, PHI=f32, DK=bf, DQ=bf, DB=f32, DC=f32,
                                           DBB=f32, DBC=f32, DPHI=f32), dict(HAS_BIAS=True, BT=m3.TURN_BT, BN2=64)),
    "mamba3_pass_fwd": (m3._pass_fwd, dict(S=bf, A=f32, H0=f32, E=bf, F=f32), dict(BLOCK=m3.PASS_BLOCK)),
    "mamba3_pass_bwd": (m3._pass_bwd, dict(E=bf, A=f32, DE=bf, DF=f32, DS=bf, DA=f32, DH0=f32),
                        dict(BLOCK=m3.PASS_BLOCK)),
    "mamba3_cout_fwd": (m3._cout_fwd, dict(Qp=bf, Kp=bf, X=bf, E=bf, ACS=f32, W=f32, WN=f32, Dp=f32, Y=bf),
                        dict(CHUNK=64, BT=64, BP=64, BN=128)),
    "mamba3_cout_bwd": (m3._cout_bwd, dict(Qp=bf, Kp=bf, X=bf, E=bf, ACS=f32, W=f32, WN=f32, DY=bf, DST=bf, DQ=bf, DK=bf,
                                           DX=bf, DE=bf, DACS=f32, DW=f32, DWN=f32, Dp=f32, DDP=f32),
                        dict(CHUNK=64, BT=64, BP=64, BN=128, PART=1)),
    "mamba3_cout_bwd2": (m3._cout_bwd, dict(Qp=bf, Kp=bf, X=bf, E=bf, ACS=f32, W=f32, WN=f32, DY=bf, DST=bf, DQ=bf, DK=bf,
                                            DX=bf, DE=bf, DACS=f32, DW=f32, DWN=f32, Dp=f32, DDP=f32),
                         dict(CHUNK=64, BT=64, BP=64, BN=128, PART=2)),
    "mamba3_cstate_fwd": (m3._cstate_fwd, dict(Kp=bf, X=bf, ACS=f32, W=f32, WN=f32, S=bf),
                          dict(CHUNK=64, BT=64, BP=64, BN=128)),
    "mhc_expand_fwd": (mhc._expand_fwd, dict(X=bf, F=bf, RES=f32, POST=f32, Y=bf),
                       dict(N=4, BM=mhc.EXPAND_BM, BC=mhc.EXPAND_BC)),
    "mhc_expand_bwd": (mhc._expand_bwd, dict(X=bf, F=bf, RES=f32, POST=f32, DY=bf, DX=bf, DF=bf, DRES=f32, DPOST=f32),
                       dict(C=1280, N=4, BM=mhc.EXPAND_BM, BC=mhc.EXPAND_BC)),
    "mamba3_angles_fwd": (m3._angles_fwd, dict(DT=f32, TH=f32, PHI0=f32, PHI=f32),
                          dict(BT=m3.ANGLES_BT, HB=m3.ANGLES_HB, BA=32)),
    "mamba3_angles_bwd": (m3._angles_bwd, dict(DPHI=f32, DT=f32, TH=f32, DDT=f32, DTH=f32),
                          dict(BT=m3.ANGLES_BT, HB=m3.ANGLES_HB, BA=32)),
    "mamba3_gate_fwd": (m3._gate_fwd, dict(Y=bf, X=bf, Z=bf, Dp=f32, Wn=f32, O=bf), dict(BT=m3.GATE_BT, BP=64, SKIP=False)),
    "mamba3_gate_bwd": (m3._gate_bwd, dict(Y=bf, X=bf, Z=bf, Dp=f32, Wn=f32, DO=bf, DY=bf, DX=bf, DZ=bf, DWp=f32,
                                           DDp=f32), dict(BT=m3.GATE_BT, BP=64, SKIP=False)),
    "mhc_collapse_fwd": (mhc._collapse_fwd, dict(X=bf, PRE=f32, U=bf), dict(N=4, BM=mhc.EXPAND_BM, BC=mhc.EXPAND_BC)),
    "mhc_collapse_bwd": (mhc._collapse_bwd, dict(X=bf, PRE=f32, DU=bf, DX=bf, DPRE=f32),
                         dict(C=1280, N=4, BM=mhc.EXPAND_BM, BC=mhc.EXPAND_BC)),
    "mhc_sinkhorn_fwd": (mhc._sinkhorn_fwd, dict(L=f32, OUT=f32), dict(ITERS=20, N=4, BLOCK=mhc.BLOCK)),
    "mhc_sinkhorn_bwd": (mhc._sinkhorn_bwd, dict(L=f32, G=f32, DL=f32, SCR=f32), dict(ITERS=20, N=4, BLOCK=mhc.BLOCK)),
    "dsa_scores": (dsa._scores, dict(Q=bf, W=bf, K=f32, OUT=f32),
                   dict(H=4, D=64, BD=64, BR=dsa.BR, BS=dsa.BS, PRECISION="tf32")),
    "decode_segment": (dec._segment, dict(Q=bf, K=bf, V=bf, POS="*i64", M=f32, L=f32, ACC=f32, OUT=bf, COUNT="*i32",
                                          KN=bf, VN=bf),
                       dict(G=1, PER_ROW=True, GP=16, D=128, SEG=256, BS=dec.BS, NP=32, PRECISION="tf32", ONE=False,
                            PDL=True, NEW=True)),
    "decode_gemv": (dec._gemv, dict(X=bf, W=bf, Y=bf, R=bf), dict(K=3072, BN=dec.GEMV_BN, BK=dec.GEMV_BK, PDL=True,
                                                                  RELU2=False, RES=True, NORM=False, MIX=False,
                                                                  STORE=False)),
    "decode_gemv_norm": (dec._gemv, dict(X=bf, W=bf, Y=bf, X0=bf, LR=f32, LA=f32, XN=bf, XM=bf),
                         dict(K=768, BN=dec.GEMV_BN, BK=dec.GEMV_BK, PDL=True, RELU2=True, RES=False, NORM=True,
                              MIX=True, STORE=True)),
    "dsa_chosen_bits": (dsa._chosen_bits, dict(SC=f32, KTH=f32, ROOM="*i32", OUT="*i32"),
                        dict(BR=dsa.SEL_BR, BW=dsa.SEL_BW)),
}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def report(kernel, pointers, constexprs, num_warps):
    """ptxas's line for kernel compiled for sm_90: (registers, stack frame bytes, spill store bytes)."""
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {p: "constexpr" if p in constexprs else pointers.get(p, "fp32" if p in ("eps", "norm", "scale", "a_floor") else "i32") for p in params}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    found = [re.search(p, out) for p in (r"Used (\d+) registers", r"(\d+) bytes stack frame", r"(\d+) bytes spill stores")]
    return tuple(int(m.group(1)) if m else 0 for m in found)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="kernels whose name contains this (default: all)")
    parser.add_argument("--warps", default="4,8", help="num_warps values, comma-separated")
    args = parser.parse_args()
    if not os.path.exists(PTXAS):
        raise SystemExit(f"no ptxas at {PTXAS}: this Triton wheel has no NVIDIA backend binaries")
    print(f"{'kernel':18} {'warps':>5} {'registers':>9} {'stack B':>8} {'spill stores B':>14}")
    for name, (kernel, pointers, constexprs) in KERNELS.items():
        if args.only in name:
            for w in (int(x) for x in args.warps.split(",")):
                regs, stack, spills = report(kernel, pointers, constexprs, w)
                print(f"{name:18} {w:>5} {regs:>9} {stack:>8} {spills:>14}", flush=True)
