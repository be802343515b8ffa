"""
Serve a chat model: the browser UI, a streaming chat endpoint and an OpenAI-compatible
API (chat completions, and text completions with fill-in-the-middle).

    python -m scripts.chat_web                        # http://localhost:8000, the sft model
    python -m scripts.chat_web -i rl --num_gpus=8     # one model per GPU, requests go to a free one
    python -m scripts.chat_web --host 0.0.0.0 --api_key SECRET

Endpoints:
    GET  /                      the chat UI (nanochat/ui.html)
    POST /chat/completions      {"messages": [...], "temperature", "top_k", "max_tokens"} ->
                                server-sent events: data: {"token": "...", "worker": i} ... data: {"done": true}
    POST /v1/chat/completions   OpenAI chat completions (stream or not, with usage)
    POST /v1/completions        OpenAI text completions; "suffix" makes it fill-in-the-middle
    GET  /v1/models             the served model
    GET  /health, GET /stats    liveness; workers, queue and counters

Workers: one model per GPU (--num_gpus; on a CPU, that many CPU replicas). A request
waits for a free worker; generation runs in a thread and streams back token by token;
a client that disconnects stops its generation at the next token, freeing the worker.
With --batch_slots=N (continuous batching, nanochat/batching.py) a worker decodes up to
N requests' answers at once in one batch that requests join and leave at any step; a
request goes to the worker with the fewest requests and waits only for free rows.
Every bad request gets a 4xx with an OpenAI-style error body, never a 500 (a failure while
generating is a 500 with one). OpenAI parameters: n (several answers), stop (up to 4
strings), frequency_penalty, presence_penalty, logit_bias, max_completion_tokens (newer
clients' max_tokens) and stream_options.include_usage work; user is accepted and unused
(OpenAI's abuse-monitoring id); a few others (top_p, logprobs, echo, best_of, ...) get a
400 naming them unless they have their neutral value; an unknown one gets a 422 naming
it: none is ignored silently.

Hardening (docs/serving.md): a request's headers must arrive within --header_timeout s
and its body within BODY_TIMEOUT s (else 408 and the connection is closed), bodies
over MAX_BODY_BYTES get a 413 (by Content-Length at once, or while a chunked body
streams in), and at most --max_connections connections are open at once (the next is
answered 503 and closed).
"""

import argparse
import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections import deque
from contextlib import aclosing, closing
from typing import Annotated, Literal, Optional, Union

import torch
import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanochat.batching import Batcher
from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, autodetect_device_type, clean_stale_exec_dirs, compute_dtype, logger
from nanochat.engine import Engine
from nanochat.execution import isolation, seccomp_layer
from nanochat.fim import fim_prompt

# limits: generous for people, small enough that nobody can tie up a worker for long
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
MAX_NEW_TOKENS = 4096
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed takes
MAX_CHOICES = 8  # n
MAX_STOPS, MAX_STOP_CHARS = 4, 100  # stop: as OpenAI, up to 4 strings
MAX_BODY_BYTES = 1 << 20  # the largest conversation, JSON-escaped, is well under this
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 10.0, 30.0, 256  # the command line's defaults
UI_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# -----------------------------------------------------------------------------
# Request bodies (pydantic checks types and ranges; the rest is checked by hand below)


def clean(text):
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which no encoder accepts:
    keep valid pairs, replace lone halves with U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# a string cleaned before pydantic checks it (its length checks reject lone surrogates)
Text = Annotated[str, BeforeValidator(lambda v: clean(v) if isinstance(v, str) else v)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[Text, list[TextPart]]  # OpenAI clients may send [{"type": "text", "text": ...}]


class Sampling(BaseModel):
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: Optional[int] = Field(50, ge=1, le=200)
    max_tokens: Optional[int] = Field(512, ge=1, le=MAX_NEW_TOKENS)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with the usage (and no choices) before [DONE]


class OpenAIParams(Sampling):
    model_config = ConfigDict(extra="forbid")  # a parameter we don't know is a 422 naming it, not ignored
    model: Optional[str] = None
    stream: bool = False  # /v1 only; the UI endpoint always streams
    stream_options: Optional[StreamOptions] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)  # newer clients' max_tokens
    user: Optional[str] = Field(None, max_length=256)  # OpenAI's end-user id for abuse monitoring: accepted, unused
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Union[None, Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)],
                Annotated[list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                          Field(max_length=MAX_STOPS)]] = None
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=300)  # token id (as a string) -> -100..100
    # OpenAI parameters we don't implement: accepted only at their neutral value (else a 400)
    top_p: Optional[float] = None
    logprobs: Union[None, bool, int] = None
    top_logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Union[None, str, dict] = None
    functions: Optional[list] = None
    response_format: Optional[dict] = None

    def stops(self):
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


