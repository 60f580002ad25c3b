"""int8 weight-only linear layers for CPUs without AVX-512: a small AVX2 kernel in their place.

torchao's int8 weight-only layers compute `x @ w_int8.t().to(fp32) * scale`, and in smelt's
compiled loop inductor fuses the conversion into the matmul: 54 GB/s of weights on AVX-512. Limited
to AVX2 (torch 2.15), the same loop converts int8 one element at a time: ~2 GB/s, 4x slower than
fp32 per decode step, so no int8 candidate could win there (`python -m bench.kernels` shows it;
ATen's `_weight_int8pack_mm` is no faster). `models/csrc/int8_gemv_avx2.cpp` widens 16 int8 at a
time in registers and reads each weight row once for all rows of x (up to 8: a decode step, a
speculative verify, a small batch).

It is compiled on first use with the C++ compiler torch.compile already needs (cached by torch in
~/.cache/torch_extensions); where it cannot be built, layers stay torchao's, with a warning. The
artifact on disk is unchanged: `swap_int8_linears` replaces modules after loading it.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_gemv_avx2.cpp"


def avx2_only(device: torch.device) -> bool:
    """The CPU's (or ATEN_CPU_CAPABILITY's) widest vector set is AVX2: where inductor's int8 loop is scalar."""
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX2"


@functools.cache
def kernel() -> bool:
    """Build and load the extension, which registers `torch.ops.smelt.int8_linear` (and its shape
    function for torch.compile). False, with a warning naming why, if it cannot be built."""
    from torch.utils.cpp_extension import load

    try:
        load(name="smelt_int8_gemv_avx2", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma"],
             is_python_module=False, verbose=False)
    except Exception as err:  # no compiler, no headers: the torchao layers still work, slower
        log.warning("smelt: the AVX2 int8 kernel could not be built (%s); int8 layers stay torchao's", err)
        return False
    # shapes only, for tracing: x [..., k] -> [..., n]
    torch.library.register_fake("smelt::int8_linear")(lambda x, w, scale: x.new_empty(*x.shape[:-1], w.shape[0]))
    return True


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., k] fp32 @ (qdata [n, k] int8 * scale [n])^T -> [..., n]; one dispatcher call in compiled graphs."""
    return torch.ops.smelt.int8_linear(x, qdata, scale)


class Int8Linear(torch.nn.Module):
    """A linear layer of int8 weights [out, in] with one fp32 scale per output row."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(-1).float().contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.qdata, self.scale)
        return y if self.bias is None else y + self.bias


def per_row_int8(weight) -> bool:
    """A torchao int8 weight-only tensor with one scale per output row (what Int8WeightOnlyConfig makes)."""
    return (type(weight).__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", True) is None
            and getattr(weight, "act_pre_scale", None) is None and list(weight.block_size) == [1, weight.qdata.shape[1]])


def swap_int8_linears(model: torch.nn.Module) -> int:
    """Replace torchao's per-row int8 weight-only linears with `Int8Linear`; returns how many.
    Nothing changes if the kernel cannot be built."""
    if not kernel():
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and per_row_int8(m.weight)]
    for name, m in targets:
        parent, _, attr = name.rpartition(".")
        layer = Int8Linear(m.weight.qdata, m.weight.scale, m.bias).to(m.weight.qdata.device)
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    return len(targets)
