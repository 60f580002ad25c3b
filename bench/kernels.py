"""One decode-step matmul, timed in every weight format smelt's compiled loop can read.

    uv run python -m bench.kernels                          # this CPU's widest vector ISA
    ATEN_CPU_CAPABILITY=avx2 uv run python -m bench.kernels # as an AVX2-only CPU runs it

Each row is x [1, k] @ W^T for W [n, k] stored as fp32, bf16 or int8 (per-row scales), written
the way inductor sees it in `models/fastgen.py` (a multiply and a sum over k, compiled with the
same backend), plus ATen's own int8 kernel and smelt's (models/int8_cpu.py; its AVX-512 build where the CPU runs it). It prints
microseconds per product and the weight bytes read per second, so a format that is not vectorised
on this ISA shows at once: under AVX2, torch 2.15's inductor converts int8 to fp32 one element at
a time (~2 GB/s against ~60 for fp32).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from models.fastgen import compile_step
from models.int8_cpu import int8_linear, kernel, vector_bits


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 [n, k], scales [n])."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale


def formats(w: torch.Tensor) -> dict[str, tuple]:
    """name -> (step function of (x, weight, scale), weight, scale); every step gives x @ w^T [1, n]."""
    w8, s = int8_rows(w)
    ones = torch.ones(w.shape[0])
    rowdot = lambda x, wq, sc: (x.unsqueeze(1) * wq.to(x.dtype).unsqueeze(0)).sum(-1) * sc  # noqa: E731
    return {
        "fp32": (rowdot, w, ones),
        "bf16": (rowdot, w.to(torch.bfloat16), ones),
        "int8 (fused dequant)": (rowdot, w8, s),
        "int8 (ATen _weight_int8pack_mm)": (lambda x, wq, sc: torch.ops.aten._weight_int8pack_mm(x, wq, sc), w8, s),
        **({"int8 (smelt AVX2 kernel)": (int8_linear, w8, s)} if kernel() else {}),
        **({"int8 (smelt AVX-512 kernel)": (lambda x, wq, sc: int8_linear(x, wq, sc, 512), w8, s)}
           if kernel() and vector_bits(w.device) == 512 else {}),
    }


def time_step(fn, x, wq, sc, repeats: int, passes: int) -> tuple[float, float, torch.Tensor]:
    """Compiled: median and spread over `passes` of the mean time of `repeats` calls (seconds), and its output."""
    step = compile_step(fn)
    with torch.inference_mode():
        out = step(x, wq, sc)
        for _ in range(2):
            step(x, wq, sc)
        means = []
        for _ in range(passes):
            t0 = time.perf_counter()
            for _ in range(repeats):
                step(x, wq, sc)
            means.append((time.perf_counter() - t0) / repeats)
    mid = statistics.median(means)
    return mid, (max(means) - min(means)) / mid, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="output features (default 4096)")
    ap.add_argument("--k", type=int, default=1536, help="input features (default 1536)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    w, x = torch.randn(args.n, args.k), torch.randn(1, args.k)
    reference = x @ w.t()
    isa = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    print(f"x [1, {args.k}] @ W^T, W [{args.n}, {args.k}]; {torch.get_num_threads()} threads; ISA {isa}")
    print(f"{'format':34} {'us':>8} {'spread':>7} {'GB/s':>7} {'max rel err':>12}")
    for name, (fn, wq, sc) in formats(w).items():
        seconds, spread, out = time_step(fn, x, wq, sc, args.repeats, args.passes)
        err = ((out - reference).abs().max() / reference.abs().max()).item()
        gbs = wq.numel() * wq.element_size() / seconds / 1e9
        print(f"{name:34} {seconds * 1e6:8.0f} {spread:7.1%} {gbs:7.1f} {err:12.4f}")


if __name__ == "__main__":
    main()
