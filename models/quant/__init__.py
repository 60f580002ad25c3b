"""Quantization backends behind one registry.

Every backend module exposes the same two functions:
    quantize(model_dir, out_dir, calibration) -> None   # writes a complete artifact into out_dir
    load(artifact_dir, device) -> model
and the method actually applied is written to `smelt_quant.json` in the artifact, so loading
never guesses it from a file name.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from models.artifacts import read_json, write_json

QUANT_META = "smelt_quant.json"

# method -> (module, kwargs given to its quantize); modules are imported lazily so an optional
# backend's import cost or absence only matters when that method is asked for.
BACKENDS: dict[str, tuple[str, dict]] = {
    "none": ("models.quant.full", {}),
    "torchao-int8-dyn": ("models.quant.torchao", {"scheme": "int8-dyn"}),
    "torchao-int8-wo": ("models.quant.torchao", {"scheme": "int8-wo"}),
}


def _backend(method: str):
    if method not in BACKENDS:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[method][0])


def check_supported(method: str, device: torch.device) -> None:
    """Refuse up front a method this device cannot run, naming the reason and what would work."""
    reason = _backend(method).unsupported_reason(device, **BACKENDS[method][1])
    if reason:
        ok = [m for m in BACKENDS if not _backend(m).unsupported_reason(device, **BACKENDS[m][1])]
        raise ValueError(f"quantization method {method!r} cannot run on {device.type}: {reason}; methods that can: {ok}")


def quantize_model(method: str, model_dir: Path, out_dir: Path, calibration: list[str]) -> None:
    """Quantize the merged model in `model_dir` into `out_dir` and record what was done."""
    module = _backend(method)
    settings = BACKENDS[method][1]
    module.quantize(Path(model_dir), Path(out_dir), calibration, **settings)
    write_json(Path(out_dir) / QUANT_META, {"method": method, "settings": settings, "calibration_rows": len(calibration)})


def quant_method(artifact_dir: Path) -> str:
    return read_json(Path(artifact_dir) / QUANT_META)["method"]


def load_quantized(artifact_dir: Path, device: torch.device):
    meta = read_json(Path(artifact_dir) / QUANT_META)
    return _backend(meta["method"]).load(Path(artifact_dir), device, **meta["settings"])
