"""The generation engine behind the API: one worker thread owns the model; requests queue for it.

- A bounded queue: past `max_batch_size + max_queue` outstanding requests, `submit` raises `Busy`
  (the API answers 429 with Retry-After) instead of letting work pile up without limit.
- Batching where the decoding strategy allows: greedy requests to a plain-strategy candidate that
  arrive together are decoded in one left-padded batch; everything else (sampling, speculative
  decoding, streaming) runs one request at a time, exactly as it was evaluated.
- One thread owns the model, so per-request seeds are reproducible and nothing races on it.
"""
from __future__ import annotations

import copy
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from transformers import TextIteratorStreamer

from pydantic import Field

from models.candidate import Candidate
from models.config import StrictModel
from models.decoding import Generation, SamplingParams, draft_acceptance, encode

ACCEPTANCE_EVERY = 8


class EngineConfig(StrictModel):
    """The scheduler's limits. serving's ServeConfig extends it and reads them from SMELT_* variables;
    evaluation and the bench build one directly."""

    max_batch_size: int = Field(8, ge=1, description="SMELT_MAX_BATCH_SIZE: greedy plain-strategy requests decoded together.")
    batch_wait_ms: float = Field(5.0, ge=0, description="SMELT_BATCH_WAIT_MS: how long the first request waits for company.")
    max_queue: int = Field(64, ge=0, description="SMELT_MAX_QUEUE: requests waiting beyond those running; more get 429.")
    retry_after_s: int = Field(1, ge=1, description="SMELT_RETRY_AFTER_S: the Retry-After a refused request is given.")


class Busy(RuntimeError):
    """Too many requests are outstanding; try again after `retry_after` seconds."""

    def __init__(self, outstanding: int, retry_after: int):
        super().__init__(f"server busy: {outstanding} requests outstanding; retry after {retry_after} s")
        self.retry_after = retry_after


class TokenStream(TextIteratorStreamer):
    """Text chunks as tokens are accepted, plus when the first one arrived (time to first token)."""

    def __init__(self, tokenizer, timeout: float = 300.0):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
        self.t0 = time.perf_counter()
        self.first: float | None = None

    def put(self, value) -> None:
        if not self.next_tokens_are_prompt and self.first is None:
            self.first = time.perf_counter() - self.t0
        super().put(value)


@dataclass
class Job:
    prompt_text: str
    params: SamplingParams
    stream: TokenStream | None = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, candidate: Candidate, cfg: EngineConfig, metrics=None):
        self.candidate, self.cfg, self.metrics = candidate, cfg, metrics
        self.jobs: deque[Job] = deque()
        self.wake = threading.Condition()
        self.outstanding = 0
        self.greedy_draft_requests = 0
        self.closed = False
        # Request threads count tokens on a copy: a fast tokenizer's padding setting is state on the shared
        # Rust object, so an unpadded call from another thread can switch padding off between the engine
        # thread's `enable_padding` and its batch encode (seen: HTTP 500s "Unable to create tensor" under
        # load when a batch held prompts of different lengths).
        self.counting_tokenizer = copy.deepcopy(candidate.tokenizer)
        self.counting_lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, name="smelt-engine", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Finish the jobs already queued, then stop the worker thread (and let go of the model)."""
        with self.wake:
            self.closed = True
            self.wake.notify_all()
        self.thread.join()

    def prompt_tokens(self, prompt_text: str) -> int:
        """Tokens of a rendered prompt, counted from any thread but the engine's."""
        with self.counting_lock:
            return len(self.counting_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    def submit(self, prompt_text: str, params: SamplingParams, stream: bool = False) -> Job:
        """Queue one request; raises Busy when the queue is full."""
        job = Job(prompt_text, params, TokenStream(self.candidate.tokenizer) if stream else None)
        with self.wake:
            if self.closed:
                raise RuntimeError("the engine is closed")
            if self.outstanding >= self.cfg.max_batch_size + self.cfg.max_queue:
                raise Busy(self.outstanding, self.cfg.retry_after_s)
            self.outstanding += 1
            self.jobs.append(job)
            self.wake.notify()
        return job

    def serve_forever(self) -> None:
        while True:
            batch = self.next_batch()
            if not batch:  # closed and drained
                return
            try:
                self.run(batch)
            finally:
                with self.wake:
                    self.outstanding -= len(batch)

    def next_batch(self) -> list[Job]:
        """The oldest job, plus (after a short wait) queued jobs that can share its batch."""
        with self.wake:
            while not self.jobs and not self.closed:
                self.wake.wait()
            if not self.jobs:
                return []
            first = self.jobs.popleft()
            if not self.can_batch(first):
                return [first]
            self.wake.wait_for(lambda: len(self.jobs) >= self.cfg.max_batch_size - 1, timeout=self.cfg.batch_wait_ms / 1000)
            batch = [first]
            for job in list(self.jobs):
                if len(batch) < self.cfg.max_batch_size and self.can_batch(job):
                    self.jobs.remove(job)
                    batch.append(job)
            return batch

    def can_batch(self, job: Job) -> bool:
        return job.stream is None and self.cfg.max_batch_size > 1 and self.candidate.batchable([job.params])

    def run(self, batch: list[Job]) -> None:
        try:
            if len(batch) == 1:
                gens = [self.candidate.complete(batch[0].prompt_text, batch[0].params, streamer=batch[0].stream)]
            else:
                gens = self.candidate.complete_batch([j.prompt_text for j in batch], [j.params for j in batch])
        except Exception as err:  # the request fails, the engine keeps serving
            for job in batch:
                if job.stream is not None:
                    job.stream.end()
                job.future.set_exception(err)
            return
        for job, gen in zip(batch, gens):  # a streamed request's time to first token came from its TokenStream
            self.observe(job, gen, len(batch))
            job.future.set_result(gen)

    def observe(self, job: Job, gen: Generation, batch_size: int) -> None:
        if self.metrics is not None:
            self.metrics.observe(gen, time.perf_counter() - job.queued_at, batch_size, self.sampled_acceptance(job, gen))

    def sampled_acceptance(self, job: Job, gen: Generation) -> float | None:
        """Draft acceptance of a greedy request, measured for every ACCEPTANCE_EVERY-th one (the first
        included): it costs a draft forward over the whole sequence, on the engine thread."""
        if self.candidate.draft is None or job.params.temperature > 0 or not gen.token_ids:
            return None
        self.greedy_draft_requests += 1
        if self.greedy_draft_requests % ACCEPTANCE_EVERY != 1:
            return None
        prompt_ids = encode(self.candidate.tokenizer, job.prompt_text)
        return draft_acceptance(self.candidate.draft, [prompt_ids], [gen.token_ids])
