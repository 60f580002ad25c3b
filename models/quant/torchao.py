"""torchao backends: `int8-dyn` (int8 activations x int8 weights), `int8-wo` (int8 weight-only) and
`int4-wo` (int4 weight-only, grouped).

int8: the quantized tensors are saved in safetensors through transformers' TorchAoConfig and load
back already quantized, so the artifact on disk is the one that ships. int8-wo quantizes the output
head too (`quantize_int8_wo`); on AVX2/AVX-512 CPUs its layers load as smelt's `Int8Linear`.
int4-wo: torchao 0.18's CPU int4 layout (PrototypeInt4WeightOnlyConfig) cannot be serialised
(shared FACTS.md), so the artifact holds the full-precision merged weights plus these settings and
`load` quantizes them the same way every time (the metadata says `quantized_at_load`).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

from models.int8_cpu import use_kernel
from models.quant import save_companions


def _int8_config(scheme: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"int8-dyn": Int8DynamicActivationInt8WeightConfig, "int8-wo": Int8WeightOnlyConfig}[scheme]()


def _int4_config(device: torch.device, group_size: int):
    if device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


def unsupported_reason(device: torch.device, scheme: str, **_) -> str | None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed"
    if scheme == "int4-wo" and device.type == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: F401
        except ImportError:
            return "this torchao has no CPU int4 weight-only layout"
        if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
            return "this torch has no CPU int4 packing kernel"
    return None


def int4_eligible(group_size: int):
    """Linear layers the int4 kernel can pack: out_features a multiple of 16, in_features of the group."""
    def eligible(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.out_features % 16 == 0 and module.in_features % group_size == 0
    return eligible


def quantize(model_dir: Path, out_dir: Path, calibration: list[str], scheme: str, group_size: int = 128) -> dict:
    # Dynamic/weight-only quantization needs no calibration data; it is recorded with the artifact anyway.
    if scheme == "int4-wo":
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        eligible = int4_eligible(group_size)
        skipped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not eligible(m, n)]
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        return {"quantized_at_load": True, "skipped_layers": skipped}
    if scheme == "int8-wo":
        return quantize_int8_wo(model_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=TorchAoConfig(_int8_config(scheme)), use_safetensors=True
    )
    model.save_pretrained(out_dir)
    save_companions(model_dir, out_dir)
    return {}


def quantize_int8_wo(model_dir: Path, out_dir: Path) -> dict:
    """Every linear layer int8 weight-only, the output head (lm_head) included; the input embeddings stay
    full precision (a lookup reads one row per token, so int8 would save no time there).

    transformers leaves the head out by default. On a small model it is a large share of what a
    decode step reads (12.2M base: 1.6M of 12.2M weights; a 5-row speculative verify: 2.35 -> 1.74
    ms with it int8). A head tied to the input embeddings is untied first (a copy), because the
    two can no longer share one tensor once one of them is int8."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    embeddings = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    with tempfile.TemporaryDirectory(dir=Path(out_dir).parent) as untied:
        source = model_dir
        if model.config.tie_word_embeddings:
            model.config.tie_word_embeddings = False
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.save_pretrained(untied)
            source = Path(untied)
        config = TorchAoConfig(_int8_config("int8-wo"), include_input_output_embeddings=True,
                               modules_to_not_convert=[embeddings])
        quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, use_safetensors=True)
        quantized.save_pretrained(out_dir)
    save_companions(model_dir, out_dir)
    return {"output_head": "int8" + (" (untied from the input embeddings)" if source != model_dir else "")}


def load(artifact_dir: Path, device: torch.device, scheme: str, group_size: int = 128):
    model = AutoModelForCausalLM.from_pretrained(artifact_dir, use_safetensors=True).to(device).eval()
    if scheme == "int4-wo":
        from torchao.quantization import quantize_

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CUDA's int4 kernel wants bf16
        model = model.to(dtype)
        quantize_(model, _int4_config(device, group_size), filter_fn=int4_eligible(group_size))
    if scheme == "int8-wo":
        use_kernel(model, device)  # where inductor's int8 loop is slow (models/int8_cpu.py)
    return model
