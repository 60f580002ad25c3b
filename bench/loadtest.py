"""`smelt loadtest`: a bounded load test of a running service's OpenAI API (count and time both capped).

Sends `requests` chat completions with at most `concurrency` in flight (each client sends its next
request when its last one ended), then reports status codes, p50/p95 latency, aggregate tokens/s
and, for streamed requests (`--stream`), time to first token and the gap between chunks. Clients
can start spread over `--ramp-up` seconds, as load generators do, instead of all in the first
millisecond. `--drop N` first opens N streams and leaves each after its first chunk, then times
one request: on a server that cancels dropped streams it is as fast as on an idle one.
Loopback by default; it never retries, so the numbers are what clients saw.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import httpx
import typer
from rich.console import Console

console = Console(width=160)


Result = tuple[int, float, int, str, float | None, list[float]]  # status, seconds, tokens, error, ttft, gaps


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> Result:
    """(status, seconds, completion tokens, what went wrong: "" on 200, time to first token, gaps between chunks)."""
    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            return await one_stream(client, url, body, headers, t0)
        r = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as err:
        # status 0: no answer (timeout, connection refused)
        return 0, time.perf_counter() - t0, 0, f"{type(err).__name__}: {err}", None, []
    if r.status_code != 200:
        return r.status_code, time.perf_counter() - t0, 0, f"{r.status_code} {r.headers.get('server', '')}: {r.text[:300]}", None, []
    return 200, time.perf_counter() - t0, r.json().get("usage", {}).get("completion_tokens", 0), "", None, []


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict, t0: float, drop: bool = False) -> Result:
    """A streamed request read chunk by chunk: the first content chunk is the time to first token;
    with `drop`, the client leaves right after it."""
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            return r.status_code, time.perf_counter() - t0, 0, f"{r.status_code}: {text[:300]}", None, []
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices", [])):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
                if drop:
                    return 200, now - t0, 0, "", first, []
            else:
                gaps.append(now - last)
            last = now
    return 200, time.perf_counter() - t0, tokens, "", first, gaps


async def run_load(base_url: str, model: str, prompts: list[str], requests: int, concurrency: int, max_tokens: int,
                   api_key: str | None = None, deadline_s: float = 300.0, stream: bool = False, ramp_up_s: float = 0.0) -> dict:
    """Fire `requests` chat completions, `concurrency` at a time, all within `deadline_s`; the first
    `concurrency` start spread evenly over `ramp_up_s`."""
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"

    async def bounded(i: int, client: httpx.AsyncClient):
        if i < concurrency and ramp_up_s:
            await asyncio.sleep(ramp_up_s * i / concurrency)
        async with gate:
            return await one_request(client, url, request_body(model, prompts[i % len(prompts)], max_tokens, stream), headers)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=deadline_s, trust_env=False, limits=limits) as client:
        results = await asyncio.wait_for(asyncio.gather(*(bounded(i, client) for i in range(requests))), deadline_s)
    return summarise(results, time.perf_counter() - t0, concurrency)


def request_body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def after_dropped_streams(base_url: str, model: str, prompt: str, drop: int, max_tokens: int,
                                api_key: str | None = None) -> dict:
    """Seconds of one request on the idle server, then right after `drop` streams left at their first chunk."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        idle = [(await one_request(client, url, request_body(model, prompt, max_tokens, False), headers))[1] for _ in range(3)]
        long = request_body(model, prompt, max_tokens * 8, True)  # would keep their rows busy for 8 requests' time
        await asyncio.gather(*(one_stream(client, url, long, headers, time.perf_counter(), drop=True) for _ in range(drop)))
        after = [(await one_request(client, url, request_body(model, prompt, max_tokens, False), headers))[1] for _ in range(3)]
    return {"idle_s": statistics.median(idle), "after_drop_s": statistics.median(after), "dropped": drop}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values) or [0.0]
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(results: list[Result], seconds: float, concurrency: int) -> dict:
    latencies = [r[1] for r in results if r[0] == 200]
    ttfts = [r[4] for r in results if r[0] == 200 and r[4] is not None]
    gaps = [g for r in results for g in r[5]]
    tokens = sum(r[2] for r in results)
    errors = list(dict.fromkeys(r[3] for r in results if r[3]))[:5]  # distinct, in order seen
    out = {"requests": len(results), "concurrency": concurrency, "status": dict(Counter(r[0] for r in results)),
           "errors": errors, "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
           "completion_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}
    if ttfts:
        out.update(ttft_p50_s=percentile(ttfts, 0.5), ttft_p95_s=percentile(ttfts, 0.95),
                   chunk_gap_p50_s=percentile(gaps, 0.5), chunk_gap_p95_s=percentile(gaps, 0.95))
    return out


def loadtest(
    url: str = typer.Option("http://127.0.0.1:3000/v1", help="Base URL of the OpenAI-compatible API."),
    model: Optional[str] = typer.Option(None, help="Model id to send; default the first of GET /models."),
    requests: int = typer.Option(200, min=1, max=100_000, help="How many requests in all."),
    concurrency: int = typer.Option(16, min=1, max=1024, help="How many in flight at once (clients)."),
    max_tokens: int = typer.Option(32, min=1, help="max_tokens of each request."),
    stream: bool = typer.Option(False, "--stream", help="Stream each answer; reports time to first token and chunk gaps."),
    ramp_up: float = typer.Option(0.0, min=0, help="Seconds over which the clients start (0: all at once)."),
    drop: int = typer.Option(0, min=0, max=1024, help="Instead of the load: leave N streams after their first chunk, "
                                                      "then time one request against the idle server's time."),
    api_key: Optional[str] = typer.Option(None, envvar="SMELT_API_KEY", help="Bearer key, if the server wants one."),
    deadline: float = typer.Option(600.0, help="Give up after this many seconds in all."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
) -> None:
    """Bounded load test of a running smelt service: status codes, p50/p95 latency, aggregate tokens/s,
    and with --stream the time to first token. Only ever sends `requests` requests, within `deadline` seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = model or httpx.get(url.rstrip("/") + "/models", headers=headers, trust_env=False).json()["data"][0]["id"]
    prompts = [f"Extract name, city, item, qty and day as JSON.\n{name} from {city} ordered {n} cups on Monday."
               for name, city, n in (("Bob", "Oslo", 3), ("Ana", "Lima", 2), ("Kai", "Rome", 7), ("Mia", "Kyiv", 1))]
    if drop:
        stats = asyncio.run(after_dropped_streams(url, model, prompts[0], drop, max_tokens, api_key))
        console.print(f"one request: {stats['idle_s']:.3f} s idle, {stats['after_drop_s']:.3f} s right after {drop} streams "
                      f"were dropped at their first chunk ({stats['after_drop_s'] / stats['idle_s']:.2f}x)")
        return write_json(json_out, stats)
    stats = asyncio.run(run_load(url, model, prompts, requests, concurrency, max_tokens, api_key, deadline, stream, ramp_up))
    console.print(f"{stats['requests']} requests at concurrency {concurrency} in {stats['seconds']:.1f} s: status {stats['status']}; "
                  f"p50 {stats['p50_s']:.3f} s, p95 {stats['p95_s']:.3f} s; {stats['completion_tokens']} tokens, "
                  f"{stats['tokens_per_s']:.0f} tokens/s aggregate")
    if "ttft_p50_s" in stats:
        console.print(f"time to first token p50 {stats['ttft_p50_s']:.3f} s, p95 {stats['ttft_p95_s']:.3f} s; "
                      f"gap between chunks p50 {stats['chunk_gap_p50_s'] * 1000:.1f} ms, p95 {stats['chunk_gap_p95_s'] * 1000:.1f} ms")
    for err in stats["errors"]:
        console.print(f"[red]  {err}[/]", markup=True, highlight=False)
    write_json(json_out, stats)
    if any(code >= 500 or code == 0 for code in stats["status"]):
        raise typer.Exit(1)


def write_json(path: Path | None, stats: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(stats, indent=2))
