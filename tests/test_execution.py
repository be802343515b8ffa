"""Tests for the sandbox in nanochat/execution.py.

Every hostile test checks afterwards that the test process itself is unharmed: no child
processes left (zombies included), no rlimit or monkeypatch leaked into it, and
execute_code still works."""

import builtins
import errno
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from nanochat import execution
from nanochat.execution import MAX_FILE_BYTES, WORK_DIR_BYTES, WORK_DIR_FILES, ExecutionResult, execute_code

HOSTILE_TIMEOUT = 2.0  # code that runs until killed: short, so the suite stays fast
QUICK_TIMEOUT = 10.0  # code that should end by itself: generous, so a loaded machine never turns it into a timeout

_ORIGINALS = {
    "open": builtins.open, "exit": builtins.exit, "os.fork": os.fork, "os.remove": os.remove,
    "os.putenv": os.putenv, "socket.socket": socket.socket, "subprocess.Popen": subprocess.Popen,
}


def _rlimits():
    import resource
    names = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_CPU")
    return {n: resource.getrlimit(getattr(resource, n)) for n in names}


_RLIMITS_AT_IMPORT = _rlimits()


def _n_processes():
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def sandbox_processes_alive():
    """Live sandbox processes anywhere on the machine (orphans are reparented to init,
    so the test process's own children don't show them)."""
    alive = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and "_nanochat_sandbox" in " ".join(p.info["cmdline"] or []):
                alive.append(p.pid)
        except psutil.Error:
            continue
    return alive


_children_before = set()


@pytest.fixture(autouse=True)
def _snapshot_children():
    """Children the test process had before the test (e.g. the multiprocessing resource
    tracker another test module's mp.spawn leaves behind): not this test's doing."""
    _children_before.clear()
    _children_before.update(p.pid for p in psutil.Process().children(recursive=True))


def assert_parent_fine():
    """The test process is untouched and the sandbox still works."""
    new_children = [p for p in psutil.Process().children(recursive=True) if p.pid not in _children_before]
    assert new_children == []  # nothing left running, no zombie
    assert sandbox_processes_alive() == []  # no orphaned grandchild escaped the group kill
    assert _rlimits() == _RLIMITS_AT_IMPORT
    current = {
        "open": builtins.open, "exit": builtins.exit, "os.fork": os.fork, "os.remove": os.remove,
        "os.putenv": os.putenv, "socket.socket": socket.socket, "subprocess.Popen": subprocess.Popen,
    }
    assert current == _ORIGINALS
    r = execute_code("print(6 * 7)", timeout=5)
    assert (r.success, r.stdout, r.reason) == (True, "42\n", None)


def run(code, **kwargs):
    t0 = time.monotonic()
    result = execute_code(code, **kwargs)
    return result, time.monotonic() - t0


# -----------------------------------------------------------------------------
# ordinary code

def test_print_returns_stdout_and_success():
    r = execute_code("print('hello')\nprint(1 + 1)\nprint('héllo ✓')")
    assert isinstance(r, ExecutionResult)
    assert r.success and r.reason is None
    assert r.stdout == "hello\n2\nhéllo ✓\n"
    assert r.stderr == ""
    assert not r.timeout and not r.memory_exceeded


def test_exception_is_error_with_traceback():
    r = execute_code("print('before')\ndef f():\n    raise ValueError('boom')\nf()\nprint('after')")
    assert not r.success and r.reason == "error"
    assert r.stdout == "before\n"  # output up to the failure is kept
    assert "Traceback (most recent call last)" in r.stderr
    assert "raise ValueError('boom')" in r.stderr  # the source line is shown
    assert r.stderr.rstrip().endswith("ValueError: boom")


def test_syntax_error_is_error():
    r = execute_code("def f(:\n    return 1\n")
    assert not r.success and r.reason == "error"
    assert "SyntaxError" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)", "raise SystemExit", "exit()", "quit()",
                                  "import os\nos._exit(0)"])
