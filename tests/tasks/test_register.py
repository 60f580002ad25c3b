from tasks.config import RegistryConfig
from tasks.register import select_challenger, version_tags

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


def test_version_tags_carry_lineage_identity_and_gate_numbers():
    lineage = {"smelt.dataset_version": "d1", "smelt.config_hash": "c1", "smelt.git_commit": "abc"}
    r = {**report(0.5, 120.0), "candidate": "none-plain-x", "quant_method": "none", "strategy": "plain",
         "eval_split": "s1", "draft_acceptance": None, "size_bytes": 10, "latency_p50_s": 0.1, "latency_p95_s": 0.2}
    tags = version_tags(r, lineage)
    assert tags["smelt.dataset_version"] == "d1" and tags["smelt.git_commit"] == "abc"
    assert tags["smelt.exact_match"] == "0.5" and tags["smelt.tokens_per_s"] == "120.0"
    assert tags["smelt.eval_split"] == "s1" and tags["smelt.draft_artifact"] == "none"
    assert all(isinstance(v, str) for v in tags.values())
