"""Evaluation stage: score every candidate on the eval split through the same loading and
decoding code that serving uses (models.candidate), for accuracy and speed."""
from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from prefect import task
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.artifacts import artifact, digest, dir_size_bytes
from models.candidate import assemble_candidate, load_candidate
from models.chat import render_context, row_context, row_messages, tokenize_conversation
from models.config import DecodeConfig
from models.decoding import Generation, SamplingParams, decode_rate
from models.device import resolve_device
from models.engine import Engine, EngineConfig
from models.measure import PeakMemory, concurrent_throughput, engine_outputs, interleaved_speeds, memory_bandwidth, weight_bytes
from models.quant import quant_meta, quantize_model
from models.structured import json_grammar
from tasks.caching import STAGE_CACHE
from tasks.config import EvalConfig
from tasks.etl import DatasetVersion
from tasks.results import EvalReport

# A candidate directory is hard links plus the recipe that assemble_candidate writes; quant_method reads
# the quantized artifact's metadata.
CANDIDATE_CODE = ("models.candidate", "models.quant")
# The reference is the base saved through the "none" quantizer, by reference_model below.
REFERENCE_CODE = ("tasks.evaluate", "models.quant")
# What the numbers of a report depend on: this stage, the loading and decoding code a candidate runs
# through (as served), the chat rendering of prompts, the timing helpers, the serving scheduler the
# concurrent throughput is measured through, the lm-eval adapter, and the report type it fills.
EVAL_CODE = ("tasks.evaluate", "tasks.results", "tasks.lm_eval_harness", "models.measure", "models.engine", "models.candidate",
             "models.decoding", "models.fastgen", "models.kvcache", "models.quant", "models.chat", "models.batching",
             "models.device", "models.int8_cpu", "models.structured")


def build_candidates(quant_dirs: dict[str, Path], draft_dir: Path | None, cfg: DecodeConfig, home: Path) -> list[Path]:
    """Every quantization method x decoding strategy this run can make (draft only with a draft)."""
    out = []
    for method, qdir in quant_dirs.items():
        for strategy in cfg.strategies:
            if strategy == "draft" and draft_dir is None:
                continue
            cand = artifact(home / "candidates", f"{method}-{strategy}", str(qdir), str(draft_dir) if strategy == "draft" else None,
                            strategy, cfg, code=CANDIDATE_CODE)
            out.append(assemble_candidate(qdir, draft_dir, strategy, cfg, cand.path))
    return out


