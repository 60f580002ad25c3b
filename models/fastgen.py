"""smelt's own greedy decode loop over a static KV cache, so each decode step can be compiled.

The design is gpt-fast's `generate.py`: a fixed-size cache written in place, one forward per
step whose shapes never change (so `torch.compile` traces it once), and speculative decoding
in the same loop. transformers' `generate` grows its cache in Python every step, and its
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
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StaticCache


@dataclass
class Decoded:
    """New token ids (EOS included when reached) and how the loop got them."""

    token_ids: list[int]
    first_token_s: float
    seconds: float
    proposed: int = 0  # draft tokens proposed (speculative decoding only)
    accepted: int = 0  # of those, how many the target kept

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


SMALL_M = 8  # rows up to which a CPU matmul becomes inductor's own loop (decode steps, verify, batches <= 8)


def small_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None):
    """a [m, k] @ b [k, n] for a few rows on the CPU, as a multiply and a sum over k.

    A decode step's linear layers are matrix-vector products. Left as `aten.mm`, each is one call
    into MKL (~7 us apiece on the tiny model, most of the step); as a reduction, inductor writes the
    loop itself, vectorized and fused with its neighbours (RMSNorm, the residual add, SiLU). Measured
    on the tiny model: a decode step 322 -> 208 us. `b` is a linear layer's weight transposed, so the
    sum over k reads each weight row contiguously. Other shapes, devices and integer matmuls (the
    int8 kernels) keep their usual lowering.
    """
    if (a.device.type != "cpu" or out_dtype is not None or not a.is_floating_point() or a.dtype != b.dtype
            or a.shape[0] > SMALL_M):
        return NotImplemented
    return (a.unsqueeze(2) * b.unsqueeze(0)).sum(dim=1)  # [m, k, 1] * [1, k, n] -> [m, n]


def inductor_small_matmul(gm, example_inputs):
    """torch.compile backend: inductor with `small_matmul` in its decomposition table.

    AOTAutograd's on-disk cache keys a graph before decompositions and does not see a custom table,
    so it is off for these graphs (it could hand back a graph compiled without `small_matmul`);
    inductor's own FX graph cache, keyed on the decomposed graph, still makes a restart warm faster.
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: small_matmul}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table, config_patches={"cpp_wrapper": True})


