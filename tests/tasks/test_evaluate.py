import json
import math
import statistics
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.candidate import assemble_candidate, load_candidate
from models.chat import tokenize_example
from models.config import DecodeConfig
from models.quant import quantize_model
from tasks.config import EtlConfig, EvalConfig
from tasks.etl import build_dataset
from tasks.evaluate import build_reference, completion_perplexity, evaluate_candidate, field_scores
from models.measure import PeakMemory, concurrent_throughput, interleaved_speeds, memory_bandwidth


@pytest.mark.parametrize("predicted, expected, scores", [
    ('{"a": 1, "b": 2}', '{"a": 1, "b": 2}', (1.0, 1.0)),
    ('{"a": 1, "b": 3}', '{"a": 1, "b": 2}', (0.5, 0.5)),
    ('{"a": 1, "b": 2, "c": 9, "d": 9}', '{"a": 1, "b": 2}', (1.0, 2 * 0.5 * 1.0 / 1.5)),  # invented fields cost F1
    ('{"a": 1}', '{"a": 1, "b": 2}', (0.5, 2 * 1.0 * 0.5 / 1.5)),
    ('not json', '{"a": 1}', (0.0, 0.0)),
    ('[1, 2]', '{"a": 1}', (0.0, 0.0)),
    ('plain answer', 'plain answer', (1.0, 1.0)),
])
def test_field_scores(predicted, expected, scores):
    assert field_scores(predicted, expected) == pytest.approx(scores)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("eval-home")
    src = home / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Order {i}: {i % 5} cups to Oslo.", "completion": json.dumps({"qty": i % 5})})
                           + "\n" for i in range(80)))
    dataset = build_dataset(EtlConfig(sources=[str(src)], eval_fraction=0.2, max_tokens=256), home, str(tiny_model_dir))
    quantize_model("none", tiny_model_dir, home / "q", [])
    cand = assemble_candidate(home / "q", None, "plain", DecodeConfig(max_new_tokens=6), home / "candidates" / "none-plain")
    return home, dataset, cand


def test_perplexity_matches_the_models_own_loss(setup, tiny_model_dir):
    _, dataset, _ = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = dataset.rows("eval")[0]
    ex = tokenize_example(tok, row["prompt"], row["completion"], 1024)
    with torch.inference_mode():
        loss = model(torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss.item()  # mean over answer tokens
    assert completion_perplexity(model, tok, [row]) == pytest.approx(math.exp(loss), rel=1e-4)


def test_evaluation_reports_accuracy_speed_memory_and_bandwidth(setup):
    home, dataset, cand = setup
    report = evaluate_candidate(cand, dataset, EvalConfig(max_samples=5, device="cpu", concurrent_streams=4), home)
    assert report.samples == 5 and len(report.latencies_s) == 5
    assert 0 <= report.exact_match <= report.field_accuracy <= 1 and 0 <= report.field_f1 <= 1
    assert report.perplexity > 1
    assert 0 < report.ttft_s < report.latency_p50_s <= report.latency_p95_s
    assert report.decode_tokens_per_s > 0 and report.concurrent_tokens_per_s > 0 and report.concurrent_streams == 4
    assert report.weight_bytes == (cand / "model" / "model.safetensors").stat().st_size
    assert report.bandwidth_share == pytest.approx(report.weight_bytes * report.decode_tokens_per_s
                                                      / (report.machine_bandwidth_gbs * 1e9))
    assert report.peak_memory_bytes >= 0 and report.load_s > 0
    assert report.lm_eval is None  # none asked for


def test_the_answers_scored_are_the_serving_engines(setup):
    """Evaluation scores what the service answers: the same engine (with its prefill dtype), the same text."""
    from models.chat import render_context, row_context
    from models.decoding import SamplingParams
    from models.engine import Engine, EngineConfig
    from models.measure import engine_outputs

    home, dataset, cand = setup
    report = evaluate_candidate(cand, dataset, EvalConfig(max_samples=5, device="cpu", concurrent_streams=4), home)
    loaded = load_candidate(cand, torch.device("cpu"))
    rows = dataset.rows("eval")[:3]
    engine = Engine(loaded, EngineConfig(max_batch_size=2, warm_rows=1))
    try:
        served = engine_outputs(engine, [render_context(loaded.tokenizer, row_context(r)) for r in rows],
                                [SamplingParams(loaded.recipe.max_new_tokens)] * len(rows))
    finally:
        engine.close()
    assert [e["output"] for e in report.examples] == [g.text for g in served]


def test_speed_is_the_median_of_interleaved_timing_passes_with_its_spread(setup):
    home, dataset, cand = setup
    cfg = EvalConfig(max_samples=4, device="cpu", concurrent_streams=2, timing_passes=3, timing_prompts=2)
    report = evaluate_candidate(cand, dataset, cfg, home)
    passes = report.tokens_per_s_passes
    assert len(passes) == 3 and all(p > 0 for p in passes)
    assert report.tokens_per_s == pytest.approx(statistics.median(passes), rel=1e-3)
    assert report.tokens_per_s_spread == pytest.approx((max(passes) - min(passes)) / statistics.median(passes), rel=1e-2)


def test_timing_rounds_visit_every_candidate_in_a_rotated_order(setup):
    _, dataset, cand = setup
    loaded = [load_candidate(cand, torch.device("cpu")) for _ in range(3)]
    calls = []
    for i, c in enumerate(loaded):
        c.generate = (lambda original, i: lambda ctx: (calls.append(i), original(ctx))[1])(c.generate, i)
    out = interleaved_speeds(loaded, ["Order 1: 1 cups to Oslo."], passes=3)
    assert calls == [0, 1, 2, 1, 2, 0, 2, 0, 1]  # each round starts one later: no candidate always runs first
    assert [len(o["tokens_per_s_passes"]) for o in out] == [3, 3, 3]


def test_the_base_reference_is_the_base_weights_prompted_like_the_candidates(setup, tiny_model_dir, tmp_path):
    home, _, _ = setup
    finetuned = tmp_path / "ft"
    # a "fine-tuned" model with a different chat template: the reference must take the fine-tune's tokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    tok.save_pretrained(finetuned / "merged")
    ref = build_reference(str(tiny_model_dir), finetuned, DecodeConfig(max_new_tokens=4), home)
    loaded = load_candidate(ref, torch.device("cpu"))
    assert loaded.recipe.strategy == "plain" and loaded.recipe.quant_method == "none"
    assert loaded.tokenizer.chat_template == tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), loaded.model.state_dict().values()))


def test_concurrent_requests_go_through_the_serving_engine_which_is_then_closed(setup):
    from models.engine import Engine, EngineConfig

    _, _, cand = setup
    loaded = load_candidate(cand, torch.device("cpu"))
    before = {t.name for t in threading.enumerate()}
    engine = Engine(loaded, EngineConfig(max_batch_size=8, warm_rows=1))
    try:
        out = concurrent_throughput(engine, ["a", "b", "c"], max_new_tokens=5, streams=8)
    finally:
        engine.close()
    assert out["concurrent_streams"] == 8 and out["concurrent_tokens_per_s"] > 0
    assert engine.batcher.steps > 0 and not engine.batcher.rows  # decoded in the running batch, every row freed
    assert "smelt-engine" not in {t.name for t in threading.enumerate()} - before  # no engine thread left behind


def test_peak_memory_sees_a_large_allocation_and_bandwidth_is_plausible():
    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
    del block
    assert mem.peak_bytes >= 48 * 2**20
    assert 1e9 < memory_bandwidth("cpu") < 2e12  # bytes/s: between 1 GB/s and 2 TB/s
