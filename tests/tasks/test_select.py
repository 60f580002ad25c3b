import pytest

from tasks.config import SelectConfig
from tasks.results import EvalReport
from tasks.select import select_candidate


def cand(name, quant, strategy, em, tps, f1=0.5):
    return EvalReport(candidate=name, quant_method=quant, strategy=strategy, exact_match=em, field_f1=f1,
                      tokens_per_s=tps, decode_tokens_per_s=tps * 1.1, concurrent_tokens_per_s=tps * 3)


BASE = cand("base", "none", "plain", 0.10, 100)
REPORTS = [
    cand("fp-plain", "none", "plain", 0.80, 100),
    cand("fp-draft", "none", "draft", 0.80, 180),
    cand("int8-plain", "torchao-int8-dyn", "plain", 0.795, 150),
    cand("int4-draft", "gptq-int4", "draft", 0.76, 400),  # fastest, but 4 points worse: rejected
]


def test_default_policy_picks_the_fastest_within_one_point_of_full_precision():
    sel = select_candidate(REPORTS, BASE, SelectConfig())
    assert sel.chosen == 1 and sel.accepted == [0, 1, 2]
    assert sel.reasons[1].startswith("chosen: fastest")
    assert sel.reasons[3] == ("rejected: exact_match 76.0% is more than 1.0% below the full-precision fine-tuned "
                                 "model's 80.0%")
    assert sel.reasons[2].startswith("accepted, not chosen: exact_match 79.5%, 150 tokens_per_s vs the chosen 180")
    assert sel.reference == "fp-plain" and sel.base == "base"


def test_a_wider_margin_lets_the_fast_quantized_candidate_win():
    assert select_candidate(REPORTS, BASE, SelectConfig(max_accuracy_drop=0.05)).chosen == 3


def test_most_accurate_policy_and_other_speed_metrics():
    assert select_candidate(REPORTS, BASE, SelectConfig(policy="most-accurate")).chosen == 1  # tie on 80%: faster
    sel = select_candidate(REPORTS, BASE, SelectConfig(speed_metric="concurrent_tokens_per_s", max_accuracy_drop=0.05))
    assert sel.chosen == 3 and "concurrent_tokens_per_s" in sel.reasons[3]


def test_nothing_is_chosen_when_fine_tuning_did_not_beat_the_base():
    base = cand("base", "none", "plain", 0.85, 100)
    sel = select_candidate(REPORTS, base, SelectConfig())
    assert sel.chosen is None and sel.accepted == []
    assert all("not above the base model's 85.0%" in r for r in sel.reasons)
    # the check can be turned off
    assert select_candidate(REPORTS, base, SelectConfig(require_above_base=False)).chosen == 1


def test_the_metric_is_configurable():
    reports = [cand("fp", "none", "plain", 0.0, 100, f1=0.6), cand("q", "gptq-int4", "plain", 0.0, 300, f1=0.2)]
    base = cand("base", "none", "plain", 0.0, 100, f1=0.0)
    assert select_candidate(reports, base, SelectConfig()).chosen is None  # exact match 0% everywhere: nothing beats the base
    sel = select_candidate(reports, base, SelectConfig(metric="field_f1"))
    assert sel.chosen == 0 and sel.reasons[1].startswith("rejected: field_f1 20.0% is more than")


def test_selection_needs_the_full_precision_reference():
    with pytest.raises(ValueError, match="add 'none' to quant.methods"):
        select_candidate([cand("q", "gptq-int4", "plain", 0.5, 100)], BASE, SelectConfig())


def timed(name, quant, strategy, em, tps, spread, weights):
    r = cand(name, quant, strategy, em, tps)
    return r.model_copy(update={"tokens_per_s_spread": spread, "weight_bytes": weights})


def test_speeds_within_the_timing_spread_are_a_tie_that_goes_to_accuracy_then_size():
    reports = [timed("fp-plain", "none", "plain", 0.80, 100, 0.02, 40),
               timed("fp-draft", "none", "draft", 0.80, 210, 0.08, 40),      # fastest median...
               timed("int8-draft", "torchao-int8-dyn", "draft", 0.80, 200, 0.03, 10)]  # ...but within its 8% spread
    sel = select_candidate(reports, BASE, SelectConfig())
    assert sel.chosen == 2, sel.reasons
    assert "within timing noise" in sel.reasons[2] and "within timing noise of the chosen, and larger" in sel.reasons[1]
    # the same medians measured without noise: the faster one wins outright
    quiet = [r.model_copy(update={"tokens_per_s_spread": 0.01}) for r in reports]
    assert select_candidate(quiet, BASE, SelectConfig()).chosen == 1
    # a tie never overrides accuracy: the more accurate of two tied candidates wins
    reports[1] = reports[1].model_copy(update={"exact_match": 0.81})
    assert select_candidate(reports, BASE, SelectConfig()).chosen == 1
    assert "within timing noise of the chosen, and less accurate" in select_candidate(reports, BASE, SelectConfig()).reasons[2]


def test_a_tie_between_equals_says_the_median_decided_and_could_flip():
    reports = [timed("fp-plain", "none", "plain", 0.80, 100, 0.02, 40),
               timed("int8-plain", "torchao-int8-wo", "plain", 0.80, 190, 0.2, 10),
               timed("int8-draft", "torchao-int8-wo", "draft", 0.80, 200, 0.2, 10)]
    sel = select_candidate(reports, BASE, SelectConfig())
    assert sel.chosen == 2
    assert "as accurate and as large, with a slower median (a rerun could flip this)" in sel.reasons[1]
