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
Every bad request gets a 4xx with an OpenAI-style error body, never a 500.
"""

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from contextlib import aclosing
from typing import Literal, Optional, Union

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.checkpoint_manager import load_model
from nanochat.common import autocast_for, autodetect_device_type, clean_stale_exec_dirs, logger
from nanochat.engine import Engine

# limits: generous for people, small enough that nobody can tie up a worker for long
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
MAX_NEW_TOKENS = 4096
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed takes
UI_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# -----------------------------------------------------------------------------
# Request bodies (pydantic checks types and ranges; the rest is checked by hand below)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]  # OpenAI clients may send [{"type": "text", "text": ...}]


class Sampling(BaseModel):
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: Optional[int] = Field(50, ge=1, le=200)
    max_tokens: Optional[int] = Field(512, ge=1, le=MAX_NEW_TOKENS)


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    model: Optional[str] = None
    stream: bool = False  # /v1 only; the UI endpoint always streams
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)


class CompletionRequest(Sampling):
    prompt: str = Field(..., max_length=MAX_CONVERSATION_CHARS)
    suffix: Optional[str] = Field(None, max_length=MAX_CONVERSATION_CHARS)
    model: Optional[str] = None
    stream: bool = False
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)


def clean(text):
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which no encoder accepts:
    keep valid pairs, replace lone halves with U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class BadRequest(Exception):
    def __init__(self, message, status=400):
        self.message, self.status = message, status


def conversation_of(messages):
    """{"messages": [...]} for the tokenizer, after the checks pydantic can't express."""
    out, total = [], 0
    for i, m in enumerate(messages):
        text = clean(m.content if isinstance(m.content, str) else "".join(p.text for p in m.content))
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


# -----------------------------------------------------------------------------
# Workers


class Worker:
    def __init__(self, index, model, tokenizer, device_type):
        self.index, self.model, self.tokenizer = index, model, tokenizer
        self.engine = Engine(model, tokenizer)
        self.autocast = autocast_for(device_type)
        self.busy, self.served, self.tokens = False, 0, 0


class WorkerPool:
    def __init__(self, workers):
        self.workers = workers
        self.free = asyncio.Queue()
        for w in workers:
            self.free.put_nowait(w)
        self.waiting = 0

    async def acquire(self):
        self.waiting += 1
        try:
            worker = await self.free.get()
        finally:
            self.waiting -= 1
        worker.busy = True
        return worker

    def release(self, worker):
        worker.busy = False
        self.free.put_nowait(worker)


def error(status, message, kind="invalid_request_error"):
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class BearerAuth:
    """--api_key: every path but the page and the health check needs `Authorization: Bearer
    KEY`. Plain ASGI, not @app.middleware("http"): that one wraps `receive`, and a handler
    then no longer sees its client disconnect."""
    OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json")

    def __init__(self, app, api_key):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {self.api_key}":
                response = error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def generate_stream(pool, tokens, sampling, seed):
    """Async generator of (text piece, tokens so far, worker index), ending with a
    ("", total tokens, worker) item. It waits for a free worker and generates in a thread.
    When the consumer goes away (a disconnected client) the thread stops at its next
    token; the thread itself hands the worker back when it is done with the model."""
    worker = await pool.acquire()
    loop = asyncio.get_running_loop()
    out = asyncio.Queue()
    stop = threading.Event()
    max_tokens = min(sampling.max_tokens or MAX_NEW_TOKENS, worker.model.config.sequence_len - len(tokens))

    def send(*item):
        loop.call_soon_threadsafe(out.put_nowait, item)

    def run():
        decode, n = worker.tokenizer.stream_decoder(), 0  # holds a character split across tokens
        try:
            with worker.autocast:
                for column, _ in worker.engine.generate(tokens, num_samples=1, max_tokens=max_tokens,
                                                        temperature=sampling.temperature, top_k=sampling.top_k,
                                                        seed=seed):
                    if stop.is_set() or column[0] in worker.engine.stop_tokens:
                        break
                    n += 1
                    worker.tokens += 1
                    text = decode(column[0])
                    if text:
                        send("text", text, n)
            send("end", decode(None), n)
        except Exception as e:  # reported to the client as an error, logged here
            logger.exception("generation failed")
            send("error", str(e), n)
        finally:
            worker.served += 1
            loop.call_soon_threadsafe(pool.release, worker)

    threading.Thread(target=run, daemon=True).start()
    try:
        while True:
            kind, text, n = await out.get()
            if kind == "error":
                raise RuntimeError(text)
            yield text, n, worker.index
            if kind == "end":
                return
    finally:
        stop.set()  # no await here: a cancelled task (client gone) could not wait anyway


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


# -----------------------------------------------------------------------------
# The app


