"""dev/triton_regs.py: ptxas's register report for sm_90 on a machine without a GPU. Run in a
subprocess without TRITON_INTERPRET (conftest turns the interpreter on, under which
@triton.jit makes functions that cannot be compiled ahead of time)."""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton wheel has no ptxas")


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_a_small_kernel_reports_no_spills_and_a_huge_tile_spills(tmp_path):
    """The parse tells spilling from not: a copy of 128 values fits in registers; a 128 x 128
    fp32 tile held by one warp (512 values a thread) cannot. (A file: @triton.jit reads
    its function's source.)"""
    script = tmp_path / "toy.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.join(ROOT, "dev")!r})
        import triton, triton.language as tl
        from triton_regs import report

        @triton.jit
        def copy(X, Y, B: tl.constexpr):
            o = tl.arange(0, B)
            tl.store(Y + o, tl.load(X + o))

        @triton.jit
        def huge(X, Y, B: tl.constexpr):
            o = tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :]
            t = tl.load(X + o)
            tl.store(Y + o, tl.cumsum(tl.cumsum(t, 0), 1) * t)

        print(*report(copy, dict(X="*fp32", Y="*fp32"), dict(B=128), 4))
        print(*report(huge, dict(X="*fp32", Y="*fp32"), dict(B=128), 1))
    """))
    out = run(str(script))
    small, big = ([int(v) for v in line.split()] for line in out.strip().splitlines())
    assert 0 < small[0] <= 255 and small[1:] == [0, 0]
    assert big[0] <= 255 and big[1] > 0 and big[2] > 0


def test_the_script_reports_our_kernels():
    out = run("dev/triton_regs.py", "--only=collapse_fwd", "--warps=4")
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert len(rows) == 1 and rows[0][:2] == ["mhc_collapse_fwd", "4"]
    assert 0 < int(rows[0][2]) <= 255 and int(rows[0][3]) >= 0
