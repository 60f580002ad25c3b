"""`none`: the full-precision merged model, the reference every quantized candidate is compared to.
`bf16`: the same weights stored and run in bfloat16 (half the bytes per token; on CPUs with
AVX512-BF16 or AMX, oneDNN's bf16 matmuls also read memory about twice as fast as fp32 GEMV)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def unsupported_reason(device: torch.device, dtype: str | None = None) -> str | None:
    return None


def quantize(model_dir: Path, out_dir: Path, calibration: list[str], dtype: str | None = None) -> None:
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    if dtype is not None:  # rewrite the weights (and config's dtype) in place of the fp32 copy
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=getattr(torch, dtype))
        model.save_pretrained(out_dir)


def load(artifact_dir: Path, device: torch.device, dtype: str | None = None):
    model = AutoModelForCausalLM.from_pretrained(artifact_dir, use_safetensors=True,
                                                 dtype=getattr(torch, dtype) if dtype else torch.float32)
    return model.to(device).eval()
