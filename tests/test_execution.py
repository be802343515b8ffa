"""Tests for the best-effort sandbox in nanochat/execution.py.

Every hostile test checks afterwards that the test process itself is unharmed: no child
processes left (zombies included), no rlimit or monkeypatch leaked into it, and
execute_code still works."""

import builtins
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from nanochat.execution import MAX_FILE_BYTES, ExecutionResult, execute_code

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


def test_timeout_kills_grandchildren_too():
    # ctypes gets around the Python-level fork ban (a documented hole); the process
    # group kill on timeout must still take the grandchild down.
    code = ("import ctypes, time\nlibc = ctypes.CDLL(None)\n"
            "if libc.fork() == 0:\n    print('grandchild', libc.getpid(), flush=True)\n"
            "while True:\n    time.sleep(0.05)\n")
    r, dt = run(code, timeout=HOSTILE_TIMEOUT)
    assert r.reason == "timeout" and dt < HOSTILE_TIMEOUT + 2
    grandchild = int(r.stdout.split()[1])
    for _ in range(50):  # killed at once; an orphan's zombie is then reaped by init
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {grandchild} still running after the timeout")
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
        assert "OSError" in r.stderr  # "Network is unreachable": the loopback of the namespace is down
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
