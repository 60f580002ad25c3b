"""Greedy generation for one prompt, with the decoding strategy chosen by the serving recipe.

Strategies (all lossless under greedy decoding: they change speed, never the text):
  plain          one target forward per new token
  draft          speculative decoding: the draft proposes `num_draft_tokens`, the target verifies
                 them in one forward and keeps the longest agreeing prefix plus its own next token
  prompt-lookup  like draft, but proposals are n-gram continuations copied from the prompt
transformers' assisted generation implements both at batch size 1 (see shared FACTS.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float
    token_ids: list[int]


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
def generate_text(model, tokenizer, prompt_text: str, max_new_tokens: int, extra: dict) -> Generation:
    """Greedy-decode a rendered prompt; returns the completion without the prompt."""
    enc = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(model.device)
    t0 = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    seconds = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]  # [new_tokens]
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()), seconds, new.tolist())


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
