"""scripts/chat_web.py on a real server on loopback (uvicorn in a thread) with a tiny
random model: the streaming endpoint, the OpenAI API through the official client
(chat, streaming, fill-in-the-middle), every limit as a 4xx, auth, a disconnecting
client freeing its worker, a schema fuzz run with no 5xx, and a bounded load test."""

import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from chat_model_fixture import make_chat_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# generous client timeouts (httpx's default is 5 s): CI runs on a loaded 2-core machine
get = functools.partial(httpx.get, timeout=30)
post = functools.partial(httpx.post, timeout=30)
stream = functools.partial(httpx.stream, timeout=30)


class LiveServer:
    def __init__(self, base_dir, **kwargs):
        from scripts.chat_web import create_app
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
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
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
    assert result["workers_busy_after"] == 0 and result["waiting_after"] == 0


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