def create_app(source="sft", model_tag=None, step=None, num_gpus=1, device_type="", api_key=None):
    device_type = autodetect_device_type(device_type)
    clean_stale_exec_dirs()  # sandbox dirs of a killed earlier server
    state = {"requests": 0, "started": time.time()}

    workers = []
    for i in range(num_gpus):
        device = torch.device(f"cuda:{i}") if device_type == "cuda" else torch.device(device_type)
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
        workers.append(Worker(i, model, tokenizer, device_type))
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

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    def fitting(tokens, what):
        """tokens, if they leave room in the model's context for at least one more."""
        limit = app.state.pool.workers[0].model.config.sequence_len
        if len(tokens) >= limit:
            raise BadRequest(f"the {what} is {len(tokens)} tokens; this model's context is {limit}")
        return tokens

    def prompt_tokens(conversation):
        return fitting(state["tokenizer"].render_for_completion(conversation), "conversation")

    def completion_id(kind):
        return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def finish_reason(n, req, tokens):
        """"length" when generation ran into max_tokens or the end of the model's context
        (generate_stream caps max_tokens by the room the prompt leaves), else "stop"."""
        limit = min(req.max_tokens or MAX_NEW_TOKENS, app.state.pool.workers[0].model.config.sequence_len - len(tokens))
        return "length" if n >= limit else "stop"

    @app.get("/", include_in_schema=False)
    async def ui():
        return FileResponse(UI_FILE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(app.state.pool.workers)}

    @app.get("/stats")
    async def stats():
        pool = app.state.pool
        return {"requests": state["requests"], "waiting": pool.waiting, "uptime_s": round(time.time() - state["started"]),
                "workers": [{"id": w.index, "busy": w.busy, "served": w.served, "tokens": w.tokens,
                             "device": str(w.model.wte.weight.device)} for w in pool.workers]}

    @app.post("/chat/completions")
    async def chat(req: ChatRequest):
        tokens = prompt_tokens(conversation_of(req.messages))
        state["requests"] += 1
        seed = req.seed if req.seed is not None else state["requests"]

        async def events():
            try:
                async with aclosing(generate_stream(app.state.pool, tokens, req, seed)) as pieces:
                    async for text, _, worker in pieces:
                        if text:
                            yield sse({"token": text, "worker": worker})
                yield sse({"done": True})
            except RuntimeError as e:
                yield sse({"error": str(e)})
        return StreamingResponse(events(), media_type="text/event-stream")

    def openai_stream(tokens, req, kind, seed):
        """OpenAI's streaming format: chunks, then data: [DONE]."""
        rid = completion_id(kind)
        created, model = int(time.time()), state["model_id"]
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text, finish=None):
            if kind == "chat":
                choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish}
            return sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]})

        async def events():
            n = 0
            if kind == "chat":
                yield sse({"id": rid, "object": obj, "created": created, "model": model,
                           "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            try:
                async with aclosing(generate_stream(app.state.pool, tokens, req, seed)) as pieces:
                    async for text, n, _ in pieces:
                        if text:
                            yield chunk(text)
            except RuntimeError as e:
                yield sse({"error": {"message": str(e), "type": "server_error"}})
                return
            yield chunk("", finish_reason(n, req, tokens))
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def openai_complete(tokens, req, kind, request):
        state["requests"] += 1
        # without a seed, each request samples differently (a retry must not repeat the answer)
        seed = req.seed if req.seed is not None else state["requests"]
        if req.stream:
            return openai_stream(tokens, req, kind, seed)
        text, n = "", 0
        async with aclosing(generate_stream(app.state.pool, tokens, req, seed)) as pieces:
            async for piece, n, _ in pieces:
                text += piece
                # nothing is sent before the end here, so look for a client that has left
                # (leaving this block stops the generation at its next token)
                if n % 8 == 0 and await request.is_disconnected():
                    return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed"}},
                                        status_code=499)
        finish = finish_reason(n, req, tokens)
        usage = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}
        base = {"id": completion_id(kind), "created": int(time.time()),
                "model": state["model_id"], "usage": usage}
        if kind == "chat":
            return dict(base, object="chat.completion", choices=[
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}])
        return dict(base, object="text_completion", choices=[{"index": 0, "text": text, "finish_reason": finish}])

    @app.post("/v1/chat/completions")
    async def v1_chat(req: ChatRequest, request: Request):
        return await openai_complete(prompt_tokens(conversation_of(req.messages)), req, "chat", request)

    @app.post("/v1/completions")
    async def v1_completions(req: CompletionRequest, request: Request):
        tok = state["tokenizer"]
        if req.suffix is not None:  # fill-in-the-middle, PSM order: prefix, suffix, then the middle
            s = tok.encode_special
            tokens = ([tok.get_bos_token_id(), s("<|fim_prefix|>")] + tok.encode(clean(req.prompt))
                      + [s("<|fim_suffix|>")] + tok.encode(clean(req.suffix)) + [s("<|fim_middle|>")])
        else:
            tokens = tok.encode(clean(req.prompt), prepend="<|bos|>")
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
    parser.add_argument("--api_key", default=os.environ.get("NANOCHAT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $NANOCHAT_API_KEY; none: open)")
    args = parser.parse_args()
    if args.device_type == "cuda" or (not args.device_type and torch.cuda.is_available()):
        if args.num_gpus > torch.cuda.device_count():
            raise SystemExit(f"--num_gpus={args.num_gpus} but {torch.cuda.device_count()} GPUs are visible")
    try:
        app = create_app(args.source, args.model_tag, args.step, args.num_gpus, args.device_type, args.api_key)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\nNo {args.source} model to serve: train that stage first (see README).") from None
    print(f"nanochat: open http://{args.host}:{args.port} for the UI; OpenAI-compatible API at "
          f"http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
