"""scripts/chat_web.py on a real server on loopback (uvicorn in a thread) with a tiny
random model: the streaming endpoint, the OpenAI API through the official client
(chat, streaming, fill-in-the-middle), every limit as a 4xx, auth, a disconnecting
client freeing its worker, a schema fuzz run with no 5xx, and a bounded load test."""

import functools
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from chat_model_fixture import make_chat_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# generous client timeouts (httpx's default is 5 s): CI runs on a loaded 2-core machine
get = functools.partial(httpx.get, timeout=30)
post = functools.partial(httpx.post, timeout=30)
stream = functools.partial(httpx.stream, timeout=30)


class LiveServer:
    def __init__(self, base_dir, server_kwargs=None, **kwargs):
        from scripts.chat_web import create_app, server_config
        old = os.environ.get("NANOCHAT_BASE_DIR")
        os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
        try:
            self.app = create_app(device_type="cpu", **kwargs)
        finally:
            if old is None:
                del os.environ["NANOCHAT_BASE_DIR"]
            else:
                os.environ["NANOCHAT_BASE_DIR"] = old
        # uvicorn serves on a socket bound here: no window in which another process could
        # take a port we picked but had not bound yet
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # as `python -m scripts.chat_web` serves it: with the header deadline and connection cap
        config = server_config(self.app, log_level="warning", **(server_kwargs or {}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(300):
            try:
                if get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("chat_web did not come up")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("web")
    make_chat_checkpoint(d, tokenizer, source="sft", mute_special=True)
    return d


@pytest.fixture(scope="module")
def server(base_dir):
    s = LiveServer(base_dir, num_gpus=2)
    yield s
    s.stop()


def sse_events(response):
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def chat_body(**kw):
    return dict({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}, **kw)


def test_ui_health_models(server):
    r = get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "<html" in r.text.lower()
    health = get(server.url + "/health").json()
    assert health["workers"] == 2 and health["sandbox"] in ("bwrap", "unshare", "none")
    assert health["seccomp"] == (sys.platform.startswith("linux") and platform.machine() == "x86_64")
    models = get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "nanochat-sft-d2"


def test_streaming_chat_endpoint(server):
    with stream("POST", server.url + "/chat/completions", json=chat_body()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == {"done": True}
    tokens = [e["token"] for e in events[:-1]]
    assert tokens and all(isinstance(t, str) for t in tokens) and events[0]["worker"] in (0, 1)


def test_openai_client_chat_stream_and_fim(server, tokenizer):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    chunks = list(client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and chunks[-1].choices[0].finish_reason == "length"

    # a prompt that leaves 3 positions of the 256-token context: the answer stops there, and
    # that is "length" (a cut-off answer), not "stop", though max_tokens was not reached
    n_words = next(n for n in range(200, 260) if len(tokenizer.encode(" the" * n)) + 1 >= 253)
    prompt = " the" * n_words
    room = 256 - (len(tokenizer.encode(prompt)) + 1)
    assert 0 < room < 8
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model="nanochat", prompt=prompt, max_tokens=8, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            cut = client.completions.create(model="nanochat", prompt=prompt, max_tokens=8)
            assert cut.usage.completion_tokens == room and cut.choices[0].finish_reason == "length"

    prefix, suffix = "int add(int a, int b) {\n", "\n}\n"
    fim = client.completions.create(model="nanochat", prompt=prefix, suffix=suffix, max_tokens=5)
    s = tokenizer.encode_special
    expected = ([tokenizer.get_bos_token_id(), s("<|fim_prefix|>")] + tokenizer.encode(prefix) + [s("<|fim_suffix|>")]
                + tokenizer.encode(suffix) + [s("<|fim_middle|>")])
    assert fim.usage.prompt_tokens == len(expected) and fim.usage.completion_tokens == 5
    assert isinstance(fim.choices[0].text, str) and fim.object == "text_completion"
    plain = client.completions.create(model="nanochat", prompt=prefix, max_tokens=5)
    assert plain.usage.prompt_tokens == len(tokenizer.encode(prefix)) + 1
    streamed = list(client.completions.create(model="nanochat", prompt=prefix, suffix=suffix, max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed)


BAD = {
    "too many messages": chat_body(messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": "x"}
                                             for i in range(501)]),
    "message too long": chat_body(messages=[{"role": "user", "content": "x" * 8001}]),
    "conversation too long": chat_body(messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 7000}
                                                 for i in range(5)]),
    "temperature": chat_body(temperature=3.0),
    "negative temperature": chat_body(temperature=-0.1),
    "top_k zero": chat_body(top_k=0),
    "top_k huge": chat_body(top_k=500),
    "max_tokens zero": chat_body(max_tokens=0),
    "max_tokens huge": chat_body(max_tokens=5000),
    "role": chat_body(messages=[{"role": "robot", "content": "hi"}]),
    "content type": chat_body(messages=[{"role": "user", "content": 42}]),
    "image part": chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
    "ends with assistant": chat_body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
    "not alternating": chat_body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
    "system later": chat_body(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]),
    "empty content": chat_body(messages=[{"role": "user", "content": "   "}]),
    "no messages": chat_body(messages=[]),
    "over the context": chat_body(messages=[{"role": "user", "content": "lorem ipsum dolor " * 400}]),
    "seed too large": chat_body(seed=2**64),
    "negative seed": chat_body(seed=-1),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_limits_are_4xx_with_a_message(server, name, path):
    r = post(server.url + path, json=BAD[name])
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_malformed_requests(server):
    r = post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(server.url + "/v1/completions", json={"prompt": "x" * 200_000})
    assert r.status_code == 422
    r = post(server.url + "/v1/completions", json={"prompt": "a " * 15_000})  # under the chars limit, over the context
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = post(server.url + "/v1/completions", json={"prompt": "x", "seed": 2**64})  # torch takes 0 .. 2**64-1
    assert r.status_code == 422 and "seed" in r.text
    r = get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_v1_samples_differ_without_a_seed_and_repeat_with_one(server):
    def complete(**kw):
        body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "top_k": 200, **kw}
        r = post(server.url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    assert complete(seed=7) == complete(seed=7)
    assert len({complete() for _ in range(3)}) > 1  # every request without a seed used seed 0 once


def test_api_key(base_dir):
    s = LiveServer(base_dir, api_key="secret")
    try:
        assert get(s.url + "/").status_code == 200 and get(s.url + "/health").status_code == 200
        r = post(s.url + "/v1/chat/completions", json=chat_body())
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert r.headers["connection"] == "close"  # its body unread: no keep-alive for a slow sender to hold
        r = post(s.url + "/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = post(s.url + "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer secret"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        s.stop()


def test_disconnected_client_frees_its_worker(base_dir, tokenizer):
    # a model with a long context, so that its answer takes seconds and the client leaves midway
    make_chat_checkpoint(base_dir, tokenizer, source="rl", sequence_len=4096, mute_special=True)
    s = LiveServer(base_dir, source="rl")
    try:
        def worker():
            return get(s.url + "/stats").json()["workers"][0]
        with stream("POST", s.url + "/chat/completions", json=chat_body(max_tokens=4000)) as r:
            lines = r.iter_lines()  # kept alive: leaving this generator closes the connection
            assert next(line for line in lines if line.startswith("data: "))
            assert worker()["busy"]  # generating for us
        # the with block has closed the connection mid-answer
        deadline = time.time() + 5
        while worker()["busy"] and time.time() < deadline:
            time.sleep(0.05)
        w = worker()
        assert not w["busy"] and 0 < w["tokens"] < 4000  # stopped early, worker free
        r = post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=3))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # and it serves again
        # the same for a non-streaming /v1 request whose client gives up waiting
        served = worker()["tokens"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=4000), timeout=1.0)
        deadline = time.time() + 5
        while worker()["busy"] and time.time() < deadline:
            time.sleep(0.05)
        w = worker()
        assert not w["busy"] and 0 < w["tokens"] - served < 4000
        # a non-streamed request whose client gives up while it waits for the (busy) worker is
        # dropped then, not when the worker frees (it took the worker and generated first)
        with stream("POST", s.url + "/chat/completions", json=chat_body(max_tokens=4000)) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=4000), timeout=1.0)
            deadline = time.time() + 3
            while get(s.url + "/stats").json()["waiting"] and time.time() < deadline:
                time.sleep(0.05)
            assert get(s.url + "/stats").json()["waiting"] == 0 and worker()["busy"]
            requests = worker()["served"]
        deadline = time.time() + 5
        while worker()["busy"] and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # (a request still queued would take the worker now)
        assert not worker()["busy"] and worker()["served"] == requests + 1  # the stream's only
    finally:
        s.stop()