def compile_step(fn):
    """`fn` under torch.compile for fixed shapes: inductor with small matmuls as its own loops
    (`small_matmul`) and a C++ wrapper around the kernels.

    On a small model a decode step is dominated by per-call overhead, not arithmetic: the C++
    wrapper calls the kernels without a Python frame each. Every runner compiles the same method
    code, and dynamo keeps a few entries per code object (8 by default) before it silently falls
    back to eager, so the limit is raised for processes that hold several models (the benchmark).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, backend=inductor_small_matmul)


class StaticRunner:
    """One model, a batch-1 static KV cache of `max_len` positions, and its forward (compiled or not).

    Prefill runs eagerly (prompt lengths vary and would recompile); decode and verify steps have
    fixed shapes ([1, 1] and [1, k + 1]) and run through `torch.compile` when asked. Steps return
    the greedy token after each input position, so the argmax is inside the compiled graph too.
    """

    def __init__(self, model, max_len: int, compile: bool = False):
        self.model = model
        self.max_len = max_len
        self.compiled = compile
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if odd := {type(layer).__name__ for layer in self.cache.layers if not hasattr(layer, "cumulative_length")}:
            raise ValueError(f"smelt's static decode loop cannot move the write position of cache layers {sorted(odd)}")
        self._step = compile_step(self.next_tokens) if compile else self.next_tokens
        self._propose = compile_step(self.propose_tokens) if compile else self.propose_tokens
        self.warm: set[tuple] = set()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids [1, n] written at cache slots `positions` [n]; returns logits [1, n, vocab]."""
        return self.model(input_ids=ids, position_ids=positions.unsqueeze(0), cache_position=positions,
                          past_key_values=self.cache, use_cache=True).logits

    def next_tokens(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """ids [1, n] written at slots start.. (start: a 0-d tensor, so its value never recompiles);
        returns the greedy token after each position [n].

        transformers' static cache layers write at their own running length and ignore
        `cache_position` (which only shapes the attention mask), so the write pointer is set here:
        after a speculative round that kept fewer tokens than it wrote, it must move back.
        """
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(start)
        positions = torch.arange(ids.shape[1], device=ids.device) + start  # [n]
        return self.forward(ids, positions)[0].argmax(-1)

    def propose_tokens(self, last: torch.Tensor, start: torch.Tensor, k: int) -> torch.Tensor:
        """k greedy tokens after `last` [1, 1] (written at `start`), one step each, in one graph; [k]."""
        guesses = []
        for i in range(k):
            last = self.next_tokens(last, start + i).unsqueeze(0)  # [1, 1]
            guesses.append(last[0])
        return torch.cat(guesses)

    def call(self, fn, *args):
        """Run a step; once a shape has compiled, skip re-checking dynamo's guards on every call.

        The guards (every parameter and cache tensor of the model) cost more than the step itself
        on a small model. The arguments of a warm shape differ only in tensor values, which the
        guards do not look at, so checking only the guards that tell compiled entries apart is safe.
        """
        key = (fn, *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        if not self.compiled or key not in self.warm:
            self.warm.add(key)
            return fn(*args)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return fn(*args)

    def prefill(self, prompt_ids: list[int]) -> int:
        """Reset the cache and run the prompt; the greedy token after it."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.cache.reset()
        ids = torch.tensor([prompt_ids], device=self.device)  # [1, prompt]
        return int(self.forward(ids, torch.arange(len(prompt_ids), device=self.device))[0, -1].argmax())

    def run(self, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed tokens [n] at positions start.. (a fixed-shape step); the greedy token after each [n]."""
        return self.call(self._step, token_ids.view(1, -1), torch.tensor(start, device=self.device))

    def propose(self, last: int, start: int, k: int) -> torch.Tensor:
        """The draft's k greedy guesses after token `last` at position `start` [k]."""
        return self.call(self._propose, torch.tensor([[last]], device=self.device), torch.tensor(start, device=self.device), k)


def check_room(runner: StaticRunner, prompt_len: int, max_new_tokens: int, lookahead: int = 0) -> None:
    need = prompt_len + max_new_tokens + lookahead
    if need > runner.max_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + lookahead ({lookahead}) "
                         f"needs {need} cache positions; the static cache has {runner.max_len}")


def cut(tokens: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """The first `max_new_tokens`, ending at (and keeping) the first EOS."""
    tokens = tokens[:max_new_tokens]
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


@torch.inference_mode()
def greedy_decode(runner: StaticRunner, prompt_ids: list[int], max_new_tokens: int, eos: int | None,
                  on_token: Callable[[int], None] | None = None) -> Decoded:
    """One target forward per new token, each a compiled [1, 1] step. `on_token` sees each new token
    as it is decided (for streaming)."""
    check_room(runner, len(prompt_ids), max_new_tokens)
    t0 = time.perf_counter()
    out = [runner.prefill(prompt_ids)]
    first = time.perf_counter() - t0
    emit(on_token, out)
    nxt = torch.tensor(out, device=runner.device)  # [1]
    pos = len(prompt_ids)  # the position of out[-1], not yet in the cache
    while len(out) < max_new_tokens and out[-1] != eos:
        nxt = runner.run(nxt, pos)
        out.append(int(nxt))
        emit(on_token, out[-1:])
        pos += 1
    return Decoded(cut(out, max_new_tokens, eos), first, time.perf_counter() - t0)


def emit(on_token: Callable[[int], None] | None, tokens: list[int]) -> None:
    if on_token is not None:
        for t in tokens:
            on_token(t)


@torch.inference_mode()
def speculative_decode(target: StaticRunner, draft: StaticRunner, prompt_ids: list[int], max_new_tokens: int,
                       eos: int | None, k: int, on_token: Callable[[int], None] | None = None) -> Decoded:
    """Greedy speculative decoding: the draft proposes `k` tokens one by one, the target checks them
    all in one [1, k + 1] forward and keeps the longest prefix equal to its own greedy choices, plus
    its own next token. Output = the target's greedy output, whatever the draft proposes.

    Both caches stay consistent without copying: slots past the accepted prefix hold stale keys,
    but attention only reads slots at or before the query's position, and the next round writes
    over them (`run` moves the write pointer back to the first rejected slot).
    """
    check_room(target, len(prompt_ids), max_new_tokens, k + 1)
    check_room(draft, len(prompt_ids), max_new_tokens, k + 1)
    t0 = time.perf_counter()
    out = [target.prefill(prompt_ids)]
    first = time.perf_counter() - t0
    emit(on_token, out)
    draft.prefill(prompt_ids)
    pos, proposed, accepted = len(prompt_ids), 0, 0  # pos: position of out[-1], in neither cache yet
    while len(out) < max_new_tokens and out[-1] != eos:
        proposal = draft.propose(out[-1], pos, k)  # [k]: the draft wrote out[-1], g1..g(k-1) at pos..pos+k-1
        last = torch.tensor(out[-1:], device=target.device)
        choices = target.run(torch.cat([last, proposal]), pos).tolist()  # [k + 1]: target's token after each
        guesses = proposal.tolist()
        n = 0
        while n < k and guesses[n] == choices[n]:
            n += 1
        if n == k:  # all kept: the draft never wrote its last guess into its cache
            draft.run(proposal[-1:], pos + k)
        new = cut(guesses[:n] + [choices[n]], max_new_tokens - len(out), eos)
        out += new
        emit(on_token, new)
        pos += n + 1
        proposed, accepted = proposed + k, accepted + n
        if eos in new:
            break
    return Decoded(cut(out, max_new_tokens, eos), first, time.perf_counter() - t0, proposed, accepted)


class BatchRunner(StaticRunner):
    """A static cache for `batch` rows decoded together; prompts are left-padded, and one padding mask
    as long as the cache keeps every step's shapes fixed ([batch, 1] ids, [batch, max_len] mask)."""

    def __init__(self, model, batch: int, max_len: int, compile: bool = False):
        super().__init__(model, max_len, compile)
        self._propose = None  # speculative decoding is batch-1: no draft runs in a batch
        self.batch = batch
        self.mask = torch.ones(batch, max_len, dtype=torch.long, device=self.device)  # [batch, max_len]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ids [batch, n] at per-row positions [batch, n], cache slots [n]; logits [batch, n, vocab]."""
        return self.model(input_ids=ids, position_ids=positions, cache_position=slots, attention_mask=self.mask,
                          past_key_values=self.cache, use_cache=True).logits

    def next_tokens(self, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """One new token per row, ids [batch, 1] at per-row positions [batch, 1], cache slot [1]
        (the same for every row: they are left-padded to one width); the greedy token after it [batch]."""
        return self.forward(ids, positions, slot)[:, -1].argmax(-1)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """`next_tokens` through the compiled step (see `next_tokens` for shapes)."""
        return self.call(self._step, ids, positions, slot)


@torch.inference_mode()
def greedy_decode_batch(runner: BatchRunner, prompts: list[list[int]], max_new_tokens: int, eos: int | None) -> list[Decoded]:
    """Greedy-decode up to `runner.batch` prompts together: one compiled [batch, 1] step per new token
    for all rows. Returns one Decoded per prompt (its own tokens, cut at its EOS)."""
    if not 0 < len(prompts) <= runner.batch:
        raise ValueError(f"{len(prompts)} prompts for a batch of {runner.batch}")
    width = max(map(len, prompts))
    check_room(runner, width, max_new_tokens)
    rows = prompts + [prompts[0]] * (runner.batch - len(prompts))  # fill the fixed batch; extra rows are dropped
    device, t0 = runner.device, time.perf_counter()
    runner.cache.reset()
    ids = torch.zeros(runner.batch, width, dtype=torch.long, device=device)  # [batch, width], left-padded
    runner.mask.fill_(1)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, device=device)
        runner.mask[i, : width - len(r)] = 0
    lengths = torch.tensor([len(r) for r in rows], device=device)  # [batch]
    positions = (runner.mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # [batch, width]: each row counts from 0
    slots = torch.arange(width, device=device)
    nxt = runner.forward(ids, positions, slots)[:, -1].argmax(-1)  # [batch]
    first = time.perf_counter() - t0
    out = [nxt]
    ended = nxt == (eos if eos is not None else -1)  # [batch]: rows that have emitted EOS
    for t in range(1, max_new_tokens):
        if bool(ended.all()):
            break
        slot = torch.tensor([width + t - 1], device=device)
        nxt = runner.step(nxt[:, None], (lengths + t - 1)[:, None], slot)
        out.append(nxt)
        ended |= nxt == (eos if eos is not None else -1)
    seconds = time.perf_counter() - t0
    tokens = torch.stack(out, 1).tolist()  # [batch, new]
    return [Decoded(cut(tokens[i], max_new_tokens, eos), first, seconds) for i in range(len(prompts))]


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
    """What a compiled candidate decodes with: static-cache runners for the target (and its draft),
    built on first use per cache size (prompt + new tokens, rounded up to `bucket` positions) and
    per batch size (rounded up to a power of two). Each runner compiles its few shapes as it is
    built, so a request never waits on a compile halfway through its tokens."""

    def __init__(self, model, draft=None, num_draft_tokens: int = 4, bucket: int = 256):
        self.model, self.draft, self.k, self.bucket = model, draft, num_draft_tokens, bucket
        self.runners: dict[tuple[str, int, int], StaticRunner] = {}

    def runner(self, role: str, batch: int, need: int) -> StaticRunner:
        """role 'target' or 'draft'; batch 0 for the batch-1 runner (speculative decoding needs it)."""
        key = (role, batch, -(-need // self.bucket) * self.bucket)
        if key not in self.runners:
            self.runners[key] = self.build(*key)
            settle_garbage_collector()
        return self.runners[key]

    @torch.inference_mode()
    def build(self, role: str, batch: int, length: int) -> StaticRunner:
        model = self.model if role == "target" else self.draft
        if batch:
            runner = BatchRunner(model, batch, length, compile=True)
            greedy_decode_batch(runner, [[0]], 2, None)  # compiles the [batch, 1] step
            return runner
        runner = StaticRunner(model, length, compile=True)
        runner.prefill([0])
        runner.run(torch.zeros(1, dtype=torch.long, device=runner.device), 1)  # [1, 1] step
        if self.draft is not None and role == "target":
            runner.run(torch.zeros(self.k + 1, dtype=torch.long, device=runner.device), 1)  # [1, k + 1] verify
        if role == "draft":
            runner.propose(0, 1, self.k)
        return runner

    def decode(self, prompt_ids: list[int], max_new_tokens: int, eos: int | None,
               on_token: Callable[[int], None] | None = None) -> Decoded:
        """Greedy (speculative with a draft) decoding of one prompt.

        Call from one thread: graphs compiled in the main thread and run from another decoded at
        0.4x here (the server warms up on its engine thread for that reason)."""
        need = len(prompt_ids) + max_new_tokens + self.k + 1
        target = self.runner("target", 0, need)
        if self.draft is None:
            return greedy_decode(target, prompt_ids, max_new_tokens, eos, on_token)
        return speculative_decode(target, self.runner("draft", 0, need), prompt_ids, max_new_tokens, eos, self.k, on_token)

    def decode_batch(self, prompts: list[list[int]], max_new_tokens: int, eos: int | None) -> list[Decoded]:
        """Greedy, the target alone (speculative decoding is batch-1 here, as in transformers)."""
        batch = 1 << (len(prompts) - 1).bit_length()
        return greedy_decode_batch(self.runner("target", batch, max(map(len, prompts)) + max_new_tokens),
                                   prompts, max_new_tokens, eos)
