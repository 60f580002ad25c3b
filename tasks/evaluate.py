"""Evaluation stage: score every candidate on the eval split through the same loading and
decoding code that serving uses (models.candidate), for accuracy and speed."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from prefect import task
from tqdm.auto import tqdm

from models.artifacts import digest, dir_size_bytes, read_json, write_json
from models.candidate import assemble_candidate, load_candidate
from models.config import DecodeConfig
from models.device import resolve_device
from tasks.caching import STAGE_CACHE
from tasks.config import EvalConfig
from tasks.etl import DatasetVersion


def build_candidates(quant_dirs: dict[str, Path], draft_dir: Path | None, cfg: DecodeConfig, home: Path) -> list[Path]:
    """Every quantization method x decoding strategy this run can make (draft only with a draft)."""
    out = []
    for method, qdir in quant_dirs.items():
        for strategy in cfg.strategies:
            if strategy == "draft" and draft_dir is None:
                continue
            key = digest("cand-v2", str(qdir), str(draft_dir) if strategy == "draft" else None, strategy, cfg)
            out.append(assemble_candidate(qdir, draft_dir, strategy, cfg, home / "candidates" / f"{method}-{strategy}-{key}"))
    return out


def field_accuracy(predicted: str, expected: str) -> float:
    """Share of the expected JSON's fields reproduced exactly (0 if the output is not a JSON object)."""
    try:
        want = json.loads(expected)
        got = json.loads(predicted)
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(want, dict):
        return float(got == want)
    if not isinstance(got, dict):
        return 0.0
    return sum(got.get(k) == v for k, v in want.items()) / max(1, len(want))


def score(rows: list[dict], outputs: list) -> dict:
    exact = [o.text == r["completion"] for r, o in zip(rows, outputs)]
    fields = [field_accuracy(o.text, r["completion"]) for r, o in zip(rows, outputs)]
    latencies = sorted(o.seconds for o in outputs)
    tokens = sum(o.new_tokens for o in outputs)
    return {
        "exact_match": sum(exact) / len(exact),
        "field_accuracy": sum(fields) / len(fields),
        "tokens_per_s": tokens / sum(latencies),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "new_tokens": tokens,
        "samples": len(rows),
    }


def eval_split_key(dataset: DatasetVersion, cfg: EvalConfig) -> str:
    """Names the exact eval rows and settings; numbers are comparable only under the same key."""
    return digest("eval-split", dataset.version, cfg)


def evaluate_candidate(candidate_dir: Path, dataset: DatasetVersion, cfg: EvalConfig, home: Path) -> dict:
    """Accuracy and speed of one candidate; cached by candidate, dataset version and config."""
    cache = home / "evals" / f"{digest('eval-v3', candidate_dir.name, eval_split_key(dataset, cfg))}.json"
    if cache.exists():
        return read_json(cache)
    rows = dataset.rows("eval")[: cfg.max_samples]
    cand = load_candidate(candidate_dir, resolve_device(cfg.device))
    cand.generate(rows[0]["prompt"], max_new_tokens=4)  # warm-up: first call pays one-off allocation costs
    outputs = [cand.generate(r["prompt"]) for r in tqdm(rows, desc=f"evaluate {candidate_dir.name[:40]}", unit="prompt")]
    report = {
        "candidate": candidate_dir.name,
        "path": str(candidate_dir),
        "quant_method": cand.recipe["quant_method"],
        "strategy": cand.recipe["strategy"],
        "draft_artifact": cand.recipe.get("draft_model"),
        "eval_split": eval_split_key(dataset, cfg),
        "size_bytes": dir_size_bytes(candidate_dir),
        "draft_acceptance": cand.draft_acceptance([r["prompt"] for r in rows], outputs),
        **score(rows, outputs),
        "examples": [{"prompt": r["prompt"], "expected": r["completion"], "output": o.text} for r, o in zip(rows[:3], outputs[:3])],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, report)
    return report


@task(name="build-candidates", cache_policy=STAGE_CACHE, persist_result=True)
def build_candidates_task(quant_dirs: dict[str, Path], draft_dir: Path | None, cfg: DecodeConfig, home: str) -> list[Path]:
    return build_candidates(quant_dirs, draft_dir, cfg, Path(home))


@task(name="evaluate", cache_policy=STAGE_CACHE, persist_result=True, task_run_name="evaluate-{candidate_dir.name}")
def evaluate_task(candidate_dir: Path, dataset: DatasetVersion, cfg: EvalConfig, home: str) -> dict:
    return evaluate_candidate(candidate_dir, dataset, cfg, Path(home))