def test_exiting_early_is_not_success(code):
    # A HumanEval completion must not "pass" by leaving before the asserts run.
    r = execute_code(code + "\nprint('unreachable')")
    assert not r.success and r.reason == "error"
    assert "unreachable" not in r.stdout


def test_writing_and_cleaning_inside_the_work_dir_works():
    code = (
        "import os, shutil, tempfile, pathlib\n"
        "assert os.listdir('.') == []\n"  # a fresh directory
        "with open('a.txt', 'w') as f:\n    f.write('data')\n"
        "pathlib.Path('b.txt').write_text(open('a.txt').read() * 2)\n"
        "os.makedirs('d/e')\n"
        "shutil.copy('b.txt', 'd/e/c.txt')\n"
        "os.rename('d/e/c.txt', 'd/c.txt')\n"
        "with tempfile.TemporaryDirectory() as t:\n    open(os.path.join(t, 'x'), 'w').close()\n"
        "os.remove('a.txt')\n"
        "shutil.rmtree('d/e')\n"
        "print(sorted(os.listdir('.')), open('d/c.txt').read())\n"
    )
    r = execute_code(code)
    assert r.success, r.stderr
    assert r.stdout == "['b.txt', 'd'] datadata\n"


def test_work_dir_is_fresh_and_removed_afterwards():
    r = execute_code("import os\nopen('left_behind.txt', 'w').write('x')\nos.mkdir('sub')\nprint(os.getcwd())")
    assert r.success, r.stderr
    workdir = r.stdout.strip()
    assert os.path.isabs(workdir) and workdir != os.getcwd()
    assert not os.path.exists(workdir)
    r2 = execute_code("import os\nprint(os.getcwd())")
    assert r2.stdout.strip() != workdir
    assert not os.path.exists(r2.stdout.strip())


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "s3cret")
    r = execute_code("import os\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))")
    assert r.success and r.stdout == "None\n"


def test_file_size_limit():
    code = (f"with open('ok', 'wb') as f:\n    f.write(b'x' * {MAX_FILE_BYTES})\n"
            f"with open('big', 'wb') as f:\n    f.write(b'x' * {MAX_FILE_BYTES + 1})\n")
    r = execute_code(code, timeout=5)
    assert not r.success and r.reason == "error"
    assert "File too large" in r.stderr
    assert "with open('big'" in r.stderr  # the first file, exactly at the limit, was fine


def test_the_work_dir_holds_at_most_its_size_and_the_host_s_stays_empty(isolated, monkeypatch):
    """At the namespace levels execute_code's work directory is a tmpfs of WORK_DIR_BYTES:
    files of MAX_FILE_BYTES each fill it (ENOSPC), not the host's disk, whose directory of
    the same path is still empty when the run ends."""
    listed, remove = [], execution._remove_tree
    monkeypatch.setattr(execution, "_remove_tree", lambda path: (listed.append(os.listdir(path)), remove(path)))
    n = WORK_DIR_BYTES // MAX_FILE_BYTES + 1
    code = (f"for i in range({n}):\n"
            f"    with open(f'f{{i}}', 'wb') as f:\n        f.write(b'x' * {MAX_FILE_BYTES})\n"
            "    print(i, flush=True)\n")
    r = execute_code(code, timeout=20)
    assert not r.success and r.reason == "error", r
    assert "No space left on device" in r.stderr, r.stderr
    assert len(r.stdout.split()) >= n - 2  # (the tmpfs's own pages take a little of it)
    assert listed == [[]]


def test_the_work_dir_holds_at_most_its_file_count_under_unshare(monkeypatch):
    _use_level("unshare", monkeypatch)
    many = "for i in range({}):\n    open(f'f{{i}}', 'w').close()\n"
    r = execute_code(many.format(WORK_DIR_FILES + 100), timeout=20)
    assert not r.success and "No space left on device" in r.stderr, r
    r = execute_code(many.format(WORK_DIR_FILES - 100), timeout=20)
    assert r.success, r.stderr


