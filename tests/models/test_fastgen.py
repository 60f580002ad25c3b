"""smelt's static-cache decode loop returns exactly transformers' greedy tokens: plain, speculative
(whatever the draft proposes), and compiled."""
import copy
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.fastgen import CompiledDecoder, Runner, greedy_decode, speculative_decode

PROMPTS = ["Return the value of the", "Extract name, city, item, qty and day as JSON.\nBob from Oslo ordered 3 cups.",
           "x", "The module provides"]
MAX_NEW = 24


def reference(model, prompt_ids: list[int], eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def noisy_copy(model, scale: float, seed: int):
    """A draft that agrees with the target often but not always."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return draft


def eos_of(ref: list[int]) -> int:
    """A token the reference emits mid-way, used as EOS so the stop path is exercised."""
    return ref[len(ref) // 2]


def assert_cache_holds(runner: Runner, history: list[int]) -> None:
    """The cache's keys for `history` are the ones a fresh prefill of it writes: every kept token sits
    at its own slot. (Rejected draft tokens written to the wrong slots can leave a tiny random
    model's greedy output unchanged, so the output alone is not proof.)"""
    fresh = Runner(runner.model, runner.max_len)
    fresh.prefill([history])
    for ours, theirs in zip(runner.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(ours.keys[:, :, : len(history)], theirs.keys[:, :, : len(history)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_decode_matches_generate(target, tokenizer, with_eos):
    runner = Runner(target, max_len=128)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        eos = eos_of(reference(target, ids, None)) if with_eos else None
        want = reference(target, ids, eos)
        got = greedy_decode(runner, ids, MAX_NEW, eos)
        assert got.token_ids == want, prompt
        assert got.first_token_s <= got.seconds


def test_speculative_decode_is_lossless_whatever_the_draft(target, tokenizer, tiny_draft_dir):
    drafts = {"itself": target, "noisy": noisy_copy(target, 1.5, seed=3),
              "unrelated": AutoModelForCausalLM.from_pretrained(tiny_draft_dir).eval()}
    rates = {}
    for name, draft in drafts.items():
        t, d = Runner(target, max_len=128), Runner(draft, max_len=128)
        proposed = accepted = 0
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            for eos in (None, eos_of(reference(target, ids, None))):
                got = speculative_decode(t, d, ids, MAX_NEW, eos, k=4)
                assert got.token_ids == reference(target, ids, eos), (name, prompt, eos)
                assert_cache_holds(t, ids + got.token_ids[:-1])
                proposed, accepted = proposed + got.proposed, accepted + got.accepted
        rates[name] = accepted / proposed
    assert rates["itself"] == 1.0  # the target proposing for itself is always right
    assert 0 < rates["noisy"] < 1  # partial acceptance: the rollback path ran
    assert rates["unrelated"] < rates["noisy"]


def test_compiled_paths_match_generate(target, tokenizer):
    draft = noisy_copy(target, 1.5, seed=3)
    t, d = Runner(target, max_len=96, compile=True), Runner(draft, max_len=96, compile=True)
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt)["input_ids"]
        want = reference(target, ids, None)
        assert greedy_decode(t, ids, MAX_NEW, None).token_ids == want
        assert speculative_decode(t, d, ids, MAX_NEW, None, k=4).token_ids == want


def test_a_built_decoder_is_exempt_from_later_garbage_collections(target, tokenizer):
    # A full collection walking everything compiling leaves behind took ~1 s inside one request in ~20;
    # after building a runner the decoder collects once and freezes what is alive, so later
    # collections never walk the runner, its model or its graphs.
    gc.unfreeze()
    fast = CompiledDecoder(target, tokenizer)
    fast.decode([1, 2, 3], 2, None)
    runner = next(iter(fast.runners.values()))
    assert gc.get_freeze_count() > 0
    assert not any(o is runner or o is runner.cache for o in gc.get_objects())  # only unfrozen objects are listed


def test_a_prompt_too_long_for_the_cache_is_refused(target, tokenizer):
    with pytest.raises(ValueError, match=r"needs 40 cache positions; the static cache has 32"):
        greedy_decode(Runner(target, max_len=32), list(range(16)), 24, None)


def test_the_cache_writes_only_the_slots_it_is_given(target):
    # The write position is the loop's to choose: a forward at slots 8 and 9 leaves 3..7 untouched.
    runner = Runner(target, max_len=16)
    runner.prefill([[5, 6, 7]])
    with torch.inference_mode():
        runner.run(torch.tensor([[8, 9]]), 8)
    for layer in runner.cache.layers:
        written = layer.keys.abs().sum(dim=(0, 1, 3)) != 0  # [max_len]
        assert written.tolist() == [i < 3 or i in (8, 9) for i in range(16)]


def test_the_cache_refuses_layers_it_cannot_hold():
    from transformers import Qwen2Config

    from models.kvcache import SlotCache

    config = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match=r"full-attention layers only, not \['sliding_attention'\]"):
        SlotCache(config, 32)