def json_fields(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else {"": value}


def field_scores(predicted: str, expected: str) -> tuple[float, float]:
    """(field accuracy, field F1) of a JSON answer: accuracy is the share of the expected fields
    reproduced exactly; F1 also charges fields the model invented. Not JSON: (0, 0)."""
    want, got = json_fields(expected), json_fields(predicted)
    if want is None:
        same = float(predicted.strip() == expected.strip())
        return same, same
    if got is None:
        return 0.0, 0.0
    hits = sum(k in got and got[k] == v for k, v in want.items())
    recall = hits / max(1, len(want))
    precision = hits / max(1, len(got))
    return recall, (2 * precision * recall / (precision + recall) if hits else 0.0)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def score(rows: list[dict], outputs: list[Generation]) -> dict:
    exact = [o.text == r["completion"] for r, o in zip(rows, outputs)]
    fields = [field_scores(o.text, r["completion"]) for r, o in zip(rows, outputs)]
    latencies = [o.seconds for o in outputs]
    ordered = sorted(latencies)
    tokens = sum(o.new_tokens for o in outputs)
    firsts = [o.first_token_s for o in outputs if o.first_token_s is not None]
    return {
        "exact_match": sum(exact) / len(exact),
        "field_accuracy": sum(f[0] for f in fields) / len(fields),
        "field_f1": sum(f[1] for f in fields) / len(fields),
        "tokens_per_s": tokens / sum(latencies),
        "decode_tokens_per_s": decode_rate(outputs),  # leaves out the prefill
        "ttft_s": statistics.mean(firsts) if firsts else None,
        "latency_p50_s": statistics.median(ordered),
        "latency_p95_s": percentile(ordered, 0.95),
        "latencies_s": [round(x, 5) for x in latencies],
        "new_tokens": tokens,
        "samples": len(rows),
    }


@torch.inference_mode()
def completion_perplexity(model, tokenizer, rows: list[dict], max_len: int = 1024) -> float:
    """Perplexity of the expected completions given their prompts (teacher-forced, prompt masked
    exactly as in training): how well the weights that ship still model held-out answers."""
    nll, count = 0.0, 0
    for r in rows:
        ex = tokenize_conversation(tokenizer, row_messages(r), max_len)
        ids = torch.tensor([ex.input_ids], device=model.device)  # [1, seq]
        labels = torch.tensor(ex.labels[1:], device=model.device)  # [seq - 1]: token t+1 predicted at t
        logits = model(ids).logits[0, :-1].float()  # [seq - 1, vocab]
        nll += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return math.exp(nll / max(1, count))


def speed_of_memory(report: dict, model_dir: Path, device: torch.device) -> dict:
    """Effective bandwidth (weight bytes x decode tokens/s) and its share of the measured bandwidth."""
    meta = quant_meta(model_dir)
    wbytes = weight_bytes(model_dir)
    tps = report.get("decode_tokens_per_s") or report["tokens_per_s"]
    machine = memory_bandwidth(device.type)
    return {
        "weight_bytes": wbytes,
        # int4 weight-only on the CPU is stored in full precision and packed at load (see models/quant/torchao.py)
        "weight_bytes_note": "full precision on disk, quantized at load" if meta.get("quantized_at_load") else "on disk",
        "effective_bandwidth_gbs": wbytes * tps / 1e9,
        "machine_bandwidth_gbs": machine / 1e9,
        "bandwidth_share": wbytes * tps / machine,
    }


def eval_split_key(dataset: DatasetVersion, cfg: EvalConfig) -> str:
    """Names the exact eval rows and settings; numbers are comparable only under the same key."""
    return digest("eval-split", dataset.version, cfg)


def evaluate_candidates(candidate_dirs: list[Path], dataset: DatasetVersion, cfg: EvalConfig, home: Path) -> list[EvalReport]:
    """Accuracy and speed of candidates evaluated together (their speed in interleaved passes, so a
    slow minute of the machine lands on all of them); cached by the set, dataset version and config."""
    names = [Path(c).name for c in candidate_dirs]
    cache = artifact(home / "evals", "eval", names, eval_split_key(dataset, cfg), code=EVAL_CODE, suffix=".json")
    measured = cache.ensure_json(lambda: [r.model_dump(mode="json") for r in measure_candidates(candidate_dirs, dataset, cfg, home)])
    return [EvalReport.model_validate(m) for m in measured]


def evaluate_candidate(candidate_dir: Path, dataset: DatasetVersion, cfg: EvalConfig, home: Path) -> EvalReport:
    return evaluate_candidates([candidate_dir], dataset, cfg, home)[0]


def measure_candidates(candidate_dirs: list[Path], dataset: DatasetVersion, cfg: EvalConfig, home: Path) -> list[EvalReport]:
    """Each candidate's accuracy pass in turn (it stays loaded), then the speed passes over all of them."""
    rows = dataset.rows("eval")[: cfg.max_samples]
    device = resolve_device(cfg.device)
    loaded, measured = [], []
    for d in candidate_dirs:
        cand, numbers = measure_candidate(Path(d), rows, eval_split_key(dataset, cfg), cfg, home, device)
        loaded.append(cand)
        measured.append(numbers)
    timing_contexts = [row_context(r) for r in rows[: cfg.timing_prompts]]
    speeds = interleaved_speeds(loaded, timing_contexts, cfg.timing_passes)
    return [EvalReport.model_validate({**m, **s}) for m, s in zip(measured, speeds)]


def measure_candidate(candidate_dir: Path, rows: list[dict], split: str, cfg: EvalConfig, home: Path,
                      device: torch.device) -> tuple:
    """(the loaded candidate, its numbers): outputs on every eval row, latencies, memory, perplexity."""
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        cand = load_candidate(candidate_dir, device)
        load_s = time.perf_counter() - t0
        contexts = [row_context(r) for r in rows]
        cand.generate(contexts[0], max_new_tokens=4)  # warm-up of the batch-1 timing loop: one-off allocation costs
        texts = [render_context(cand.tokenizer, c) for c in contexts]
        engine = Engine(cand, EngineConfig(max_batch_size=cfg.concurrent_streams, warm_rows=1))
        try:
            # The answers scored are the service's: its engine, one request at a time (unloaded latencies),
            # with the engine's own choices (a bf16 prefill on an AMX CPU, models/device.py).
            params = SamplingParams(cand.recipe.max_new_tokens)
            engine_outputs(engine, texts[:1], [SamplingParams(4)])
            outputs = [engine_outputs(engine, [t], [params])[0]
                       for t in tqdm(texts, desc=f"evaluate {candidate_dir.name[:40]}", unit="prompt")]
            concurrent = concurrent_throughput(engine, texts, cand.recipe.max_new_tokens, cfg.concurrent_streams)
            constrained = constrained_accuracy(engine, texts, rows) if cfg.json_constrained else {}
        finally:
            engine.close()
    measured = {
        "candidate": candidate_dir.name,
        "path": str(candidate_dir),
        "quant_method": cand.recipe.quant_method,
        "strategy": cand.recipe.strategy,
        "draft_artifact": cand.recipe.draft_model,
        "eval_split": split,
        "size_bytes": dir_size_bytes(candidate_dir),
        "load_s": load_s,
        "peak_memory_bytes": memory.peak_bytes,
        "draft_acceptance": cand.draft_acceptance(contexts, outputs),
        "perplexity": completion_perplexity(cand.model, cand.tokenizer, rows),
        **score(rows, outputs),
        **concurrent,
        **constrained,
        "examples": [{"prompt": r["prompt"], "expected": r["completion"], "output": o.text} for r, o in zip(rows[:3], outputs[:3])],
    }
    measured.update(speed_of_memory(measured, candidate_dir / "model", device))
    measured["lm_eval"] = benchmark_candidate(cand, rows, cfg, home / "lm-eval" / candidate_dir.name)
    return cand, measured


def constrained_accuracy(engine: Engine, texts: list[str], rows: list[dict]) -> dict:
    """Exact match of the answers decoded under the API's `response_format: json_object` grammar."""
    grammar = json_grammar({"type": "object"}, engine.candidate.tokenizer)
    params = SamplingParams(engine.candidate.recipe.max_new_tokens, grammar=grammar)
    return {"exact_match_json": score(rows, engine_outputs(engine, texts, [params] * len(texts)))["exact_match"]}


def benchmark_candidate(cand, rows: list[dict], cfg: EvalConfig, workdir: Path) -> dict | None:
    """lm-evaluation-harness tasks on the candidate's own weights. Decoding strategies are lossless
    under greedy decoding, so only plain candidates run them (the others would repeat the numbers)."""
    if not cfg.lm_eval_tasks or cand.recipe.strategy != "plain":
        return None
    from tasks.lm_eval_harness import run_lm_eval

    return run_lm_eval(cand.model, cand.tokenizer, cfg.lm_eval_tasks, rows, cfg.lm_eval_limit, workdir,
                       max_gen_toks=cand.recipe.max_new_tokens)


def reference_model(base: str, finetuned: Path, home: Path) -> Path:
    """The base model before fine-tuning, as a full-precision artifact prompted exactly like the
    candidates (the fine-tuned tokenizer and chat template; the vocabulary is the same)."""
    def make(tmp: Path) -> None:
        source = tmp / "source"
        AutoModelForCausalLM.from_pretrained(base).save_pretrained(source)
        AutoTokenizer.from_pretrained(finetuned / "merged").save_pretrained(source)
        quantize_model("none", source, tmp / "done", [])
        shutil.rmtree(source)
    return artifact(home / "models", "reference-base", base, str(finetuned), code=REFERENCE_CODE).ensure(make)


def build_reference(base: str, finetuned: Path, cfg: DecodeConfig, home: Path) -> Path:
    """A plain-decoding candidate of the base model: what fine-tuning must beat."""
    plain = cfg.model_copy(update={"strategies": ["plain"]})
    ref = reference_model(base, finetuned, home) / "done"
    cand = artifact(home / "candidates", "base-plain", str(ref), plain, code=CANDIDATE_CODE)
    return assemble_candidate(ref, None, "plain", plain, cand.path)


@task(name="build-candidates", cache_policy=STAGE_CACHE, persist_result=True)
def build_candidates_task(quant_dirs: dict[str, Path], draft_dir: Path | None, cfg: DecodeConfig, home: str) -> list[Path]:
    return build_candidates(quant_dirs, draft_dir, cfg, Path(home))


@task(name="build-reference", cache_policy=STAGE_CACHE, persist_result=True)
def build_reference_task(base: str, finetuned: Path, cfg: DecodeConfig, home: str) -> Path:
    return build_reference(base, finetuned, cfg, Path(home))


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_task(candidate_dirs: list[Path], dataset: DatasetVersion, cfg: EvalConfig, home: str) -> list[EvalReport]:
    return evaluate_candidates(candidate_dirs, dataset, cfg, Path(home))


@task(name="evaluate-base", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_base_task(candidate_dir: Path, dataset: DatasetVersion, cfg: EvalConfig, home: str) -> EvalReport:
    return evaluate_candidate(candidate_dir, dataset, cfg, Path(home))