def test_threads_left_running_do_not_hang():
    r, dt = run("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('done')",
                timeout=QUICK_TIMEOUT)
    assert r.success and r.stdout == "done\n"
    assert dt < QUICK_TIMEOUT
    assert_parent_fine()


# -----------------------------------------------------------------------------
# hostile code

def test_infinite_loop_times_out():
    r, dt = run("print('started', flush=True)\nwhile True:\n    pass", timeout=HOSTILE_TIMEOUT)
    assert not r.success and r.reason == "timeout" and r.timeout
    assert r.stdout == "started\n"
    assert HOSTILE_TIMEOUT - 0.1 <= dt < HOSTILE_TIMEOUT + 2
    assert_parent_fine()


def test_fork_bomb_fails_and_leaves_no_processes():
    before = _n_processes()
    r, dt = run("import os\nwhile True:\n    os.fork()", timeout=QUICK_TIMEOUT)
    assert not r.success and r.reason == "error"
    assert "os.fork() is disabled" in r.stderr
    assert dt < QUICK_TIMEOUT
    assert _n_processes() <= before + 20  # slack for unrelated activity on the machine; a bomb makes thousands
    assert_parent_fine()


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['sleep', '30'])",
    "import os\nos.system('sleep 30')",
    "import os\nos.popen('sleep 30').read()",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})",
    "import multiprocessing as mp, time\nmp.Process(target=time.sleep, args=(30,)).start()",
    "import multiprocessing as mp, time\nmp.get_context('spawn').Process(target=time.sleep, args=(30,)).start()",
    "import os\nos.kill(os.getppid(), 0)",  # signal 0: harmless even if the guard failed
])
def test_process_creation_and_signals_are_disabled(code):
    r, dt = run(code, timeout=QUICK_TIMEOUT)
    assert not r.success and r.reason == "error"
    assert "disabled in the sandbox" in r.stderr
    assert dt < QUICK_TIMEOUT
    assert_parent_fine()


def test_ctypes_fork_is_refused_by_the_kernel():
    # ctypes gets around the Python-level fork ban; the seccomp filter does not care
    r = execute_code("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.fork(), ctypes.get_errno())",
                     timeout=QUICK_TIMEOUT)
    assert r.success and r.stdout == "-1 1\n"  # EPERM
    assert_parent_fine()


def test_huge_allocation_is_memory():
    r, dt = run("x = bytearray(10 * 2**30)", timeout=QUICK_TIMEOUT)
    assert not r.success and r.reason == "memory" and r.memory_exceeded
    assert "MemoryError" in r.stderr
    assert_parent_fine()


def test_gradual_allocation_is_memory():
    r, dt = run("x = []\nwhile True:\n    x.append(bytearray(2**20))", timeout=QUICK_TIMEOUT,
                max_memory_bytes=128 * 2**20)
    assert r.reason == "memory"
    assert dt < QUICK_TIMEOUT
    assert_parent_fine()


@pytest.mark.parametrize("how", [
    "open({p!r}, 'w').write('pwned')",
    "open({p!r}, 'a').write('pwned')",
    "import io\nio.open({p!r}, 'r+').write('pwned')",
    "import pathlib\npathlib.Path({p!r}).write_text('pwned')",
    "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))",
    "import os\nrel = os.path.relpath({p!r})\nassert rel.startswith('..')\nopen(rel, 'w').write('pwned')",
    "import shutil\nopen('src', 'w').write('pwned')\nshutil.copy('src', {p!r})",
    "import os\nopen('src', 'w').write('pwned')\nos.replace('src', {p!r})",
    "import os\nos.truncate({p!r}, 0)",
])
def test_cannot_write_outside_the_work_dir(tmp_path, how):
    existing = tmp_path / "existing.txt"
    existing.write_text("original")
    new = tmp_path / "new.txt"
    for target in (existing, new):
        r = execute_code(how.format(p=str(target)), timeout=QUICK_TIMEOUT)
        assert not r.success and r.reason == "error", r
        assert "PermissionError" in r.stderr
    assert existing.read_text() == "original"
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]
    assert_parent_fine()


