"""
Run untrusted Python (model-written tool calls, HumanEval completions) in a separate,
isolated process and report what happened.

    result = execute_code("print(6 * 7)", timeout=3.0)
    result.success, result.stdout, result.stderr, result.reason  # True, "42\n", "", None
    isolation()  # "bwrap", "unshare" or "none": how strongly the code is isolated here

Threat model, honestly
----------------------
The code is assumed hostile. The boundary is the Linux kernel, set up in layers:

1. Namespaces (isolation() "bwrap" or "unshare"). The code runs in its own user, pid,
   mount, network, IPC and UTS namespaces, as uid 65534 inside them, without
   capabilities and with no_new_privs:
   - pid: it sees only its own processes (its /proc is a new one): the server, its
     /proc/<pid>/environ|cmdline|mem, its pidfds and signals are out of reach. When the
     namespace's init exits or is killed, the kernel kills everything left in it.
   - mount: the filesystem is an empty read-only tmpfs with, read-only, /usr (and the
     /bin, /lib* links), the interpreter's prefix (venv and base install), and this file;
     a private writable work directory; minimal read-only /dev (null, zero, full, random,
     urandom; no /dev/shm to fill); /proc with /proc/sys and /proc/sysrq-trigger read-only
     (uid 65534 inside maps to the server's uid outside: a server run as root would let
     the code write host sysctls). No home directory, no repository, no /etc, no
     checkpoints or tokens on disk. bwrap runs with --as-pid-1: the code is the namespace's
     init (bwrap's own init there ran without seccomp or limits, and the code could write
     into its memory through /proc/1/mem).
   - network: a new namespace with only a loopback that is down: nothing can be reached,
     not even the host's 127.0.0.1; setns back is refused (no capability in the host's
     namespaces, and the syscall is filtered, see 2).
   - environment: a fresh minimal one (no API keys), HOME and TMPDIR = the work dir.
   "bwrap" uses bubblewrap; "unshare" is the same setup done here (_launcher_main) where
   bwrap is not installed. Both need user namespaces; where the kernel or a container
   forbids them, isolation() is "none" (see below).
2. A seccomp filter (Linux x86-64, every level) installed in the sandboxed interpreter
   before the code runs: no new processes (fork, vfork, clone without CLONE_THREAD;
   threads still work), no signals to other processes (kill, tgkill, pidfd_*), no
   setns/unshare/mount/pivot_root/chroot, no ptrace/process_vm_*, no io_uring, bpf,
   perf_event_open, userfaultfd, keyrings; no leaving the process group the timeout kills
   (setsid, setpgid) or clearing the death signal (prctl PR_SET_PDEATHSIG): a process that
   did both outlived its kill; no memfd_create or SysV shmget (memory RLIMIT_AS does not
   count). The calls fail with EPERM (clone3: ENOSYS).
3. Resource limits (setrlimit, soft = hard): address space/data = max_memory_bytes (a
   failing allocation raises MemoryError -> reason "memory"), file size MAX_FILE_BYTES
   (writes past it fail with EFBIG), no core dumps, CPU time a little above the timeout,
   RLIMIT_NPROC for non-root users. The parent's wall-clock timeout SIGKILLs the process
   group (which holds the namespace's init); output is read concurrently and truncated at
   max_output_bytes.
4. In-process guards (the weakest layer, kept because they give clear errors and are
   all there is at level "none"): os.fork/system/exec*/kill..., subprocess, sockets and
   writes outside the work directory raise PermissionError. They are Python-level
   patches and do NOT hold against code that sets out to escape (ctypes, io.FileIO, a
   fresh copy of a builtin module through the import machinery, frame walking).

What the namespaces do not give: a limit on the host's total memory beyond the per-process
RLIMIT_AS (one process: forks are filtered), protection against kernel bugs (the kernel
is the boundary, as for any container), or hiding what /usr and the Python install
contain (read-only, but readable). CPU time within the timeout is not shared fairly.

Level "none" (no user namespaces, non-Linux, or NANOCHAT_SANDBOX=none): the code runs as
the server's user, with layers 2 (Linux x86-64) to 4 and a best-effort network namespace.
That is NOT a security boundary: it can read the server's files and /proc (environment,
command line: secrets). So scripts/chat_web.py refuses to start at level "none" unless
given --unsandboxed_tool, and chat_eval warns.

NANOCHAT_SANDBOX (read once, by isolation()): "auto" (default) tries bwrap, then unshare,
then none; "unshare" skips bwrap; "none" forces no isolation (e.g. to test the refusal).

Mechanics
---------
- Separate process: a fresh interpreter, `sys.executable -I -B -X utf8`, started with
  subprocess (through bwrap or the launcher) in a new session, so it and everything it
  starts share a process group that is killed at once. Not multiprocessing: "fork" would
  copy the caller's state (CUDA contexts, threads, locks) into the child and "spawn"
  re-imports the caller's __main__ (torch). subprocess's fork_exec is safe in a threaded
  parent.
- Work directory: a fresh temporary directory, the child's cwd, bound at the same path
  inside the sandbox; the parent removes it afterwards, whatever happened.
- Completion: success=True only if the code ran to its end. The child reports "ok",
  "error" or "memory" on a private pipe with a random per-run token; exiting early
  (sys.exit, SystemExit, os._exit is disabled) or without the token is a failure.
- Reasons: "timeout" (wall clock, counted from the start), "memory", "error" (an
  exception, an early exit), "killed" (a signal: SIGKILL, SIGSEGV, SIGXCPU...).

The work directory of execute_code, and of execute_native with private=True (how
cpp_exec runs a compiled program), is a tmpfs of its own at the namespace levels: at most
WORK_DIR_BYTES in all (writes past it fail with ENOSPC), and at level "unshare" at most
WORK_DIR_FILES files and directories; the host's directory stays as it was (execute_native
binds the files it held into the tmpfs read-only). Not limited: reading the files the
sandbox can see, the number of (empty) files at level "bwrap" (kernel memory until the run
ends), the files execute_native's programs without private=True (the compiler) write into
its caller's work directory (each at most MAX_FILE_BYTES) or code at level "none" writes
into its own, threads (bounded by memory). Not protected: a result's integrity against the code itself
(it runs in the reporting process and can reach finish() by frame walking, so HumanEval
code could report success before its tests run: our models are not adversarial there).

Platforms: Linux is the target and what the tests cover. Elsewhere the level is "none"
(other POSIX: the same path minus namespaces, seccomp and the /proc-based dir_fd checks;
Windows: no rlimits or group kill, the timeout kills the child; untested there).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

try:
    import resource
except ImportError:  # Windows: no rlimits, only the timeout
    resource = None

__all__ = ["ExecutionResult", "execute_code", "execute_native", "isolation", "MAX_FILE_BYTES", "WORK_DIR_BYTES",
           "WORK_DIR_FILES"]

MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: the largest file the code may write
# execute_code's work directory at the namespace levels: a tmpfs of its own, so that many files of
# MAX_FILE_BYTES each cannot fill the host's disk (any number of them could, before); at level "unshare"
# also at most WORK_DIR_FILES files and directories (bwrap cannot set a tmpfs's inode count)
WORK_DIR_BYTES, WORK_DIR_FILES = 64 * 2**20, 10_000
_STATUS_BYTES = 4096  # how much of the status pipe the parent keeps
_EXIT_CODES = {"ok": 0, "error": 1, "memory": 3}  # child exit codes (used where there is no status pipe)
_NPROC_MARGIN = 64  # tasks (processes + threads) a non-root child may add to its user's count
_WRITABLE_DEVICES = frozenset({os.devnull, "/dev/stdout", "/dev/stderr"})

_SANDBOX_ID = 65534  # uid and gid inside the namespaces ("nobody"): not root, so no capabilities survive exec
_LEVELS = ("bwrap", "unshare", "none")

# The child runs this file as a standalone module (not through the nanochat package,
# whose import would pull in torch) and calls the function named by argv[2]:
# _child_main (the sandboxed interpreter) or _launcher_main (the "unshare" level).
_LOADER = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_nanochat_sandbox', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
    "getattr(m, sys.argv[2])()\n"
)


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    reason: str | None = None  # None on success, else "timeout" | "memory" | "error" | "killed"
    returncode: int | None = None  # the sandbox's exit status (128 + N for signal N under bwrap/unshare)

    @property
    def timeout(self) -> bool:
        return self.reason == "timeout"

    @property
    def memory_exceeded(self) -> bool:
        return self.reason == "memory"


# -----------------------------------------------------------------------------
# Parent side

def execute_code(code: str, timeout: float = 5.0, max_memory_bytes: int = 256 * 2**20,
                 max_output_bytes: int = 1 << 20) -> ExecutionResult:
    """Run `code` in a sandboxed child process (see the module docstring) and return
    what it printed and how it ended. `max_memory_bytes` <= 0 or None means no memory
    limit. Raises ValueError for a non-positive timeout and OSError if the child
    cannot be started at all; everything the code itself does ends up in the result."""
    if not (timeout > 0):
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if not sys.executable:
        raise RuntimeError("sys.executable is unknown: cannot start a sandbox interpreter")
    level = isolation()
    # the pid in the name lets common.clean_stale_exec_dirs remove it if this process is killed
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"nanochat-exec-{os.getpid()}-"))
    nonce = secrets.token_hex(16)
    cfg = {
        "code": code,
        "nonce": nonce,
        "root": workdir,
        "timeout": float(timeout),
        "max_memory_bytes": int(max_memory_bytes or 0),
        "isolation": level,
    }
    argv = _sandboxed(level, workdir, _interpreter("_child_main"), private=True)
    try:
        if os.name == "posix":
            return _run_posix(argv, cfg, _child_env(workdir), workdir, timeout, max_output_bytes, nonce)
        return _run_fallback(argv, cfg, _child_env(workdir), workdir, timeout, max_output_bytes)
    finally:
        _remove_tree(workdir)


def _interpreter(entry: str) -> list[str]:
    return [sys.executable, "-I", "-B", "-X", "utf8", "-c", _LOADER, os.path.abspath(__file__), entry]


def execute_native(argv: list[str], workdir: str, timeout: float = 5.0, max_memory_bytes: int = 512 * 2**20,
                   max_output_bytes: int = 1 << 20, allow_processes: bool = False,
                   private: bool = False) -> ExecutionResult:
    """Run a native program (g++, a compiled candidate) in the same sandbox as
    execute_code: namespaces, rlimits, the group kill, capped output. `workdir` (made by
    the caller, removed by the caller) is its cwd and the only writable place; argv[0]
    must be an absolute path the sandbox sees (under /usr or in workdir). The seccomp
    filter is installed before exec and so holds for the program, unless
    allow_processes (a compiler driver must fork cc1plus, as and ld; it runs no
    untrusted code). reason: None (exit 0), "timeout", "killed" (a signal) or "error"
    (a nonzero exit); returncode says which. Raises RuntimeError if the sandbox itself
    could not be set up, so that an infrastructure fault never reads as a wrong answer.
    private: at the namespace levels the program sees instead a fresh tmpfs at workdir's
    path (as execute_code's work directory: WORK_DIR_BYTES, at "unshare" WORK_DIR_FILES)
    holding read-only the regular files that workdir holds at the call (the compiled
    program; nothing may change workdir meanwhile): what it writes stays out of the host's
    directory (a compiler writes its output there, so its step is not private). The tmpfs
    is memory outside RLIMIT_AS: up to WORK_DIR_BYTES per concurrent run."""
    if not (timeout > 0):
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if os.name != "posix":
        raise RuntimeError("execute_native needs a POSIX system")
    level = isolation()
    workdir = os.path.realpath(workdir)
    nonce = secrets.token_hex(16)
    cfg = {"argv": list(argv), "nonce": nonce, "timeout": float(timeout), "max_memory_bytes": int(max_memory_bytes or 0),
           "isolation": level, "allow_processes": bool(allow_processes)}
    inputs = sorted(e.name for e in os.scandir(workdir) if e.is_file(follow_symlinks=False)) if private else []
    cmd = _sandboxed(level, workdir, _interpreter("_native_main"), private=private, inputs=inputs)
    result = _run_posix(cmd, cfg, _child_env(workdir), workdir, timeout, max_output_bytes, nonce, native=True)
    if result.reason == "setup":
        raise RuntimeError(f"sandbox setup failed for {argv[0]}: {result.stderr.strip()[-500:]}")
    return result


# -----------------------------------------------------------------------------
# Isolation levels

_isolation = None


def isolation() -> str:
    """How tool code is isolated on this machine: "bwrap", "unshare" or "none" (see the
    module docstring). Probed once (a trial run, ~0.1 s) and cached; NANOCHAT_SANDBOX
    ("auto", "bwrap", "unshare", "none") says where to start looking."""
    global _isolation
    if _isolation is None:
        wanted = (os.environ.get("NANOCHAT_SANDBOX") or "auto").strip().lower()
        if wanted not in ("auto", *_LEVELS):
            raise ValueError(f"NANOCHAT_SANDBOX={wanted!r}: expected auto, bwrap, unshare or none")
        candidates = _LEVELS[_LEVELS.index(wanted):] if wanted != "auto" else _LEVELS
        # each level gets a second trial run: one failure (a slow start under load, a full /tmp)
        # must not leave a server on a weaker level for its whole life
        _isolation = next(level for level in candidates if level == "none" or _works(level) or _works(level))
        if candidates[0] == "bwrap" and _isolation != "bwrap" and shutil.which("bwrap"):
            import logging
            logging.getLogger(__name__).warning(
                "the Python tool's sandbox: bwrap is installed but its trial runs failed twice; tool code runs at "
                "level %r", _isolation)
    return _isolation


def seccomp_layer() -> bool:
    """Whether the sandboxed interpreter gets the seccomp filter (layer 2): Linux x86-64 only;
    on other machines (aarch64: its syscall numbers differ) that layer is missing at every level."""
    import platform
    return sys.platform.startswith("linux") and platform.machine() == "x86_64"


def _works(level: str) -> bool:
    """Can this level start an interpreter here? (user namespaces may be disabled, bwrap
    missing, /proc not mountable in a container...)"""
    if not sys.platform.startswith("linux") or (level == "bwrap" and not shutil.which("bwrap")):
        return False
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=f"nanochat-exec-{os.getpid()}-"))
    inner = [sys.executable, "-I", "-c", "import os; assert os.getpid() < 10 and os.listdir('/') != []"]
    try:
        proc = subprocess.run(_sandboxed(level, workdir, inner, private=True), env=_child_env(workdir), cwd=workdir,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30, start_new_session=True)
        return proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        _remove_tree(workdir)


def _sandboxed(level: str, workdir: str, inner: list[str], private: bool = False, inputs: list[str] = ()) -> list[str]:
    """The command line that runs `inner` at `level`. private: the work directory is a new
    tmpfs of WORK_DIR_BYTES at the same path (nothing is read back from it), holding the
    host directory's files named in `inputs` read-only; else the host's directory bound in
    (execute_native's compiler writes the program there)."""
    if level == "none":
        return inner
    binds, links = _host_view()
    if level == "unshare":
        spec = {"binds": binds, "links": links, "workdir": workdir, "argv": inner, "inputs": list(inputs),
                "tmpfs": f"mode=0700,size={WORK_DIR_BYTES},nr_inodes={WORK_DIR_FILES}" if private else None}
        return _interpreter("_launcher_main") + [json.dumps(spec)]
    # --as-pid-1: no bwrap init in the namespace (the code could write into that process's
    # memory through /proc/1/mem: same user, no seccomp, no limits); the code is pid 1, so its
    # exit or its death with bwrap (--die-with-parent; seccomp refuses to clear that) ends all
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--uid", str(_SANDBOX_ID),
            "--gid", str(_SANDBOX_ID), "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--as-pid-1"]
    for src, dst in binds:
        argv += ["--ro-bind", src, dst]
    for target, path in links:
        argv += ["--symlink", target, path]
    # /proc/sys read-only: the namespace's uid maps to the server's, and a server run as root
    # would let the code write host sysctls (kernel.core_pattern: a command run as root);
    # /dev read-only: its tmpfs (/dev/shm) was memory outside the limits
    argv += ["--dev", "/dev", "--proc", "/proc"]
    argv += [a for sub in _PROC_READ_ONLY if os.path.exists("/proc/" + sub) for a in ("--ro-bind", "/proc/" + sub,
                                                                                     "/proc/" + sub)]
    argv += ["--remount-ro", "/dev"]
    argv += ["--size", str(WORK_DIR_BYTES), "--tmpfs", workdir] if private else ["--bind", workdir, workdir]
    for name in inputs:  # (bwrap reads a bind's source in the host's tree, under the new tmpfs)
        argv += ["--ro-bind", os.path.join(workdir, name), os.path.join(workdir, name)]
    argv += ["--remount-ro", "/", "--chdir", workdir, "--"]
    return argv + inner


def _host_view():
    """What the sandbox sees of the host, read-only: (source, destination) binds and
    (target, path) symlinks. The interpreter and its libraries, nothing else."""
    links, paths = [], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))  # merged /usr: /lib -> usr/lib
        elif os.path.isdir(top):
            paths.append(top)
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(sys.executable)), os.path.abspath(__file__)):
        paths += [os.path.abspath(p), os.path.realpath(p)]  # the venv's python links into the base install
    binds = []
    for p in sorted(set(paths), key=len):  # parents first: a path inside a bound one needs nothing more
        if os.path.exists(p) and not any(p == q or p.startswith(q.rstrip("/") + "/") for q, _ in binds):
            if not any(p == path or p.startswith(path + "/") for _, path in links):
                binds.append((p, p))
    return binds, links


