"""Typed results: every metric is declared once, and the tables, MLflow numbers and listings read it."""
from typing import Annotated, Optional

import pytest
from pydantic import ValidationError

from tasks.promote import listed_tags
from tasks.report import candidate_rows
from tasks.results import EvalReport, Metric, RegistryResult


def report(**fields) -> EvalReport:
    return EvalReport(**{"candidate": "c", "quant_method": "none", "strategy": "plain", **fields})


REGISTRY = RegistryResult(name="m", versions=["1"], chosen=0, reasons=["chosen: fastest"], challenger="1", promoted=True,
                          gate_reason="no champion yet", champion="1")


def test_table_and_summary_columns_come_from_the_declarations_in_order():
    rows = candidate_rows([report(exact_match=0.75, tokens_per_s=812.4, ttft_s=0.0123, weight_bytes=10_400_000)], REGISTRY)
    assert list(rows[0]) == ["version", "quant", "decoding", "exact match", "field F1", "ppl", "EM json-constrained", "tok/s",
                             "± spread", "decode tok/s",
                             "TTFT ms", "p50 s", "p95 s", "8-stream tok/s", "draft accept", "weights MB", "BW share",
                             "peak mem MB", "chosen", "why"]
    assert rows[0]["exact match"] == "75.0%" and rows[0]["tok/s"] == "812" and rows[0]["TTFT ms"] == "12.3"
    assert rows[0]["weights MB"] == "10.40" and rows[0]["draft accept"] == "-"  # unmeasured: a dash
    summary = candidate_rows([report()], REGISTRY, report(candidate="base"), which="summary")
    assert list(summary[0]) == ["version", "quant", "decoding", "exact match", "field F1", "ppl", "tok/s", "± spread", "TTFT ms",
                                "8-stream tok/s", "draft accept", "weights MB", "chosen", "why"]
    assert summary[1]["version"] == "base" and summary[1]["chosen"] == "-"


def test_tracked_numbers_skip_unmeasured_metrics_and_listing_reads_the_listed_ones():
    numbers = report(exact_match=0.5, tokens_per_s=100.0, size_bytes=7).tracked_numbers()
    assert numbers["exact_match"] == 0.5 and numbers["size_bytes"] == 7.0 and "draft_acceptance" not in numbers
    assert listed_tags()[:3] == ["exact_match", "field_accuracy", "tokens_per_s"]


def test_a_metric_added_to_a_report_type_reaches_every_reader():
    class Wider(EvalReport):
        tokens_per_joule: Annotated[Optional[float], Metric("tok/J", "{:.1f}", table=True, listed=True)] = None

    wide = Wider(candidate="c", quant_method="none", strategy="plain", tokens_per_joule=12.34)
    assert wide.cells()["tok/J"] == "12.3" and wide.tracked_numbers()["tokens_per_joule"] == pytest.approx(12.34)
    assert "tokens_per_joule" not in EvalReport.metrics()  # the base declaration is untouched


def test_a_report_refuses_unknown_keys_and_reads_back_its_own_json():
    r = report(exact_match=0.5, latencies_s=[0.1, 0.2])
    assert EvalReport.model_validate(r.model_dump(mode="json")) == r
    with pytest.raises(ValidationError, match="exact_matchh"):
        EvalReport.model_validate({**r.model_dump(), "exact_matchh": 1.0})


def test_the_bench_table_shares_the_evaluation_metrics_declarations():
    from bench.serve import table_rows

    row = {"recipe": "fp32 · compiled", "weights": "fp32", "loop": "compiled", "decode_tokens_per_s": 500.0, "speedup": 3.2,
           "ttft_s": 0.004, "draft_acceptance": None, "weight_bytes": 10_000_000, "effective_bandwidth_gbs": 5.0,
           "bandwidth_share": 0.1, "concurrent_tokens_per_s": 900.0, "concurrency_gain": 1.8, "warmup_s": 20.0,
           "same_tokens_as_baseline": 8, "tokens_per_s": 480.0}
    head, cells = table_rows([row])
    assert head == ["recipe", "decode tok/s", "x baseline", "TTFT ms", "draft accept", "weights MB", "GB/s", "BW share",
                    "8-stream tok/s", "x 1 stream", "warm-up s", "same tokens"]
    for key in ("decode_tokens_per_s", "ttft_s", "draft_acceptance", "weight_bytes", "bandwidth_share"):
        assert EvalReport.metric(key).label in head  # one declaration, one label, in both tables
    assert cells[1:4] == ["500", "3.20", "4.0"]