@pytest.mark.parametrize("how", [
    "import os\nos.remove({f!r})",
    "import os\nos.unlink({f!r})",
    "import pathlib\npathlib.Path({f!r}).unlink()",
    "import os\nos.rename({f!r}, 'stolen')",
    "import shutil\nshutil.move({f!r}, 'stolen')",
    "import shutil\nshutil.rmtree({d!r})",
    "import os\nos.rmdir({e!r})",
    "import os\nos.chmod({f!r}, 0)",
])
def test_cannot_delete_or_change_files_outside(tmp_path, how):
    d = tmp_path / "keep"
    d.mkdir()
    f = d / "precious.txt"
    f.write_text("precious")
    (tmp_path / "empty").mkdir()
    mode = f.stat().st_mode
    r = execute_code(how.format(f=str(f), d=str(d), e=str(tmp_path / "empty")), timeout=QUICK_TIMEOUT)
    assert not r.success and r.reason == "error"
    assert "PermissionError" in r.stderr
    assert f.read_text() == "precious" and f.stat().st_mode == mode
    assert (tmp_path / "empty").is_dir()
    assert_parent_fine()


def _listening_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    return server, server.getsockname()[1]


def _assert_nobody_connected(server):
    with pytest.raises(socket.timeout):
        server.accept()


@pytest.mark.parametrize("how", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
    "import socket\nsocket.getaddrinfo('localhost', {port})",
])
def test_network_is_blocked(how):
    server, port = _listening_server()
    try:
        r = execute_code(how.format(port=port), timeout=QUICK_TIMEOUT)
        assert not r.success and r.reason == "error"
        _assert_nobody_connected(server)
    finally:
        server.close()
    assert_parent_fine()


def test_network_blocked_below_python_when_namespaces_are_available():
    # Bypass the socket patch through the type itself; only the network namespace stops this.
    r = execute_code("import os\nprint(os.readlink('/proc/self/ns/net'))")
    if r.stdout.strip() == os.readlink("/proc/self/ns/net"):
        pytest.skip("this kernel/container does not allow a network namespace for the child")
    server, port = _listening_server()
    try:
        code = ("raw = [c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket'][0]\n"
                f"s = raw()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')")
        r = execute_code(code, timeout=QUICK_TIMEOUT)
        assert not r.success and "connected" not in r.stdout
        # "Network is unreachable" (the namespace's loopback is down) or, with bwrap, which brings
        # it up, "Connection refused": nobody listens on the namespace's own 127.0.0.1
        assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr
        _assert_nobody_connected(server)
    finally:
        server.close()


def test_huge_output_is_truncated_and_does_not_hang():
    limit = 10_000
    r, dt = run("for i in range(300_000):\n    print('x' * 99)", timeout=10, max_output_bytes=limit)  # ~30 MB
    assert r.success, r.stderr
    assert r.stdout.startswith("x" * 99 + "\n")
    kept, note = r.stdout.split("\n[... output truncated: ")
    assert len(kept) == limit
    assert note.startswith(f"{300_000 * 100 - limit} more bytes dropped]")
    assert dt < 10
    assert_parent_fine()


def test_endless_output_times_out_with_bounded_output():
    limit = 5_000
    r, dt = run("import os, sys\nwhile True:\n    print('y' * 1000)\n    os.write(2, b'z' * 1000)",
                timeout=HOSTILE_TIMEOUT, max_output_bytes=limit)
    assert r.reason == "timeout"
    assert dt < HOSTILE_TIMEOUT + 2
    for stream, char in ((r.stdout, "y"), (r.stderr, "z")):
        kept = stream.split("\n[... output truncated")[0]
        assert len(kept) == limit and set(kept) <= {char, "\n"}
        assert "output truncated" in stream
    assert_parent_fine()