NEUTRAL = {"top_p": (None, 1, 1.0), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
           "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
           "response_format": (None, {"type": "text"})}


class ChatRequest(OpenAIParams):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(OpenAIParams):
    prompt: Text = Field(..., max_length=MAX_CONVERSATION_CHARS)
    suffix: Optional[Text] = Field(None, max_length=MAX_CONVERSATION_CHARS)


class BadRequest(Exception):
    def __init__(self, message, status=400):
        self.message, self.status = message, status


def conversation_of(messages):
    """{"messages": [...]} for the tokenizer, after the checks pydantic can't express."""
    out, total = [], 0
    for i, m in enumerate(messages):
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        if not text.strip():
            raise BadRequest(f"messages[{i}] is empty")
        if len(text) > MAX_MESSAGE_CHARS:
            raise BadRequest(f"messages[{i}] is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}")
        total += len(text)
        if m.role == "system" and i != 0:
            raise BadRequest(f"messages[{i}]: a system message may only come first")
        out.append({"role": m.role, "content": text})
    if total > MAX_CONVERSATION_CHARS:
        raise BadRequest(f"the conversation is {total} characters; the limit is {MAX_CONVERSATION_CHARS}")
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRequest("messages must alternate user / assistant (after an optional system message), "
                             "starting with user")
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("the last message must be from the user")
    return {"messages": out + [{"role": "assistant", "content": ""}]}


def check_params(req, vocab_size):
    """The OpenAI parameters pydantic can't check: logit_bias's keys and values, the
    ones we don't implement (a 400 naming the parameter unless it has its neutral value),
    max_completion_tokens (becomes max_tokens) and stream_options (with stream only)."""
    for name, neutral in NEUTRAL.items():
        if getattr(req, name) not in neutral:
            raise BadRequest(f"'{name}' is not supported by this server (leave it out)")
    if req.max_completion_tokens is not None:
        if "max_tokens" in req.model_fields_set and req.max_tokens != req.max_completion_tokens:
            raise BadRequest("max_tokens and max_completion_tokens differ: give one of them")
        req.max_tokens = req.max_completion_tokens
    if req.stream_options is not None and not req.stream:
        raise BadRequest("stream_options is only allowed with stream: true")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        # ASCII digits only ('²'.isdigit() is True, int('²') fails), and short (int() refuses over 4,300 digits)
        if not (key.isascii() and key.isdigit() and len(key) <= 9) or int(key) >= vocab_size:
            raise BadRequest(f"logit_bias: {key!r} is not a token id (0 to {vocab_size - 1})")
        if not -100 <= value <= 100:
            raise BadRequest(f"logit_bias[{key}]: {value} is outside -100 to 100")
        bias[int(key)] = value
    return bias


class StopScanner:
    """Cuts a row's text at the first stop string. feed(text) returns what may be sent
    now and whether a stop string was hit (then the row is done; the stop string and
    what follows are dropped). Text that could be the start of a stop string is held
    back until the next pieces show whether it is; finish() returns what was held."""

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def feed(self, text):
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def finish(self):
        out, self.held = self.held, ""
        return out


# -----------------------------------------------------------------------------
# Workers


