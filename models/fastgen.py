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

import time
from dataclasses import dataclass

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


class StaticRunner:
    """One model, a batch-1 static KV cache of `max_len` positions, and its forward (compiled or not).

    Prefill runs eagerly (prompt lengths vary and would recompile); decode and verify steps have
    fixed shapes ([1, 1] and [1, k + 1]) and run through `torch.compile` when asked.
    """

    def __init__(self, model, max_len: int, compile: bool = False):
        self.model = model
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if odd := {type(layer).__name__ for layer in self.cache.layers if not hasattr(layer, "cumulative_length")}:
            raise ValueError(f"smelt's static decode loop cannot move the write position of cache layers {sorted(odd)}")
        self.step = torch.compile(self.forward, dynamic=False) if compile else self.forward

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids [1, n] written at cache slots `positions` [n]; returns logits [1, n, vocab]."""
        return self.model(input_ids=ids, position_ids=positions.unsqueeze(0), cache_position=positions,
                          past_key_values=self.cache, use_cache=True).logits

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Reset the cache and run the prompt; logits [vocab] of its last position."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.cache.reset()
        ids = torch.tensor([prompt_ids], device=self.device)  # [1, prompt]
        return self.forward(ids, torch.arange(len(prompt_ids), device=self.device))[0, -1]

    def seek(self, position: int) -> None:
        """Make the next write land at slot `position`.

        transformers' static cache layers write at their own running length and ignore
        `cache_position` (which only shapes the attention mask), so after a speculative round that
        kept fewer tokens than it wrote, the write pointer must be moved back by hand.
        """
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(position)

    def run(self, token_ids: list[int], start: int) -> torch.Tensor:
        """Feed tokens at positions start.. (a fixed-shape compiled step); logits [n, vocab]."""
        self.seek(start)
        ids = torch.tensor([token_ids], device=self.device)  # [1, n]
        positions = torch.arange(start, start + len(token_ids), device=self.device)  # [n]
        return self.step(ids, positions)[0]


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
def greedy_decode(runner: StaticRunner, prompt_ids: list[int], max_new_tokens: int, eos: int | None) -> Decoded:
    """One target forward per new token, each a compiled [1, 1] step."""
    check_room(runner, len(prompt_ids), max_new_tokens)
    t0 = time.perf_counter()
    out = [int(runner.prefill(prompt_ids).argmax())]
    first = time.perf_counter() - t0
    pos = len(prompt_ids)  # the position of out[-1], not yet in the cache
    while len(out) < max_new_tokens and out[-1] != eos:
        out.append(int(runner.run([out[-1]], pos)[-1].argmax()))
        pos += 1
    return Decoded(cut(out, max_new_tokens, eos), first, time.perf_counter() - t0)


@torch.inference_mode()
def speculative_decode(target: StaticRunner, draft: StaticRunner, prompt_ids: list[int], max_new_tokens: int,
                       eos: int | None, k: int) -> Decoded:
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
    out = [int(target.prefill(prompt_ids).argmax())]
    first = time.perf_counter() - t0
    draft.prefill(prompt_ids)
    pos, proposed, accepted = len(prompt_ids), 0, 0  # pos: position of out[-1], in neither cache yet
    while len(out) < max_new_tokens and out[-1] != eos:
        guesses, last = [], out[-1]
        for i in range(k):  # the draft writes out[-1], g1..g(k-1) at pos..pos+k-1
            last = int(draft.run([last], pos + i)[-1].argmax())
            guesses.append(last)
        choices = target.run([out[-1], *guesses], pos).argmax(-1).tolist()  # [k + 1]: target's token after each
        n = 0
        while n < k and guesses[n] == choices[n]:
            n += 1
        if n == k:  # all kept: the draft never wrote its last guess into its cache
            draft.run([guesses[-1]], pos + k)
        new = guesses[:n] + [choices[n]]
        out += new
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
        self.batch = batch
        self.mask = torch.ones(batch, max_len, dtype=torch.long, device=self.device)  # [batch, max_len]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ids [batch, n] at per-row positions [batch, n], cache slots [n]; logits [batch, n, vocab]."""
        return self.model(input_ids=ids, position_ids=positions, cache_position=slots, attention_mask=self.mask,
                          past_key_values=self.cache, use_cache=True).logits


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
        step = torch.tensor([width + t - 1], device=device)
        nxt = runner.step(nxt[:, None], (lengths + t - 1)[:, None], step)[:, -1].argmax(-1)
        out.append(nxt)
        ended |= nxt == (eos if eos is not None else -1)
    seconds = time.perf_counter() - t0
    tokens = torch.stack(out, 1).tolist()  # [batch, new]
    return [Decoded(cut(tokens[i], max_new_tokens, eos), first, seconds) for i in range(len(prompts))]
