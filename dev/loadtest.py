"""
A bounded load test of a running chat_web server: N concurrent clients, each sending
streaming chat requests back to back for a fixed time. Prints one JSON line: requests,
requests/s, time to first token (p50, p95, p99; and p95 without each client's first
request, since all clients start at once), each answer's streaming rate after its
first token (text pieces a second, about tokens: p50 and p5, the slow end), the shortest
and longest answer, errors, the busiest client process's CPU share (near 1: the clients,
not the server, set the pace; then split them over --procs), the server's own part of the
time to first token, and its /stats afterwards (every worker should be free again: none
leaked).

    python -m scripts.chat_web --num_gpus=2 &
    python dev/loadtest.py --url http://127.0.0.1:8000 --clients 32 --seconds 30

Every answer asks for --max_tokens, so with a model that never stops early (a random
checkpoint: dev/random_checkpoint.py) all clients end, and ask again, in the same step, round
after round; --max_tokens_spread 0.5 draws each request's max_tokens within +-50% instead,
so their rounds drift apart as real traffic's do.
"""

import argparse
import asyncio
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor

import httpx


async def client(url, deadline, args, ttfts, rates, errors, headers, index):
    body = {"messages": [{"role": "user", "content": "Tell me about compilers."}],
            "max_tokens": args.max_tokens, "temperature": 0.8}
    # --max_tokens_spread: answers of different lengths, so the clients' rounds drift apart
    # (with one length they stay in step: all end, and all ask again, in the same step)
    rng = random.Random(index)
    spread = round(args.max_tokens * args.max_tokens_spread)
    mine_first = True  # this client's first request (every client sends its first at once)
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers) as http:
        while time.monotonic() < deadline:
            if spread:
                body["max_tokens"] = max(1, args.max_tokens + rng.randint(-spread, spread))
            t0 = time.monotonic()
            first, pieces = None, 0
            try:
                async with http.stream("POST", f"{url}/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            errors.append(event["error"])
                        if "token" in event:
                            pieces += 1
                            if first is None:
                                first = time.monotonic() - t0
                        if event.get("done"):
                            break
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if first is not None:
                ttfts.append((first, mine_first, pieces))
                mine_first = False
                if pieces > 1:  # the pieces after the first, over the time after it
                    rates.append((pieces - 1) / max(time.monotonic() - t0 - first, 1e-6))


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


async def clients(args, n, first=0):
    """n clients (numbered from first) until the deadline: (ttfts, rates, errors, this
    process's CPU seconds)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ttfts, rates, errors = [], [], []
    cpu = time.process_time()
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(*(client(args.url, deadline, args, ttfts, rates, errors, headers, first + i)
                           for i in range(n)))
    return ttfts, rates, errors, time.process_time() - cpu


def clients_in_process(args, n, first=0):
    return asyncio.run(clients(args, n, first))


def main(args):
    # --procs: the clients split over processes, so that one Python process parsing every stream
    # (thousands of events a second at 128 clients) does not become the bottleneck it measures
    shares = [args.clients // args.procs + (i < args.clients % args.procs) for i in range(args.procs)]
    t0 = time.monotonic()
    if args.procs == 1:
        parts = [clients_in_process(args, args.clients)]
    else:
        with ProcessPoolExecutor(args.procs) as pool:
            firsts = [sum(shares[:i]) for i in range(args.procs)]
            parts = list(pool.map(clients_in_process, [args] * args.procs, shares, firsts))
    elapsed = time.monotonic() - t0
    ttfts, rates, errors = (sum((part[k] for part in parts), []) for k in range(3))
    later = [t for t, first, _ in ttfts if not first]  # each client's requests after its first (all start at once)
    pieces = [n for _, _, n in ttfts]
    ttfts = [t for t, _, _ in ttfts]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stats = httpx.get(f"{args.url}/stats", headers=headers).json()
    ms = lambda values, q: round(1000 * percentile(values, q), 1) if values else None
    rate = lambda q: round(percentile(rates, q), 1) if rates else None
    return {"clients": args.clients, "procs": args.procs, "max_tokens_spread": args.max_tokens_spread,
            "seconds": round(elapsed, 1), "requests": len(ttfts), "requests_per_s": round(len(ttfts) / elapsed, 2),
            # text pieces per answer (about tokens): one length unless --max_tokens_spread or a stop
            "answer_pieces_min": min(pieces, default=None), "answer_pieces_max": max(pieces, default=None),
            "ttft_p50_ms": ms(ttfts, 0.5), "ttft_p95_ms": ms(ttfts, 0.95), "ttft_p99_ms": ms(ttfts, 0.99),
            "ttft_p95_ms_after_first": ms(later, 0.95),
            "stream_tok_per_s_p50": rate(0.5), "stream_tok_per_s_p5": rate(0.05),
            "errors": len(errors), "first_errors": errors[:3],
            # the busiest client process's CPU time over the wall time: near 1, the clients were the bottleneck
            "client_cpu": round(max(part[3] for part in parts) / elapsed, 2),
            "server_first_token_ms": stats.get("first_token_ms"),
            "workers_busy_after": sum(w["busy"] for w in stats["workers"]), "waiting_after": stats["waiting"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load-test a chat_web server with concurrent streaming clients")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--max_tokens_spread", type=float, default=0.0,
                        help="each request's max_tokens drawn uniformly within +-this fraction (0.5: 8 to 24 for 16)")
    parser.add_argument("--timeout", type=float, default=120, help="per-request timeout (queueing included)")
    parser.add_argument("--api_key", default=None)
    parser.add_argument("--procs", type=int, default=1, help="client processes (the clients split over them)")
    args = parser.parse_args()
    if not 1 <= args.procs <= args.clients:
        parser.error(f"--procs={args.procs}: use 1 to --clients ({args.clients})")
    if not 0 <= args.max_tokens_spread < 1:
        parser.error(f"--max_tokens_spread={args.max_tokens_spread}: use a fraction in [0, 1)")
    print(json.dumps(main(args)))
