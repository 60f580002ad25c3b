"""smelt's own greedy decode loop over a static KV cache, so each decode step can be compiled.

The design is gpt-fast's `generate.py`: a fixed-size cache written in place at the slots each
forward is given (models/kvcache.py), one forward per step whose shapes never change (so
`torch.compile` traces it once), and speculative decoding in the same loop. A `Runner` is that
cache plus its step function, for one prompt or a left-padded batch alike. transformers' `generate` grows its cache in Python every step, and its
assisted generation works neither with the static cache nor at batch > 1 (shared FACTS.md),
which is why this loop exists.

Every function here is lossless under greedy decoding: it returns the tokens
`model.generate(do_sample=False)` returns, EOS included, up to `max_new_tokens`.
"""
from __future__ import annotations

import atexit
import functools
import gc
import time
from typing import Callable

import torch

from models.decoding import Generation, SamplingParams, cut, encode, finish
from models.kvcache import SlotCache


SMALL_M = 8  # rows up to which a CPU matmul becomes inductor's own loop (decode steps, verify, batches <= 8)


def small_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None, max_rows: int = SMALL_M):
    """a [m, k] @ b [k, n] for a few rows on the CPU, as a multiply and a sum over k.

    A decode step's linear layers are matrix-vector products. Left as `aten.mm`, each is one call
    into MKL (~7 us apiece on the tiny model, most of the step); as a reduction, inductor writes the
    loop itself, vectorized and fused with its neighbours (RMSNorm, the residual add, SiLU). Measured
    on the tiny model: a decode step 322 -> 208 us. `b` is a linear layer's weight transposed, so the
    sum over k reads each weight row contiguously. Other shapes, devices and integer matmuls (the
    int8 kernels) keep their usual lowering.
    """
    if (a.device.type != "cpu" or out_dtype is not None or not a.is_floating_point() or a.dtype != b.dtype
            or a.shape[0] > max_rows):
        return NotImplemented
    return (a.unsqueeze(2) * b.unsqueeze(0)).sum(dim=1)  # [m, k, 1] * [1, k, n] -> [m, n]


