"""
Compile and run untrusted C++ (model-written functions plus a benchmark's test main) in
the sandbox of nanochat.execution, and say how each candidate ended.

    result = compile_and_run(source)           # one program
    results = run_many(sources, workers=8)     # many, in parallel over the CPU cores
    result.status  # "passed" | "compile_error" | "timeout" | "crash" | "wrong_answer"

Each candidate gets its own temporary directory (removed afterwards, whatever happened).
Both steps run through execution.execute_native, so both are inside the namespaces
(no network, read-only view of /usr only, the work directory the one writable place),
with memory and CPU-time rlimits, a wall-clock timeout that kills the whole process
group, and capped output:

1. g++ -std=c++17 -O0 main.cpp -o main, with compile_timeout and compile_memory_bytes.
   The compiler driver must fork cc1plus/as/ld, so this step runs without the seccomp
   filter; it executes nothing the model wrote. Any failure here (errors, a compiler
   that runs out of time or memory on a template bomb) is "compile_error".
2. ./main with timeout and max_memory_bytes and the seccomp filter (no fork: a fork
   bomb's forks fail with EPERM; no signals to other processes; no mount/setns...), in
   a work directory of its own (a tmpfs of execution.WORK_DIR_BYTES holding main and
   main.cpp read-only): files it writes cannot fill the host's disk.

Statuses, told apart from the program's exit:
- passed: exit status 0.
- timeout: still running at the wall-clock limit (killed with its process group).
- wrong_answer: a nonzero exit, or an abort whose stderr holds glibc's assert message
  ("Assertion `...' failed"): MultiPL-E's tests are asserts in main(), and a failed
  assert is a wrong answer, not a crash.
- crash: any other death by a signal (segfault, an uncaught exception such as
  std::bad_alloc when the memory limit refuses an allocation, the CPU-time rlimit).

At isolation() level "none" (no user namespaces) the C++ program runs with the rlimits,
the seccomp filter and a best-effort network namespace but can write wherever the
server's user can: not a security boundary (see nanochat/execution.py).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nanochat.execution import _remove_tree, execute_native

CXXFLAGS = ("-std=c++17", "-O0")
STATUSES = ("passed", "compile_error", "timeout", "crash", "wrong_answer")
ASSERT_FAILED = re.compile(r"Assertion [`'].*' failed")


@dataclass
class CppResult:
    status: str  # one of STATUSES
    stdout: str = ""
    stderr: str = ""  # the program's; for compile_error, the compiler's messages
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def find_compiler(name: str = "g++") -> str:
    """Absolute path of the compiler (the sandbox's PATH is only /bin:/usr/bin)."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: the C++ evaluation needs it (apt-get install g++)")
    return os.path.abspath(path)


def compile_and_run(source: str, timeout: float = 10.0, compile_timeout: float = 60.0,
                    max_memory_bytes: int = 512 * 2**20, compile_memory_bytes: int = 2 * 2**30,
                    max_output_bytes: int = 64 * 1024, cxx: str | None = None) -> CppResult:
    """Compile `source` (a whole program, main included) and run it; see the module docstring."""
    cxx = cxx or find_compiler()
    # the pid in the name lets common.clean_stale_exec_dirs remove it if this process is killed
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"nanochat-exec-{os.getpid()}-"))
    try:
        with open(os.path.join(workdir, "main.cpp"), "w", encoding="utf-8") as f:
            f.write(source)
        built = execute_native([cxx, *CXXFLAGS, "main.cpp", "-o", "main"], workdir, timeout=compile_timeout,
                               max_memory_bytes=compile_memory_bytes, max_output_bytes=max_output_bytes,
                               allow_processes=True)
        if not built.success:
            note = f"\n[compiler {built.reason}]" if built.reason in ("timeout", "killed") else ""
            return CppResult("compile_error", built.stdout, built.stderr + note, built.returncode)
        ran = execute_native([os.path.join(workdir, "main")], workdir, timeout=timeout, private=True,
                             max_memory_bytes=max_memory_bytes, max_output_bytes=max_output_bytes)
        if ran.reason is None:
            status = "passed"
        elif ran.reason == "timeout":
            status = "timeout"
        elif ran.reason == "killed":
            status = "wrong_answer" if ASSERT_FAILED.search(ran.stderr) else "crash"
        else:  # a nonzero exit
            status = "wrong_answer"
        return CppResult(status, ran.stdout, ran.stderr, ran.returncode)
    finally:
        _remove_tree(workdir)


def run_many(sources: list[str], workers: int | None = None, **kwargs) -> list[CppResult]:
    """compile_and_run over many programs, `workers` at a time (default: every CPU core).
    Threads suffice: each one waits on its own sandboxed subprocesses. Results are in
    the order of `sources`."""
    if not sources:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(sources)))
    if workers == 1:
        return [compile_and_run(s, **kwargs) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: compile_and_run(s, **kwargs), sources))


def syntax_check(source: str, timeout: float = 30.0, memory_bytes: int = 2 * 2**30, cxx: str | None = None) -> bool:
    """Whether `source` passes g++ -fsyntax-only -std=c++17 (in the sandbox, nothing run):
    the FIM evaluation's test that a filled-in file still parses."""
    cxx = cxx or find_compiler()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"nanochat-exec-{os.getpid()}-"))
    try:
        with open(os.path.join(workdir, "doc.cpp"), "w", encoding="utf-8") as f:
            f.write(source)
        return execute_native([cxx, "-fsyntax-only", "-std=c++17", "-w", "doc.cpp"], workdir, timeout=timeout,
                              max_memory_bytes=memory_bytes, allow_processes=True).success
    finally:
        _remove_tree(workdir)


def syntax_check_many(sources: list[str], workers: int | None = None, **kwargs) -> list[bool]:
    """syntax_check over many sources in parallel (as run_many)."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(sources) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: syntax_check(s, **kwargs), sources))
