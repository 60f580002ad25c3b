"""Continuous batching returns each request's own tokens: greedy rows equal the same prompt decoded
alone (plain, draft, prompt lookup; eager and compiled), rows join and leave mid-flight, seeded
sampling repeats in any company, cancelled rows free their slot, and a JSON schema is always met."""
import copy
import json

import jsonschema
import pytest
import torch
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

from models.batching import Batcher, Sequence, lookup_proposal
from models.decoding import SamplingParams
from models.device import has_amx_bf16, prefill_dtype
from models.fastgen import Runner, greedy_decode
from models.structured import Constraint, SchemaError, json_grammar
from tests.models.test_fastgen import PROMPTS, noisy_copy

MAX_NEW = 20


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS + ["a b c a b c a b", "The value of the value of the"]]


@pytest.fixture(scope="module")
def alone(target, prompts):
    """Each prompt decoded by itself with smelt's single-row loop (itself checked against transformers)."""
    runner = Runner(target, 256)
    return [greedy_decode(runner, p, MAX_NEW, None).token_ids for p in prompts]


def run(batcher: Batcher, seqs: list[Sequence], stagger: int = 0) -> list[Sequence]:
    """Admit while rows are free, `stagger` steps apart; step until all have ended."""
    waiting, ended, steps = list(seqs), [], 0
    while len(ended) < len(seqs):
        if waiting and batcher.has_free_row() and (not stagger or steps % stagger == 0):
            batcher.admit(waiting.pop(0))
        ended += batcher.step()
        steps += 1
    return seqs


@pytest.mark.parametrize("strategy,compile,spec_rows", [("plain", False, 4), ("draft", False, 4), ("draft", False, 1),
                                                        ("prompt-lookup", False, 4), ("plain", True, 4), ("draft", True, 2)])
def test_greedy_rows_in_a_batch_equal_each_prompt_alone(target, prompts, alone, strategy, compile, spec_rows):
    draft = noisy_copy(target, 0.3, seed=1) if strategy == "draft" else None
    batcher = Batcher(target, None, 4, 256, strategy, draft, k=3, compile=compile, spec_rows=spec_rows)
    seqs = run(batcher, [Sequence(p, SamplingParams(MAX_NEW)) for p in prompts])
    assert [s.out for s in seqs] == alone
    if strategy != "plain":
        assert sum(s.proposed for s in seqs) > 0 and 0 <= sum(s.accepted for s in seqs) <= sum(s.proposed for s in seqs)


def test_rows_join_and_leave_mid_flight_and_long_prompts_prefill_in_chunks(target, prompts, alone):
    batcher = Batcher(target, None, 2, 256, "draft", noisy_copy(target, 0.3, seed=2), k=2, prefill_tokens=3)
    seqs = [Sequence(p, SamplingParams(MAX_NEW - i)) for i, p in enumerate(prompts)]
    run(batcher, seqs, stagger=3)
    assert [s.out for s in seqs] == [a[: MAX_NEW - i] for i, a in enumerate(alone)]
    assert all(s.finish_reason == "length" for s in seqs) and not batcher.rows and len(batcher.free) == 2


def test_seeded_sampling_repeats_in_any_company_and_seeds_differ(target, prompts):
    def sampled(seed, company):
        batcher = Batcher(target, None, 4, 256, "draft", noisy_copy(target, 0.3, seed=1), k=3)
        seq = Sequence(prompts[1], SamplingParams(MAX_NEW, temperature=0.9, top_p=0.9, seed=seed))
        others = [Sequence(p, SamplingParams(MAX_NEW, temperature=1.0)) for p in prompts[:company]]
        run(batcher, others + [seq])
        return seq.out

    assert sampled(7, 0) == sampled(7, 3)
    assert sampled(7, 0) != sampled(8, 0)


def test_a_cancelled_row_is_free_by_the_next_step(target, prompts):
    batcher = Batcher(target, None, 1, 256)
    first, second = Sequence(prompts[0], SamplingParams(200)), Sequence(prompts[1], SamplingParams(3))
    batcher.admit(first)
    batcher.step()
    assert not batcher.has_free_row()
    first.cancel()
    assert batcher.step() == [first] and first.finish_reason == "cancelled" and batcher.has_free_row()
    run(batcher, [second])
    assert len(second.out) == 3


