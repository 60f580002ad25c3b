"""Greedy generation for one prompt, with the decoding strategy chosen by the serving recipe.

Greedy by default (temperature 0); sampling (temperature, top_p, seed) and stop strings for the
OpenAI-compatible API. Strategies (all lossless under greedy decoding: they change speed, never the text):
  plain          one target forward per new token
  draft          speculative decoding: the draft proposes `num_draft_tokens`, the target verifies
                 them in one forward and keeps the longest agreeing prefix plus its own next token
  prompt-lookup  like draft, but proposals are n-gram continuations copied from the prompt
transformers' assisted generation implements both at batch size 1 (see shared FACTS.md).

Every decode loop (transformers' generate here, smelt's compiled static-cache loops in
models/fastgen.py, greedy or speculative, one prompt or a batch) returns a `Generation`, and sits
behind one `Decoder` interface that a candidate (models/candidate.py) dispatches through.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Generation:
    """New token ids (EOS included when reached), their text, and how the loop got them."""

    token_ids: list[int]
    seconds: float
    first_token_s: float | None = None
    text: str = ""  # filled by `finish`; the compiled loops work on ids alone
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "stop": end of turn or a stop string; "length": hit max_new_tokens
    proposed: int = 0  # draft tokens proposed (smelt's speculative loop only)
    accepted: int = 0  # of those, how many the target kept

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


@dataclass
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy (the evaluated, reproducible setting)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None  # constrained decoding (models/structured.py): served by the engine's batch

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


class FirstTokenTimer:
    """A transformers streamer that only notes when the first new token arrives (time to first token)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the prompt, the second the first new token
            self.first = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to (not including) the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def strategy_kwargs(strategy: str, draft, num_draft_tokens: int, prompt_lookup_tokens: int) -> dict:
    if strategy == "plain":
        return {}
    if strategy == "draft":
        if draft is None:
            raise ValueError("decoding strategy 'draft' needs a draft model, but the candidate has none")
        return {"assistant_model": draft, "num_assistant_tokens": num_draft_tokens,
                "num_assistant_tokens_schedule": "constant"}
    if strategy == "prompt-lookup":
        return {"prompt_lookup_num_tokens": prompt_lookup_tokens}
    raise ValueError(f"unknown decoding strategy {strategy!r}")


