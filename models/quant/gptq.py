"""GPTQ backends (`gptq-int4`, `gptq-int8`) through GPTQModel, the maintained successor of auto-gptq.

Calibration is the training split's prompts the quantize stage passes in (stored beside the model),
so the same inputs give the same weights. Loading goes through GPTQModel, which picks a kernel for
the device (torch kernels on the CPU), and hands back the transformers module it wraps, so the
decoding code is the same as for every other backend.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from models.quant import save_companions

# GPTQModel's loader asks for 2 CPU workers and fails on a 2-core machine unless told it may
# (shared FACTS.md); only set when the user has not chosen.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))


def unsupported_reason(device: torch.device, **_) -> str | None:
    try:
        import gptqmodel  # noqa: F401
    except ImportError as err:
        return f"gptqmodel cannot be imported ({err})"
    return None


def quantize(model_dir: Path, out_dir: Path, calibration: list[str], bits: int, group_size: int = 128) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper import loop_processor

    if not calibration:
        raise ValueError("GPTQ needs calibration rows; the quantize stage draws them from the training split")
    # GPTQModel writes per-layer quantization logs (loss, damping, time) to ./logs of whatever the
    # working directory is; keep them with the artifact they describe instead.
    loop_processor._PROJECT_LOG_DIR = Path(out_dir) / "gptq-logs"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(str(model_dir), QuantizeConfig(bits=bits, group_size=group_size), device=device)
    model.quantize(calibration, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.save(str(out_dir))
    save_companions(model_dir, out_dir)  # GPTQModel may rewrite the tokenizer (pad token)
    return {}


def load(artifact_dir: Path, device: torch.device, bits: int, group_size: int = 128):
    from gptqmodel import GPTQModel

    wrapper = GPTQModel.load(str(artifact_dir), device=str(device))
    model = wrapper.model.eval()
    # Keep GPTQModel's wrapper (kernels, hooks) alive with the module, outside nn.Module's registry:
    # the wrapper is itself a module that contains this one.
    model.__dict__["_smelt_gptq_wrapper"] = wrapper
    return model
