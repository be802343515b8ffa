"""
A bounded load test of a running chat_web server: N concurrent clients, each sending
streaming chat requests back to back for a fixed time. Prints one JSON line: requests,
requests/s, time to first token (p50, p99), errors, and the server's /stats afterwards
(every worker should be free again: none leaked).

    python -m scripts.chat_web --num_gpus=2 &
    python dev/loadtest.py --url http://127.0.0.1:8000 --clients 32 --seconds 30
"""

import argparse
import asyncio
import json
import time

import httpx


async def client(url, deadline, args, ttfts, errors, headers):
    body = {"messages": [{"role": "user", "content": "Tell me about compilers."}],
            "max_tokens": args.max_tokens, "temperature": 0.8}
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers) as http:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            first = None
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
                        if first is None and "token" in event:
                            first = time.monotonic() - t0
                        if event.get("done"):
                            break
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if first is not None:
                ttfts.append(first)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


async def main(args):
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ttfts, errors = [], []
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    await asyncio.gather(*(client(args.url, deadline, args, ttfts, errors, headers) for _ in range(args.clients)))
    elapsed = time.monotonic() - t0
    async with httpx.AsyncClient(headers=headers) as http:
        stats = (await http.get(f"{args.url}/stats")).json()
    return {"clients": args.clients, "seconds": round(elapsed, 1), "requests": len(ttfts),
            "requests_per_s": round(len(ttfts) / elapsed, 2),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1) if ttfts else None,
            "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 1) if ttfts else None,
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