def _child_env(workdir: str) -> dict:
    """A minimal environment: nothing of the caller's (tokens, keys) is passed on."""
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "TMP": workdir, "TEMP": workdir,
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_MAIN_FREE": "1"}  # numpy sets this with os.putenv (disabled) unless it is there
    if os.name == "nt":  # the Windows interpreter does not start without these
        for key in ("SYSTEMROOT", "WINDIR"):
            if key in os.environ:
                env[key] = os.environ[key]
    return env


class _Capture:
    """Keeps the first `limit` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.limit = max(0, int(limit))
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += len(chunk) - max(0, min(room, len(chunk)))

    def text(self) -> str:
        text = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[... output truncated: {self.dropped} more bytes dropped]\n"
        return text


def _run_posix(argv, cfg, env, workdir, timeout, max_output_bytes, nonce, native=False) -> ExecutionResult:
    status_r, status_w = os.pipe()
    cfg["status_fd"] = status_w  # pass_fds keeps the descriptor number in the child
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, pass_fds=(status_w,), start_new_session=True)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)

    payload = json.dumps(cfg).encode()
    out, err, status = _Capture(max_output_bytes), _Capture(max_output_bytes), _Capture(_STATUS_BYTES)
    sel = selectors.DefaultSelector()
    pidfd = None
    timed_out = False
    try:
        for fd in (proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno(), status_r):
            os.set_blocking(fd, False)
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, out)
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, err)
        sel.register(status_r, selectors.EVENT_READ, status)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
        if hasattr(os, "pidfd_open"):  # Linux >= 5.3: wake up the moment the child exits
            try:
                pidfd = os.pidfd_open(proc.pid)
                sel.register(pidfd, selectors.EVENT_READ, "exited")
            except OSError:
                pidfd = None
        written = 0
        deadline = time.monotonic() + timeout
        while not _has_exited(proc):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            # without a pidfd, poll for the exit every 20 ms (the cap keeps select's timeout finite)
            for key, _ in sel.select(min(remaining, 60.0 if pidfd is not None else 0.02)):
                if key.data == "exited":
                    continue
                if key.data == "stdin":  # the config/code, written as the child reads it
                    try:
                        written += os.write(key.fd, payload[written:written + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # the child is gone already
                        written = len(payload)
                    if written >= len(payload):
                        sel.unregister(key.fd)
                        _close_quietly(proc.stdin)
                else:
                    _read_some(sel, key)
        # Kill the whole process group (the child is a session leader, pgid == pid, and
        # is not reaped yet so the id cannot have been reused). After a normal exit this
        # only removes stragglers; after the timeout it is the kill itself.
        _kill_group(proc.pid)
        for fd in (proc.stdin.fileno() if not proc.stdin.closed else None, pidfd):
            if fd is not None and fd in sel.get_map():
                sel.unregister(fd)
        # Everyone who held the write ends is dead: read what is left, up to EOF. (The
        # bound only matters if something escaped the process group, e.g. via ctypes.)
        grace = time.monotonic() + 1.0
        while sel.get_map() and time.monotonic() < grace:
            for key, _ in sel.select(max(0.0, grace - time.monotonic())):
                _read_some(sel, key)
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        os.close(status_r)
        if proc.returncode is None:  # not reaped yet, so the group id is still ours
            _kill_group(proc.pid)  # a no-op unless the parent itself was interrupted above
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            _close_quietly(stream)
        proc.wait()  # reap: no zombie

    state = None
    for line in bytes(status.data).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == nonce.encode():
            state = parts[1].decode("ascii", errors="replace")
    return _classify(timed_out, state, proc.returncode, out.text(), err.text(), native)


def _classify(timed_out, state, returncode, stdout, stderr, native=False) -> ExecutionResult:
    if timed_out:
        reason = "timeout"
    elif native and state is None:  # an exec'd program writes no record: its exit status is the answer
        killed = returncode is not None and (returncode < 0 or 128 < returncode <= 128 + 64)
        reason = None if returncode == 0 else "killed" if killed else "error"
    elif native and state == "setup":
        reason = "setup"
    elif state == "ok" and returncode == 0:
        reason = None
    elif state == "memory":
        reason = "memory"
    elif state == "error":
        reason = "error"
    elif returncode is not None and (returncode < 0 or 128 < returncode <= 128 + 64):
        reason = "killed"  # died from a signal (SIGKILL, SIGSEGV, SIGXCPU...); bwrap and the launcher say 128 + N
    else:  # exited without a valid completion record
        reason = "error"
    return ExecutionResult(success=reason is None, stdout=stdout, stderr=stderr, reason=reason, returncode=returncode)


def _read_some(sel, key) -> None:
    try:
        chunk = os.read(key.fd, 65536)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    if chunk:
        key.data.add(chunk)
    else:  # EOF
        sel.unregister(key.fd)


def _has_exited(proc) -> bool:
    """True once the child has terminated, WITHOUT reaping it (WNOWAIT), so that its
    pid - and with it the process group id - stays reserved until we kill the group."""
    if proc.returncode is not None:
        return True
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def _group_alive(pgid: int) -> bool:
    """Is any live (non-zombie) process left in the group? Read from /proc."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _kill_group(pgid: int, deadline_s: float = 2.0) -> None:
    """SIGKILL the whole group, again and again until no member is alive: a process in
    the middle of fork() when the first signal lands can leave a child that missed it."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not os.path.isdir("/proc") or not _group_alive(pgid) or time.monotonic() > end:
            return
        time.sleep(0.01)


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _run_fallback(argv, cfg, env, workdir, timeout, max_output_bytes) -> ExecutionResult:
    """Platforms without fork/process groups (Windows): timeout via communicate(), the
    child's exit code as its status, output truncated after the fact."""
    cfg["status_fd"] = None
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=workdir, env=env, creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
    timed_out = False
    try:
        stdout, stderr = proc.communicate(json.dumps(cfg).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        stdout, stderr = proc.communicate()
    out, err = _Capture(max_output_bytes), _Capture(max_output_bytes)
    out.add(stdout)
    err.add(stderr)
    state = {code: name for name, code in _EXIT_CODES.items()}.get(proc.returncode)
    return _classify(timed_out, state, proc.returncode, out.text(), err.text())


def _remove_tree(path: str) -> None:
    """Remove the work directory even if the code made parts of it unreadable."""
    try:
        os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):  # never chmod through a link (its target may be outside)
                    os.chmod(sub, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


# -----------------------------------------------------------------------------
# Child side: everything below runs only in the sandboxed interpreter.

def _child_main() -> None:
    import builtins
    import linecache
    import traceback

    cfg = json.loads(sys.stdin.buffer.read())
    exit_now, write_fd = os._exit, os.write  # saved before the guards replace them
    status_fd = cfg.get("status_fd")
    records = {state: f"{cfg['nonce']} {state}\n".encode() for state in _EXIT_CODES}

    def emit(fd: int, data: bytes) -> None:
        while data:
            try:
                data = data[write_fd(fd, data):]
            except InterruptedError:
                continue
            except OSError:
                return

    def finish(state: str) -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass
        if status_fd is not None:
            emit(status_fd, records[state])
        exit_now(_EXIT_CODES[state])  # also ends any threads the code left running

    def report(exc: BaseException, skip_first_frame: bool) -> None:
        tb = exc.__traceback__
        if skip_first_frame and tb is not None:
            tb = tb.tb_next  # the exec() call below
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except BaseException:
            text = f"{type(exc).__name__}: {exc}\n"
        for stream in (sys.stdout, sys.__stdout__):  # keep stdout before the traceback
            try:
                stream.flush()
            except BaseException:
                pass
        emit(2, text.encode("utf-8", errors="replace"))  # fd 2 even if sys.stderr was replaced

    try:
        fd = os.open(os.devnull, os.O_RDONLY)  # input() sees EOF
        os.dup2(fd, 0)
        os.close(fd)
        nproc_limit = _nproc_limit()
        if cfg["isolation"] == "none":  # in the namespaces the network is gone already
            _isolate_network()
        _apply_limits(cfg["max_memory_bytes"], cfg["timeout"], nproc_limit)
        _install_seccomp()
        _install_guards(cfg["root"])
    except BaseException as exc:  # fail closed: never run the code half-protected
        report(exc, skip_first_frame=False)
        finish("error")

    code = cfg.pop("code")
    del cfg
    filename = "<sandbox>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # source lines in tracebacks
    scope = {"__name__": "__main__", "__builtins__": builtins}
    reserve = bytearray(1 << 20)  # given back on MemoryError so the traceback can be formatted
    try:
        exec(compile(code, filename, "exec"), scope)
    except MemoryError as exc:
        reserve = None
        scope.clear()
        report(exc, skip_first_frame=True)
        finish("memory")
    except BaseException as exc:  # SystemExit included: the code did not run to completion
        report(exc, skip_first_frame=True)
        finish("error")
    del reserve
    finish("ok")


def _native_main() -> None:
    """execute_native's child: the limits and (unless allow_processes) the seccomp filter,
    then exec the program, which inherits both. Only a setup failure writes a record."""
    cfg = json.loads(sys.stdin.buffer.read())
    status_fd = cfg.get("status_fd")
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        nproc_limit = _nproc_limit()
        if cfg["isolation"] == "none":
            _isolate_network()
        _apply_limits(cfg["max_memory_bytes"], cfg["timeout"], nproc_limit)
        if not cfg["allow_processes"]:
            _install_seccomp()
        if status_fd is not None:
            os.set_inheritable(status_fd, False)  # closed by a successful exec: the program cannot forge a record
        os.execv(cfg["argv"][0], cfg["argv"])
    except BaseException as exc:
        os.write(2, f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode())
        if status_fd is not None:
            try:
                os.write(status_fd, f"{cfg['nonce']} setup\n".encode())
            except OSError:
                pass
        os._exit(126)


# Linux constants (the same on every architecture unless noted)
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_CLONE_THREAD = 0x00010000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP = 1, 38, 22
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # glibc has no wrapper


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def call(name: str, *args) -> int:
        ret = getattr(libc, name)(*args)
        if ret == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}{args}: {os.strerror(err)}")
        return ret
    return call


