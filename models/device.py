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


def has_amx_bf16() -> bool:
    """This CPU multiplies bf16 matrices in AMX tiles (Sapphire Rapids and later)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def prefill_dtype(model, choice: str = "auto") -> torch.dtype | None:
    """The dtype a batch prefills prompts in (under autocast), None for the model's own.

    'auto': bf16 where an fp32 model on the CPU has AMX, else the model's own. Prefill multiplies
    many rows at once, where AMX's bf16 tiles are fast: one 384x1024 linear of 800 rows took 0.29 ms
    in bf16 and 2.0 ms in fp32 here (2 cores, `torch.nn.functional.linear`); decode steps keep the
    model's dtype, so a request's tokens do not depend on what else is in the batch. Layers that
    autocast does not reach (GPTQ, torchao's tensor subclasses) keep the model's own dtype for all of it."""
    if choice == "model":
        return None
    plain = all(autocastable(m) for m in model.modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__)
    if choice == "bfloat16":
        if not plain:
            raise ValueError("prefill in bfloat16 needs plain or smelt int8 linear layers; this model's quantized layers "
                             "cannot run under autocast: use prefill_dtype 'model'")
        return torch.bfloat16
    fits = model.device.type == "cpu" and model.dtype == torch.float32 and has_amx_bf16()
    return torch.bfloat16 if fits and plain else None


def autocastable(layer: torch.nn.Module) -> bool:
    """A linear layer that runs under autocast: torch's own with a plain weight, or smelt's int8 layer
    (which widens its weights to the autocast dtype). Not GPTQ's, bitsandbytes' or torchao's subclasses."""
    from models.int8_cpu import Int8Linear

    if isinstance(layer, Int8Linear):
        return True
    return type(layer) is torch.nn.Linear and type(layer.weight.data) is torch.Tensor
