"""models/int8_cpu.py: the int8 weight-only kernel (AVX2 and AVX-512 builds) computes torchao's
product, swaps in for torchao's layers without changing the model's output, and is what `load` gives
on AVX2-only and AVX-512 CPUs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.fastgen import CompiledDecoder
from models.int8_cpu import Int8Linear, has_vnni, int8_linear, kernel, swap_int8_linears
from models.config import QuantConfig
from models.quant import quantize_model

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


def widths() -> list[int]:
    """The kernel builds this CPU can run."""
    return [256, 512] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [256]


def builds() -> list[tuple[int, bool]]:
    """(vector bits, int16 activations) of every build this CPU can run."""
    return [(bits, False) for bits in widths()] + ([(512, True)] if has_vnni() else [])


def test_the_kernel_matches_dequantized_fp32_for_1_to_8_rows_and_more():
    assert kernel()
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (51, 64), dtype=torch.int8)  # 51 rows: not a multiple of the 512 build's tiles
    scale = torch.rand(51) / 100
    for bits, int16_x in builds():
        # int16 x: each row rounded to 1/32767 of its largest value, so the product's error is ~1e-4 of its scale
        tol = 2e-4 if int16_x else 1e-4
        for rows in (1, 2, 3, 5, 6, 7, 8, 9, 33):  # 9 and 33: at::mm, or 8 rows at a time with int16 x
            x = torch.randn(rows, 64)
            reference = x @ (w.float() * scale[:, None]).t()
            got = int8_linear(x, w, scale, bits, int16_x)
            assert (got - reference).abs().max() <= tol * reference.abs().max(), (bits, int16_x, rows)
        x3 = torch.randn(2, 3, 64)  # leading dims kept
        assert int8_linear(x3, w, scale, bits, int16_x).shape == (2, 3, 51)
    with pytest.raises(RuntimeError, match="vector_bits"):
        int8_linear(torch.randn(1, 64), w, scale, 128)
    if not has_vnni():
        with pytest.raises(RuntimeError, match="VNNI"):
            int8_linear(torch.randn(1, 64), w, scale, 512, True)


def test_int16_activations_do_not_overflow_int32_on_long_rows():
    """The largest int16 x is lowered with k so that k products of +-127 x it fit int32: a row of
    2048 maximal values against maximal weights sums to 2048 * 127 * limit, no wrap-around."""
    if not has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    w = torch.full((16, 2048), 127, dtype=torch.int8)
    x = torch.full((2, 2048), 3.0)
    got = int8_linear(x, w, torch.ones(16), 512, True)
    assert torch.allclose(got, torch.full((2, 16), 3.0 * 127 * 2048), rtol=1e-4)


def test_swapped_layers_give_torchaos_logits_and_greedy_tokens_compiled(wide64_model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    quantize_model("torchao-int8-wo", wide64_model_dir, tmp_path / "q", [], QuantConfig(group_size=32))
    torchao_model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    prompt = [5, 17, 42, 99, 7, 3]
    b = CompiledDecoder(torchao_model, tok).decode(prompt, 12, None).token_ids
    draft = AutoModelForCausalLM.from_pretrained(wide64_model_dir).eval()  # the unquantized model: any draft will do
    for bits, int16_x in builds():
        for fuse_one_row in (False, True):
            swapped = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
            n = swap_int8_linears(swapped, bits, fuse_one_row, int16_x)
            assert n == 2 * 7 + 1 and isinstance(swapped.lm_head, Int8Linear)  # 7 linears per layer, and the head
            with torch.inference_mode():
                for ids in ([[5]], [[5, 17, 42, 99, 7, 3]]):  # one row (inductor's when fused) and several (the kernel)
                    got, want = swapped(torch.tensor(ids)).logits, torchao_model(torch.tensor(ids)).logits
                    assert torch.allclose(got, want, atol=1e-3 if int16_x else 1e-4), (bits, int16_x, fuse_one_row, ids)
            a = CompiledDecoder(swapped, tok).decode(prompt, 12, None).token_ids
            assert a == b and len(a) == 12, (bits, int16_x, fuse_one_row)
            spec = CompiledDecoder(swapped, tok, draft, num_draft_tokens=3).decode(prompt, 12, None)
            assert spec.token_ids == b and spec.proposed > 0, (bits, int16_x, fuse_one_row)  # verify steps run the kernel


LOAD_UNDER_AVX2 = """
import json, sys, torch
from pathlib import Path
from models.quant.torchao import load
m = load(Path(sys.argv[1]), torch.device("cpu"), "int8-wo")
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "layer": type(m.model.layers[0].mlp.up_proj).__name__}))
"""


def test_loading_int8_wo_on_an_avx2_only_cpu_uses_the_kernel(wide64_model_dir, tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 is how torch (and inductor) run on a CPU without AVX-512."""
    (tmp_path / "q").mkdir()
    quantize_model("torchao-int8-wo", wide64_model_dir, tmp_path / "q", [], QuantConfig(group_size=32))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", LOAD_UNDER_AVX2, str(tmp_path / "q")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"capability": "AVX2", "layer": "Int8Linear"}


def test_under_bf16_autocast_the_layer_multiplies_its_widened_weights_in_bf16():
    """A bf16 prefill (models/device.py prefill_dtype): the int8 layer multiplies bf16 weights, made once."""
    assert kernel()
    torch.manual_seed(0)
    w, scale = torch.randint(-127, 128, (51, 64), dtype=torch.int8), torch.rand(51) / 100
    layer = Int8Linear(w, scale, None)
    x = torch.randn(40, 64)
    reference = x @ (w.float() * scale[:, None]).t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        kept = layer.widened(torch.bfloat16)
        assert layer(x).dtype == torch.bfloat16 and layer.widened(torch.bfloat16) is kept
    assert got.dtype == torch.bfloat16
    assert (got.float() - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert layer(x).dtype == torch.float32  # outside autocast: the kernel, in fp32
