"""torchao int8 backends: `int8-dyn` (int8 activations x int8 weights) and `int8-wo` (weight-only).

The quantized tensors are saved in safetensors through transformers' TorchAoConfig and load
back already quantized, so the artifact on disk is the one that ships.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig


def _torchao_config(scheme: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"int8-dyn": Int8DynamicActivationInt8WeightConfig, "int8-wo": Int8WeightOnlyConfig}[scheme]()


def unsupported_reason(device: torch.device, scheme: str) -> str | None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed"
    return None


def quantize(model_dir: Path, out_dir: Path, calibration: list[str], scheme: str) -> None:
    # Dynamic/weight-only int8 needs no calibration data; it is recorded with the artifact anyway.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=TorchAoConfig(_torchao_config(scheme)), use_safetensors=True
    )
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    for extra in ("smelt_build.json",):
        if (model_dir / extra).exists():
            shutil.copy2(model_dir / extra, out_dir / extra)


def load(artifact_dir: Path, device: torch.device, scheme: str):
    model = AutoModelForCausalLM.from_pretrained(artifact_dir, use_safetensors=True)
    return model.to(device).eval()