class Decoder(Protocol):
    """A one-request decode loop behind a candidate: transformers' generate (plain, assisted by a draft or
    by prompt lookup) or smelt's compiled static-cache loop (greedy or speculative). Concurrent requests
    are the continuous batch's (models/batching.py)."""

    def accepts(self, params: SamplingParams) -> bool:
        """Whether this loop can serve a request with these settings."""

    def complete(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        """Continue already-rendered text; `streamer` follows transformers' protocol (prompt, then each token)."""


@dataclass
class GenerateDecoder:
    """transformers' `generate`, with the strategy's keyword arguments (assistant model, prompt lookup):
    serves every request. Its assisted generation runs at batch size 1 only (shared FACTS.md)."""

    model: torch.nn.Module
    tokenizer: object
    extra: dict = field(default_factory=dict)

    def accepts(self, params: SamplingParams) -> bool:
        return True

    def complete(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        return generate_text(self.model, self.tokenizer, prompt_text, params, self.extra, streamer)


@dataclass
class Preferring:
    """A fast decoder for the requests it accepts, and another (that accepts all) for the rest."""

    fast: Decoder
    rest: Decoder

    def accepts(self, params: SamplingParams) -> bool:
        return True

    def pick(self, params: list[SamplingParams]) -> Decoder:
        return self.fast if all(self.fast.accepts(p) for p in params) else self.rest

    def complete(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        return self.pick([params]).complete(prompt_text, params, streamer)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-rendered text (the chat template wrote its special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def generate_text(model, tokenizer, prompt_text: str, params: SamplingParams, extra: dict, streamer=None) -> Generation:
    """Decode a rendered prompt (greedy unless `params` say otherwise); the completion without the prompt."""
    enc = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(model.device)
    if params.seed is not None:
        torch.manual_seed(params.seed)  # callers serialise generation, so the global generator is theirs
    timer = streamer or FirstTokenTimer()
    stop_kwargs = {"stop_strings": params.stop, "tokenizer": tokenizer} if params.stop else {}
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=params.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, streamer=timer, **params.generate_kwargs(), **stop_kwargs, **extra)
    seconds = time.perf_counter() - t0
    prompt = enc["input_ids"].shape[1]
    gen = Generation(out[0, prompt:].tolist(), seconds, getattr(timer, "first", None), prompt_tokens=prompt)
    return finish(tokenizer, gen, params)


def finish(tokenizer, gen: Generation, params: SamplingParams) -> Generation:
    """The generation with its text (cut at a stop string) and the reason it ended."""
    new = gen.token_ids
    ended = bool(new) and new[-1] == tokenizer.eos_token_id
    text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), params.stop)
    reason = "stop" if ended or stopped or len(new) < params.max_new_tokens else "length"
    gen.text, gen.finish_reason = text.strip(), reason
    return gen


def cut(tokens: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """The first `max_new_tokens`, ending at (and keeping) the first EOS: under greedy decoding a row's
    first n tokens do not depend on how many come after, and what follows EOS in a batch is padding."""
    tokens = tokens[:max_new_tokens]
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


@torch.inference_mode()
def generate_batch(model, tokenizer, prompt_texts: list[str], params: list[SamplingParams]) -> list[Generation]:
    """Greedy-decode several rendered prompts in one left-padded batch with transformers' generate
    (the plain strategy; training's distillation uses it too). Runs to the longest max_new_tokens
    asked for and cuts each row to its own."""
    # left padding for this call only: the tokenizer is shared with single-request decoding
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max(p.max_new_tokens for p in params), do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - t0
    rows = out[:, enc["input_ids"].shape[1]:].tolist()  # [batch, new]
    return [finish(tokenizer, Generation(cut(row, p.max_new_tokens, tokenizer.eos_token_id), seconds,
                                         prompt_tokens=int(mask.sum())), p)
            for row, p, mask in zip(rows, params, enc["attention_mask"])]


def decode_rate(gens: list[Generation]) -> float | None:
    """Decode tokens/s, leaving out the prefill: tokens after the first over the time after the first
    (generations without a first-token time or with a single token say nothing about it)."""
    timed = [g for g in gens if g.first_token_s is not None and g.new_tokens > 1]
    seconds = sum(g.seconds - g.first_token_s for g in timed)
    return sum(g.new_tokens - 1 for g in timed) / seconds if seconds > 0 else None


@torch.inference_mode()
def draft_agreement(target_ids: list[int], prompt_ids: list[int], draft) -> tuple[int, int]:
    """How many of the target's greedy tokens the draft would have proposed itself.

    Greedy speculative decoding accepts a proposed token exactly when it equals the target's own
    greedy token, so the share of agreeing positions (teacher-forced on the target's output) is
    the per-token acceptance rate. Returns (agreeing, total).
    """
    if not target_ids:
        return 0, 0
    ids = torch.tensor([prompt_ids + target_ids], device=draft.device)  # [1, prompt + new]
    logits = draft(ids).logits[0, len(prompt_ids) - 1: -1]  # [new, vocab]: predictions for each new token
    guesses = logits.argmax(-1).tolist()
    return sum(g == t for g, t in zip(guesses, target_ids)), len(target_ids)


def draft_acceptance(draft, prompts: list[list[int]], targets: list[list[int]]) -> float | None:
    """The draft's acceptance rate over prompts (token ids) and the target's greedy tokens after each:
    agreeing positions over all positions (None when there are none). Evaluation, training's
    distillation and the server's sampled metric all measure it here."""
    agree = total = 0
    for prompt_ids, target_ids in zip(prompts, targets):
        a, t = draft_agreement(target_ids, prompt_ids, draft)
        agree, total = agree + a, total + t
    return agree / total if total else None
