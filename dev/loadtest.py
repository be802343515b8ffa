"""
A bounded load test of a running chat_web server: N concurrent clients, each sending
streaming chat requests back to back for a fixed time. Prints one JSON line: requests,
requests/s, time to first token (p50, p95, p99), each answer's streaming rate after its
first token (text pieces a second, about tokens: p50 and p5, the slow end), errors, and
the server's /stats afterwards (every worker should be free again: none leaked).

    python -m scripts.chat_web --num_gpus=2 &
    python dev/loadtest.py --url http://127.0.0.1:8000 --clients 32 --seconds 30
"""

import argparse
import asyncio
import json
import time

import httpx


async def client(url, deadline, args, ttfts, rates, errors, headers):
    body = {"messages": [{"role": "user", "content": "Tell me about compilers."}],
            "max_tokens": args.max_tokens, "temperature": 0.8}
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers) as http:
        while time.monotonic() < deadline:
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
                ttfts.append(first)
                if pieces > 1:  # the pieces after the first, over the time after it
                    rates.append((pieces - 1) / max(time.monotonic() - t0 - first, 1e-6))


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


async def main(args):
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ttfts, rates, errors = [], [], []
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    await asyncio.gather(*(client(args.url, deadline, args, ttfts, rates, errors, headers) for _ in range(args.clients)))
    elapsed = time.monotonic() - t0
    async with httpx.AsyncClient(headers=headers) as http:
        stats = (await http.get(f"{args.url}/stats")).json()
    ms = lambda q: round(1000 * percentile(ttfts, q), 1) if ttfts else None
    rate = lambda q: round(percentile(rates, q), 1) if rates else None
    return {"clients": args.clients, "seconds": round(elapsed, 1), "requests": len(ttfts),
            "requests_per_s": round(len(ttfts) / elapsed, 2),
            "ttft_p50_ms": ms(0.5), "ttft_p95_ms": ms(0.95), "ttft_p99_ms": ms(0.99),
            "stream_tok_per_s_p50": rate(0.5), "stream_tok_per_s_p5": rate(0.05),
            "errors": len(errors), "first_errors": errors[:3],
            "workers_busy_after": sum(w["busy"] for w in stats["workers"]), "waiting_after": stats["waiting"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load-test a chat_web server with concurrent streaming clients")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120, help="per-request timeout (queueing included)")
    parser.add_argument("--api_key", default=None)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
