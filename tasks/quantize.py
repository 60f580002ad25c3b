"""Quantization stage: one artifact per method, always from the merged fine-tuned model."""
from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from prefect import task

from models.artifacts import artifact
from models.config import QuantConfig
from models.device import resolve_device
from models.quant import check_supported, method_settings, quantize_model
from tasks.caching import STAGE_CACHE
from tasks.etl import DatasetVersion

# What decides a quantized artifact: the backends behind the registry (and their metadata) and this
# stage, which picks the calibration prompts and stores them beside the weights.
QUANT_CODE = ("models.quant", "tasks.quantize")


def calibration_prompts(dataset: DatasetVersion, n: int) -> list[str]:
    return [r["prompt"] for r in dataset.rows("train")[:n]]


def quantizer_process() -> ProcessPoolExecutor:
    """One spawned child process for a stage's quantizers (it starts on the first method that runs).

    GPTQModel leaves worker threads behind in the process that quantized (21 threads instead of 6),
    and they slowed every compiled decode after it in that process ~6x (the int8-dyn candidate:
    206 vs 1,313 tokens/s; 1,193 when GPTQ ran in a child). The evaluation stage runs in the flow's
    process and must time candidates as they would serve, so no quantizer runs there. A quantizer's
    errors are raised in the caller by `.result()`.
    """
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def quantize_candidates(finetuned: Path, dataset: DatasetVersion, cfg: QuantConfig, home: Path, device: str = "auto") -> dict[str, Path]:
    """Return {method: artifact_dir}; every method is checked against the device before any work."""
    dev = resolve_device(device)
    for method in cfg.methods:
        check_supported(method, dev)
    calibration = calibration_prompts(dataset, cfg.calibration_rows)
    out = {}
    with quantizer_process() as child:
        for method in cfg.methods:
            target = artifact(home / "models", f"quant-{method}", str(finetuned), method, method_settings(method, cfg),
                              calibration, code=QUANT_CODE)
            if not target.exists():
                with target.build() as tmp:
                    child.submit(quantize_model, method, finetuned / "merged", tmp, calibration, cfg).result()
                    # Stored with the model so the quantization can be reproduced exactly.
                    (tmp / "calibration.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in calibration))
            out[method] = target.path
    return out


@task(name="quantize", cache_policy=STAGE_CACHE, persist_result=True)
def quantize_task(finetuned: Path, dataset: DatasetVersion, cfg: QuantConfig, home: str, device: str) -> dict[str, Path]:
    return quantize_candidates(finetuned, dataset, cfg, Path(home), device)
