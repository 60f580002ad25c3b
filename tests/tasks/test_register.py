from tasks.config import RegistryConfig
from tasks.register import gate, select_challenger

CFG = RegistryConfig(accuracy_tolerance=0.02, speed_margin=0.10, min_accuracy_gain_to_trade_speed=0.02)


def report(em, tps, fa=0.5):
    return {"exact_match": em, "tokens_per_s": tps, "field_accuracy": fa}


def test_challenger_is_the_fastest_within_the_accuracy_margin():
    reports = [report(0.90, 100), report(0.89, 300), report(0.70, 900)]
    d = select_challenger(reports, CFG)
    assert d.chosen == 1
    assert d.reasons[0].startswith("slower") and d.reasons[2].startswith("exact match 70.0% below")


def test_challenger_is_the_most_accurate_when_the_fast_one_is_worse():
    assert select_challenger([report(0.90, 100), report(0.50, 900)], CFG).chosen == 0


def test_gate_promotes_only_when_not_less_accurate_and_not_slower():
    champ = {"exact_match": 0.80, "tokens_per_s": 200.0}
    assert gate(report(0.80, 200), None, CFG) == (True, "no champion yet")
    assert gate(report(0.79, 185), champ, CFG)[0]
    ok, why = gate(report(0.70, 400), champ, CFG)
    assert not ok and "exact match 0.700 < champion 0.800" in why
    ok, why = gate(report(0.95, 150), champ, CFG)
    assert not ok and "150.0 tok/s < champion 200.0" in why
