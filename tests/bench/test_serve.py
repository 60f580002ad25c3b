"""The serving benchmark times real recipes on a tiny model; lossless ones give the baseline's tokens."""
import pytest

from models.quant import quantize_model
from bench.serve import bench_candidates, metric_key, table_rows

PROMPTS = ["Extract name, city, item, qty and day as JSON.\nBob from Oslo ordered 3 cups on Monday.",
           "Extract name, city, item, qty and day as JSON.\nOn Friday, Lena bought 12 maps in Lima."]


@pytest.fixture(scope="module")
def fp32_artifact(tiny_model_dir, tmp_path_factory):
    return quantize_model("none", tiny_model_dir, tmp_path_factory.mktemp("none") / "model", [])


def test_bench_times_every_recipe_and_lossless_ones_match_the_baseline(fp32_artifact, tiny_draft_dir):
    result = bench_candidates({"none": fp32_artifact}, tiny_draft_dir, PROMPTS, max_new_tokens=12, streams=3,
                              num_draft_tokens=3, passes=2, echo=lambda *_: None)
    rows = {r["recipe"]: r for r in result["rows"]}
    assert list(rows) == ["baseline: fp32 · transformers generate", "fp32 · compiled", "fp32 · compiled+draft", "fp32 · hf+draft"]
    assert result["machine_bandwidth_gbs"] > 0 and result["passes"] == 2
    for r in rows.values():
        assert r["same_tokens_as_baseline"] == len(PROMPTS), r["recipe"]  # every recipe here is lossless
        assert r["decode_tokens_per_s"] > 0 and 0 < r["ttft_s"] and r["weight_bytes"] > 0
        assert r["effective_bandwidth_gbs"] == pytest.approx(r["weight_bytes"] * r["decode_tokens_per_s"] / 1e9)
    assert rows["fp32 · compiled"]["concurrency"] == "batched" and rows["fp32 · compiled"]["concurrent_tokens_per_s"] > 0
    assert 0 <= rows["fp32 · compiled+draft"]["draft_acceptance"] <= 1
    assert rows["fp32 · compiled"]["draft_acceptance"] is None
    cells = table_rows(result["rows"])
    assert len(cells) == 5 and all(len(c) == len(cells[0]) for c in cells)


def test_metric_keys_are_valid_mlflow_names():
    assert metric_key("baseline: fp32 · transformers generate", "speedup") == "baseline.fp32.transformers_generate.speedup"
    assert metric_key("torchao-int8-dyn · compiled+draft", "ttft_s") == "torchao-int8-dyn.compiled_draft.ttft_s"