def test_eos_ends_a_row_and_max_tokens_cut_a_verify(target, prompts, alone):
    eos = alone[0][5]  # a token the first prompt reaches at its 6th step
    batcher = Batcher(target, eos, 2, 256, "draft", noisy_copy(target, 0.0, seed=0), k=4)
    seq = run(batcher, [Sequence(prompts[0], SamplingParams(MAX_NEW))])[0]
    assert seq.out == alone[0][: alone[0].index(eos) + 1] and seq.finish_reason == "stop"
    short = run(batcher, [Sequence(prompts[1], SamplingParams(3))])[0]
    assert short.out == alone[1][:3] and short.finish_reason == "length"


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    assert lookup_proposal([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]
    assert lookup_proposal([5, 6, 7], 3) == [7, 7, 7]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "day": {"enum": ["Monday", "Friday"]}},
          "required": ["city", "qty", "day"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_json_schema_is_met_by_every_answer(target, tokenizer, prompts, temperature):
    grammar = json_grammar(SCHEMA, tokenizer)
    batcher = Batcher(target, tokenizer.eos_token_id, 4, 512, "draft", noisy_copy(target, 0.3, seed=1), k=3)
    seqs = [Sequence(prompts[i % len(prompts)], SamplingParams(300, temperature=temperature, seed=i)) for i in range(20)]
    for s in seqs:
        s.constraint = Constraint(grammar, tokenizer)
    run(batcher, seqs)
    for s in seqs:
        assert s.finish_reason == "stop" and s.out[-1] == tokenizer.eos_token_id
        jsonschema.validate(json.loads(tokenizer.decode(s.out, skip_special_tokens=True)), SCHEMA)


def test_a_schema_that_cannot_be_enforced_says_why(tokenizer):
    with pytest.raises(SchemaError, match="schema"):
        json_grammar({"type": "object", "properties": {"x": {"type": "no-such-type"}}}, tokenizer)


def test_admission_refuses_a_request_past_the_row_size(target, prompts):
    batcher = Batcher(target, None, 1, 32, "prompt-lookup", k=4)
    with pytest.raises(ValueError, match="cache slots"):
        batcher.admit(Sequence(prompts[1], SamplingParams(30)))
    assert batcher.has_free_row()


def test_a_bf16_prefill_keeps_rows_equal_alone_and_the_cache_in_the_models_dtype(target, prompts):
    """Prompts prefilled under bf16 autocast (what 'auto' picks on an AMX CPU): each row still decodes
    exactly as the same prompt alone through the same batcher, in joined and chunked prefills; the cache
    stays fp32 and the first logits stay close to an fp32 prefill's."""
    def decode(slots, seqs, **kw):
        batcher = Batcher(target, None, slots, 256, "draft", noisy_copy(target, 0.3, seed=1), k=3, prefill_dtype=torch.bfloat16, **kw)
        run(batcher, seqs, stagger=kw.get("prefill_tokens") and 2)
        return batcher, [s.out for s in seqs]

    alone_bf16 = [decode(1, [Sequence(p, SamplingParams(MAX_NEW))])[1][0] for p in prompts]
    batcher, together = decode(4, [Sequence(p, SamplingParams(MAX_NEW)) for p in prompts], prefill_tokens=5)
    assert together == alone_bf16
    assert batcher.target.cache.layers[0].keys.dtype == torch.float32

    def first_logits(dtype):
        stepper = Batcher(target, None, 1, 256, prefill_dtype=dtype).target
        return stepper.prefill([0], [prompts[0]], [0])[0]

    fp32, bf16 = first_logits(None), first_logits(torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()


def test_the_prefill_dtype_choice(target, tiny_model_dir):
    assert prefill_dtype(target, "model") is None
    assert prefill_dtype(target, "bfloat16") is torch.bfloat16
    assert prefill_dtype(target, "auto") is (torch.bfloat16 if has_amx_bf16() else None)
    quantized = copy.deepcopy(target)  # torchao's int8 layers (a tensor subclass autocast does not reach)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    assert prefill_dtype(quantized, "auto") is None
    with pytest.raises(ValueError, match="prefill_dtype 'model'"):
        prefill_dtype(quantized, "bfloat16")
