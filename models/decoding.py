"""Greedy generation for one prompt, with the decoding strategy chosen by the serving recipe.

Greedy by default (temperature 0); sampling (temperature, top_p, seed) and stop strings for the
OpenAI-compatible API. Strategies (all lossless under greedy decoding: they change speed, never the text):
  plain          one target forward per new token
  draft          speculative decoding: the draft proposes `num_draft_tokens`, the target verifies
                 them in one forward and keeps the longest agreeing prefix plus its own next token
  prompt-lookup  like draft, but proposals are n-gram continuations copied from the prompt
transformers' assisted generation implements both at batch size 1 (see shared FACTS.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    token_ids: list[int]
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "stop": end of turn or a stop string; "length": hit max_new_tokens
    first_token_s: float | None = None


@dataclass
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy (the evaluated, reproducible setting)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

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
    new = out[0, enc["input_ids"].shape[1]:].tolist()  # [new_tokens]
    return finish(tokenizer, new, params, seconds, enc["input_ids"].shape[1], getattr(timer, "first", None))


def finish(tokenizer, new: list[int], params: SamplingParams, seconds: float, prompt_tokens: int,
           first_token_s: float | None) -> Generation:
    """Decode new token ids into a Generation, cutting at a stop string and naming why it ended."""
    ended = bool(new) and new[-1] == tokenizer.eos_token_id
    text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), params.stop)
    reason = "stop" if ended or stopped or len(new) < params.max_new_tokens else "length"
    return Generation(text.strip(), len(new), seconds, new, prompt_tokens, reason, first_token_s)
@torch.inference_mode()
def generate_batch(model, tokenizer, prompt_texts: list[str], params: list[SamplingParams]) -> list[Generation]:
    """Greedy-decode several rendered prompts in one left-padded batch (plain strategy only).

    Runs to the longest max_new_tokens asked for and cuts each row to its own: under greedy
    decoding a row's first n tokens do not depend on how many come after.
    """
    # left padding for this call only: the tokenizer is shared with single-request decoding
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max(p.max_new_tokens for p in params), do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - t0
    gens = []
    for row, p, mask in zip(out[:, enc["input_ids"].shape[1]:].tolist(), params, enc["attention_mask"]):  # row: [new]
        new = row[: p.max_new_tokens]
        if tokenizer.eos_token_id in new:  # finished rows are padded after their end-of-turn token
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        gens.append(finish(tokenizer, new, p, seconds, int(mask.sum()), None))
    return gens


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