def _launcher_main() -> None:
    """Level "unshare": what bwrap would do, for machines without it. Runs as the server's
    user: enters new user/mount/pid/network/IPC/UTS namespaces, forks the namespace's
    init (pid 1), which builds a new root holding only the binds and execs the sandboxed
    interpreter. Waits for it and exits with its status (128 + N for signal N, as bwrap)."""
    import platform
    spec = json.loads(sys.argv[3])
    call = _libc()
    uid, gid = os.geteuid(), os.getegid()
    call("unshare", _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{_SANDBOX_ID} {uid} 1"), ("gid_map", f"{_SANDBOX_ID} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    # the sources, opened while the whole host tree is in view (the new root hides /tmp)
    sources = [(os.open(src, os.O_PATH | os.O_CLOEXEC), dst) for src, dst in spec["binds"]]
    devices = [(os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC), f"/dev/{d}") for d in ("null", "zero", "full", "random", "urandom")]
    workdir = spec["workdir"]
    work = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
    inputs = [(os.open(os.path.join(workdir, name), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC), os.path.join(workdir, name))
              for name in spec.get("inputs", ())]
    if not all(stat.S_ISREG(os.fstat(fd).st_mode) for fd, _ in inputs):  # (a name swapped for a link or a directory)
        raise RuntimeError("execute_native: an input of the private work directory is not a regular file")
    pid = os.fork()
    if pid == 0:  # pid 1 of the new pid namespace: when it exits, the kernel kills all the rest
        try:
            call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher killed -> this dies too
            root = "/tmp"  # any directory will do: a tmpfs over it becomes the new root
            call("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates back to the host
            call("mount", b"tmpfs", root.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=1m")

            def bind(fd: int, dst: str, flags: int | None) -> None:
                target = root + dst
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(target, exist_ok=True)
                else:
                    open(target, "a").close()
                call("mount", f"/proc/self/fd/{fd}".encode(), target.encode(), None, _MS_BIND, None)
                if flags is not None:  # keep the source's locked flags (nosuid/nodev/noexec), or the kernel refuses
                    kept = os.statvfs(target).f_flag & (_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
                    call("mount", None, target.encode(), None, _MS_REMOUNT | _MS_BIND | flags | kept, None)

            for fd, dst in sources:
                bind(fd, dst, _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            for fd, dst in devices:
                bind(fd, dst, None)
            if spec["tmpfs"]:
                os.makedirs(root + workdir)
                call("mount", b"tmpfs", (root + workdir).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                     spec["tmpfs"].encode())
                for fd, dst in inputs:  # the host's files, read-only, inside the private directory
                    bind(fd, dst, _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            else:
                bind(work, workdir, _MS_NOSUID | _MS_NODEV)
            for target, path in spec["links"]:
                os.symlink(target, root + path)
            os.makedirs(root + "/proc")
            call("mount", b"proc", (root + "/proc").encode(), b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            for sub in _PROC_READ_ONLY:  # as bwrap's level does (see _sandboxed)
                path = f"{root}/proc/{sub}"
                if os.path.exists(path):
                    call("mount", path.encode(), path.encode(), None, _MS_BIND, None)
                    kept = os.statvfs(path).f_flag & (_MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
                    call("mount", None, path.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept, None)
            os.chdir(root)
            call("syscall", _SYS_PIVOT_ROOT[platform.machine()], b".", b".")  # the old root stacks under the new
            call("umount2", b".", _MNT_DETACH)  # ... and is detached: the host tree is gone
            call("mount", None, b"/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
            os.chdir(workdir)
            call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            os.execv(spec["argv"][0], spec["argv"])  # uid 65534 in the namespace: exec drops every capability
        except BaseException as exc:
            os.write(2, f"sandbox setup failed: {exc}\n".encode())
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


# seccomp: x86-64 syscall numbers refused to the sandboxed code (see the module docstring)
_SECCOMP_DENY_X86_64 = {
    "fork": 57, "vfork": 58, "kill": 62, "ptrace": 101, "rt_sigqueueinfo": 129, "pivot_root": 155,
    "chroot": 161, "mount": 165, "umount2": 166, "init_module": 175, "tkill": 200, "tgkill": 234,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "rt_tgsigqueueinfo": 297, "perf_event_open": 298, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "finit_module": 313, "bpf": 321, "userfaultfd": 323,
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_open": 434, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    # leaving the process group the timeout kills (with prctl(PR_SET_PDEATHSIG, 0), below: a
    # process that outlived its kill), and memory that RLIMIT_AS does not count
    "setpgid": 109, "setsid": 112, "shmget": 29, "memfd_create": 319, "memfd_secret": 447,
}
_SYS_PRCTL_X86_64 = 157
_PROC_READ_ONLY = ("sys", "sysrq-trigger")  # /proc entries the sandbox sees read-only
_SYS_CLONE_X86_64, _SYS_CLONE3_X86_64 = 56, 435


def _install_seccomp() -> None:
    """Install the seccomp filter (Linux x86-64 only; elsewhere this layer is missing).
    Fails closed: an error here means the code does not run."""
    if not seccomp_layer():
        return
    import ctypes
    import struct
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    allow, deny, nosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW, ERRNO(EPERM), ERRNO(ENOSYS)
    kill = 0x80000000  # SECCOMP_RET_KILL_PROCESS
    prog = [
        (ld, 0, 0, 4), (jeq, 1, 0, 0xC000003E), (ret, 0, 0, kill),  # arch must be x86-64 (no i386/int 0x80 ABI)
        (ld, 0, 0, 0), (0x35, 0, 1, 0x40000000), (ret, 0, 0, kill),  # nr >= 0x40000000: the x32 ABI
    ]
    for nr in _SECCOMP_DENY_X86_64.values():  # if nr == N: refuse
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    prog += [(jeq, 0, 4, _SYS_PRCTL_X86_64), (ld, 0, 0, 16), (jeq, 0, 1, _PR_SET_PDEATHSIG),  # prctl: its option
             (ret, 0, 0, deny), (ret, 0, 0, allow)]  # (the death signal stays: the sandbox dies with its launcher)
    prog += [(jeq, 0, 1, _SYS_CLONE3_X86_64), (ret, 0, 0, nosys)]  # flags are behind a pointer: libc falls back to clone
    prog += [(jeq, 1, 0, _SYS_CLONE_X86_64), (ret, 0, 0, allow),  # clone: only threads
             (ld, 0, 0, 16), (jset, 1, 0, _CLONE_THREAD), (ret, 0, 0, deny), (ret, 0, 0, allow)]
    code = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    call = _libc()
    call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    call("prctl", _PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0)  # SECCOMP_MODE_FILTER


def _nproc_limit() -> int | None:
    """RLIMIT_NPROC value for a non-root child: the tasks its real uid has now plus a
    margin. None for root (exempt, or in a container counted with the whole host)."""
    if resource is None or not hasattr(resource, "RLIMIT_NPROC") or os.geteuid() == 0:
        return None
    if not os.path.isdir("/proc"):
        return _NPROC_MARGIN
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count + _NPROC_MARGIN


def _isolate_network() -> None:
    """Best effort: a fresh network namespace (only a loopback that is down). Linux only;
    skipped silently where the kernel/container does not allow it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        clone_newnet, clone_newuser = 0x40000000, 0x10000000
        if os.geteuid() == 0 and libc.unshare(clone_newnet) == 0:
            return
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(clone_newuser | clone_newnet) != 0:
            return
        # keep our own uid/gid visible inside the new user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            try:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            except OSError:
                pass
    except Exception:
        pass


def _apply_limits(max_memory_bytes: int, timeout: float, nproc_limit: int | None) -> None:
    if resource is None:
        return

    def limit(name: str, soft: int, hard: int | None = None) -> None:
        res = getattr(resource, name, None)
        if res is None:
            return
        hard = soft if hard is None else hard
        try:
            _, current_hard = resource.getrlimit(res)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):  # e.g. macOS refuses RLIMIT_AS: keep going without it
            pass

    if max_memory_bytes and max_memory_bytes > 0:
        limit("RLIMIT_AS", max_memory_bytes)
        limit("RLIMIT_DATA", max_memory_bytes)
    limit("RLIMIT_FSIZE", MAX_FILE_BYTES)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG error instead of death
    limit("RLIMIT_CORE", 0)
    if math.isfinite(timeout):
        cpu = math.ceil(timeout) + 1  # backstop only: the parent's wall clock acts first
        limit("RLIMIT_CPU", cpu, cpu + 1)
    if nproc_limit is not None:
        limit("RLIMIT_NPROC", nproc_limit)


_DISABLED_OS = (
    "system", "popen", "fork", "forkpty", "kill", "killpg", "_exit", "putenv", "unsetenv",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "chdir", "fchdir", "chroot", "chown", "fchown", "lchown",
    "fchmod", "lchmod", "chflags", "lchflags", "link", "symlink", "mkfifo", "mknod",
    "setsid", "setpgid", "setpgrp", "setuid", "seteuid", "setgid", "setegid", "setreuid",
    "setregid", "setresuid", "setresgid", "setgroups", "initgroups", "setxattr", "removexattr",
    "plock",
)
_NETWORK_FUNCS = ("socketpair", "fromfd", "fromshare", "create_connection", "create_server",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr")


def _install_guards(root: str) -> None:
    """Replace dangerous functions in this (child) interpreter; see the module docstring."""
    import _io
    import builtins
    import io
    import socket
    import _socket

    def deny(name: str):
        def disabled(*args, **kwargs):
            raise PermissionError(f"{name}() is disabled in the sandbox")
        disabled.__name__ = disabled.__qualname__ = name.rsplit(".", 1)[-1]
        return disabled

    def fd_target(fd: int) -> str:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not os.path.isabs(target):
            raise PermissionError(f"cannot tell where file descriptor {fd} points: refused in the sandbox")
        return target

    def resolve(path, dir_fd=None, follow=True) -> str:
        if isinstance(path, int):
            return os.path.realpath(fd_target(path))
        p = os.fsdecode(os.fspath(path))
        if not os.path.isabs(p):
            p = os.path.join(os.getcwd() if dir_fd is None else fd_target(dir_fd), p)
        if follow:
            return os.path.realpath(p)
        head, tail = os.path.split(p.rstrip(os.sep) or os.sep)
        if tail in ("", ".", ".."):
            return os.path.realpath(p)
        return os.path.join(os.path.realpath(head), tail)  # the entry itself, not a link's target

    def check(what: str, path, dir_fd=None, follow=True, devices=False) -> None:
        if devices and not isinstance(path, int) and dir_fd is None:
            try:
                if os.path.normpath(os.fsdecode(os.fspath(path))) in _WRITABLE_DEVICES:
                    return
            except TypeError:
                pass
        try:
            p = resolve(path, dir_fd, follow)
        except PermissionError:
            raise
        except Exception:
            raise PermissionError(f"{what}: cannot check {path!r}: refused in the sandbox") from None
        if not (p == root or p.startswith(root + os.sep)):
            raise PermissionError(f"{what}: {path!r} is outside the sandbox directory {root!r}")

    os_modules = [m for m in (os, sys.modules.get("posix")) if m is not None]

    def patch_os(name: str, fn) -> None:
        for m in os_modules:
            if hasattr(m, name):
                setattr(m, name, fn)

    for name in _DISABLED_OS:
        patch_os(name, deny(f"os.{name}"))

    # writing opens
    orig_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and isinstance(mode, str) and any(c in mode for c in "wax+"):
            check("open", file, devices=True)
        return orig_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open

    orig_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check("os.open", path, dir_fd, devices=True)
        return orig_os_open(path, flags, mode, dir_fd=dir_fd)

    patch_os("open", guarded_os_open)

    # changes to the file tree
    def entry_op(name: str):  # remove/unlink/rmdir/mkdir: the entry itself (no link following)
        orig = getattr(os, name)

        def guarded(path, *args, dir_fd=None, **kwargs):
            check(f"os.{name}", path, dir_fd, follow=False)
            return orig(path, *args, dir_fd=dir_fd, **kwargs)
        guarded.__name__ = name
        return guarded

    for name in ("remove", "unlink", "rmdir", "mkdir"):
        patch_os(name, entry_op(name))

    def move_op(name: str):  # rename/replace: both ends
        orig = getattr(os, name)

        def guarded(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            check(f"os.{name}", src, src_dir_fd, follow=False)
            check(f"os.{name}", dst, dst_dir_fd, follow=False)
            return orig(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        guarded.__name__ = name
        return guarded

    for name in ("rename", "replace"):
        patch_os(name, move_op(name))

    def attr_op(name: str):  # chmod/utime: path or fd, maybe follow_symlinks=False
        orig = getattr(os, name)

        def guarded(path, *args, dir_fd=None, follow_symlinks=True, **kwargs):
            check(f"os.{name}", path, dir_fd, follow=follow_symlinks)
            return orig(path, *args, dir_fd=dir_fd, follow_symlinks=follow_symlinks, **kwargs)
        guarded.__name__ = name
        return guarded

    for name in ("chmod", "utime"):
        if hasattr(os, name):
            patch_os(name, attr_op(name))

    if hasattr(os, "truncate"):
        orig_truncate = os.truncate

        def guarded_truncate(path, length):
            check("os.truncate", path)
            return orig_truncate(path, length)
        patch_os("truncate", guarded_truncate)

    orig_rmtree, orig_move = shutil.rmtree, shutil.move

    def guarded_rmtree(path, *args, **kwargs):
        check("shutil.rmtree", path, follow=False)
        return orig_rmtree(path, *args, **kwargs)

    def guarded_move(src, dst, *args, **kwargs):
        check("shutil.move", src, follow=False)
        check("shutil.move", dst)
        return orig_move(src, dst, *args, **kwargs)

    shutil.rmtree, shutil.move = guarded_rmtree, guarded_move
    shutil.chown = deny("shutil.chown")

    # processes: the low-level primitives (covers multiprocessing, pty, os.popen...) and Popen
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = deny("_posixsubprocess.fork_exec")
    except ImportError:  # not POSIX
        pass
    if hasattr(subprocess, "_fork_exec"):
        subprocess._fork_exec = deny("subprocess._fork_exec")

    class BlockedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("subprocess.Popen() is disabled in the sandbox")

        def __del__(self):  # never initialised: nothing to clean up
            pass

    subprocess.Popen = BlockedPopen
    if resource is not None:
        resource.setrlimit = deny("resource.setrlimit")
        if hasattr(resource, "prlimit"):
            resource.prlimit = deny("resource.prlimit")

    # network: constructors raise (classes stay subclassable, so `import ssl` still works)
    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

        def __del__(self):
            pass

    class BlockedRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = socket.SocketType = BlockedSocket
    _socket.socket = _socket.SocketType = BlockedRawSocket
    for name in _NETWORK_FUNCS:
        for m in (socket, _socket):
            if hasattr(m, name):
                setattr(m, name, deny(f"socket.{name}"))

    # leaving early is not completing
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, deny(name))
