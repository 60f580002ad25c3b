"""Pretraining blocks for the embedded base: text, copy blocks and key-value records.

A base that has read only docstrings cannot copy a name out of a prompt, and LoRA cannot grow that
ability in minutes. Two synthetic kinds of block teach it during pretraining, each drawn fresh
(no block repeats, so the model cannot memorise the content and must look it up):

- **copy**: runs of random words, each written twice with a varied stretch of text between; only
  the second sighting is a target (the first is unpredictable), so the loss rewards copying by content.
- **record**: fields written as `key: value` in a random format, then restated as JSON in another
  order; the model must find each key's value in the source (lookup by key, not by position).
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from models.config import CurriculumMix

IGNORE = -100
KINDS = ("text", "copy", "records")  # in the order of CurriculumMix's shares
# What the skill probe scores during pretraining: name -> (kind, progress, options). Copying back to
# back is the first skill to form; copying across text and lookup by key are what the task needs.
PROBES = {
    "copy_adjacent": ("copy", 0.0, {"words_only": True}),
    "copy_apart": ("copy", 1.0, {"words_only": True}),
    "records": ("records", 1.0, {}),
    "text": ("text", 1.0, {}),
}
PROBE_SEED = 7_919  # added to the build's seed: probe blocks are never training blocks


def word_ids(tokenizer) -> list[int]:
    """Vocabulary entries that are whole alphabetic words (task words included: the tokenizer saw them)."""
    out = []
    for tok, i in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([tok])
        if len(text) >= 2 and text.isalpha() and text.isascii():
            out.append(i)
    return sorted(out)


class Curriculum(Dataset):
    """`n_blocks` blocks of exactly `seq_len` tokens, block i decided by (seed, i) alone.

    Blocks are generated at construction (a few seconds for tens of thousands) so the training
    loop indexes tensors, and a resumed run sees exactly the blocks it would have seen.
    """

    def __init__(self, text_ids: list[int], tokenizer, seq_len: int, n_blocks: int, mix: CurriculumMix, seed: int,
                 fixed_progress: float | None = None):
        if len(text_ids) <= seq_len:
            raise ValueError(f"pretraining corpus has {len(text_ids)} tokens, fewer than one block of {seq_len}")
        self.text = torch.tensor(text_ids)  # [corpus_tokens]
        self.seq_len, self.eos = seq_len, tokenizer.bos_token_id
        self.words = word_ids(tokenizer)
        self.space = tokenizer.encode(" ", add_special_tokens=False)[0]
        self.word_strs = [tokenizer.decode([i]) for i in self.words]
        self.tokenizer = tokenizer
        weights = [mix.text, mix.copy_spans, mix.records]
        if sum(weights) <= 0:
            raise ValueError("pretrain_mix: every share is zero")
        rng = random.Random(seed)
        kinds = rng.choices(KINDS, weights=weights, k=n_blocks)
        ids = torch.empty(n_blocks, seq_len, dtype=torch.long)  # [n_blocks, seq_len]
        labels = torch.empty(n_blocks, seq_len, dtype=torch.long)
        for i, kind in enumerate(kinds):
            # how far into pretraining this block comes (0 -> 1); fixed: every block as drawn at that point
            self.progress = i / n_blocks if fixed_progress is None else fixed_progress
            ids[i], labels[i] = self.make(kind, random.Random(seed * 1_000_003 + i))
        self.ids, self.labels, self.kinds = ids, labels, kinds

    def make(self, kind: str, r: random.Random, **options) -> tuple[torch.Tensor, torch.Tensor]:
        return {"text": self.text_block, "copy": self.copy_block, "records": self.record_block}[kind](r, **options)

    def sample(self, kind: str, n: int, progress: float, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
        """n blocks of one kind as pretraining draws them at `progress` (0 -> 1); ids, labels [n, seq_len]."""
        self.progress = progress
        pairs = [self.make(kind, random.Random(seed * 1_000_003 + i), **options) for i in range(n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def window(self, r: random.Random, n: int) -> torch.Tensor:
        start = r.randrange(len(self.text) - n)
        return self.text[start:start + n].clone()

    def text_block(self, r: random.Random, **_) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.window(r, self.seq_len)
        return ids, ids.clone()

    def copy_block(self, r: random.Random, words_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Episodes of: a run of 4-24 random words, up to 48 tokens of text, the run again.

        The distance changes every episode, so no fixed offset predicts the repeat: only a head
        that finds the current token's earlier occurrence and copies what followed it (an induction
        head) does. Only the repeat is a target: the first sighting of random words is unpredictable.
        The first blocks repeat each run at once and without spaces; text between (up to 80% of
        episodes) and spaced runs (up to half) come in over the first half of pretraining. Measured
        on a 2-layer model: back-to-back runs grew copying by content in ~450 steps, while runs with
        text between from the start grew none in 2,000. `words_only=True` (the skill probe) scores only
        the repeated words: the text between and the spaces inside a spaced run are predictable
        without copying (a model that copies nothing scored ~33% on spaced runs counting them).
        """
        ramp = min(1.0, 2 * self.progress)
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < self.seq_len:
            words = [r.choice(self.words) for _ in range(r.randint(4, 24))]
            # words back to back: matching on the current token alone (the classic induction pattern)
            # forms first; spaced runs need the token before it, as JSON values do
            run = [t for w in words for t in (w, self.space)][:-1] if r.random() < 0.5 * ramp else words
            gap = self.window(r, r.randint(1, 48)).tolist() if r.random() < 0.8 * ramp else []
            ids += run + gap + run + [self.eos]
            if words_only:
                labels += [IGNORE] * (len(run) + len(gap)) + [t if t != self.space else IGNORE for t in run] + [IGNORE]
            else:
                labels += [IGNORE] * len(run) + gap + run + [self.eos]
        return torch.tensor(ids[:self.seq_len]), torch.tensor(labels[:self.seq_len])

    def record_text(self, r: random.Random) -> tuple[str, str]:
        """(source, json): 3-6 fields in one of several layouts, then the JSON in a shuffled order."""
        keys = r.sample(self.word_strs, r.randint(3, 6))
        values = [str(r.randint(0, 999)) if r.random() < 0.25 else " ".join(r.sample(self.word_strs, r.randint(1, 2)))
                  for _ in keys]
        layout = r.choice(["{k}: {v}", "{k} = {v}", "{k} {v}", "{v} ({k})", "{k} is {v}"])
        sep = r.choice([", ", "; ", "\n", ". "])
        source = sep.join(layout.format(k=k, v=v) for k, v in zip(keys, values))
        order = list(range(len(keys)))
        r.shuffle(order)
        fields = [f'"{keys[j]}": ' + (values[j] if values[j].isdigit() else f'"{values[j]}"') for j in order]
        return source, "{" + ", ".join(fields) + "}"

    def record_block(self, r: random.Random, **_) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < self.seq_len:
            source, target = self.record_text(r)
            src = self.tokenizer.encode(source + "\n", add_special_tokens=False)
            tgt = self.tokenizer.encode(target, add_special_tokens=False) + [self.eos]
            ids += src + tgt
            labels += [IGNORE] * len(src) + tgt  # the values are random: only the restatement is learnable
        return torch.tensor(ids[:self.seq_len]), torch.tensor(labels[:self.seq_len])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i].tolist(), "labels": self.labels[i].tolist()}


def skill_probes(curriculum: Curriculum, n: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out blocks for each of PROBES: name -> (ids, labels) [n, seq_len]."""
    return {name: curriculum.sample(kind, n, progress, seed + PROBE_SEED, **options)
            for name, (kind, progress, options) in PROBES.items()}


@torch.no_grad()
def skill_accuracy(model, probes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Greedy next-token accuracy on each probe's target tokens (copy: the repeats only; records: the
    JSON; text: every token). Near 0 on copy means no copying by content has formed yet."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for name, (ids, labels) in probes.items():
        pred = model(input_ids=ids.to(device)).logits[:, :-1].argmax(-1)  # [n, seq_len - 1]
        target = labels[:, 1:].to(device)  # the token after each position
        mask = target != IGNORE
        out[name] = round((pred == target)[mask].float().mean().item(), 4)
    model.train(was_training)
    return out


def sample_text(block: dict, tokenizer) -> str:
    """A block as text, for eyeballing what the base is taught (`smelt embedded build --show`)."""
    return tokenizer.decode(block["input_ids"])