def inductor_small_matmul(gm, example_inputs, max_rows: int = SMALL_M):
    """torch.compile backend: inductor with `small_matmul` in its decomposition table, and its C++
    wrapper unless the graph calls smelt's own ops (`calls_smelt_ops`).

    AOTAutograd's on-disk cache keys a graph before decompositions and does not see a custom table,
    so it is off for these graphs (it could hand back a graph compiled without `small_matmul`);
    inductor's own FX graph cache, keyed on the decomposed graph, still makes a restart warm faster.
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: functools.partial(small_matmul, max_rows=max_rows)}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table, config_patches={"cpp_wrapper": not calls_smelt_ops(gm)})


def calls_smelt_ops(gm) -> bool:
    """The graph calls smelt's own C++ ops (models/int8_cpu.py). The C++ wrapper reaches those through
    a generic proxy that cost ~30 us a call (a 12M-parameter decode step: 2.2 ms with it, 1.07 ms
    with inductor's Python wrapper), so such graphs keep the Python wrapper."""
    return any(str(getattr(n, "target", "")).startswith("smelt.") for n in gm.graph.nodes)


def compile_step(fn, max_rows: int = SMALL_M):
    """`fn` under torch.compile for fixed shapes: inductor with small matmuls as its own loops
    (`small_matmul`) and a C++ wrapper around the kernels.

    On a small model a decode step is dominated by per-call overhead, not arithmetic: the C++
    wrapper calls the kernels without a Python frame each. Every runner compiles the same method
    code, and dynamo keeps a few entries per code object (8 by default) before it silently falls
    back to eager, so the limit is raised for processes that hold several models (the benchmark).
    """
    raise_recompile_limit()
    backend = inductor_small_matmul if max_rows == SMALL_M else functools.partial(inductor_small_matmul, max_rows=max_rows)
    return torch.compile(fn, dynamic=False, backend=backend)


def raise_recompile_limit() -> None:
    """Let dynamo keep 64 compiled entries per step function (one per model, batch and slot bucket).
    Call it on the thread that compiles too: dynamo's config is per thread (an engine thread that
    compiled 9 batch shapes hit the default limit of 8 and fell back to eager)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


class GuardSkipper:
    """Runs compiled steps; once a shape has compiled, skips re-checking dynamo's guards on every call.

    The guards (every parameter and cache tensor of the model) cost more than the step itself
    on a small model. The arguments of a warm shape differ only in tensor values, which the
    guards do not look at, so checking only the guards that tell compiled entries apart is safe.
    """

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.warm: set[tuple] = set()
        self.guarded: set[tuple] = set()  # warm shapes whose entry the reduced guard set failed to pick

    def __call__(self, fn, *args):
        key = (fn, *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        if not self.compiled or key not in self.warm or key in self.guarded:
            self.warm.add(key)
            return fn(*args)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return fn(*args)
        except RuntimeError as err:
            if "skip_guard_eval_unsafe" not in str(err):
                raise
            # Several runners compiled this same step code (evaluation keeps a run's candidates loaded
            # together, and engines come and go); when the reduced guard set cannot pick this runner's
            # entry, dynamo refuses before running anything: from now on check every guard for it.
            self.guarded.add(key)
            return fn(*args)


class Runner:
    """A model, the static KV cache it owns (`SlotCache`: `batch` rows of `max_len` slots), and its step.

    Rows are prompts left-padded to one width, so every row writes the same cache slot at each
    step and a step's shapes never change: [batch, n] ids, one [batch, max_len] padding mask
    (none at batch 1, where nothing is padded). A row's positions count from its own first token.
    Prefill runs eagerly (prompt lengths vary and would recompile); decode ([batch, 1]), verify
    ([1, k + 1]) and propose steps run through `torch.compile` when asked. Steps return the greedy
    token after each input position, so the argmax is inside the compiled graph too.
    """

    def __init__(self, model, max_len: int, batch: int = 1, compile: bool = False):
        self.model, self.max_len, self.batch, self.compiled = model, max_len, batch, compile
        self.cache = SlotCache(model.config, max_len)
        self.pad = torch.zeros(batch, dtype=torch.long, device=self.device)  # [batch]: each row's left padding
        self.mask = torch.ones(batch, max_len, dtype=torch.long, device=self.device) if batch > 1 else None
        self._step = compile_step(self.next_tokens) if compile else self.next_tokens
        self._propose = compile_step(self.propose_tokens) if compile else self.propose_tokens
        self.calls = GuardSkipper(compile)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """ids [batch, n] written at cache slots start.. (start: a 0-d tensor, so its value never
        recompiles); logits [batch, n, vocab]."""
        slots = torch.arange(ids.shape[1], device=ids.device) + start  # [n]
        positions = (slots - self.pad[:, None]).clamp(min=0)  # [batch, n]; padding sits at 0, masked
        return self.model(input_ids=ids, position_ids=positions, attention_mask=self.mask,
                          past_key_values=self.cache.at(slots), use_cache=True).logits

    def next_tokens(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """ids [batch, n] at slots start..; the greedy token after each position [batch, n]."""
        return self.forward(ids, start).argmax(-1)

    def propose_tokens(self, last: torch.Tensor, start: torch.Tensor, k: int) -> torch.Tensor:
        """k greedy tokens after `last` [batch, 1] (written at `start`), one step each, in one graph; [batch, k]."""
        guesses = []
        for i in range(k):
            last = self.next_tokens(last, start + i)  # [batch, 1]
            guesses.append(last)
        return torch.cat(guesses, dim=1)

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Clear the cache and run up to `batch` prompts, left-padded to the longest; the greedy token
        after each row [batch]. Rows past the prompts repeat the first (their tokens are dropped)."""
        if not 0 < len(prompts) <= self.batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
        if not all(prompts):
            raise ValueError("the prompt has no tokens")
        rows = prompts + [prompts[0]] * (self.batch - len(prompts))
        width = max(map(len, rows))
        ids = torch.zeros(self.batch, width, dtype=torch.long, device=self.device)  # [batch, width]
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, device=self.device)
        self.pad.copy_(torch.tensor([width - len(r) for r in rows], device=self.device))
        if self.mask is not None:
            self.mask.copy_(torch.arange(self.max_len, device=self.device)[None] >= self.pad[:, None])
        self.cache.reset()
        return self.forward(ids, torch.tensor(0, device=self.device))[:, -1].argmax(-1)

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ids [batch, n] at slots start.. (a fixed-shape step); the greedy token after each [batch, n]."""
        return self.calls(self._step, ids, torch.tensor(start, device=self.device))

    def propose(self, last: torch.Tensor, start: int, k: int) -> torch.Tensor:
        """The k greedy guesses after `last` [batch, 1] at slot `start`, in one step [batch, k]."""
        return self.calls(self._propose, last, torch.tensor(start, device=self.device), k)


def check_room(runner: Runner, prompt_len: int, max_new_tokens: int, lookahead: int = 0) -> None:
    need = prompt_len + max_new_tokens + lookahead
    if need > runner.max_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + lookahead ({lookahead}) "
                         f"needs {need} cache positions; the static cache has {runner.max_len}")


@torch.inference_mode()
def greedy_decode(runner: Runner, prompt_ids: list[int], max_new_tokens: int, eos: int | None,
                  on_token: Callable[[int], None] | None = None) -> Generation:
    """One target forward per new token, each a compiled [1, 1] step. `on_token` sees each new token
    as it is decided (for streaming)."""
    check_room(runner, len(prompt_ids), max_new_tokens)
    t0 = time.perf_counter()
    nxt = runner.prefill([prompt_ids])[:, None]  # [1, 1]
    first = time.perf_counter() - t0
    out = [int(nxt)]
    emit(on_token, out)
    pos = len(prompt_ids)  # the slot of out[-1], not yet in the cache
    while len(out) < max_new_tokens and out[-1] != eos:
        nxt = runner.run(nxt, pos)
        out.append(int(nxt))
        emit(on_token, out[-1:])
        pos += 1
    return Generation(cut(out, max_new_tokens, eos), time.perf_counter() - t0, first, prompt_tokens=len(prompt_ids))


def emit(on_token: Callable[[int], None] | None, tokens: list[int]) -> None:
    if on_token is not None:
        for t in tokens:
            on_token(t)


@torch.inference_mode()
def speculative_decode(target: Runner, draft: Runner, prompt_ids: list[int], max_new_tokens: int,
                       eos: int | None, k: int, on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy speculative decoding: the draft proposes `k` tokens one by one, the target checks them
    all in one [1, k + 1] forward and keeps the longest prefix equal to its own greedy choices, plus
    its own next token. Output = the target's greedy output, whatever the draft proposes.

    Both caches stay consistent without copying: each forward writes at the slots it is given, so
    slots past the accepted prefix hold stale keys that attention never reads (it reads slots at or
    before the query's), and the next round starts writing at the first rejected slot.
    """
    check_room(target, len(prompt_ids), max_new_tokens, k + 1)
    check_room(draft, len(prompt_ids), max_new_tokens, k + 1)
    t0 = time.perf_counter()
    out = [int(target.prefill([prompt_ids])[0])]
    first = time.perf_counter() - t0
    emit(on_token, out)
    draft.prefill([prompt_ids])
    pos, proposed, accepted = len(prompt_ids), 0, 0  # pos: slot of out[-1], in neither cache yet
    while len(out) < max_new_tokens and out[-1] != eos:
        last = torch.tensor([out[-1:]], device=target.device)  # [1, 1]
        proposal = draft.propose(last, pos, k)  # [1, k]: the draft wrote out[-1], g1..g(k-1) at pos..pos+k-1
        choices = target.run(torch.cat([last, proposal], dim=1), pos)[0].tolist()  # [k + 1]: target's token after each
        guesses = proposal[0].tolist()
        n = 0
        while n < k and guesses[n] == choices[n]:
            n += 1
        if n == k:  # all kept: the draft never wrote its last guess into its cache
            draft.run(proposal[0, -1:].view(1, 1), pos + k)  # a [1, 1] view with the strides its step compiled for
        new = cut(guesses[:n] + [choices[n]], max_new_tokens - len(out), eos)
        out += new
        emit(on_token, new)
        pos += n + 1
        proposed, accepted = proposed + k, accepted + n
        if eos in new:
            break
    return Generation(cut(out, max_new_tokens, eos), time.perf_counter() - t0, first, prompt_tokens=len(prompt_ids),
                      proposed=proposed, accepted=accepted)


