import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.quant import BACKENDS, QUANT_META, check_supported, load_quantized, quantize_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


@pytest.mark.parametrize("method", sorted(BACKENDS))
def test_quantize_save_load_and_generate(method, tiny_model_dir, tmp_path):
    out = tmp_path / method
    out.mkdir()
    quantize_model(method, tiny_model_dir, out, calibration=["a calibration prompt"])
    meta = json.loads((out / QUANT_META).read_text())
    assert meta["method"] == method and meta["calibration_rows"] == 1
    model = load_quantized(out, torch.device("cpu"))
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        diff = (model(IDS).logits - ref(IDS).logits).abs().max().item()
    if method == "none":
        assert diff == 0
    else:
        assert 0 < diff < 0.5  # quantized: close to the reference, but not bit-identical
    generated = model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 5)


def test_int8_artifact_is_smaller_and_loads_quantized_in_a_fresh_process(tiny_model_dir, tmp_path):
    full, q = tmp_path / "full", tmp_path / "q"
    full.mkdir(), q.mkdir()
    quantize_model("none", tiny_model_dir, full, [])
    quantize_model("torchao-int8-dyn", tiny_model_dir, q, [])
    assert (q / "model.safetensors").stat().st_size < 0.8 * (full / "model.safetensors").stat().st_size
    code = (
        "import torch, sys; from models.quant import load_quantized;"
        "m = load_quantized(sys.argv[1], torch.device('cpu'));"
        "w = m.model.layers[0].mlp.up_proj.weight; print(type(w).__name__);"
        "print(m.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=3, do_sample=False).tolist())"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(q)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "Int8" in lines[-2]  # the weights came back as int8 tensors, not re-quantized fp32
    assert len(json.loads(lines[-1])[0]) == 6


def test_unknown_method_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown quantization method 'gptq-int3'.*torchao-int8-dyn"):
        check_supported("gptq-int3", torch.device("cpu"))
