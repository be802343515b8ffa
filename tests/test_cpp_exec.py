"""Tests for nanochat/cpp_exec.py: compiled C++ in the sandbox of nanochat/execution.py.

The hostile programs reuse test_execution's checks that the test process is unharmed
(assert_parent_fine) and its isolation fixture: what only the kernel namespaces can
stop (writing outside the work directory, reaching the host's network from native
code) runs at each level that works here and is skipped, saying so, where none does."""

import os
import shutil
import time

import pytest

from nanochat.cpp_exec import compile_and_run, run_many
from nanochat.execution import MAX_FILE_BYTES, WORK_DIR_BYTES
from tests.test_execution import (HOSTILE_TIMEOUT, QUICK_TIMEOUT, _assert_nobody_connected,  # noqa: F401 (fixtures)
                                  _listening_server, _n_processes, _snapshot_children, assert_parent_fine, isolated)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

ADD = "int add(int a, int b) {\n    return a + b;\n}\n"
TEST_MAIN = "#include <cassert>\nint main() {\n    assert(add(2, 3) == 5);\n    assert(add(-1, 1) == 0);\n}\n"


def run(source, **kwargs):
    t0 = time.monotonic()
    result = compile_and_run(source, **kwargs)
    return result, time.monotonic() - t0


def test_correct_program_passes():
    r, _ = run("#include <cstdio>\n" + ADD + TEST_MAIN.replace("}\n", "    std::printf(\"ok\\n\");\n}\n"))
    assert r.status == "passed" and r.passed and r.stdout == "ok\n" and r.returncode == 0
    assert_parent_fine()


def test_failed_assert_is_wrong_answer():
    r, _ = run(ADD.replace("a + b", "a - b") + TEST_MAIN)
    assert r.status == "wrong_answer" and "Assertion" in r.stderr


def test_nonzero_exit_is_wrong_answer():
    r, _ = run("int main() { return 3; }\n")
    assert r.status == "wrong_answer" and r.returncode == 3


def test_compile_error():
    r, _ = run("int add(int a, int b) { retrun a + b; }\n" + TEST_MAIN)
    assert r.status == "compile_error" and "error" in r.stderr


def test_segfault_is_crash():
    r, _ = run("int main() { volatile int *p = nullptr; *p = 1; }\n")
    assert r.status == "crash"
    assert_parent_fine()


def test_infinite_loop_times_out():
    r, dt = run("#include <cstdio>\nint main() { std::puts(\"started\"); std::fflush(stdout); for (;;) {} }\n",
                timeout=HOSTILE_TIMEOUT)
    assert r.status == "timeout" and r.stdout == "started\n"
    assert_parent_fine()


def test_fork_bomb_is_contained():
    before = _n_processes()
    source = ("#include <unistd.h>\n#include <cstdio>\nint main() {\n    int made = 0;\n"
              "    for (int i = 0; i < 100000; i++) if (fork() >= 0) made++;\n"  # a child would fork too
              "    std::printf(\"%d\\n\", made);\n    std::fflush(stdout);\n    for (;;) fork();\n}\n")
    r, _ = run(source, timeout=HOSTILE_TIMEOUT)
    assert r.status == "timeout"
    assert r.stdout.startswith("0\n")  # the seccomp filter refused every fork
    assert _n_processes() <= before + 20
    assert_parent_fine()


def test_huge_allocation_fails_cleanly():
    source = ("#include <cstdio>\nint main() {\n    char *p = new char[10ull << 30];\n"
              "    for (unsigned long long i = 0; i < (10ull << 30); i += 4096) p[i] = 1;\n"
              "    std::printf(\"allocated\\n\");\n}\n")
    r, dt = run(source, timeout=QUICK_TIMEOUT)
    assert r.status == "crash" and "bad_alloc" in r.stderr and "allocated" not in r.stdout
    assert dt < QUICK_TIMEOUT + 60  # compile time included
    assert_parent_fine()


def test_huge_output_is_capped():
    r, _ = run("#include <cstdio>\nint main() { for (int i = 0; i < 1000000; i++) std::puts(\"xxxxxxxxxxxxxxxx\"); }\n",
               max_output_bytes=1000)
    assert r.status == "passed" and len(r.stdout) < 1200 and "output truncated" in r.stdout