def settle_garbage_collector() -> None:
    """Collect once, then exempt every object alive now (models, compiled graphs) from later collections.

    A process that has compiled holds so many long-lived Python objects (dynamo/inductor state,
    the models' modules) that a full collection walking them took 0.75-1.35 s: it landed inside one
    request in ~20 (the pipeline's evaluation timed it as a 1.2 s request; gone with gc disabled).
    Frozen objects are never walked again; anything that dies later is collected as usual.
    """
    gc.collect()
    gc.freeze()
    unfreeze_at_exit()


@functools.cache
def unfreeze_at_exit() -> None:
    """Once per process: let shutdown free frozen objects (else triton's bindings report them as leaked)."""
    atexit.register(gc.unfreeze)


class CompiledDecoder:
    """smelt's compiled static-cache loop as a `Decoder` (models/decoding.py): greedy requests without
    stop strings (it has no sampler and no stop check), speculative with a draft; one request at a time
    (concurrent requests are the continuous batch's, models/batching.py).

    Runners for the target (and its draft) are built on first use per cache size (prompt + new
    tokens, rounded up to `bucket` slots). Each
    runner compiles its few shapes as it is built, so a request never waits on a compile halfway
    through its tokens."""

    def __init__(self, model, tokenizer, draft=None, num_draft_tokens: int = 4, bucket: int = 256):
        self.model, self.tokenizer, self.draft, self.k, self.bucket = model, tokenizer, draft, num_draft_tokens, bucket
        self.runners: dict[tuple[str, int, int], Runner] = {}

    def runner(self, role: str, batch: int, need: int) -> Runner:
        """role 'target' or 'draft'; batch 1 for speculative decoding."""
        key = (role, batch, -(-need // self.bucket) * self.bucket)
        if key not in self.runners:
            self.runners[key] = self.build(*key)
            settle_garbage_collector()
        return self.runners[key]

    @torch.inference_mode()
    def build(self, role: str, batch: int, length: int) -> Runner:
        """A runner with its steps compiled: decode [batch, 1], and at batch 1 with a draft the target's
        verify [1, k + 1] or the draft's k proposals."""
        runner = Runner(self.model if role == "target" else self.draft, length, batch, compile=True)
        nxt = runner.prefill([[0]])[:, None]  # [batch, 1]
        runner.run(nxt, 1)
        if self.draft is not None and batch == 1 and role == "target":
            runner.run(torch.zeros(1, self.k + 1, dtype=torch.long, device=runner.device), 1)
        if role == "draft":
            runner.propose(nxt, 1, self.k)
        return runner

    def decode(self, prompt_ids: list[int], max_new_tokens: int, eos: int | None,
               on_token: Callable[[int], None] | None = None) -> Generation:
        """Greedy (speculative with a draft) decoding of one prompt.

        Call from one thread: graphs compiled in the main thread and run from another decoded at
        0.4x here (the server warms up on its engine thread for that reason)."""
        need = len(prompt_ids) + max_new_tokens + self.k + 1
        target = self.runner("target", 1, need)
        if self.draft is None:
            return greedy_decode(target, prompt_ids, max_new_tokens, eos, on_token)
        return speculative_decode(target, self.runner("draft", 1, need), prompt_ids, max_new_tokens, eos, self.k, on_token)

    def accepts(self, params: SamplingParams) -> bool:
        return params.temperature <= 0 and not params.stop

    def complete(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        ids = encode(self.tokenizer, prompt_text)
        on_token = None
        if streamer is not None:  # the transformers streamer protocol: the prompt first, then each new token
            streamer.put(torch.tensor([ids]))
            on_token = lambda t: streamer.put(torch.tensor([t]))  # noqa: E731
        out = self.decode(ids, params.max_new_tokens, self.tokenizer.eos_token_id, on_token)
        if streamer is not None:
            streamer.end()
        return finish(self.tokenizer, out, params)
