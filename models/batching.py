"""Continuous batching: a request joins the running batch at the next step and leaves it when it ends.

The scheduling of vLLM, SGLang and llama.cpp's server, at the scale of this project: a static KV
cache of `slots` rows (`RowCache`), one row per running request. Each `Batcher.step`
  1. prefills waiting prompts, up to `prefill_tokens` tokens a step (a long prompt in chunks), so
     a long prompt never stalls the running streams for more than one chunk;
  2. decodes every running row in one forward: greedy and sampled rows side by side (per-row
     temperature, top-p and seeded generator), and with a draft model (or prompt lookup) every row
     gets k proposals that the target verifies in one [rows, k + 1] forward, accepted per row.
Rows sit at different positions: each row writes its own cache slots (a scatter), and the mask is
built per row from its position. A step's shapes are bucketed — rows to a power of two, attended
slots to a power of two from 128 — so each bucket compiles once (`compile=True`) and a step reads
only the slots its rows use. Cancelling frees a row before the next step.

Greedy decoding is lossless here as in models/fastgen.py: a row's tokens are the target's own
greedy tokens whatever the batch holds or the draft proposes. A sampled row samples each position
from the target's distribution and keeps a proposal only when the sample equals it, so speculation
changes the speed, not the distribution.
"""
from __future__ import annotations

import heapq
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from models.decoding import SamplingParams, cut
from models.fastgen import GuardSkipper, compile_step, raise_recompile_limit
from models.structured import Constraint

MIN_SLOTS_BUCKET = 128


