"""The generation engine behind the API: one worker thread owns the model and its running batch.

- Continuous batching (models/batching.py): a request joins the running batch at the next step and
  leaves it when it ends; streamed and non-streamed, greedy and sampled, speculative or not, all in
  the same batch, each row exactly as the candidate was evaluated.
- A bounded queue: past `max_batch_size + max_queue` outstanding requests, `submit` raises `Busy`
  (the API answers 429 with Retry-After) instead of letting work pile up without limit.
- Cancellation: `Job.cancel` (a client that went away) frees the request's row before the next step.
- Streaming: text pieces as tokens are accepted, held back where they could be the start of a stop
  string or an unfinished UTF-8 character; delivered to an asyncio queue or a blocking iterator.
- One thread owns the model, so per-request seeds are reproducible and nothing races on it.
"""
from __future__ import annotations

import asyncio
import copy
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from models.batching import Sequence
from models.candidate import Candidate
from models.config import StrictModel
from models.decoding import Generation, SamplingParams, cut_at_stop, encode, finish
from models.structured import Constraint

END = object()  # closes a stream


class EngineConfig(StrictModel):
    """The scheduler's limits. serving's ServeConfig extends it and reads them from SMELT_* variables;
    evaluation and the bench build one directly."""

    max_batch_size: int = Field(16, ge=1, description="SMELT_MAX_BATCH_SIZE: requests decoded together (rows of the KV cache).")
    max_queue: int = Field(64, ge=0, description="SMELT_MAX_QUEUE: requests waiting beyond those running; more get 429.")
    retry_after_s: int = Field(1, ge=1, description="SMELT_RETRY_AFTER_S: the Retry-After a refused request is given.")
    max_seq_len: int = Field(2048, ge=16, description="SMELT_MAX_SEQ_LEN: cache slots per row (prompt + new tokens), "
                                                       "capped at the model's context length.")
    prefill_tokens: int = Field(256, ge=1, description="SMELT_PREFILL_TOKENS: prompt tokens prefilled per step between "
                                                        "decode steps (a long prompt goes in chunks).")
    prefill_dtype: Literal["auto", "model", "bfloat16"] = Field(
        "auto", description="SMELT_PREFILL_DTYPE: the dtype prompts are prefilled in: 'auto' = bfloat16 on a CPU with "
                            "AMX (7x fp32's matmul speed there), else the model's; 'model'; 'bfloat16'. Decode steps "
                            "always run in the model's dtype.")
    warm_rows: int = Field(4, ge=1, description="SMELT_WARM_ROWS: batch sizes up to this are compiled at start; "
                                                "larger ones compile when load first needs them.")


class Busy(RuntimeError):
    """Too many requests are outstanding; try again after `retry_after` seconds."""

    def __init__(self, outstanding: int, retry_after: int):
        super().__init__(f"server busy: {outstanding} requests outstanding; retry after {retry_after} s")
        self.retry_after = retry_after