def test_parent_is_unaffected_after_everything():
    # a run that installs every guard, then a check in this process of what it replaced
    r = execute_code("import socket, subprocess, shutil, resource\nprint('ok')")
    assert r.success
    assert_parent_fine()
    with open(os.devnull, "w") as f:  # builtins.open still writes anywhere in the parent
        f.write("x")
    assert sys.modules["os"].fork is _ORIGINALS["os.fork"]


# -----------------------------------------------------------------------------
# kernel isolation: escapes a hostile tester found around the in-process guards. Each
# runs at every isolation level that works on this machine ("none" only where the
# seccomp filter alone must stop it).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a fresh copy of the builtin module, with none of the guards (found by the tester)
FRESH_POSIX = ("import _imp, importlib.machinery as m\nposix = _imp.create_builtin(m.BuiltinImporter.find_spec('posix'))\n"
               "_imp.exec_builtin(posix)\n")


@functools.cache
def _level_works(level):
    return level == "none" or execution._works(level)


def _use_level(level, monkeypatch):
    if not _level_works(level):
        pytest.skip(f"isolation level {level!r} does not work on this machine")
    monkeypatch.setattr(execution, "_isolation", level)
    monkeypatch.setenv("NANOCHAT_SANDBOX", level)  # for the "server" subprocesses below


@pytest.fixture(params=["bwrap", "unshare"])
def isolated(request, monkeypatch):
    _use_level(request.param, monkeypatch)
    return request.param


@pytest.fixture(params=["bwrap", "unshare", "none"])
def any_level(request, monkeypatch):
    _use_level(request.param, monkeypatch)
    return request.param


def test_isolation_is_detected_and_forced_by_the_env_var(monkeypatch):
    monkeypatch.setattr(execution, "_isolation", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "none")
    assert execution.isolation() == "none"
    monkeypatch.setattr(execution, "_isolation", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "auto")
    level = execution.isolation()
    assert level in ("bwrap", "unshare", "none")
    assert execution.isolation() is level  # cached
    if subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True).returncode == 0:
        assert level != "none"  # user namespaces work here: the sandbox must use them
    monkeypatch.setattr(execution, "_isolation", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "bogus")
    with pytest.raises(ValueError):
        execution.isolation()


def test_a_failed_trial_run_is_retried_and_a_failing_bwrap_is_reported(monkeypatch, caplog):
    """isolation() tries a level twice before falling back (one failure under load left a
    server on a weaker level for its life), and says so when an installed bwrap fails."""
    monkeypatch.setenv("NANOCHAT_SANDBOX", "auto")
    monkeypatch.setattr(execution.shutil, "which", lambda name: "/usr/bin/" + name)
    tries = []
    monkeypatch.setattr(execution, "_works", lambda level: tries.append(level) or len(tries) > 1)
    monkeypatch.setattr(execution, "_isolation", None)
    assert execution.isolation() == "bwrap" and tries == ["bwrap", "bwrap"]
    tries.clear()
    monkeypatch.setattr(execution, "_works", lambda level: tries.append(level) or level == "unshare")
    monkeypatch.setattr(execution, "_isolation", None)
    with caplog.at_level("WARNING"):
        assert execution.isolation() == "unshare"
    assert tries == ["bwrap", "bwrap", "unshare"]
    assert "bwrap is installed but its trial runs failed twice" in caplog.text


def test_isolated_sandbox_sees_only_itself(isolated):
    code = ("import json, os\nprint(json.dumps([os.getuid(), [p for p in os.listdir('/proc') if p.isdigit()], os.getcwd(),\n"
            "    sorted(os.listdir('/')), os.path.exists(os.path.expanduser('~root')), os.listdir({root!r})]))")
    r = execute_code(code.format(root=ROOT), timeout=QUICK_TIMEOUT)
    assert r.success, r.stderr
    uid, pids, cwd, top, home, repo = json.loads(r.stdout)
    assert uid == 65534 and len(pids) <= 2 and cwd.startswith(tempfile.gettempdir())
    assert "home" not in top and "etc" not in top and not home
    assert sorted(repo) in (["nanochat"], [".venv", "nanochat"])  # of the repository: this module and the venv
    assert_parent_fine()