class RowLayer(CacheLayerMixin):
    """One layer's keys and values [rows, kv_heads, max_len, head_dim]; a forward writes some rows at
    per-row slots and attends to the first `length` slots of those rows."""

    is_compileable = True
    is_sliding = False

    def __init__(self, rows: int, max_len: int, dtype: torch.dtype):
        super().__init__()
        self.rows, self.max_len, self.dtype = rows, max_len, dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # the model's dtype, not the first write's: a prefill under bf16 autocast writes bf16 states
        heads = key_states.shape[1]
        self.keys = key_states.new_zeros(self.rows, heads, self.max_len, key_states.shape[-1], dtype=self.dtype)
        self.values = value_states.new_zeros(self.rows, heads, self.max_len, value_states.shape[-1], dtype=self.dtype)
        if not torch.compiler.is_compiling():  # fixed addresses: compiled steps update them in place
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor,
              length: int):
        """key/value states [b, kv_heads, n, head_dim] at slots [b, n] of rows 0..b (`rows` None: a decode
        step) or of the given rows [b] (a prefill, eager); returns those rows' first `length` slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, heads, n, dim = key_states.shape
        row_index = torch.arange(b, device=slots.device) if rows is None else rows
        # index_put_ on the whole cache: written through a slice of it, inductor copied the cache around
        # the write (8 rows: 18 ms a step instead of 3.6), and scatter_ did the same
        index = (row_index[:, None, None], torch.arange(heads, device=slots.device)[None, :, None], slots[:, None, :])
        self.keys.index_put_(index, key_states.to(self.dtype))  # index -> [b, heads, n]
        self.values.index_put_(index, value_states.to(self.dtype))
        if rows is None:
            return self.keys[:b, :, :length], self.values[:b, :, :length]
        return self.keys[rows, :, :length], self.values[rows, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a RowLayer is written through RowCache.update, which knows the rows and slots")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self) -> int:
        raise TypeError("a RowCache has no running length: each row's position is its owner's")

    def get_max_length(self) -> int:
        return self.max_len


class RowCache(Cache):
    """Per-layer `RowLayer`s and where the next forward writes (`window`). The forward is given a
    ready 4D mask, so transformers never asks this cache for lengths."""

    def __init__(self, config, rows: int, max_len: int, dtype: torch.dtype):
        text = config.get_text_config(decoder=True)
        if odd := sorted(set(getattr(text, "layer_types", None) or []) - {"full_attention"}):
            raise ValueError(f"smelt's batch cache holds full-attention layers only, not {odd}")
        super().__init__(layers=[RowLayer(rows, max_len, dtype) for _ in range(text.num_hidden_layers)])
        self.rows, self.max_len = rows, max_len
        self.rows, self.length, self.slots = None, max_len, torch.zeros(1, 1, dtype=torch.long)

    def window(self, rows: torch.Tensor | None, slots: torch.Tensor, length: int) -> RowCache:
        """The next forward writes rows 0..b (None) or rows [b] at slots [b, n] and attends to `length` slots."""
        self.rows, self.slots, self.length = rows, slots, length
        return self

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].write(key_states, value_states, self.rows, self.slots, self.length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def run_rows(model, cache: RowCache, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None, length: int):
    """ids [b, n] at slots pos..pos+n-1 of each row (pos [b]) in rows 0..b (None) or `rows` [b] through
    `model` (a causal LM, or its decoder); the model's output. Each query sees its own row's slots up
    to its own: the mask [b, 1, n, length]."""
    n = ids.shape[1]
    slots = pos[:, None] + torch.arange(n, device=ids.device)  # [b, n]
    mask = torch.arange(length, device=ids.device)[None, None, :] <= slots[:, :, None]  # [b, n, length]
    return model(input_ids=ids, position_ids=slots, attention_mask=mask[:, None], use_cache=True,
                 past_key_values=cache.window(rows, slots, length))


def forward_rows(model, cache: RowCache, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor | None,
                 length: int) -> torch.Tensor:
    """`run_rows` through the causal LM: logits [b, n, vocab]."""
    return run_rows(model, cache, ids, pos, rows, length).logits


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [m, vocab] of final hidden states [m, hidden] through the LM head, in the head's dtype
    (as the causal LM's forward makes them, logit soft-capping included)."""
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype) if hasattr(head, "weight") else hidden)
    if cap := getattr(model.config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits


class Stepper:
    """A model with its `RowCache` and its step functions, compiled per shape when asked."""

    def __init__(self, model, rows: int, max_len: int, compile: bool, prefill_dtype: torch.dtype | None = None):
        self.model, self.compiled, self.prefill_dtype = model, compile, prefill_dtype
        self.cache = RowCache(model.config, rows, max_len, model.dtype)
        # One row's linears as inductor's own loops (fastest for a decode step and a verify, models/fastgen.py);
        # several rows' through the BLAS (8 rows a step: 3.6 ms vs 8.3 ms as loops on the 12.2M base).
        self._step = {1: compile_step(self.step_fn), 2: compile_step(self.step_fn, max_rows=1)} if compile else None
        self._propose = {1: compile_step(self.propose_fn), 2: compile_step(self.propose_fn, max_rows=1)} if compile else None
        self.calls = GuardSkipper(compile)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def step_fn(self, ids: torch.Tensor, pos: torch.Tensor, length: int):
        """ids [b, n] for rows 0..b; (logits [b, n, vocab], greedy tokens [b, n])."""
        logits = forward_rows(self.model, self.cache, ids, pos, None, length)
        return logits, logits.argmax(-1)

    def propose_fn(self, pair: torch.Tensor, pos: torch.Tensor, length: int, k: int) -> torch.Tensor:
        """k greedy guesses per row [b, k]: `pair` [b, 2] is each row's token before its last and its
        last (slots pos-1, pos: rewriting pos-1 catches the cache up after a fully accepted round)."""
        guess = forward_rows(self.model, self.cache, pair, pos - 1, None, length)[:, -1:].argmax(-1)  # [b, 1]
        guesses = [guess]
        for i in range(1, k):
            guess = forward_rows(self.model, self.cache, guess, pos + i, None, length).argmax(-1)
            guesses.append(guess)
        return torch.cat(guesses, dim=1)

    def step(self, ids: torch.Tensor, pos: torch.Tensor, length: int):
        fn = self._step[min(len(ids), 2)] if self.compiled else self.step_fn
        return self.calls(fn, ids, pos, length)

    def propose(self, pair: torch.Tensor, pos: torch.Tensor, length: int, k: int) -> torch.Tensor:
        fn = self._propose[min(len(pair), 2)] if self.compiled else self.propose_fn
        return self.calls(fn, pair, pos, length, k)

    @torch.inference_mode()
    def prefill(self, rows: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Prompt chunks into their rows at slots start.. in one eager forward (lengths vary), right-padded
        to the longest: a padding position writes a slot its row writes again before reading it (the next
        chunk, or the decode step at that position). Logits after each chunk's last token [len(rows), vocab].

        Under `prefill_dtype` autocast when set (bf16 on a CPU with AMX: models/device.py); the LM head
        runs only at each chunk's last token (a prompt's other positions need no logits), in its own dtype."""
        width = max(map(len, chunks))
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, :len(c)] = torch.tensor(c)
        pos = torch.tensor(starts, device=self.device)
        with torch.autocast(self.device.type, dtype=self.prefill_dtype, enabled=self.prefill_dtype is not None):
            hidden = run_rows(self.model.get_decoder(), self.cache, ids.to(self.device), pos,
                              torch.tensor(rows, device=self.device), max(starts) + width).last_hidden_state  # [b, width, h]
        last = hidden[torch.arange(len(chunks)), torch.tensor([len(c) - 1 for c in chunks])]  # [b, h]
        return head_logits(self.model, last)


@dataclass
class Sequence:
    """One request in the batch. `on_tokens` sees each round's new tokens (engine thread) and returns
    True to end the sequence there (a stop string); `cancel` may be called from any thread."""

    prompt: list[int]
    params: SamplingParams
    on_tokens: Callable[[list[int]], bool] | None = None
    row: int = -1
    filled: int = 0  # prompt tokens in the cache
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once ended
    proposed: int = 0
    accepted: int = 0
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # the response format's grammar, if any
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def pos(self) -> int:
        """Tokens in the target's cache: the prompt and every new token but the last."""
        return len(self.prompt) + len(self.out) - 1

    def token_at(self, slot: int) -> int:
        return self.prompt[slot] if slot < len(self.prompt) else self.out[slot - len(self.prompt)]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [vocab]: argmax at temperature 0, else top-p sampling at the temperature."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def lookup_proposal(tokens: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (longest n first), padded with its last token; no match proposes the last token k times."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                found = tokens[start + n:start + n + k]
                return found + [found[-1]] * (k - len(found))
    return [tokens[-1]] * k


def bucket(n: int, floor: int, ceiling: int) -> int:
    """n rounded up to a power of two, at least `floor`, at most `ceiling`."""
    return min(ceiling, max(floor, 1 << (n - 1).bit_length()))


class Batcher:
    """The running batch of one model (and its draft): admit sequences, `step`, collect the ended.

    strategy 'plain' decodes one token a row per step; 'draft' and 'prompt-lookup' propose `k`
    tokens a row and verify them in one forward. Not thread-safe: one thread (the engine's) owns it;
    only `Sequence.cancel` may come from others.
    """

    def __init__(self, model, eos: int | None, slots: int, max_len: int, strategy: str = "plain", draft=None,
                 k: int = 4, compile: bool = False, prefill_tokens: int = 512, spec_rows: int = 4,
                 prefill_dtype: torch.dtype | None = None):
        if strategy == "draft" and draft is None:
            raise ValueError("decoding strategy 'draft' needs a draft model")
        self.eos, self.slots, self.max_len, self.strategy = eos, slots, max_len, strategy
        self.k = k if strategy != "plain" else 0
        self.prefill_tokens, self.spec_rows = prefill_tokens, spec_rows
        self.target = Stepper(model, slots, max_len, compile, prefill_dtype)
        self.draft = Stepper(draft, slots, max_len, compile, prefill_dtype) if strategy == "draft" else None
        self.rows: dict[int, Sequence] = {}
        self.free = list(range(slots))  # a heap: the lowest free row first keeps the batch buckets small
        self.ended: list[Sequence] = []
        self.steps = 0  # decode steps run (for the batch-size metric)

    @property
    def device(self) -> torch.device:
        return self.target.device

    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Cache slots a request needs: its prompt, its new tokens and one verify's lookahead."""
        return prompt_tokens + max_new_tokens + self.k + 1

    def has_free_row(self) -> bool:
        return bool(self.free)

    def free_rows(self) -> int:
        return len(self.free)

    def running(self) -> int:
        return len(self.rows)

    def admit(self, seq: Sequence) -> None:
        """Give a sequence a row; its prompt is prefilled over the next steps."""
        if not seq.prompt:
            raise ValueError("the prompt has no tokens")
        if (need := self.room(len(seq.prompt), seq.params.max_new_tokens)) > self.max_len:
            raise ValueError(f"prompt ({len(seq.prompt)} tokens) + max_new_tokens ({seq.params.max_new_tokens}) + lookahead "
                             f"({self.k + 1}) needs {need} cache slots; this batch has {self.max_len} a row")
        if seq.params.temperature > 0 and seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else random.getrandbits(63))
        seq.row = heapq.heappop(self.free)
        self.rows[seq.row] = seq

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One scheduling step: drop cancelled rows, prefill within the token budget, decode every
        running row once. Returns the sequences that ended in this step."""
        if not self.steps:
            raise_recompile_limit()  # on the thread that steps (and compiles what warm-up did not)
        for seq in [s for s in self.rows.values() if s.cancelled.is_set()]:
            self.end(seq, "cancelled")
        self.prefill_waiting()
        running = [s for s in self.rows.values() if s.filled == len(s.prompt) and s.finish_reason is None]
        if running:
            self.decode(running)
            self.steps += 1
        ended, self.ended = self.ended, []
        return ended

    def prefill_waiting(self) -> None:
        """Prompt chunks of the waiting rows, oldest rows first, `prefill_tokens` in all, in one forward
        (reading the weights once for all of them: int8 weights are widened once per forward)."""
        budget, picked = self.prefill_tokens, []
        for seq in sorted((s for s in self.rows.values() if s.filled < len(s.prompt)), key=lambda s: s.row):
            chunk = seq.prompt[seq.filled:seq.filled + budget]
            width = max([len(chunk)] + [len(c) for _, c in picked])
            if budget <= 0 or max([seq.filled] + [s.filled for s, _ in picked]) + width > self.max_len:
                break  # (padding to the widest chunk must stay inside every row)
            picked.append((seq, chunk))
            budget -= len(chunk)
        if not picked:
            return
        rows, chunks, starts = [s.row for s, _ in picked], [c for _, c in picked], [s.filled for s, _ in picked]
        logits = self.target.prefill(rows, chunks, starts)  # [picked, vocab]
        if self.draft is not None:
            self.draft.prefill(rows, chunks, starts)
        for i, (seq, chunk) in enumerate(picked):
            seq.filled += len(chunk)
            if seq.filled == len(seq.prompt):
                self.accept(seq, [self.pick(seq, logits[None], 0, i)])

    def layout(self, running: list[Sequence], width: int) -> tuple[int, int, torch.Tensor]:
        """(rows b, attended slots, pos [b]) of a step `width` tokens wide. Rows that are not running
        (free, or prefilling) write past their last written slot (the draft's proposal rewrites pos - 1),
        where nothing has been read yet; admission keeps filled + 1 + width within the row."""
        b = bucket(max(s.row for s in running) + 1, 1, self.slots)
        pos = [1] * b
        for row in range(b):
            seq = self.rows.get(row)
            if seq is not None:
                pos[row] = seq.pos if seq in running else seq.filled + 1
        length = bucket(max(pos) + width, MIN_SLOTS_BUCKET, self.max_len)
        return b, length, torch.tensor(pos, device=self.device)

    def decode(self, running: list[Sequence]) -> None:
        """One step for every running row: speculative while the batch is small (a verify of k + 1
        tokens a row costs little more than one token while a step is bound by reading the weights;
        past `spec_rows` rows it is bound by arithmetic, and k + 1 tokens a row cost ~k + 1 times one)."""
        speculate = self.k and bucket(max(s.row for s in running) + 1, 1, self.slots) <= self.spec_rows
        width = self.k + 1 if speculate else 1
        b, length, pos = self.layout(running, width)
        last = torch.zeros(b, 1, dtype=torch.long)
        for s in running:
            last[s.row, 0] = s.out[-1]
        last = last.to(self.device)
        if not speculate:
            logits, greedy = self.target.step(last, pos, length)  # [b, 1, vocab], [b, 1]
            if self.draft is not None:  # keeps the draft's cache level for when the batch is small again
                self.draft.step(last, pos, length)
            choices = greedy[:, 0].tolist()
            for s in running:
                self.accept(s, [self.pick(s, logits, s.row, 0, choices[s.row])])
            return
        proposals = self.propose(running, b, length, pos, last)  # [b, k]
        logits, greedy = self.target.step(torch.cat([last, proposals], dim=1), pos, length)  # [b, k+1, vocab], [b, k+1]
        guesses, choices = proposals.tolist(), greedy.tolist()
        for s in running:
            new = self.verify(s, guesses[s.row], choices[s.row], logits)
            s.proposed, s.accepted = s.proposed + self.k, s.accepted + len(new) - 1
            self.accept(s, new)

    def propose(self, running: list[Sequence], b: int, length: int, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """k proposals a row [b, k]: the draft's greedy guesses, or prompt lookup's n-gram continuations."""
        if self.draft is not None:
            before = torch.zeros(b, 1, dtype=torch.long)
            for s in running:
                before[s.row, 0] = s.token_at(s.pos - 1)
            return self.draft.propose(torch.cat([before.to(self.device), last], dim=1), pos, length, self.k)
        rows = [[0] * self.k for _ in range(b)]
        for s in running:
            rows[s.row] = lookup_proposal(s.prompt + s.out, self.k)
        return torch.tensor(rows, device=self.device)

    def verify(self, seq: Sequence, guesses: list[int], choices: list[int], logits: torch.Tensor) -> list[int]:
        """The row's new tokens: its own token at each position (greedy, or sampled from its logits in
        [b, k+1, vocab]) for as long as each equals the proposal, plus the first that does not."""
        new = []
        for j in range(self.k + 1):
            new.append(self.pick(seq, logits, seq.row, j, choices[j]))
            if j == self.k or new[-1] != guesses[j]:
                return new
        return new

    def pick(self, seq: Sequence, logits: torch.Tensor, row: int, j: int, greedy: int | None = None) -> int:
        """The row's token at position j of logits [b, n, vocab]: the greedy one (computed in the step),
        or sampled, or chosen among the tokens its grammar allows (committed to the grammar: every
        token picked is kept, since a verify stops at the first that differs from the proposal)."""
        if seq.constraint is None and seq.params.temperature <= 0 and greedy is not None:
            return greedy
        scores = logits[row, j] if seq.constraint is None else seq.constraint.mask(logits[row, j])
        token = sample(scores, seq.params, seq.generator)
        if seq.constraint is not None:
            seq.constraint.consume(token)
        return token

    def accept(self, seq: Sequence, new: list[int]) -> None:
        """Append a round's tokens (cut at EOS and max_new_tokens), tell the sequence, end it if done."""
        left = seq.params.max_new_tokens - len(seq.out)
        new = cut(new, left, self.eos)
        seq.out += new
        stop = seq.on_tokens(new) if seq.on_tokens is not None else False
        if stop or (self.eos is not None and new and new[-1] == self.eos):
            self.end(seq, "stop")
        elif len(seq.out) >= seq.params.max_new_tokens:
            self.end(seq, "length")

    def abort(self) -> list[Sequence]:
        """End every row (a step failed); the sequences ended, in this step or by the abort."""
        for seq in list(self.rows.values()):
            self.end(seq, "error")
        ended, self.ended = self.ended, []
        return ended

    def end(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        del self.rows[seq.row]
        heapq.heappush(self.free, seq.row)
        self.ended.append(seq)

    def warm_up(self, max_rows: int | None = None) -> float:
        """Compile (or run once) the step shapes of 1, 2, 4, ... rows at the smallest slot bucket, so
        the first requests do not wait on a compile; seconds taken."""
        raise_recompile_limit()  # on this (the compiling) thread
        t0, eos, self.eos = time.perf_counter(), self.eos, None  # no EOS: every shape gets its decode step
        b = 1
        while b <= min(max_rows or self.slots, self.slots):
            seqs = [Sequence([0, 0], SamplingParams(2)) for _ in range(b)]
            for s in seqs:
                self.admit(s)
            while self.rows:
                self.step()
            b *= 2
        self.ended, self.eos = [], eos
        return time.perf_counter() - t0
