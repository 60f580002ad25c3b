"""Quantization stage: one artifact per method, always from the merged fine-tuned model."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from models.artifacts import atomic_dir, digest
from models.config import QuantConfig
from models.device import resolve_device
from models.quant import check_supported, method_settings, quantize_model
from tasks.caching import STAGE_CACHE
from tasks.etl import DatasetVersion


def calibration_prompts(dataset: DatasetVersion, n: int) -> list[str]:
    return [r["prompt"] for r in dataset.rows("train")[:n]]


def quantize_candidates(finetuned: Path, dataset: DatasetVersion, cfg: QuantConfig, home: Path, device: str = "auto") -> dict[str, Path]:
    """Return {method: artifact_dir}; every method is checked against the device before any work."""
    dev = resolve_device(device)
    for method in cfg.methods:
        check_supported(method, dev)
    calibration = calibration_prompts(dataset, cfg.calibration_rows)
    out = {}
    for method in cfg.methods:
        key = digest("quant-v2", str(finetuned), method, method_settings(method, cfg), calibration)
        target = home / "models" / f"quant-{method}-{key}"
        if not target.exists():
            with atomic_dir(target) as tmp:
                quantize_model(method, finetuned / "merged", tmp, calibration, cfg)
                # Stored with the model so the quantization can be reproduced exactly.
                (tmp / "calibration.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in calibration))
        out[method] = target
    return out


@task(name="quantize", cache_policy=STAGE_CACHE, persist_result=True)
def quantize_task(finetuned: Path, dataset: DatasetVersion, cfg: QuantConfig, home: str, device: str) -> dict[str, Path]:
    return quantize_candidates(finetuned, dataset, cfg, Path(home), device)