# A "server" process with a secret in its environment and on its command line, as
# chat_web has with NANOCHAT_API_KEY / --api_key, runs the sandbox.
SERVER = (
    "import json, os, sys\nfrom nanochat.execution import execute_code\n"
    "r = execute_code(sys.stdin.read().replace('SERVER_PID', str(os.getpid())), timeout=20)\n"
    "print(json.dumps([r.success, r.stdout, r.stderr, r.reason]))\n"
)


def run_in_server(code):
    secret = "nanochat-fake-secret-" + os.urandom(8).hex()
    env = dict(os.environ, NANOCHAT_API_KEY=secret, HF_TOKEN=secret)
    out = subprocess.run([sys.executable, "-c", SERVER, f"--api_key={secret}"], input=code, env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return secret, out.stdout + out.stderr


@pytest.mark.parametrize("what", ["environ", "cmdline", "mem", "env"])
def test_server_secrets_are_out_of_reach(isolated, what):
    # the code looks for the prefix only: the random part is not in its text
    body = {
        # each pid on its own (at level unshare getppid() is 0: /proc/0 failing first ended the loop)
        "environ": ("for pid in (SERVER_PID, os.getppid()):\n  try:\n"
                    "    data += open(f'/proc/{pid}/environ', 'rb').read()\n  except OSError as e:\n    print(pid, e)"),
        "cmdline": ("for pid in (SERVER_PID, os.getppid()):\n  try:\n"
                    "    data += open(f'/proc/{pid}/cmdline', 'rb').read()\n  except OSError as e:\n    print(pid, e)"),
        "mem": ("for pid in (SERVER_PID, os.getppid()):\n  try:\n"
                "    stack = [l for l in open(f'/proc/{pid}/maps') if '[stack]' in l][0]\n"
                "    lo, hi = [int(x, 16) for x in stack.split()[0].split('-')]\n"
                "    f = open(f'/proc/{pid}/mem', 'rb', buffering=0)\n    f.seek(lo)\n    data += f.read(hi - lo)\n"
                "  except OSError as e:\n    print(pid, e)"),
        "env": "data += repr(dict(os.environ)).encode()",
    }[what]
    code = ("import os, re\ndata = b''\ntry:\n" + "".join(f"    {line}\n" for line in body.splitlines())
            + "except OSError as e:\n    print('refused:', e)\n"
            + "print(re.findall(rb'nanochat-fake-secret-[0-9a-f]+', data))\n")
    secret, output = run_in_server(code)
    assert secret.split("-")[-1] not in output


@pytest.fixture
def sigusr1_received():
    received = []
    old = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    yield received
    signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("how", [
    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGUSR1)",
    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGUSR1)",
    "import ctypes, os\nassert ctypes.CDLL(None).kill(os.getppid(), 10) == 0",
    "import ctypes\nassert ctypes.CDLL(None).kill({pid}, 10) == 0",
    FRESH_POSIX + "posix.kill({pid}, 10)",
    FRESH_POSIX + "posix.kill(posix.getppid(), 10)",
])
def test_cannot_signal_the_parent(any_level, sigusr1_received, how):
    # SIGUSR1 with a handler here stands for the SIGKILL the tester sent
    r = execute_code(how.format(pid=os.getpid()), timeout=QUICK_TIMEOUT)
    time.sleep(0.2)
    assert sigusr1_received == [], r
    assert not r.success
    assert_parent_fine()