class Worker:
    def __init__(self, index, model, tokenizer, device_type, speculative=True, batch_slots=0, bf16_linears=True,
                 compile_mode=None, stack_qkv=True, decode_kernel="auto"):
        self.index, self.model, self.tokenizer = index, model, tokenizer
        model.set_decode_kernel(decode_kernel)  # (a ValueError: create_app's caller says what to change)
        if bf16_linears:  # every request runs under autocast (self.autocast, the batcher's), as linears_to needs
            model.linears_to(compute_dtype(device_type))
        if stack_qkv:
            model.stack_projections()
        self.engine = Engine(model, tokenizer, speculative=speculative)
        self.engine.compile_mode = compile_mode
        self.autocast = autocast_for(device_type)
        # continuous batching: one decode batch shared by the requests (no speculative decoding)
        self.batcher = Batcher(self.engine, batch_slots, autocast=lambda: autocast_for(device_type)) if batch_slots else None
        if self.batcher:  # one token decoded before serving: on CUDA this compiles and captures every step size
            list(self.batcher.generate([tokenizer.get_bos_token_id()], max_tokens=1, temperature=0.0))
        self.busy, self.served, self.tokens, self.requests = False, 0, 0, 0


class WorkerPool:
    def __init__(self, workers):
        self.workers = workers
        self.free = asyncio.Queue()
        for w in workers:
            self.free.put_nowait(w)
        self.waiting = 0
        self.first_token_s = deque(maxlen=1000)  # the last requests' times from arrival here to their first piece

    async def acquire(self):
        if self.workers[0].batcher is not None:  # batching: the least loaded worker, shared
            worker = min(self.workers, key=lambda w: w.requests)
            worker.requests += 1
            worker.busy = True
            return worker
        self.waiting += 1
        try:
            worker = await self.free.get()
        finally:
            self.waiting -= 1
        worker.busy = True
        return worker

    async def acquire_unless(self, left):
        """acquire(), given up (None) once `left()` (async) says the client has gone, checked
        every 0.25 s: a non-streamed request waiting for a worker sends nothing, so nothing
        else notices its client leave, and it took a worker when one freed."""
        task = asyncio.ensure_future(self.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await left():
                    task.cancel()
                    try:
                        worker = await task
                    except asyncio.CancelledError:
                        return None
                    self.release(worker)  # (it got one just before the cancel)
                    return None
        except asyncio.CancelledError:
            task.cancel()
            raise

    def release(self, worker):
        if worker.batcher is not None:
            worker.requests -= 1
            worker.busy = worker.requests > 0
            return
        worker.busy = False
        self.free.put_nowait(worker)


def percentiles_ms(seconds):
    """{"p50": ms, "p95": ms} of recent waits (None before any)."""
    values = sorted(seconds)
    at = lambda q: round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1)
    return {"p50": at(0.5), "p95": at(0.95)} if values else None


