import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.artifacts import dir_size_bytes
from models.config import QuantConfig
from models.quant import BACKENDS, QUANT_META, check_supported, load_quantized, quantize_model, supported_methods

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])
CFG = QuantConfig(group_size=32)
CALIBRATION = [f"order {i}: ship {i % 7} boxes of item {i * 13 % 97} to Lisbon" for i in range(16)]
# One fresh interpreter loads every artifact from disk only (no state carried over from quantizing)
# and generates with it; a single process keeps the import cost paid once.
FRESH_LOAD = """
import json, sys, time, torch
from models.quant import load_quantized
for path in sys.argv[1:]:
    t0 = time.perf_counter()
    m = load_quantized(path, torch.device("cpu"))
    load_s = time.perf_counter() - t0
    w = m.model.layers[0].mlp.up_proj
    out = m.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=4, do_sample=False)
    # smelt's Int8Linear (models/int8_cpu.py, on AVX2/AVX-512 CPUs) holds int8 `qdata` instead of a weight
    weight = f"qdata {w.qdata.dtype}" if hasattr(w, "qdata") else type(getattr(w, "weight", None)).__name__
    print("RESULT " + json.dumps({"path": path, "load_s": load_s, "layer": type(w).__name__,
                                  "weight": weight, "tokens": out.tolist()}))
"""
# What each method's up_proj must look like after a fresh load: proof the quantized form came back.
QUANTIZED_LAYER = {
    "none": ("Linear", "Parameter"), "bf16": ("Linear", "Parameter"), "gptq-int4": ("Torch", None), "gptq-int8": ("Torch", None),
    "torchao-int8-dyn": ("Linear", "Int8"), "torchao-int8-wo": ("Linear", "Int8"),
    "torchao-int4-wo": ("Linear", "Int4"), "bnb-int8": ("Linear8bitLt", None), "bnb-nf4": ("Linear4bit", None),
}


@pytest.fixture(scope="module")
def quant_model_dir(wide64_model_dir):
    return wide64_model_dir


@pytest.fixture(scope="module")
def reference_logits(quant_model_dir):
    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(quant_model_dir).eval()(IDS).logits


@pytest.fixture(scope="module")
def artifacts(quant_model_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quantized")
    for method in BACKENDS:
        (root / method).mkdir()
        quantize_model(method, quant_model_dir, root / method, CALIBRATION, CFG)
    return {m: root / m for m in BACKENDS}


@pytest.fixture(scope="module")
def fresh_loads(artifacts) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, *map(str, artifacts.values())], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {method: r for method, r in zip(artifacts, loaded)}


@pytest.mark.parametrize("method", sorted(BACKENDS))
def test_quantize_save_load_in_a_fresh_process_and_generate(method, artifacts, fresh_loads, reference_logits):
    out = artifacts[method]
    meta = json.loads((out / QUANT_META).read_text())
    assert meta["method"] == method and meta["calibration_rows"] == len(CALIBRATION) and len(meta["calibration_digest"]) == 16
    assert meta["settings"].get("group_size", 32) == 32

    fresh = fresh_loads[method]
    layer, weight = QUANTIZED_LAYER[method]
    assert layer in fresh["layer"], fresh
    if weight:
        assert weight.lower() in fresh["weight"].lower(), fresh
    assert len(fresh["tokens"][0]) == 3 + 4
    print(f"{method}: {dir_size_bytes(out)} bytes on disk, fresh load {fresh['load_s']:.2f} s")

    model = load_quantized(out, torch.device("cpu"))
    if method in ("none", "bf16"):
        assert model.model.layers[0].mlp.up_proj.weight.dtype == (torch.bfloat16 if method == "bf16" else torch.float32)
    with torch.inference_mode():
        diff = (model(IDS).logits.float() - reference_logits).abs().max().item()
    scale = reference_logits.abs().max().item()
    if method == "none":
        assert diff == 0
    else:
        assert 0 < diff < scale  # quantized: near the reference, but not bit-identical


def test_int8_and_int4_artifacts_are_smaller_than_full_precision(artifacts):
    sizes = {m: sum(p.stat().st_size for p in d.glob("*.safetensors")) for m, d in artifacts.items()}
    assert sizes["torchao-int8-dyn"] < 0.8 * sizes["none"]
    assert sizes["gptq-int4"] < 0.8 * sizes["none"] and sizes["bnb-nf4"] < 0.8 * sizes["none"]


def test_int4_weight_only_records_that_it_quantizes_at_load(artifacts):
    meta = json.loads((artifacts["torchao-int4-wo"] / QUANT_META).read_text())
    assert meta["quantized_at_load"] is True and meta["settings"] == {"scheme": "int4-wo", "group_size": 32}


def test_nf4_on_the_cpu_refuses_layers_its_kernel_cannot_pack(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="bnb-nf4 on the CPU packs blocks of 64 inputs.*model.layers.0.self_attn.q_proj.*32"):
        quantize_model("bnb-nf4", tiny_model_dir, tmp_path, CALIBRATION, CFG)


def test_gptq_refuses_to_run_without_calibration(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_model("gptq-int4", tiny_model_dir, tmp_path, [], CFG)


def test_an_unmerged_adapter_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="unmerged LoRA adapter"):
        quantize_model("none", tmp_path, tmp_path / "out", CALIBRATION)


def test_unknown_method_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown quantization method 'gptq-int3'.*torchao-int8-dyn"):
        check_supported("gptq-int3", torch.device("cpu"))


def test_every_method_runs_on_this_cpu():
    # This machine has AVX-512 and torch's CPU int4 kernels: nothing may be refused here.
    assert supported_methods(torch.device("cpu")) == list(BACKENDS)


def test_a_method_the_cpu_cannot_run_is_refused_with_the_reason_and_the_alternatives():
    # ATEN_CPU_CAPABILITY=default makes torch report a CPU without AVX2, where bitsandbytes' CPU backend cannot run.
    code = ("import torch; from models.quant import check_supported\n"
            "try:\n    check_supported('bnb-nf4', torch.device('cpu'))\nexcept ValueError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    msg = proc.stdout.strip().splitlines()[-1]
    assert msg.startswith("quantization method 'bnb-nf4' cannot run on cpu: bitsandbytes on the CPU needs AVX2")
    assert "methods that can: ['none', 'bf16', 'gptq-int4'" in msg and "bnb-int8" not in msg.split("methods that can:")[1]


def test_the_registry_serves_exactly_the_methods_the_config_accepts():
    from typing import get_args

    from models.config import QuantMethod
    from models.quant import check_registry

    assert tuple(BACKENDS) == get_args(QuantMethod)
    with pytest.raises(ImportError, match="bnb-nf4"):
        check_registry({m: spec for m, spec in BACKENDS.items() if m != "bnb-nf4"}, get_args(QuantMethod))