class TextStream:
    """Text pieces of one request as they are decided, ending with END; iterate it blocking or async."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.items: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def put(self, item) -> None:
        if self.loop is None:
            self.items.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            pass

    def __iter__(self):
        while (item := self.items.get()) is not END:
            yield item

    async def __aiter__(self):
        """Pieces as they come; what piled up while the reader was busy comes as one piece (fewer events)."""
        ended = False
        while not ended:
            item = await self.items.get()
            if item is END:
                return
            while not self.items.empty():
                more = self.items.get_nowait()
                if more is END:
                    ended = True
                    break
                item += more
            yield item


@dataclass
class Job:
    prompt_text: str
    params: SamplingParams
    stream: TextStream | None = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None
    cancelled: bool = False
    first_at: float | None = None
    last_at: float | None = None
    text: str = ""  # decoded so far (streamed requests and stop strings only)
    sent: int = 0  # characters of `text` streamed

    def cancel(self) -> None:
        """The client went away: free the row before the next step (callable from any thread)."""
        self.cancelled = True
        if self.seq is not None:
            self.seq.cancel()


class Engine:
    def __init__(self, candidate: Candidate, cfg: EngineConfig, metrics=None):
        self.candidate, self.cfg, self.metrics = candidate, cfg, metrics
        self.batcher = candidate.batcher(cfg.max_batch_size, min(cfg.max_seq_len, candidate.context_length), cfg.prefill_tokens,
                                         cfg.prefill_dtype)
        self.jobs: deque[Job] = deque()
        self.running: dict[int, Job] = {}  # id(seq) -> job
        self.wake = threading.Condition()
        self.outstanding = 0
        self.closed = False
        # Request threads count tokens on a copy: a fast tokenizer's padding setting is state on the shared
        # Rust object, so an unpadded call from another thread can switch padding off between another
        # thread's `enable_padding` and its batch encode (seen: HTTP 500s "Unable to create tensor").
        self.counting_tokenizer = copy.deepcopy(candidate.tokenizer)
        self.counting_lock = threading.Lock()
        self.warmed = Future()
        self.thread = threading.Thread(target=self.serve_forever, name="smelt-engine", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Finish the jobs already queued, then stop the worker thread (and let go of the model)."""
        with self.wake:
            self.closed = True
            self.wake.notify_all()
        self.thread.join()

    def warm_up(self) -> float:
        """Wait until the engine thread has compiled the batch shapes up to `warm_rows`; seconds it took.
        On the engine's thread: compiled graphs decode at full speed only in the thread that compiled them."""
        return self.warmed.result()

    def prompt_tokens(self, prompt_text: str) -> int:
        """Tokens of a rendered prompt, counted from any thread but the engine's."""
        with self.counting_lock:
            return len(self.counting_tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    def submit(self, prompt_text: str, params: SamplingParams, stream: bool = False) -> Job:
        """Queue one request; raises Busy when the queue is full. A streamed job's pieces go to an
        asyncio queue when submitted from an event loop, else to a blocking one."""
        loop = None
        if stream:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        job = Job(prompt_text, params, TextStream(loop) if stream else None)
        with self.wake:
            if self.closed:
                raise RuntimeError("the engine is closed")
            if self.outstanding >= self.cfg.max_batch_size + self.cfg.max_queue:
                self.count("rejected")
                raise Busy(self.outstanding, self.cfg.retry_after_s)
            self.outstanding += 1
            self.jobs.append(job)
            self.wake.notify()
        return job

    def serve_forever(self) -> None:
        try:
            self.warmed.set_result(self.batcher.warm_up(self.cfg.warm_rows))
        except Exception as err:  # a model that cannot run: every request will say why
            self.warmed.set_exception(err)
        while True:
            with self.wake:
                while not self.jobs and not self.running and not self.closed:
                    self.wake.wait()
                if self.closed and not self.jobs and not self.running:
                    return
                admitted = [self.jobs.popleft() for _ in range(min(len(self.jobs), self.batcher.free_rows()))]
                queued = len(self.jobs)
            for job in admitted:
                self.start(job)
            if not self.running:
                continue
            if self.metrics is not None:
                self.metrics.observe_step(len(self.running), queued)
            try:
                ended = self.batcher.step()
            except Exception as err:  # the running requests fail, the engine keeps serving
                ended = self.batcher.abort()
                for seq in ended:
                    self.fail(self.running.pop(id(seq)), err)
                continue
            for seq in ended:
                self.finish(self.running.pop(id(seq)))

    def start(self, job: Job) -> None:
        """Give a queued job a row (a cancelled one is dropped, a bad one fails alone)."""
        if job.cancelled:
            self.count("cancelled")
            return self.done(job, lambda: job.future.cancel())
        try:
            job.seq = Sequence(encode(self.candidate.tokenizer, job.prompt_text), job.params, lambda new: self.emit(job, new))
            if job.params.grammar is not None:
                job.seq.constraint = Constraint(job.params.grammar, self.candidate.tokenizer)
            self.batcher.admit(job.seq)
        except Exception as err:
            return self.fail(job, err)
        if job.cancelled:  # cancelled between the check and the Sequence: the flag was set on no seq
            job.seq.cancel()
        self.running[id(job.seq)] = job

    def emit(self, job: Job, new: list[int]) -> bool:
        """A round's new tokens of one job: timings, streamed text. True ends the job (a stop string)."""
        now = time.perf_counter()
        if job.first_at is None:
            job.first_at = now
            if self.metrics is not None:
                self.metrics.observe_first_token(now - job.queued_at)
        elif self.metrics is not None and new:
            self.metrics.observe_inter_token((now - job.last_at) / len(new), len(new))
        job.last_at = now
        if job.stream is None and not job.params.stop:
            return False
        job.text = self.candidate.tokenizer.decode(job.seq.out, skip_special_tokens=True).lstrip()
        safe, stopped = cut_at_stop(job.text, job.params.stop)
        if job.stream is not None:
            hold = 0 if stopped else max((len(s) - 1 for s in job.params.stop), default=0)
            upto = len(safe) - hold
            if safe.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for its next bytes
                upto = min(upto, len(safe) - 1)
            if upto > job.sent:
                job.stream.put(safe[job.sent:upto])
                job.sent = upto
        return stopped

    def finish(self, job: Job) -> None:
        seq = job.seq
        if seq.finish_reason == "cancelled":
            self.count("cancelled")
        gen = Generation(seq.out, time.perf_counter() - job.queued_at,
                         None if job.first_at is None else job.first_at - job.queued_at, prompt_tokens=len(seq.prompt),
                         proposed=seq.proposed, accepted=seq.accepted)
        gen = finish(self.candidate.tokenizer, gen, job.params)
        if job.stream is not None and len(gen.text) > job.sent:  # what was held back for a stop string
            job.stream.put(gen.text[job.sent:])
        if self.metrics is not None:
            self.metrics.observe(gen, gen.seconds, gen.acceptance)
        self.done(job, lambda: job.future.set_result(gen))

    def fail(self, job: Job, err: Exception) -> None:
        self.done(job, lambda: job.future.set_exception(err))

    def done(self, job: Job, settle) -> None:
        if job.stream is not None:
            job.stream.put(END)
        settle()
        with self.wake:
            self.outstanding -= 1

    def count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.count_event(event)
