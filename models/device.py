"""The one place that decides device and dtype; everything else receives them."""
from __future__ import annotations

import torch


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible; use device: cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves bytes per token on GPUs; CPU kernels for the tiny default are fastest in fp32.
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
