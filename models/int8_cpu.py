"""int8 weight-only linear layers for the CPU: a small kernel where inductor's own loop is slow.

torchao's int8 weight-only layers compute `x @ w_int8.t().to(fp32) * scale`, and in smelt's
compiled loop inductor fuses the conversion into the matmul. Two cases where that is slow:
- AVX2 only (torch 2.15): the loop converts int8 one element at a time, ~2 GB/s, 4x slower than
  fp32 per decode step (`python -m bench.kernels` shows it; ATen's `_weight_int8pack_mm` is no
  faster). Every int8 layer uses the kernel there.
- Several rows (a speculative verify of k + 1 tokens, a small batch), AVX-512 too: inductor's loop
  converts each weight once per row, so verifying 5 tokens cost ~3x a one-token step; the kernel
  widens each weight once for all rows. With AVX-512 VNNI each row of x is also rounded to int16, so
  products are summed in int32 by `vpdpwssd` (12.2M base, 5-row verify, compiled, interleaved in one
  process, with a C shim since removed: int16 2.9-3.1 ms, fp32 activations 3.6 ms).
  One row stays inductor's: its fused loop beats the kernel there (1.5 vs 1.8 ms a step).
  Graphs that call the kernel keep inductor's Python wrapper (models/fastgen.py `calls_smelt_ops`).

`models/csrc/int8_gemv.cpp` widens 16 int8 at a time in registers (AVX2 or AVX-512 lanes) and reads
each weight row once for all rows of x (up to 8). It is compiled on first use with the C++ compiler
torch.compile already needs (cached by torch in ~/.cache/torch_extensions); where it cannot be
built, layers stay torchao's, with a warning. The artifact on disk is unchanged:
`swap_int8_linears` replaces modules after loading it.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_gemv.cpp"


def vector_bits(device: torch.device) -> int | None:
    """The width of the CPU's (or ATEN_CPU_CAPABILITY's) widest vector set the kernel has a build
    for: 256 (AVX2), 512 (AVX-512), None (another CPU, or not a CPU)."""
    if device.type != "cpu":
        return None
    return {"AVX2": 256, "AVX512": 512}.get(torch.backends.cpu.get_cpu_capability())


@functools.cache
def kernel() -> bool:
    """Build and load the extension, which registers `torch.ops.smelt.int8_linear` (and its shape
    function for torch.compile). False, with a warning naming why, if it cannot be built."""
    from torch.utils.cpp_extension import load

    try:
        load(name="smelt_int8_gemv", sources=[str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma"],
             is_python_module=False, verbose=False)
    except Exception as err:  # no compiler, no headers: the torchao layers still work, slower
        log.warning("smelt: the int8 kernel could not be built (%s); int8 layers stay torchao's", err)
        return False
    # shapes only, for tracing: x [..., k] -> [..., n]
    torch.library.register_fake("smelt::int8_linear")(
        lambda x, w, scale, vector_bits=256, int16_x=False: x.new_empty(*x.shape[:-1], w.shape[0]))
    return True


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bits: int = 256,
                int16_x: bool = False) -> torch.Tensor:
    """x [..., k] fp32 @ (qdata [n, k] int8 * scale [n])^T -> [..., n]; one dispatcher call in compiled
    graphs. `bits`: the kernel's vector width, 256 (AVX2) or 512 (AVX-512; only on such a CPU).
    `int16_x` (AVX-512 VNNI only, `has_vnni`): each row of x rounded to int16 with its own scale,
    so products sum in int32 (relative error ~5e-5 of the row's largest value, measured)."""
    return torch.ops.smelt.int8_linear(x, qdata, scale, bits, int16_x)


def has_vnni() -> bool:
    """This CPU has AVX-512 VNNI (and BW), which the int16-activation build needs."""
    return kernel() and torch.ops.smelt.has_vnni()


class Int8Linear(torch.nn.Module):
    """A linear layer of int8 weights [out, in] with one fp32 scale per output row.

    `bits` picks the kernel's vector width; with `fuse_one_row`, a single row of x (a decode step)
    is left to inductor as torchao's own `x @ w.t().to(fp32) * scale`, the kernel doing 2-8 rows.
    The row count is static in a compiled graph, so each graph holds one of the two."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 256,
                 fuse_one_row: bool = False, int16_x: bool = False):
        super().__init__()
        self.bits, self.fuse_one_row, self.int16_x = bits, fuse_one_row, int16_x
        self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]
        self.register_buffer("qdata", qdata.contiguous())
        self.register_buffer("scale", scale.reshape(-1).float().contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # a prefill in bf16 (models/device.py prefill_dtype)
            return torch.nn.functional.linear(x, self.widened(torch.get_autocast_dtype(x.device.type)), self.bias)
        if self.fuse_one_row and x.shape[:-1].numel() == 1:
            y = torch.nn.functional.linear(x, self.qdata.to(x.dtype)) * self.scale
        else:
            y = int8_linear(x, self.qdata, self.scale, self.bits, self.int16_x)
        return y if self.bias is None else y + self.bias


    def widened(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights [out, in] in `dtype`, made at the first prefill and kept (2 bytes a weight in bf16:
        widening them at every prefill cost a third of a one-prompt prefill of the 12.2M default)."""
        if getattr(self, "_widened", None) is None or self._widened.dtype != dtype:
            self._widened = (self.qdata.to(torch.float32) * self.scale[:, None]).to(dtype)
        return self._widened


def per_row_int8(weight) -> bool:
    """A torchao int8 weight-only tensor with one scale per output row (what Int8WeightOnlyConfig makes)."""
    return (type(weight).__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", True) is None
            and getattr(weight, "act_pre_scale", None) is None and list(weight.block_size) == [1, weight.qdata.shape[1]])


def swap_int8_linears(model: torch.nn.Module, bits: int = 256, fuse_one_row: bool = False, int16_x: bool = False) -> int:
    """Replace torchao's per-row int8 weight-only linears with `Int8Linear`; returns how many.
    Nothing changes if the kernel cannot be built."""
    if not kernel():
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and per_row_int8(m.weight)]
    for name, m in targets:
        parent, _, attr = name.rpartition(".")
        layer = Int8Linear(m.weight.qdata, m.weight.scale, m.bias, bits, fuse_one_row, int16_x).to(m.weight.qdata.device)
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    return len(targets)


def use_kernel(model: torch.nn.Module, device: torch.device) -> int:
    """Where the kernel beats inductor's loop (module docstring): every int8 layer on AVX2, the
    several-row steps on AVX-512 (with int16 activations where the CPU has VNNI). Returns how many
    layers were swapped."""
    bits = vector_bits(device)
    if bits is None:
        return 0
    return swap_int8_linears(model, bits, fuse_one_row=bits == 512, int16_x=bits == 512 and has_vnni())
