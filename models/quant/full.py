"""`none`: the full-precision merged model, the reference every quantized candidate is compared to."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def unsupported_reason(device: torch.device) -> str | None:
    return None


def quantize(model_dir: Path, out_dir: Path, calibration: list[str]) -> None:
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)


def load(artifact_dir: Path, device: torch.device):
    model = AutoModelForCausalLM.from_pretrained(artifact_dir, use_safetensors=True)
    return model.to(device).eval()
