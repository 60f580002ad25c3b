"""The hub presets run the same code as the embedded default; here on tiny random models of their architectures."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from models.candidate import assemble_candidate, load_candidate
from tasks.config import load_config
from tasks.etl import DatasetVersion
from tasks.quantize import quantize_candidates
from tasks.train import finetune


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds")
    rows = [{"prompt": f"Bob from Oslo ordered {i} cups.", "completion": f'{{"qty": {i}}}'} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), path / "train.parquet")
    return DatasetVersion("tinyds", path)


def test_qwen_preset_trains_merges_quantizes_and_generates_on_a_tiny_qwen2(tiny_qwen2_dir, tiny_dataset, tmp_path):
    # group size 32: the preset's 128 is wider than this model's 64-wide layers
    preset = load_config("qwen2.5-1.5b-lora-gpu", ["train.steps=3", "train.batch_size=4", "train.device=cpu", "quant.group_size=32"])
    assert preset.train.lora.target_modules[0] == "q_proj"  # the preset's own module names exist in Qwen2
    finetuned = finetune(str(tiny_qwen2_dir), tiny_dataset, preset.train, preset.model, tmp_path)
    assert (finetuned / "adapter" / "adapter_model.safetensors").exists()
    quant = quantize_candidates(finetuned, tiny_dataset, preset.quant.model_copy(update={"calibration_rows": 4}), tmp_path, "cpu")
    assert set(quant) == {"none", "gptq-int4", "torchao-int8-dyn", "bnb-nf4"} == set(preset.quant.methods)
    assert len((quant["none"] / "calibration.jsonl").read_text().splitlines()) == 4
    for method, qdir in quant.items():
        cand = load_candidate(assemble_candidate(qdir, None, "plain", preset.decode, tmp_path / f"c-{method}"), torch.device("cpu"))
        out = cand.generate("Bob from Oslo ordered 3 cups.", max_new_tokens=4)
        assert out.new_tokens >= 1
        assert type(cand.model).__name__ == "Qwen2ForCausalLM"


def test_a_method_the_device_cannot_run_is_refused_up_front(tiny_dataset, tmp_path, monkeypatch):
    # A backend that says it cannot run here must stop the stage before any artifact is written.
    import models.quant.torchao as tao
    from models.config import QuantConfig
    from models.quant import BACKENDS

    monkeypatch.setattr(tao, "unsupported_reason", lambda device, scheme: "needs a GPU" if scheme == "int8-wo" else None)
    with pytest.raises(ValueError, match="'torchao-int8-wo' cannot run on cpu: needs a GPU; methods that can: .*none"):
        quantize_candidates(tmp_path / "nowhere", tiny_dataset, QuantConfig(methods=["none", "torchao-int8-wo"]), tmp_path, "cpu")
    assert not (tmp_path / "models").exists()
    assert "torchao-int8-wo" in BACKENDS


def test_distillation_targets_are_the_targets_greedy_tokens_in_batches(tiny_model_dir):
    # Training's distillation decodes its targets with the one left-padded batch helper, a few
    # prompts per batch; each row must be what the target alone would generate, cut at its EOS.
    from transformers import AutoModelForCausalLM

    from models.chat import render_context
    from models.decoding import draft_acceptance, encode
    from tasks.train import greedy_generations, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(str(tiny_model_dir), None)
    prompts = [[{"role": "user", "content": t}] for t in ("Bob from Oslo ordered 3 cups.", "x", "The module provides")]
    gens = greedy_generations(model, tok, prompts, max_new_tokens=10, batch_size=2)
    ids = [encode(tok, render_context(tok, p)) for p in prompts]
    for g, prompt_ids in zip(gens, ids):
        alone = model.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
        assert g.token_ids == alone and g.text == tok.decode(alone, skip_special_tokens=True).strip()
    assert sum(g.new_tokens for g in gens) > 0
    assert draft_acceptance(model, ids, [g.token_ids for g in gens]) == 1.0  # the target drafting for itself