SOCKET = """#include <arpa/inet.h>
#include <cstdio>
#include <sys/socket.h>
#include <unistd.h>
int main() {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) { std::perror("socket"); return 1; }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(PORT);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (sockaddr *)&addr, sizeof addr) != 0) { std::perror("connect"); return 1; }
    std::puts("connected");
}
"""


def test_socket_cannot_reach_the_host(isolated):
    server, port = _listening_server()
    try:
        r, _ = run(SOCKET.replace("PORT", str(port)), timeout=QUICK_TIMEOUT)
        assert r.status == "wrong_answer" and "connected" not in r.stdout
        assert "connect" in r.stderr  # unreachable or refused: the namespace's own loopback
        _assert_nobody_connected(server)
    finally:
        server.close()
    assert_parent_fine()


def test_cannot_write_outside_its_directory(isolated, tmp_path):
    existing = tmp_path / "existing.txt"
    existing.write_text("original")
    source = ("#include <cstdio>\nint main() {\n"
              f"    FILE *a = std::fopen(\"{existing}\", \"w\");\n"
              f"    FILE *b = std::fopen(\"{tmp_path / 'new.txt'}\", \"w\");\n"
              "    if (a) std::fputs(\"pwned\", a);\n    if (b) std::fputs(\"pwned\", b);\n"
              "    return a || b ? 0 : 1;\n}\n")
    r, _ = run(source, timeout=QUICK_TIMEOUT)
    assert r.status == "wrong_answer"
    assert existing.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]
    assert_parent_fine()


FILL = r"""
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>
int main() {
    std::printf("main.cpp writable: %d\n", std::fopen("main.cpp", "a") != nullptr);
    std::vector<char> block(1 << 20, 'x');
    for (int i = 0; i < FILES; i++) {
        char name[32];
        std::snprintf(name, sizeof name, "f%d", i);
        FILE *f = std::fopen(name, "wb");
        if (!f) { std::printf("open %d: %s\n", i, std::strerror(errno)); return 1; }
        for (int j = 0; j < MIB; j++)
            if (std::fwrite(block.data(), 1, block.size(), f) != block.size() || std::fflush(f) != 0) {
                std::printf("write %d: %s\n", i, std::strerror(errno));
                return 1;
            }
        std::fclose(f);
        std::printf("file %d\n", i);
    }
}
"""


def test_the_program_writes_into_a_tmpfs_of_its_own(isolated, monkeypatch):
    """The compiled program's work directory is a tmpfs of WORK_DIR_BYTES holding main and
    main.cpp read-only: files of MAX_FILE_BYTES each fill it (ENOSPC), not the host's disk,
    whose directory holds only what the compiler wrote when the run ends."""
    import nanochat.cpp_exec as cpp_exec
    listed, remove = [], cpp_exec._remove_tree
    monkeypatch.setattr(cpp_exec, "_remove_tree", lambda path: (listed.append(sorted(os.listdir(path))), remove(path)))
    n = WORK_DIR_BYTES // MAX_FILE_BYTES + 1
    r, _ = run(FILL.replace("FILES", str(n)).replace("MIB", str(MAX_FILE_BYTES >> 20)), timeout=HOSTILE_TIMEOUT)
    assert r.status == "wrong_answer", r
    assert "main.cpp writable: 0" in r.stdout
    assert f"write {n - 1}: No space left on device" in r.stdout or f"write {n - 2}: No space" in r.stdout, r.stdout
    assert listed == [["main", "main.cpp"]]
    assert_parent_fine()


def test_run_many_keeps_order_and_runs_in_parallel():
    sources = [f"int main() {{ return {i % 2}; }}\n" for i in range(4)]
    results = run_many(sources, workers=2)
    assert [r.status for r in results] == ["passed", "wrong_answer", "passed", "wrong_answer"]
    assert not [d for d in os.listdir("/tmp") if d.startswith(f"nanochat-exec-{os.getpid()}-")]
    assert_parent_fine()
