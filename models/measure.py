"""Speed and memory measurements shared by evaluation and the bench: memory bandwidth of this machine,
weight bytes a decode step reads, peak memory while a candidate runs, and aggregate throughput under
concurrent requests (through the engine the service uses)."""
from __future__ import annotations

import statistics
import threading
import time
from functools import lru_cache
from pathlib import Path

import psutil
import torch

from models.candidate import Candidate
from models.decoding import Generation, SamplingParams
from models.engine import Engine


@lru_cache(maxsize=None)
def memory_bandwidth(device_type: str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s this device reads from a large tensor (a sum over it), best of `repeats`.

    A decode step reads every weight once and writes next to nothing, so read bandwidth is its
    roofline: weight bytes x tokens/s divided by this is the share a candidate reaches. (A copy,
    read + write, under-states it: writing a line costs reading it first; here a copy moved
    46 GB/s while compiled fp32 decoding of a 409 MB model read 50 GB/s.)"""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device_type)
    best = float("inf")
    for _ in range(repeats):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        src.sum()
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best


def weight_bytes(model_dir: Path) -> int:
    """Bytes of weights a decode step reads: the model's weight files on disk."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin"))


class PeakMemory:
    """Peak memory a block adds: sampled process RSS on the CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device, every_s: float = 0.005):
        self.device, self.every_s = device, every_s
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.high = self.start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
        return self

    def sample(self) -> None:
        while not self.stop.wait(self.every_s):
            self.high = max(self.high, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.high = max(self.high, self.proc.memory_info().rss)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.cuda_start
        else:
            self.peak_bytes = self.high - self.start


def concurrent_throughput(engine: Engine, prompt_texts: list[str], max_new_tokens: int, streams: int = 8) -> dict:
    """Aggregate new tokens/s when `streams` requests arrive together, served by the service's own
    engine (continuous batching of every request, speculative while the batch is small)."""
    texts = [prompt_texts[i % len(prompt_texts)] for i in range(streams)]
    for rnd in ("warm-up", "timed"):  # the first round pays one-off costs (a compiled candidate compiles its batch shapes)
        t0 = time.perf_counter()
        gens = engine_outputs(engine, texts, [SamplingParams(max_new_tokens)] * len(texts))
        seconds = time.perf_counter() - t0
    return {"concurrent_streams": streams, "concurrent_tokens_per_s": sum(g.new_tokens for g in gens) / seconds}


def engine_outputs(engine: Engine, prompt_texts: list[str], params: list[SamplingParams]) -> list[Generation]:
    """Every prompt through the engine at once (it runs as many as it has rows, queues the rest)."""
    jobs = [engine.submit(t, p) for t, p in zip(prompt_texts, params)]
    return [j.future.result(timeout=600) for j in jobs]


def interleaved_speeds(candidates: list[Candidate], contexts: list, passes: int) -> list[dict]:
    """Batch-1 tokens/s of every candidate on the same prompts, timed in `passes` rounds.

    Each round times every candidate once, in an order rotated by one per round, so a slow stretch
    of a noisy machine (another process, frequency changes) is shared out instead of landing on
    whichever candidate ran then. Returns, per candidate, the median over rounds, the spread
    (max - min) / median, and the rounds themselves.
    """
    rounds: list[list[float]] = [[] for _ in candidates]
    n = len(candidates)
    for p in range(passes):
        for i in [(p + k) % n for k in range(n)]:
            t0 = time.perf_counter()
            tokens = sum(candidates[i].generate(c).new_tokens for c in contexts)
            rounds[i].append(tokens / (time.perf_counter() - t0))
    out = []
    for r in rounds:
        mid = statistics.median(r)
        out.append({"tokens_per_s": mid, "tokens_per_s_spread": (max(r) - min(r)) / mid if mid else None,
                    "tokens_per_s_passes": [round(x, 2) for x in r]})
    return out