def error(status, message, kind="invalid_request_error"):
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class BearerAuth:
    """--api_key: every path but the page and the health check needs `Authorization: Bearer
    KEY` (the scheme in any case, as RFC 7235 says). Plain ASGI, not @app.middleware("http"):
    that one wraps `receive`, and a handler then no longer sees its client disconnect."""
    OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json")

    def __init__(self, app, api_key):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = given.strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                response = error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error")
                # the body is not read: close the connection (a client still sending it, slowly,
                # would otherwise hold it open, outside every timeout)
                response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyGuard:
    """Reads the whole request body before the app sees it: at most max_bytes (a larger
    Content-Length is refused at once, a chunked body as soon as it grows past the limit:
    413) within timeout seconds (else 408); both answers close the connection. The app
    then gets the body in one message, and after that the real `receive`, so it still
    sees its client disconnect."""

    def __init__(self, app, max_bytes=MAX_BODY_BYTES, timeout=BODY_TIMEOUT):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.refuse(413, f"the request body is over the limit of {self.max_bytes} bytes",
                                     scope, receive, send)
        body, deadline = [], time.monotonic() + self.timeout
        size, more = 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return await self.refuse(408, f"the request body did not arrive within {self.timeout:g} s",
                                         scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self.refuse(413, f"the request body is over the limit of {self.max_bytes} bytes",
                                         scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(status, message, scope, receive, send):
        response = error(status, message)
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def guarded_protocol(header_timeout=HEADER_TIMEOUT, max_connections=MAX_CONNECTIONS):
    """uvicorn's h11 protocol, plus what uvicorn lacks: a deadline for a request's headers
    (from the connection's start, or from the end of the previous response: a client that
    sends half a header is answered 408 and closed, one that stays silent is closed, so
    slow clients can't hold sockets) and a cap on open connections (the next one is answered 503 and closed
    at once; uvicorn's limit_concurrency only answers once the headers are in)."""

    class GuardedH11Protocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.refuse(b"503 Service Unavailable")
            else:
                self.start_header_timer()

        def start_header_timer(self):
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self.on_header_timeout)

        def on_header_timeout(self):
            self.header_timer = None
            if self.conn.trailing_data[0]:  # part of a request came: say why we hang up
                self.refuse(b"408 Request Timeout")
            elif not self.transport.is_closing():  # nothing came (e.g. an idle keep-alive connection)
                self.transport.close()

        def stop_header_timer(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def refuse(self, status):
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def data_received(self, data):
            if self.conn.their_state is h11.IDLE:  # a new request: its headers are due in time
                self.start_header_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # headers in (or the connection is done)
                self.stop_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.start_header_timer()  # the next request's headers are due in time as well

        def connection_lost(self, exc):
            self.stop_header_timer()
            super().connection_lost(exc)

    return GuardedH11Protocol


def server_config(app, host="127.0.0.1", port=8000, header_timeout=HEADER_TIMEOUT,
                  max_connections=MAX_CONNECTIONS, **kwargs):
    """uvicorn's Config for chat_web: the guarded protocol (header deadline, connection
    cap); the body's limits are BodyGuard's, in the app."""
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(header_timeout, max_connections),
                          ws="none", **kwargs)


class Answers:
    """The text of n answers sampled together, as their token columns arrive: feed(column)
    and end() return the items to stream, (kind, choice, text, tokens so far, finish_reason):
    "text" pieces, then one "end" per answer whose finish_reason is "stop" (a stop token,
    or one of the request's stop strings, whose text is not returned) or "length"."""

    def __init__(self, tokenizer, stop_tokens, n, stops):
        self.stop_tokens = stop_tokens
        self.decoders = [tokenizer.stream_decoder() for _ in range(n)]  # each holds a character split across tokens
        self.scanners = [StopScanner(stops) if stops else None for _ in range(n)]
        self.counts, self.done = [0] * n, [False] * n

    def feed(self, column):
        items = []
        for i, token in enumerate(column):
            if self.done[i]:
                continue
            if token in self.stop_tokens:
                self.done[i] = True
                tail = self.decoders[i](None)
                if self.scanners[i]:
                    tail, _ = self.scanners[i].feed(tail)
                    tail += self.scanners[i].finish()
                items.append(("end", i, tail, self.counts[i], "stop"))
                continue
            self.counts[i] += 1
            text = self.decoders[i](token)
            hit = False
            if self.scanners[i] and text:
                text, hit = self.scanners[i].feed(text)
            if hit:
                self.done[i] = True
                items.append(("end", i, text, self.counts[i], "stop"))
            elif text:
                items.append(("text", i, text, self.counts[i], None))
        return items

    def end(self):
        """The ends of the answers not done: what their decoders and scanners still hold."""
        items = []
        for i in range(len(self.done)):
            if self.done[i]:
                continue
            self.done[i] = True
            tail = self.decoders[i](None)
            if self.scanners[i]:
                tail, hit = self.scanners[i].feed(tail)
                if hit:
                    items.append(("end", i, tail, self.counts[i], "stop"))
                    continue
                tail += self.scanners[i].finish()
            items.append(("end", i, tail, self.counts[i], "length"))
        return items


def deliver_in(loop):
    """A Batcher's deliver for consumers in this event loop: each step's items, every
    request's at once, handed over in one call (not a thread per request woken per token)."""
    def run(pairs):
        for sink, item in pairs:
            try:
                sink(item)
            except Exception:  # (one request's failure must not keep the others' tokens or ends from them)
                logger.exception("a batched request's item failed")
    return lambda pairs: loop.call_soon_threadsafe(run, pairs)


async def generate_stream(pool, tokens, req, seed, bias=None, left=None):
    """Async generator of (choice, text piece, tokens so far, finish_reason, worker index)
    for req.n answers sampled together; finish_reason is None until that answer's last
    item, then "stop" (a stop token, or one of req.stop, whose text is not returned) or
    "length" (max_tokens, or the end of the model's context). bias: logit_bias as
    {token id: bias}. It waits for a free worker and generates in a thread, which stops
    once every answer is done. When the consumer goes away (a disconnected client) the
    thread stops at its next token; it hands the worker back when done with the model.
    With continuous batching the worker is shared: the request runs in its batcher, whose
    thread hands each step's tokens to this event loop (no thread per request). left: an async
    check that the client has gone, while waiting for a worker (nothing then, not even a worker)."""
    arrived = time.perf_counter()
    worker = await (pool.acquire() if left is None else pool.acquire_unless(left))
    if worker is None:
        return
    loop = asyncio.get_running_loop()
    out = asyncio.Queue()
    n = getattr(req, "n", 1)
    max_tokens = min(req.max_tokens or MAX_NEW_TOKENS, worker.model.config.sequence_len - len(tokens))
    answers = Answers(worker.tokenizer, worker.engine.stop_tokens, n, req.stops() if getattr(req, "stop", None) else None)
    kwargs = dict(num_samples=n, max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, seed=seed,
                  frequency_penalty=getattr(req, "frequency_penalty", 0) or 0.0,
                  presence_penalty=getattr(req, "presence_penalty", 0) or 0.0, logit_bias=bias)

    def send(*item):
        loop.call_soon_threadsafe(out.put_nowait, item)

    def feed(column):
        before = sum(answers.counts)
        items = answers.feed(column)
        worker.tokens += sum(answers.counts) - before
        return items

    def finished():  # (in this event loop)
        worker.served += 1
        pool.release(worker)
        out.put_nowait(("done", 0, "", 0, None))

    def run():
        if worker.model.wte.weight.device.type == "cuda":  # this thread's streams and graphs on the worker's GPU
            torch.cuda.set_device(worker.model.wte.weight.device)
        gen = worker.engine.generate(tokens, **kwargs)
        try:
            with worker.autocast, closing(gen):
                for column, _ in gen:
                    if stop.is_set():
                        break
                    for item in feed(column):
                        send(*item)
                    if all(answers.done):
                        break
            for item in answers.end():
                send(*item)
        except Exception as e:  # reported to the client as an error, logged here
            logger.exception("generation failed")
            send("error", 0, str(e), 0, None)
        finally:
            loop.call_soon_threadsafe(finished)

    failed = []

    def on_item(item):  # continuous batching: the batcher's items, in this event loop
        if isinstance(item, Exception):
            logger.error(f"generation failed: {item!r}")
            out.put_nowait(("error", 0, str(item), 0, None))
            finished()
        elif item is None:
            if not failed:
                for piece in answers.end():
                    out.put_nowait(piece)
            finished()
        elif not all(answers.done) and not failed:
            try:
                pieces = feed(item[0])
            except Exception as e:  # (as the thread reports its errors; the request's end still comes)
                logger.exception("generation failed")
                failed.append(e)
                out.put_nowait(("error", 0, str(e), 0, None))
                request.cancelled = True
                return
            for piece in pieces:
                out.put_nowait(piece)
            if all(answers.done):
                request.cancelled = True  # every answer ended (a stop string): its rows are free at the next step

    if worker.batcher is not None:
        if worker.batcher.deliver is None:  # from now on every step's items come through this event loop
            worker.batcher.deliver = deliver_in(loop)
        try:
            request = worker.batcher.submit(tokens, on_item, **kwargs)
            cancel = lambda: setattr(request, "cancelled", True)
        except Exception as e:  # (a request the batcher refuses: reported as the thread's errors are)
            logger.exception("generation failed")
            out.put_nowait(("error", 0, str(e), 0, None))
            finished()
            cancel = lambda: None
    else:
        stop = threading.Event()
        threading.Thread(target=run, daemon=True).start()
        cancel = stop.set
    first = True
    try:
        while True:
            kind, i, text, count, finish = await out.get()
            if kind == "error":
                raise RuntimeError(text)
            if kind == "done":
                return
            if first:
                pool.first_token_s.append(time.perf_counter() - arrived)
                first = False
            yield i, text, count, finish, worker.index
    finally:
        cancel()  # no await here: a cancelled task (client gone) could not wait anyway


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


# -----------------------------------------------------------------------------
# The app


def create_app(source="sft", model_tag=None, step=None, num_gpus=1, device_type="", api_key=None,
               max_body_bytes=MAX_BODY_BYTES, body_timeout=BODY_TIMEOUT, speculative=True, batch_slots=0,
               bf16_linears=True, compile_mode=None, stack_qkv=True, decode_kernel="auto"):
    if batch_slots and batch_slots < MAX_CHOICES:
        raise ValueError(f"batch_slots={batch_slots}: use 0 (off) or at least {MAX_CHOICES}, the most answers (n) "
                         "one request may ask for")
    device_type = autodetect_device_type(device_type)
    clean_stale_exec_dirs()  # sandbox dirs of a killed earlier server
    state = {"requests": 0, "started": time.time()}

    workers = []
    for i in range(num_gpus):
        device = torch.device(f"cuda:{i}") if device_type == "cuda" else torch.device(device_type)
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
        workers.append(Worker(i, model, tokenizer, device_type, speculative, batch_slots, bf16_linears, compile_mode,
                              stack_qkv, decode_kernel))
        logger.info(f"worker {i}: {source}/{meta['model_tag']} step {meta['step']} on {device}")
    state["tokenizer"], state["model_id"] = tokenizer, f"nanochat-{source}-{meta['model_tag']}"
    app = FastAPI(title="nanochat", description="nanochat: chat UI and OpenAI-compatible API")
    app.state.pool = WorkerPool(workers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors()[:5])
        return error(400 if any(e["type"] == "json_invalid" for e in exc.errors()) else 422, problems)

    @app.exception_handler(BadRequest)
    async def on_bad_request(request, exc):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    app.add_middleware(BodyGuard, max_bytes=max_body_bytes, timeout=body_timeout)  # with or without a key
    if api_key:  # outside BodyGuard: a request without the key is refused before its body is read
        app.add_middleware(BearerAuth, api_key=api_key)

    def fitting(tokens, what):
        """tokens, if they leave room in the model's context for at least one more."""
        limit = app.state.pool.workers[0].model.config.sequence_len
        if len(tokens) >= limit:
            raise BadRequest(f"the {what} is {len(tokens)} tokens; this model's context is {limit}")
        return tokens

    def prompt_tokens(conversation):
        return fitting(state["tokenizer"].render_for_completion(conversation), "conversation")

    def usage_of(tokens, counts):
        n = sum(counts)
        return {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}

    def completion_id(kind):
        return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def logit_bias(req):
        return check_params(req, state["tokenizer"].get_vocab_size())

    @app.get("/", include_in_schema=False)
    async def ui():
        return FileResponse(UI_FILE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(app.state.pool.workers), "sandbox": isolation(), "seccomp": seccomp_layer()}

    @app.get("/stats")
    async def stats():
        pool = app.state.pool
        # first_token_ms: the server's part of the time to first token (the last 1,000 requests), from the
        # request's arrival at the generator; the batcher's own part (waiting for rows, prefill) beside it
        return {"requests": state["requests"], "waiting": pool.waiting, "uptime_s": round(time.time() - state["started"]),
                "first_token_ms": percentiles_ms(pool.first_token_s),
                "workers": [{"id": w.index, "busy": w.busy, "served": w.served, "tokens": w.tokens,
                             "device": str(w.model.wte.weight.device),
                             **({"rows_busy": w.batcher.busy_rows, "rows": w.batcher.slots, "queued": w.batcher.queued,
                                 "batcher_first_token_ms": percentiles_ms(w.batcher.first_token_s)}
                                if w.batcher else {})}
                            for w in pool.workers]}

    @app.post("/chat/completions")
    async def chat(req: ChatRequest):
        if req.n != 1:
            raise BadRequest("'n' must be 1 here (the UI endpoint streams one answer); /v1 takes more")
        tokens, bias = prompt_tokens(conversation_of(req.messages)), logit_bias(req)
        state["requests"] += 1
        seed = req.seed if req.seed is not None else state["requests"]

        async def events():
            try:
                async with aclosing(generate_stream(app.state.pool, tokens, req, seed, bias)) as pieces:
                    async for _, text, _, _, worker in pieces:
                        if text:
                            yield sse({"token": text, "worker": worker})
                yield sse({"done": True})
            except RuntimeError as e:
                yield sse({"error": str(e)})
        return StreamingResponse(events(), media_type="text/event-stream")

    def openai_stream(tokens, req, kind, seed, bias):
        """OpenAI's streaming format: chunks (each of one choice), then data: [DONE]."""
        rid = completion_id(kind)
        created, model = int(time.time()), state["model_id"]
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(i, text, finish=None):
            if kind == "chat":
                choice = {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text, "finish_reason": finish}
            return sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

        async def events():
            if kind == "chat":
                for i in range(req.n):
                    yield sse({"id": rid, "object": obj, "created": created, "model": model,
                               "choices": [{"index": i, "delta": {"role": "assistant"}, "finish_reason": None}]})
            counts = [0] * req.n
            try:
                async with aclosing(generate_stream(app.state.pool, tokens, req, seed, bias)) as pieces:
                    async for i, text, count, finish, _ in pieces:
                        counts[i] = count
                        if text:
                            yield chunk(i, text)
                        if finish:
                            yield chunk(i, "", finish)
            except RuntimeError as e:
                yield sse({"error": {"message": str(e), "type": "server_error"}})
                return
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                           "usage": usage_of(tokens, counts)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def openai_complete(tokens, req, kind, request):
        bias = logit_bias(req)
        state["requests"] += 1
        # without a seed, each request samples differently (a retry must not repeat the answer)
        seed = req.seed if req.seed is not None else state["requests"]
        if req.stream:
            return openai_stream(tokens, req, kind, seed, bias)
        texts, counts, finishes, items = [""] * req.n, [0] * req.n, [None] * req.n, 0
        try:
            pieces = generate_stream(app.state.pool, tokens, req, seed, bias, left=request.is_disconnected)
            async with aclosing(pieces) as pieces:
                async for i, piece, count, finish, _ in pieces:
                    texts[i] += piece
                    counts[i], finishes[i], items = count, finish, items + 1
                    # nothing is sent before the end here, so look for a client that has left
                    # (leaving this block stops the generation at its next token)
                    if items % 8 == 0 and await request.is_disconnected():
                        return error(499, "client disconnected", "client_closed")
        except RuntimeError as e:  # the worker's error (generate_stream's), as the streaming path reports it
            return error(500, str(e), "server_error")
        if items == 0 and await request.is_disconnected():  # it left while waiting for a worker
            return error(499, "client disconnected", "client_closed")
        base = {"id": completion_id(kind), "created": int(time.time()),
                "model": state["model_id"], "usage": usage_of(tokens, counts)}
        if kind == "chat":
            return dict(base, object="chat.completion", choices=[
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                for i, (t, f) in enumerate(zip(texts, finishes))])
        return dict(base, object="text_completion", choices=[{"index": i, "text": t, "finish_reason": f}
                                                             for i, (t, f) in enumerate(zip(texts, finishes))])

    @app.post("/v1/chat/completions")
    async def v1_chat(req: ChatRequest, request: Request):
        return await openai_complete(prompt_tokens(conversation_of(req.messages)), req, "chat", request)

    @app.post("/v1/completions")
    async def v1_completions(req: CompletionRequest, request: Request):
        tok = state["tokenizer"]
        if req.suffix is not None:  # fill-in-the-middle, PSM order: prefix, suffix, then the middle
            tokens = fim_prompt(tok, req.prompt, req.suffix)
        else:
            tokens = tok.encode(req.prompt, prepend="<|bos|>")
        return await openai_complete(fitting(tokens, "prompt"), req, "text", request)

    @app.get("/v1/models")
    async def v1_models():
        return {"object": "list", "data": [{"id": state["model_id"], "object": "model", "created": int(state["started"]),
                                            "owned_by": "nanochat"}]}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a chat model: web UI and OpenAI-compatible API")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's model")
    parser.add_argument("-g", "--model_tag", default=None, help="model tag (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--num_gpus", type=int, default=1, help="workers: one model per GPU (on a CPU: CPU replicas)")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (default: autodetect)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--header_timeout", type=float, default=HEADER_TIMEOUT,
                        help="seconds a client has to send a request's headers (else 408, closed)")
    parser.add_argument("--max_connections", type=int, default=MAX_CONNECTIONS,
                        help="open connections at most; the next is answered 503 and closed")
    parser.add_argument("--api_key", default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $NANOCHAT_API_KEY; none: open)")
    parser.add_argument("--speculative", type=int, default=1,
                        help="1: greedy answers (temperature 0) of a model with one MTP module (--mtp) and "
                             "attention-only layers decode self-speculatively (same tokens, fewer forwards); 0: off")
    parser.add_argument("--batch_slots", type=int, default=0,
                        help="N > 0: continuous batching, each worker decodes up to N answers at once in one batch "
                             "(for many concurrent clients; no speculative decoding); 0: one request at a time per worker")
    parser.add_argument("--bf16_linears", type=int, default=1,
                        help="1 (default): keep the Linear weights in bf16 on GPUs (GPT.linears_to); 0: fp32 weights that "
                             "autocast casts at every step (a d12 decodes 1.46x faster at batch 1 with 1 on an H200; docs/serving.md)")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode of the decode step, e.g. max-autotune-no-cudagraphs (1.17x batch-1 "
                             "decode in engine_bench on an H200, none at batch 128; ~45 s more startup the first time: "
                             "autotuning; docs/engine.md)")
    parser.add_argument("--stack_qkv", type=int, default=1,
                        help="1 (default): each attention layer's q, k, v projections as one matmul when decoding "
                             "(GPT.stack_projections: fewer kernels a step; docs/engine.md); 0: three")
    parser.add_argument("--decode_kernel", default="auto", choices=["auto", "sdpa", "triton"],
                        help="attention of a decode step: flash-decoding over each row's visible keys "
                             "(nanochat/decode_triton.py: CUDA, power-of-two head dim), or SDPA over the whole cache "
                             "with a mask; auto (default): triton where it runs, else sdpa (docs/engine.md)")
    parser.add_argument("--unsandboxed_tool", action="store_true",
                        help="serve even if the Python tool cannot be isolated here (it then runs as this user)")
    args = parser.parse_args()
    if isolation() == "none" and not args.unsandboxed_tool:  # the tool's code could read this server's secrets
        raise SystemExit("The Python tool cannot be isolated on this machine (no user namespaces; see "
                         "nanochat/execution.py). Start with --unsandboxed_tool to serve anyway, tool unsandboxed.")
    if args.device_type == "cuda" or (not args.device_type and torch.cuda.is_available()):
        if args.num_gpus > torch.cuda.device_count():
            raise SystemExit(f"--num_gpus={args.num_gpus} but {torch.cuda.device_count()} GPUs are visible")
    try:
        app = create_app(args.source, args.model_tag, args.step, args.num_gpus, args.device_type, args.api_key,
                         speculative=bool(args.speculative), batch_slots=args.batch_slots,
                         bf16_linears=bool(args.bf16_linears), compile_mode=args.compile_mode,
                         stack_qkv=bool(args.stack_qkv), decode_kernel=args.decode_kernel)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nNo {args.source} model to serve: train that stage first (see README).") from None
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    print(f"nanochat: open http://{args.host}:{args.port} for the UI; OpenAI-compatible API at "
          f"http://{args.host}:{args.port}/v1; Python tool sandbox: {isolation()}"
          + (" (UNSANDBOXED: --unsandboxed_tool)" if isolation() == "none" else "")
          + ("" if seccomp_layer() else " (no seccomp filter on this machine: Linux x86-64 only)"))
    uvicorn.Server(server_config(app, args.host, args.port, args.header_timeout, args.max_connections,
                                 log_level="info")).run()
