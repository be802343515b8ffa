"""
Run untrusted Python (model-written tool calls, HumanEval completions) in a separate,
restricted process and report what happened.

    result = execute_code("print(6 * 7)", timeout=3.0)
    result.success, result.stdout, result.stderr, result.reason  # True, "42\n", "", None

Threat model, honestly
----------------------
This is a BEST-EFFORT sandbox meant to contain *accidental* damage from model-written
code: infinite loops, runaway memory, fork loops, `rm -rf`-style cleanups, huge prints,
stray network calls. It is NOT a security boundary in the sense of a container, a VM,
gVisor or seccomp: code that sets out to escape can do so, e.g. through ctypes (raw
libc calls: fork, unlink, connect), through `io.FileIO`, through the closures of the
wrappers installed here (they hold the original functions), or by walking frames /
`gc` to find the completion token. Run genuinely hostile code inside a real isolation
layer, with this module as an extra layer inside it.

What it does (child side unless noted):
- Separate process: a fresh interpreter, `sys.executable -I -B -X utf8`, started with
  subprocess in a new session (so it and anything it starts share a process group
  that can be killed at once). Not multiprocessing: "fork" would copy the caller's
  state (CUDA contexts, torch/tokenizer threads, locks held by other threads) into the
  child, which is unsafe, and "spawn" re-imports the caller's __main__ and the
  nanochat package (torch). subprocess uses posix_spawn/vfork-style fork_exec, which is
  safe in a threaded parent, and nothing of the caller's state leaks into the child.
  The environment is NOT inherited (no API keys); HOME and TMPDIR point at the work dir.
- Work directory: a fresh temporary directory is the child's cwd; the parent removes it
  afterwards, whatever happened.
- Resource limits (setrlimit, soft = hard so they cannot be raised again by a
  non-root child): RLIMIT_AS and RLIMIT_DATA = max_memory_bytes (a failing allocation
  raises MemoryError -> reason "memory"), RLIMIT_FSIZE = MAX_FILE_BYTES (SIGXFSZ is
  ignored, so writes past it fail with EFBIG), RLIMIT_CORE = 0, RLIMIT_CPU a little
  above the timeout (a backstop in case the parent dies), RLIMIT_NPROC for non-root
  users (current task count of the user + a margin: it counts ALL processes/threads of
  the user, and root is exempt - or, in a container, shares the count with the whole
  host - so it is skipped for root). Because RLIMIT_NPROC is weak, process creation is
  also disabled in Python (next point).
- Disabled / guarded functions, replaced before the code runs (they raise
  PermissionError, an OSError): os/posix fork, forkpty, system, popen, exec*, spawn*,
  posix_spawn*, kill, killpg, _exit, putenv/unsetenv (so `os.environ[k] = v` raises
  too), chdir/fchdir/chroot, chown & co, fchmod, link/symlink, mkfifo/mknod, set*id,
  setsid/setpgid, xattrs; _posixsubprocess.fork_exec and subprocess.Popen (which also
  covers multiprocessing, concurrent.futures.ProcessPoolExecutor, pty, os.popen);
  resource.setrlimit/prlimit; builtins exit/quit/help; shutil.chown.
  Guarded to the work directory (the resolved path, symlinks and '..' included, must
  lie inside it): open/io.open/os.open in any writing mode (reads are allowed
  everywhere - imports need them; /dev/null, /dev/stdout, /dev/stderr are allowed),
  os.remove/unlink/rmdir/mkdir/rename/replace/truncate/chmod/utime (dir_fd resolved
  through /proc/self/fd), shutil.rmtree/move. So os.makedirs, tempfile, pathlib and
  shutil.copy keep working inside the work directory.
- Network: socket.socket/_socket.socket become classes whose constructor raises;
  socketpair, fromfd, create_connection, create_server, getaddrinfo, gethostbyname*
  raise. In addition, on Linux the child tries to move into a fresh network namespace
  (unshare(CLONE_NEWNET), or CLONE_NEWUSER|CLONE_NEWNET when not root) where only a
  down loopback exists, so even a bypass of the Python-level patch reaches nothing.
  Silently skipped where the kernel or a container forbids it.
- Completion: success=True only if the code ran to its end. The child reports "ok",
  "error" or "memory" on a private pipe with a random per-run token; exiting early
  (sys.exit, SystemExit, os._exit is disabled) or without the token is a failure.
- Timeout (parent): wall clock, counted from the start of the child. On expiry the
  parent SIGKILLs the child's whole process group, so grandchildren die too; it then
  reaps the child (no zombies). Output is read concurrently through pipes and only the
  first max_output_bytes of each stream are kept (the rest is read and dropped, so a
  chatty child never blocks); a truncated stream ends with a "[... output truncated"
  note.

Not limited: reading files, number of files written into the work directory (each is
at most MAX_FILE_BYTES), threads (bounded by memory), CPU use by threads within the
timeout.

Platforms: Linux is the target and is what the tests cover. Other POSIX systems run the
same path minus the /proc-based dir_fd checks (dir_fd writes are refused) and network
namespaces, with whatever rlimits the OS accepts. Where the `resource` module does not
exist (Windows) there are no resource limits and no process-group kill: the code still
runs in a separate process with the function guards, the wall-clock timeout kills the
child, and output is truncated after the fact (untested there).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

try:
    import resource
except ImportError:  # Windows: no rlimits, only the timeout
    resource = None

__all__ = ["ExecutionResult", "execute_code", "MAX_FILE_BYTES"]

MAX_FILE_BYTES = 16 * 2**20  # RLIMIT_FSIZE: the largest file the code may write
_STATUS_BYTES = 4096  # how much of the status pipe the parent keeps
_EXIT_CODES = {"ok": 0, "error": 1, "memory": 3}  # child exit codes (used where there is no status pipe)
_NPROC_MARGIN = 64  # tasks (processes + threads) a non-root child may add to its user's count
_WRITABLE_DEVICES = frozenset({os.devnull, "/dev/stdout", "/dev/stderr"})

# The child runs this file as a standalone module (not through the nanochat package,
# whose import would pull in torch) and calls _child_main(); see execute_code.
_LOADER = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_nanochat_sandbox', sys.argv[1])\n"
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
    "m._child_main()\n"
)


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    reason: str | None = None  # None on success, else "timeout" | "memory" | "error" | "killed"

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
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-exec-"))
    nonce = secrets.token_hex(16)
    cfg = {
        "code": code,
        "nonce": nonce,
        "root": workdir,
        "timeout": float(timeout),
        "max_memory_bytes": int(max_memory_bytes or 0),
    }
    argv = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _LOADER, os.path.abspath(__file__)]
    try:
        if os.name == "posix":
            return _run_posix(argv, cfg, _child_env(workdir), workdir, timeout, max_output_bytes, nonce)
        return _run_fallback(argv, cfg, _child_env(workdir), workdir, timeout, max_output_bytes)
    finally:
        _remove_tree(workdir)


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


def _run_posix(argv, cfg, env, workdir, timeout, max_output_bytes, nonce) -> ExecutionResult:
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
    return _classify(timed_out, state, proc.returncode, out.text(), err.text())


def _classify(timed_out, state, returncode, stdout, stderr) -> ExecutionResult:
    if timed_out:
        reason = "timeout"
    elif state == "ok" and returncode == 0:
        reason = None
    elif state == "memory":
        reason = "memory"
    elif state == "error":
        reason = "error"
    elif returncode is not None and returncode < 0:  # died from a signal: SIGKILL (OOM killer), SIGSEGV, SIGXCPU...
        reason = "killed"
    else:  # exited without a valid completion record
        reason = "error"
    return ExecutionResult(success=reason is None, stdout=stdout, stderr=stderr, reason=reason)


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
        _isolate_network()
        _apply_limits(cfg["max_memory_bytes"], cfg["timeout"], nproc_limit)
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
