"""The pretraining curriculum (models/curriculum.py): what each kind of block teaches, and that it
is fresh, deterministic and masked where the next token cannot be known."""
import json

import pytest
import torch

from models.config import CurriculumMix
from models.curriculum import IGNORE, PROBES, Curriculum, skill_accuracy, skill_probes, word_ids


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def text(tok):
    return tok(" ".join(f"function number {i} returns a value for the caller." for i in range(200)),
               add_special_tokens=False)["input_ids"]


def only(kind: str) -> CurriculumMix:
    return CurriculumMix(**{k: float(k == kind) for k in ("text", "copy_spans", "records")})


def test_copy_blocks_repeat_random_words_and_learn_only_the_second_sighting(tok, text):
    c = Curriculum(text, tok, 256, 20, only("copy_spans"), seed=0)
    words = set(word_ids(tok))
    repeats = 0
    for ids, labels in zip(c.ids, c.labels):
        row, masked = ids.tolist(), (labels == IGNORE).nonzero().flatten().tolist()
        assert masked, "the first sighting of a run is not a target"
        runs, start = [], masked[0]  # maximal masked stretches: (start, tokens)
        for a, b in zip(masked, masked[1:] + [None]):
            if b != a + 1:
                runs.append((start, row[start:a + 1]))
                start = b
        for start, span in runs:
            assert set(span[::2]) <= words  # word, space, word... or words back to back
            later = [i for i in range(start + len(span), len(row) - len(span) + 1)
                     if row[i:i + len(span)] == span and labels[i] != IGNORE]
            # the run comes again later as a target, unless the block ends first (its last episode is cut)
            assert later or (start, span) == runs[-1]
            repeats += bool(later)
            if later:
                assert later[0] - start - len(span) <= 48  # at most 48 tokens of text between
    assert repeats >= 20


def test_record_blocks_restate_the_source_as_json_with_only_the_json_as_target(tok, text):
    c = Curriculum(text, tok, 128, 4, only("records"), seed=1)
    ids, labels = c.ids[0], c.labels[0]
    first_record = tok.decode(ids.tolist()).split(tok.bos_token)[0]
    source, restated = first_record.rsplit("\n", 1)
    fields = json.loads(restated)
    for key, value in fields.items():
        assert key in source and str(value) in source  # every value is found in the source, by its key
    targets = tok.decode([t for t in labels.tolist() if t != IGNORE])
    assert targets.startswith(restated)  # the source is context, the JSON is what is learnt


def test_blocks_are_fresh_deterministic_and_mixed_as_asked(tok, text):
    a = Curriculum(text, tok, 64, 60, CurriculumMix(), seed=3)
    b = Curriculum(text, tok, 64, 60, CurriculumMix(), seed=3)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)  # a resumed run sees the same blocks
    assert a.ids.shape == (60, 64) and set(a.kinds) == {"text", "copy", "records"}
    copies = [i for i, k in enumerate(a.kinds) if k == "copy"]
    assert len({tuple(a.ids[i].tolist()) for i in copies}) == len(copies)  # no copy block repeats
    assert not torch.equal(Curriculum(text, tok, 64, 60, CurriculumMix(), seed=4).ids, a.ids)
    with pytest.raises(ValueError, match="every share is zero"):
        Curriculum(text, tok, 64, 2, CurriculumMix(text=0, copy_spans=0, records=0), seed=0)


def test_copy_runs_start_back_to_back_and_gain_text_between_and_spaces_later(tok, text):
    c = Curriculum(text, tok, 256, 40, only("copy_spans"), seed=2)

    def episodes(i):
        row, labels = c.ids[i].tolist(), c.labels[i].tolist()
        starts = [k for k in range(len(row)) if labels[k] == IGNORE and (k == 0 or labels[k - 1] != IGNORE)]
        out = []
        for k in starts:
            n = next((j for j in range(k, len(row)) if labels[j] != IGNORE), len(row)) - k
            out.append((row[k:k + n], row[k + n:k + 2 * n]))
        return out

    first = episodes(0)
    assert all(run == again for run, again in first[:-1])  # the repeat follows at once...
    assert all(c.space not in run for run, _ in first)  # ...and the words are back to back
    late = [e for i in range(30, 40) for e in episodes(i)[:-1]]
    assert any(run != again for run, again in late)  # text between the sightings
    assert any(c.space in run for run, _ in late)  # spaced runs


class Oracle(torch.nn.Module):
    """Predicts the true next token everywhere (it reads ahead): a model that has every skill."""

    def __init__(self, vocab: int, cheat: bool):
        super().__init__()
        self.vocab, self.cheat = vocab, cheat
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1) if self.cheat else torch.zeros_like(input_ids)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


def test_skill_probes_are_held_out_and_score_only_what_each_skill_targets(tok, text):
    c = Curriculum(text, tok, 128, 30, CurriculumMix(), seed=0)
    probes = skill_probes(c, n=4, seed=0)
    assert set(probes) == set(PROBES)
    training = {tuple(row.tolist()) for row in c.ids}
    for ids, labels in probes.values():
        assert ids.shape == labels.shape == (4, 128)
        assert not {tuple(row.tolist()) for row in ids} & training  # never a block pretraining sees
    adjacent_ids, adjacent_labels = probes["copy_adjacent"]
    apart_ids, apart_labels = probes["copy_apart"]
    # back to back: every target is a repeat (or its EOS); apart: the text between is not scored
    assert (apart_labels != IGNORE).sum() < (apart_ids != IGNORE).sum() / 2
    # only the repeated words: a space inside a spaced run is predictable without copying
    scored = torch.cat([adjacent_labels[adjacent_labels != IGNORE], apart_labels[apart_labels != IGNORE]])
    assert set(scored.tolist()) <= set(c.words)
    vocab = len(tok)
    assert skill_accuracy(Oracle(vocab, cheat=True), probes) == {name: 1.0 for name in PROBES}
    assert all(v < 0.2 for v in skill_accuracy(Oracle(vocab, cheat=False), probes).values())