def test_code_cannot_outlive_its_timeout_kill(any_level):
    """The sandboxed process itself (pid 1 of its namespace, or the process the launcher
    starts) leaves the killed process group (setsid) and clears its death signal
    (PR_SET_PDEATHSIG 0), then sleeps: at level unshare it outlived the kill, reparented to
    the host's init. Both calls are refused, and nothing is left running after the timeout."""
    code = ("import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.setsid(), ctypes.get_errno(), libc.prctl(1, 0, 0, 0, 0), ctypes.get_errno(), flush=True)\n"
            "time.sleep(30)\n")
    r = execute_code(code, timeout=HOSTILE_TIMEOUT)
    assert r.reason == "timeout", r
    if any_level != "none" and platform.machine() == "x86_64":
        assert r.stdout.split() == ["-1", str(errno.EPERM), "-1", str(errno.EPERM)], r.stdout
    deadline = time.monotonic() + 3
    while sandbox_processes_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_parent_fine()


def test_host_sysctls_dev_shm_and_memfd_are_out_of_reach(isolated):
    """The namespace's uid is the server's: with a root server, /proc/sys was writable (host
    sysctls, e.g. kernel.core_pattern); /dev/shm and memfd_create gave memory outside
    RLIMIT_AS. Opening for writing only (nothing is written), then the refusals."""
    code = ("import json, os\nout = {}\n"
            "for p in ('/proc/sys/vm/drop_caches', '/proc/sys/kernel/core_pattern', '/proc/sysrq-trigger',\n"
            "          '/dev/shm/x'):\n"
            "    try:\n        os.close(os.open(p, os.O_WRONLY | os.O_CREAT))\n        out[p] = 'open'\n"
            "    except OSError as e:\n        out[p] = e.errno\n"
            "try:\n    os.memfd_create('x')\n    out['memfd'] = 'made'\nexcept OSError as e:\n    out['memfd'] = e.errno\n"
            "print(json.dumps(out))\n")
    r = execute_code(code, timeout=QUICK_TIMEOUT)
    assert r.success, r.stderr
    out = json.loads(r.stdout)
    assert "open" not in out.values() and "made" not in out.values(), out
    assert_parent_fine()


def test_cannot_reach_the_host_network_through_setns(any_level):
    server, port = _listening_server()
    try:
        code = ("import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "for path in ('/proc/{pid}/ns/net', '/proc/1/ns/net'):\n"
                "    try:\n        fd = os.open(path, os.O_RDONLY)\n    except OSError as e:\n        print(e)\n        continue\n"
                "    print(path, libc.setns(fd, 0x40000000), ctypes.get_errno())\n"
                "raw = [c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket'][0]\n"
                "s = raw()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')")
        r = execute_code(code.format(pid=os.getpid(), port=port), timeout=QUICK_TIMEOUT)
        assert "connected" not in r.stdout and not r.success
        _assert_nobody_connected(server)
    finally:
        server.close()
    assert_parent_fine()


@pytest.mark.parametrize("how", [
    FRESH_POSIX + "posix.close(posix.open({p!r}, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC))",
    "import _io\n_io.FileIO({p!r}, 'w').write(b'pwned')",
    "import ctypes\nassert ctypes.CDLL(None).creat({p!r}.encode(), 0o644) >= 0",
])
def test_cannot_write_outside_below_python(isolated, tmp_path, how):
    existing = tmp_path / "existing.txt"
    existing.write_text("original")
    for target in (existing, tmp_path / "new.txt"):
        r = execute_code(how.format(p=str(target)), timeout=QUICK_TIMEOUT)
        assert not r.success, r
    assert existing.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]
    assert_parent_fine()


def test_python_install_is_read_only(isolated):
    target = os.path.join(os.path.dirname(os.__file__), f"nanochat-sandbox-test-{os.getpid()}")
    try:
        r = execute_code(f"import _io\n_io.FileIO({target!r}, 'w').write(b'x')", timeout=QUICK_TIMEOUT)
        assert not r.success and "Read-only file system" in r.stderr
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)