def test_schema_fuzz_finds_no_server_errors(server):
    out = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
                          "--checks", "not_a_server_error", "--max-examples", "25", "--request-timeout", "60",
                          "--generation-deterministic", "--suppress-health-check", "all"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_load_32_streaming_clients(server):
    out = subprocess.run([sys.executable, "dev/loadtest.py", "--url", server.url, "--clients", "32", "--seconds", "30",
                          "--max_tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("load test:", result)
    assert result["errors"] == 0, result
    assert result["requests"] >= 32 and result["ttft_p99_ms"] is not None
    assert 0 < result["client_cpu"] < 2 and result["server_first_token_ms"]["p95"] > 0, result
    assert result["ttft_p95_ms_after_first"] > 0, result  # (None: no client sent a second request)
    assert result["workers_busy_after"] == 0 and result["waiting_after"] == 0
    # the muted model never stops early: every answer is max_tokens long (8 tokens, pieces of
    # whole characters: at most 8)
    assert 1 <= result["answer_pieces_min"] <= result["answer_pieces_max"] <= 8, result


def test_load_with_a_spread_of_answer_lengths(server):
    """--max_tokens_spread 0.5 at max_tokens 16: each request asks for 8 to 24 tokens."""
    out = subprocess.run([sys.executable, "dev/loadtest.py", "--url", server.url, "--clients", "4", "--seconds", "4",
                          "--max_tokens", "16", "--max_tokens_spread", "0.5", "--procs", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["max_tokens_spread"] == 0.5, result
    assert result["answer_pieces_max"] <= 24 and result["answer_pieces_max"] - result["answer_pieces_min"] >= 4, result
    bad = subprocess.run([sys.executable, "dev/loadtest.py", "--url", server.url, "--max_tokens_spread", "1.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max_tokens_spread=1.5" in bad.stderr


def test_serve_bench_makes_a_model_serves_it_and_loads_it(tokenizer, tmp_path):
    """dev/serve_bench.sh on the CPU: a random d2 made, served with batching, one load, against
    this code once more with other flags (REF=. REF_FLAGS)."""
    import shutil
    shutil.copytree(tokenizer.directory, tmp_path / "tokenizer")
    with socket.socket() as a, socket.socket() as b:  # two free ports (port + 1 may be taken: a client's, once in CI)
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, ref_port = a.getsockname()[1], b.getsockname()[1]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), DEPTH="2", SLOTS="8", LOADS="4", SECONDS_EACH="3",
               MAX_TOKENS="8", PROCS="2", PORT=str(port), REF_PORT=str(ref_port),
               WEB_FLAGS="--device_type=cpu --unsandboxed_tool",
               SPREAD="0.5", REF=".", REF_FLAGS="--device_type=cpu --unsandboxed_tool --bf16_linears=1")
    out = subprocess.run(["bash", "dev/serve_bench.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "chatsft_checkpoints" / "d2").is_dir()
    for name in ("main", "ref"):
        lines = [line for line in out.stdout.splitlines() if line.startswith(name + " ")]
        assert len(lines) == 1, out.stdout
        result = json.loads(lines[0][len(name) + 1:])
        assert result["clients"] == 4 and result["requests"] >= 4 and result["errors"] == 0, result
        assert result["max_tokens_spread"] == 0.5
        assert result["workers_busy_after"] == 0


@pytest.mark.parametrize("flag", [[], ["--unsandboxed_tool"]])
def test_refuses_to_start_with_an_unsandboxed_tool_unless_told(tmp_path, flag):
    # NANOCHAT_SANDBOX=none stands for a machine without user namespaces; with the flag it
    # goes on to load the model (there is none in tmp_path)
    env = dict(os.environ, NANOCHAT_SANDBOX="none", NANOCHAT_BASE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--device_type", "cpu", *flag], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    refused = "--unsandboxed_tool to serve anyway" in out.stderr
    assert refused == (not flag), out.stderr
    assert flag == [] or "No sft model to serve" in out.stderr


# -----------------------------------------------------------------------------
# Hardening (issue 26): timeouts, connection cap, body limit, Bearer case, OpenAI
# parameters (n, stop, penalties, logit_bias, the unsupported ones), lone surrogates


def raw_exchange(port, data, wait=10.0):
    """Send bytes on a fresh socket, then read until the server closes it; returns
    (what came back, seconds until the close)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(wait)
    t0, got = time.time(), b""
    try:
        if data:
            sock.sendall(data)
        while True:
            part = sock.recv(65536)
            if not part:
                break
            got += part
    except (TimeoutError, socket.timeout):
        got += b"<still open>"
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got, time.time() - t0


def test_slow_clients_are_cut_off_and_connections_are_capped(base_dir):
    s = LiveServer(base_dir, server_kwargs={"header_timeout": 1.5, "max_connections": 4}, body_timeout=1.5)
    try:
        # half a header, then nothing: 408 and closed at the deadline (before: held forever)
        got, took = raw_exchange(s.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert got.startswith(b"HTTP/1.1 408") and took < 6, (got, took)
        got, took = raw_exchange(s.port, b"")  # a connection that never says anything is closed
        assert got == b"" and took < 6, (got, took)
        # the headers, then part of the body: 408 at the body's deadline
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        got, took = raw_exchange(s.port, head + b'{"prompt": "')
        assert got.startswith(b"HTTP/1.1 408") and took < 6, (got, took)
        # a keep-alive connection whose second request stalls halfway is cut off as well
        got, took = raw_exchange(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n")
        assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got and took < 4, (got, took)
        # connection cap: 4 idle connections fill it, the 5th is refused at once
        time.sleep(0.3)  # the connections above are gone
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(4)]
        time.sleep(0.3)
        got, took = raw_exchange(s.port, b"")
        assert got.startswith(b"HTTP/1.1 503") and took < 1, (got, took)
        time.sleep(2.5)  # the idle ones are dropped at their header deadline: the server answers again
        assert get(s.url + "/health").status_code == 200
        for sock in idle:
            sock.close()
    finally:
        s.stop()


def test_body_size_limit(server):
    # by Content-Length, before any of the body is sent
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    got, took = raw_exchange(server.port, head)
    assert got.startswith(b"HTTP/1.1 413") and b"limit" in got and took < 5, got[:300]
    # a chunked body: refused once past the limit, without reading the rest
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk, sent, got = b"x" * 65536, 0, b""
    try:
        while sent < 20_000_000 and not got:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            sock.settimeout(0.02)
            try:
                got = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                pass
            sock.settimeout(10)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 413") and sent < 4_000_000, (got[:200], sent)
    # a normal request still works
    assert post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_bearer_scheme_is_case_insensitive_and_bodies_are_limited_with_a_key(base_dir):
    s = LiveServer(base_dir, api_key="secret")
    try:
        for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
            r = post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                     headers={"Authorization": f"{scheme} secret"})
            assert r.status_code == 200, (scheme, r.text)
        assert post(s.url + "/v1/completions", json={"prompt": "hi"},
                    headers={"Authorization": "Basic secret"}).status_code == 401
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        got, _ = raw_exchange(s.port, head)
        assert got.startswith(b"HTTP/1.1 413"), got[:200]
    finally:
        s.stop()


def test_n_choices(server):
    r = post(server.url + "/v1/chat/completions", json=chat_body(n=3, max_tokens=5))
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" and c["message"]["content"] for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 15
    assert len({c["message"]["content"] for c in out["choices"]}) > 1  # sampled, not copies
    r = post(server.url + "/v1/completions", json={"prompt": "Once", "n": 2, "max_tokens": 4})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, n=2, stream=True))
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length"}
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert all(texts)
    assert post(server.url + "/v1/chat/completions", json=chat_body(n=9)).status_code in (400, 422)
    assert post(server.url + "/chat/completions", json=chat_body(n=2)).status_code == 400  # the UI streams one


def completion_text(server, stream=False, **kw):
    body = {"prompt": "The meaning of life is", "max_tokens": 24, "temperature": 0.0, **kw}
    if not stream:
        r = post(server.url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"], choice["finish_reason"], None
    with stream_post(server, body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    pieces = [e["choices"][0]["text"] for e in events]
    return "".join(pieces), events[-1]["choices"][0]["finish_reason"], [p for p in pieces if p]


def stream_post(server, body):
    return stream("POST", server.url + "/v1/completions", json=dict(body, stream=True))


def test_stop_strings(server):
    full, finish, pieces = completion_text(server, stream=True)
    assert finish == "length" and len(pieces) >= 4
    # a stop string across two streamed pieces: the first half must not be sent before
    # the server knows whether the rest follows
    j = next(j for j in range(1, len(pieces) - 1) if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 2)
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    expected = full[:full.index(stop)]
    for stream_ in (False, True):
        for stop_param in (stop, [stop], ["never-in-the-output", stop]):
            text, finish, _ = completion_text(server, stream=stream_, stop=stop_param)
            assert (text, finish) == (expected, "stop"), (stream_, stop_param, text, expected)
    # a stop string that never comes: the whole text, "length"
    assert completion_text(server, stop=["never-in-the-output"])[:2] == (full, "length")
    # chat: the same, through the official client
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0).choices[0]
    stop = whole.message.content[4:7]
    cut = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, stop=stop).choices[0]
    assert cut.message.content == whole.message.content[:whole.message.content.index(stop)]
    assert cut.finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, stop=[stop],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # at most 4 strings, none empty
    assert post(server.url + "/v1/completions", json={"prompt": "x", "stop": list("abcde")}).status_code in (400, 422)
    assert post(server.url + "/v1/completions", json={"prompt": "x", "stop": ""}).status_code in (400, 422)


def test_penalties_and_logit_bias(server, tokenizer):
    (a,) = tokenizer.encode(" the")
    text, _, _ = completion_text(server, max_tokens=10, logit_bias={str(a): 1.0})
    assert text == " the" * 10  # the model's logits are ~0.001: a bias of 1 decides
    text, _, _ = completion_text(server, max_tokens=10, logit_bias={str(a): 1.0}, presence_penalty=2.0)
    assert text.startswith(" the") and not text.startswith(" the the")
    text, _, _ = completion_text(server, max_tokens=10, logit_bias={str(a): 1.0}, frequency_penalty=0.4)
    assert text.startswith(" the" * 3) and not text.startswith(" the" * 4)  # 1 - 0.4 * 3 < 0
    text, _, _ = completion_text(server, stream=True, max_tokens=10, logit_bias={str(a): 1.0}, frequency_penalty=0.4)
    assert text.startswith(" the" * 3) and not text.startswith(" the" * 4)
    r = post(server.url + "/v1/chat/completions", json=chat_body(logit_bias={str(a): 100}, temperature=0, max_tokens=3))
    assert r.json()["choices"][0]["message"]["content"] == " the" * 3
    for bad in ({"x": 1}, {"99999999": 1}, {str(a): 101}, {"²": 1}, {"٣": 1}, {"1" * 5000: 1}):
        r = post(server.url + "/v1/completions", json={"prompt": "x", "logit_bias": bad})
        assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    assert post(server.url + "/v1/completions", json={"prompt": "x", "presence_penalty": 3}).status_code == 422


@pytest.mark.parametrize("param,value", [("top_p", 0.5), ("logprobs", True), ("logprobs", 3), ("echo", True),
                                         ("best_of", 2), ("top_logprobs", 2),
                                         ("response_format", {"type": "json_object"}),
                                         ("tools", [{"type": "function", "function": {"name": "f"}}])])
def test_unsupported_params_are_400_never_ignored(server, param, value):
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}), ("/v1/chat/completions", chat_body())):
        r = post(server.url + path, json=dict(body, **{param: value}))
        assert r.status_code == 400 and param in r.json()["error"]["message"], (path, r.status_code, r.text)


def test_max_completion_tokens_usage_in_streams_user_and_unknown_params(server, tokenizer):
    """max_completion_tokens (newer OpenAI clients send it, not max_tokens) limits the answer;
    stream_options.include_usage ends a stream with a usage chunk; user is accepted; an
    unknown parameter is a 422 naming it (pydantic dropped it silently)."""
    a = tokenizer.encode(" the")[0]
    body = chat_body(logit_bias={str(a): 100}, temperature=0)
    del body["max_tokens"]
    r = post(server.url + "/v1/chat/completions", json=dict(body, max_completion_tokens=3, user="u-1"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"
    r = post(server.url + "/v1/chat/completions", json=dict(body, max_completion_tokens=3, max_tokens=4))
    assert r.status_code == 400 and "max_completion_tokens" in r.json()["error"]["message"]
    with stream("POST", server.url + "/v1/chat/completions",
                json=dict(body, max_tokens=3, stream=True, stream_options={"include_usage": True})) as r:
        events = sse_events(r)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" not in e for e in events[:-1])
    r = post(server.url + "/v1/chat/completions", json=dict(body, stream_options={"include_usage": True}))
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]
    for extra in ({"frobnicate": 1}, {"stream_options": {"include_usage": True, "x": 1}, "stream": True}):
        r = post(server.url + "/v1/completions", json=dict({"prompt": "x", "max_tokens": 2}, **extra))
        assert r.status_code == 422 and ("frobnicate" in r.text or "x" in r.json()["error"]["message"]), r.text


def test_neutral_values_of_unsupported_params_are_fine(server):
    r = post(server.url + "/v1/chat/completions", json=chat_body(top_p=1, logprobs=False, echo=False, best_of=1,
                                                                 frequency_penalty=0, presence_penalty=0, n=1))
    assert r.status_code == 200, r.text


def test_lone_surrogates_everywhere(server):
    def send(path, body):
        return post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    r = send("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "a\ud800b"}]))
    assert r.status_code == 200, r.text
    r = send("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = send("/v1/completions", {"prompt": "int f(\udfff", "suffix": "}\ud83d", "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = send("/v1/completions", {"prompt": "x", "stop": ["\ud800"], "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def batched(base_dir):
    s = LiveServer(base_dir, num_gpus=2, batch_slots=8)
    yield s
    s.stop()


def test_continuous_batching_answers_as_one_at_a_time(server, batched):
    """--batch_slots: concurrent requests decoded in one shared batch get the answers that the
    one-request-at-a-time server gives (greedy, and sampled with a seed; n = 3 too), and every
    row is free afterwards."""
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0.0} for p in ("Once upon", "The meaning of", "Hi")]
    bodies += [{"prompt": "Once", "max_tokens": 8, "temperature": 1.0, "top_k": 50, "seed": 11},
               {"prompt": "Tell me", "max_tokens": 6, "temperature": 0.9, "seed": 5, "n": 3}]
    # a stop string from inside a greedy answer: that answer ends there ("stop"), the batch goes on
    greedy = post(server.url + "/v1/completions", json=bodies[0]).json()["choices"][0]["text"]
    assert len(greedy) > 4, greedy
    bodies.append(dict(bodies[0], stop=[greedy[2:4]], max_tokens=12))
    texts = lambda r: [(c["text"], c["finish_reason"]) for c in r.json()["choices"]] + [r.json()["usage"]]
    want = [texts(post(server.url + "/v1/completions", json=b)) for b in bodies]
    assert want[-1][0] == (greedy[:greedy.index(greedy[2:4])], "stop"), want[-1]
    got = [None] * len(bodies)

    def run(i):
        got[i] = texts(post(batched.url + "/v1/completions", json=bodies[i]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    workers = get(batched.url + "/stats").json()["workers"]
    assert [(w["rows_busy"], w["rows"], w["queued"], w["busy"]) for w in workers] == [(0, 8, 0, False)] * 2


def test_a_batched_request_that_fails_in_the_server_frees_its_rows(batched, monkeypatch):
    """Turning a batched request's tokens into text fails (here: forced): the client gets
    the error, its rows and worker are free again, and the next request is served."""
    import scripts.chat_web as web

    def boom(self, column):
        raise ValueError("boom")
    with monkeypatch.context() as m:
        m.setattr(web.Answers, "feed", boom)
        with stream("POST", batched.url + "/chat/completions", json=chat_body(max_tokens=50)) as r:
            events = sse_events(r)
    assert events == [{"error": "boom"}], events
    deadline = time.time() + 10
    while any(w["busy"] or w["rows_busy"] for w in get(batched.url + "/stats").json()["workers"]) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(w["busy"] or w["rows_busy"] for w in get(batched.url + "/stats").json()["workers"])
    with stream("POST", batched.url + "/chat/completions", json=chat_body()) as r:
        assert sse_events(r)[-1] == {"done": True}


def test_a_non_streaming_request_that_fails_in_the_server_gets_an_openai_error(batched, monkeypatch):
    """A failure while generating a /v1 answer that is not streamed: a 500 with an
    OpenAI-style body (it escaped as a plain-text 500), and the next request is served."""
    import scripts.chat_web as web

    def boom(self, column):
        raise ValueError("boom")
    with monkeypatch.context() as m:
        m.setattr(web.Answers, "feed", boom)
        r = post(batched.url + "/v1/chat/completions", json=chat_body())
    assert r.status_code == 500 and r.json()["error"] == {"message": "boom", "type": "server_error"}, r.text
    assert post(batched.url + "/v1/chat/completions", json=chat_body()).status_code == 200


def test_continuous_batching_under_load_and_a_client_that_leaves(base_dir, tokenizer):
    # a model with a long context, so that an answer takes seconds and the client leaves midway
    make_chat_checkpoint(base_dir, tokenizer, source="mid", sequence_len=4096, mute_special=True)
    s = LiveServer(base_dir, source="mid", batch_slots=8)
    try:
        def rows_busy():
            return get(s.url + "/stats").json()["workers"][0]["rows_busy"]
        with stream("POST", s.url + "/chat/completions", json=chat_body(max_tokens=4000)) as r:
            lines = r.iter_lines()  # kept alive: leaving this generator closes the connection
            assert "token" in next(line for line in lines if line.startswith("data: "))
            assert rows_busy() == 1
        deadline = time.time() + 5
        while rows_busy() and time.time() < deadline:
            time.sleep(0.05)
        assert rows_busy() == 0  # the client left: its row is free
        out = subprocess.run([sys.executable, "dev/loadtest.py", "--url", s.url, "--clients", "32", "--seconds", "20",
                              "--max_tokens", "8", "--procs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print("load test, batched:", result)
        assert result["errors"] == 0 and result["requests"] >= 32 and result["procs"] == 2, result
        assert result["workers_busy_after"] == 0 and rows_busy() == 0
        # the server's part of the time to first token, and the batcher's part of that
        server, batcher = result["server_first_token_ms"], get(s.url + "/stats").json()["workers"][0]["batcher_first_token_ms"]
        assert 0 < batcher["p50"] <= batcher["p95"] and 0 < server["p50"] <= server["p95"], (server, batcher)
        assert batcher["p50"] <= server["p50"] + 1, (server, batcher)
    finally:
        s.stop()


def test_the_triton_decode_kernel_is_refused_without_cuda(base_dir):
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        LiveServer(base_dir, decode_kernel="triton")


def test_batch_slots_below_the_most_answers_is_refused(base_dir):
    with pytest.raises(ValueError, match="at least 8"):
        LiveServer(base_dir, batch_slots=4)


@pytest.mark.parametrize("slots", [0, 8])
def test_bf16_linears_by_default_every_forward_runs_under_autocast(base_dir, monkeypatch, slots):
    """With bf16 compute (as on a GPU; here bf16 autocast on the CPU), the default
    --bf16_linears=1 keeps the Linear weights in bf16, which only works if every forward of
    every path runs under autocast (an fp32 input against a bf16 weight is an error): the
    chat stream, completions greedy and sampled, n > 1, one request at a time and batched."""
    import scripts.chat_web as web
    monkeypatch.setattr(web, "compute_dtype", lambda device_type: torch.bfloat16)
    monkeypatch.setattr(web, "autocast_for", lambda device_type: torch.autocast("cpu", dtype=torch.bfloat16))
    s = LiveServer(base_dir, batch_slots=slots)
    try:
        worker = s.app.state.pool.workers[0]
        assert worker.model.blocks[0].mixer.c_q.weight.dtype == torch.bfloat16
        assert worker.model.wte.weight.dtype == torch.float32  # (only the Linear weights)
        with stream("POST", s.url + "/chat/completions", json=chat_body()) as r:
            assert sse_events(r)[-1] == {"done": True}
        for body in ({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.0},
                     {"prompt": "Once", "max_tokens": 6, "temperature": 0.9, "top_k": 50, "seed": 3, "n": 2}):
            r = post(s.url + "/v1/completions", json=body)
            assert r.status_code == 200 and all(c["text"] for c in r.json()["choices"]), r.text
        r = post(s.url + "/v1/chat/completions", json=chat_body(temperature=0.0))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    finally:
        s.stop()


def test_bf16_linears_stack_qkv_and_compile_mode_reach_every_worker(base_dir, monkeypatch):
    """--bf16_linears casts each worker's Linear weights to the device's compute dtype (fp32 on
    a CPU: nothing changes, and answers still come); --stack_qkv stacks each worker's q, k, v
    projections; --compile_mode reaches each engine."""
    from nanochat.gpt import GPT
    cast = []
    real = GPT.linears_to
    monkeypatch.setattr(GPT, "linears_to", lambda self, dtype: cast.append(dtype) or real(self, dtype))
    s = LiveServer(base_dir, num_gpus=2, bf16_linears=True, compile_mode="max-autotune-no-cudagraphs", stack_qkv=True)
    try:
        assert cast == [torch.float32, torch.float32]  # (compute_dtype("cpu"))
        assert all(w.model.blocks[0].mixer.w_qkv is not None for w in s.app.state.pool.workers)
        assert all(w.model.decode_kernel == "sdpa" for w in s.app.state.pool.workers)
        assert [w.engine.compile_mode for w in s.app.state.pool.workers] == ["max-autotune-no-cudagraphs"] * 2
        r = post(s.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    finally:
        s.stop()
