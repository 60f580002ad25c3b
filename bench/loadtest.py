"""`smelt loadtest`: a bounded load test of a running service's OpenAI API (count and time both capped).

Sends `requests` chat completions with at most `concurrency` in flight, then reports status codes,
p50/p95 latency and aggregate tokens/s. Loopback by default; it never retries, so the numbers are
what clients saw.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import Optional

import httpx
import typer
from rich.console import Console

console = Console(width=160)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[int, float, int, str]:
    """(status, seconds, completion tokens, what went wrong: "" on 200)."""
    t0 = time.perf_counter()
    try:
        r = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as err:
        # status 0: no answer (timeout, connection refused)
        return 0, time.perf_counter() - t0, 0, f"{type(err).__name__}: {err}"
    if r.status_code != 200:
        return r.status_code, time.perf_counter() - t0, 0, f"{r.status_code} {r.headers.get('server', '')}: {r.text[:300]}"
    return 200, time.perf_counter() - t0, r.json().get("usage", {}).get("completion_tokens", 0), ""


async def run_load(base_url: str, model: str, prompts: list[str], requests: int, concurrency: int, max_tokens: int,
                   api_key: str | None = None, deadline_s: float = 300.0) -> dict:
    """Fire `requests` chat completions, `concurrency` at a time, all within `deadline_s`."""
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"

    async def bounded(i: int, client: httpx.AsyncClient):
        async with gate:
            body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
            return await one_request(client, url, body, headers)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=deadline_s, trust_env=False) as client:
        results = await asyncio.wait_for(asyncio.gather(*(bounded(i, client) for i in range(requests))), deadline_s)
    return summarise(results, time.perf_counter() - t0, concurrency)


def summarise(results: list[tuple[int, float, int, str]], seconds: float, concurrency: int) -> dict:
    latencies = sorted(lat for code, lat, _, _ in results if code == 200) or [0.0]
    tokens = sum(t for _, _, t, _ in results)
    errors = list(dict.fromkeys(err for _, _, _, err in results if err))[:5]  # distinct, in order seen
    return {"requests": len(results), "concurrency": concurrency, "status": dict(Counter(code for code, _, _, _ in results)),
            "errors": errors,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "completion_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}


def loadtest(
    url: str = typer.Option("http://127.0.0.1:3000/v1", help="Base URL of the OpenAI-compatible API."),
    model: Optional[str] = typer.Option(None, help="Model id to send; default the first of GET /models."),
    requests: int = typer.Option(200, min=1, max=100_000, help="How many requests in all."),
    concurrency: int = typer.Option(16, min=1, max=1024, help="How many in flight at once."),
    max_tokens: int = typer.Option(32, min=1, help="max_tokens of each request."),
    api_key: Optional[str] = typer.Option(None, envvar="SMELT_API_KEY", help="Bearer key, if the server wants one."),
    deadline: float = typer.Option(600.0, help="Give up after this many seconds in all."),
) -> None:
    """Bounded load test of a running smelt service: status codes, p50/p95 latency, aggregate tokens/s."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = model or httpx.get(url.rstrip("/") + "/models", headers=headers, trust_env=False).json()["data"][0]["id"]
    prompts = [f"Extract name, city, item, qty and day as JSON.\n{name} from {city} ordered {n} cups on Monday."
               for name, city, n in (("Bob", "Oslo", 3), ("Ana", "Lima", 2), ("Kai", "Rome", 7), ("Mia", "Kyiv", 1))]
    stats = asyncio.run(run_load(url, model, prompts, requests, concurrency, max_tokens, api_key, deadline))
    console.print(f"{stats['requests']} requests at concurrency {concurrency} in {stats['seconds']:.1f} s: status {stats['status']}; "
                  f"p50 {stats['p50_s']:.3f} s, p95 {stats['p95_s']:.3f} s; {stats['completion_tokens']} tokens, "
                  f"{stats['tokens_per_s']:.0f} tokens/s aggregate")
    for err in stats["errors"]:
        console.print(f"[red]  {err}[/]", markup=True, highlight=False)
    if any(code >= 500 or code == 0 for code in stats["status"]):
        raise typer.Exit(1)
