"""Quantization backends behind one registry.

Every backend module exposes the same three functions:
    unsupported_reason(device, **settings) -> str | None   # why this device cannot run it, or None
    quantize(model_dir, out_dir, calibration, **settings) -> Path   # writes a complete artifact into out_dir
    load(artifact_dir, device, **settings) -> model
and the method, its settings and the calibration digest are written to `smelt_quant.json` in the
artifact, so loading never guesses them from a file name.
"""
from __future__ import annotations

import importlib
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from models.artifacts import digest, read_json, write_json
from models.config import QUANT_METHODS, QuantConfig, QuantMethod

QUANT_META = "smelt_quant.json"

# method -> (module, fixed settings, library whose version is recorded); modules are imported lazily
# so an optional backend's import cost or absence only matters when that method is asked for.
BACKENDS: dict[QuantMethod, tuple[str, dict, str | None]] = {
    "none": ("models.quant.full", {}, None),
    "bf16": ("models.quant.full", {"dtype": "bfloat16"}, None),
    "gptq-int4": ("models.quant.gptq", {"bits": 4}, "gptqmodel"),
    "gptq-int8": ("models.quant.gptq", {"bits": 8}, "gptqmodel"),
    "torchao-int8-dyn": ("models.quant.torchao", {"scheme": "int8-dyn"}, "torchao"),
    "torchao-int8-wo": ("models.quant.torchao", {"scheme": "int8-wo"}, "torchao"),
    "torchao-int4-wo": ("models.quant.torchao", {"scheme": "int4-wo"}, "torchao"),
    "bnb-int8": ("models.quant.bnb", {"scheme": "int8"}, "bitsandbytes"),
    "bnb-nf4": ("models.quant.bnb", {"scheme": "nf4"}, "bitsandbytes"),
}


def check_registry(backends: dict, methods: tuple[str, ...]) -> None:
    """The registry serves exactly the methods the config accepts, in the same order (supported_methods
    keeps that order), so a method added to one and not the other fails at import, not mid-run."""
    if tuple(backends) != methods:
        raise ImportError(f"models/quant BACKENDS {tuple(backends)} != models/config QuantMethod {methods}")


check_registry(BACKENDS, QUANT_METHODS)


def runtime_library(method: str) -> str | None:
    """The package that loading `method`'s artifacts needs beyond torch and transformers (None: none)."""
    return BACKENDS[method][2]


def _backend(method: str):
    if method not in BACKENDS:
        raise ValueError(f"unknown quantization method {method!r}; known: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[method][0])


def method_settings(method: str, cfg: QuantConfig | None = None) -> dict:
    """The settings a method runs with: its fixed ones plus the configurable ones it uses."""
    cfg = cfg or QuantConfig()
    fixed = dict(BACKENDS[method][1])
    if method.startswith("gptq-") or method == "torchao-int4-wo":
        fixed["group_size"] = cfg.group_size
    if method == "bnb-nf4":
        fixed["double_quant"] = cfg.bnb_double_quant
    return fixed


def save_companions(model_dir: Path, out_dir: Path) -> None:
    """What travels beside quantized weights: the tokenizer with the chat template training
    recorded (a backend may have rewritten it), and the embedded build record if there is one."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    if (Path(model_dir) / "smelt_build.json").exists():
        shutil.copy2(Path(model_dir) / "smelt_build.json", Path(out_dir) / "smelt_build.json")


def unsupported_reason(method: str, device: torch.device) -> str | None:
    return _backend(method).unsupported_reason(device, **BACKENDS[method][1])


def supported_methods(device: torch.device) -> list[str]:
    return [m for m in BACKENDS if not unsupported_reason(m, device)]


def check_supported(method: str, device: torch.device) -> None:
    """Refuse up front a method this device cannot run, naming the reason and what would work."""
    reason = unsupported_reason(method, device)
    if reason:
        raise ValueError(f"quantization method {method!r} cannot run on {device.type}: {reason}; "
                         f"methods that can: {supported_methods(device)}")


def check_merged(model_dir: Path) -> None:
    # Quantizing a base under an unmerged adapter would ship the base's behaviour, not the fine-tune.
    if (Path(model_dir) / "adapter_config.json").exists():
        raise ValueError(f"{model_dir} holds an unmerged LoRA adapter; quantize the merged model (merge_and_unload) instead")


def quantize_model(method: str, model_dir: Path, out_dir: Path, calibration: list[str], cfg: QuantConfig | None = None) -> Path:
    """Quantize the merged model in `model_dir` into `out_dir` and record exactly what was done."""
    check_merged(model_dir)
    module = _backend(method)
    settings = method_settings(method, cfg)
    t0 = time.perf_counter()
    extra = module.quantize(Path(model_dir), Path(out_dir), calibration, **settings) or {}
    library = runtime_library(method)
    write_json(Path(out_dir) / QUANT_META, {
        "method": method, "settings": settings, "calibration_rows": len(calibration),
        "calibration_digest": digest(calibration, length=16), "library": library,
        "library_version": _version(library), "quantize_seconds": round(time.perf_counter() - t0, 3), **extra,
    })
    return Path(out_dir)


def _version(package: str | None) -> str | None:
    try:
        return version(package) if package else None
    except PackageNotFoundError:
        return None


def quant_meta(artifact_dir: Path) -> dict:
    return read_json(Path(artifact_dir) / QUANT_META)


def quant_method(artifact_dir: Path) -> str:
    return quant_meta(artifact_dir)["method"]


def load_quantized(artifact_dir: Path, device: torch.device):
    meta = quant_meta(artifact_dir)
    return _backend(meta["method"]).load(Path(artifact_dir), device, **meta["settings"])
