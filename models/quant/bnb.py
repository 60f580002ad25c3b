"""bitsandbytes backends: `int8` (LLM.int8) and `nf4` (4-bit NormalFloat, optional double quantization).

Quantized on load by transformers and saved serialised (bitsandbytes 0.50 saves both int8 and
4-bit weights), so the artifact on disk is the quantized one. bitsandbytes runs on CUDA and, since
0.49, on CPUs with AVX2 (its fast int8 matmul needs AVX-512; see shared FACTS.md).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from models.quant import save_companions


def unsupported_reason(device: torch.device, scheme: str, **_) -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"bitsandbytes on the CPU needs AVX2; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    return None


def bnb_config(scheme: str, double_quant: bool = True) -> BitsAndBytesConfig:
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # fp32 compute on the CPU: its fp16 matmuls are slow and the tiny default is fp32 everywhere.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32)


CPU_NF4_BLOCK = 64  # bitsandbytes' CPU 4-bit kernel packs this many inputs per block


def check_cpu_packable(model_dir: Path, what: str = "bnb-nf4",
                       instead: str = "use another method for this model (e.g. torchao-int4-wo or gptq-int4)") -> None:
    """Name the first layer the CPU 4-bit kernel cannot pack (it fails deep inside the model otherwise)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and module.in_features % CPU_NF4_BLOCK:
            raise ValueError(f"{what} on the CPU packs blocks of {CPU_NF4_BLOCK} inputs, but {name} has "
                             f"{module.in_features}; {instead}")


def quantize(model_dir: Path, out_dir: Path, calibration: list[str], scheme: str, double_quant: bool = True) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and scheme == "nf4":
        check_cpu_packable(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(scheme, double_quant),
                                                 device_map=device, use_safetensors=True)
    model.save_pretrained(out_dir)
    save_companions(model_dir, out_dir)
    return {}


def load(artifact_dir: Path, device: torch.device, scheme: str, double_quant: bool = True):
    # The quantization config travels in config.json, so this loads the saved quantized weights.
    return AutoModelForCausalLM.from_pretrained(artifact_dir, device_map=str(device), use_safetensors=True).eval()
