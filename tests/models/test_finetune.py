"""Fine-tuning methods (LoRA, QLoRA on bitsandbytes' CPU backend, full) and the multi-process path
(torchrun, gloo), on a tiny random Llama through the same `finetune` the pipeline calls."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from models.config import LoraConfig, ModelConfig, TrainConfig
from models.finetune import load_for_training
from tasks.etl import DatasetVersion
from tasks.train import finetune

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds")
    rows = [{"messages": [{"role": "user", "content": f"Bob from Oslo ordered {i} cups."},
                          {"role": "assistant", "content": f'{{"qty": {i}}}'}]} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows[:32]), path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[32:]), path / "eval.parquet")
    return DatasetVersion("tinyds", path)


def config(**kw) -> TrainConfig:
    base = dict(lora=LoraConfig(r=4, alpha=8), steps=6, batch_size=8, learning_rate=5e-3, max_seq_len=48, log_every=2,
                checkpoint_every=0, device="cpu")
    return TrainConfig(**{**base, **kw})


def train_json(out) -> dict:
    return json.loads((out / "train.json").read_text())


@torch.no_grad()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits


def test_lora_keeps_the_adapter_and_merges_it_exactly(tiny_model_dir, dataset, tmp_path):
    from peft import PeftModel

    cfg = config(lora=LoraConfig(r=4, alpha=8, modules_to_save=["embed_tokens"]))
    before = cfg.model_dump()
    out = finetune(str(tiny_model_dir), dataset, cfg, ModelConfig(), tmp_path)
    assert cfg.model_dump() == before  # peft edits the lists it is given; our config must not change
    t = train_json(out)
    assert t["method"] == "lora" and t["steps_run"] == 6 and t["history"][-1]["loss"] < t["history"][0]["loss"]
    assert t["eval_loss"] > 0 and not list(tmp_path.glob("models/.work-*"))  # checkpoints gone once the result is in place
    tokens = torch.randint(0, 300, (2, 12))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert torch.allclose(logits(adapted, tokens), logits(merged, tokens), atol=1e-4)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokens), logits(merged, tokens), atol=1e-3)
    assert (out / "merged" / "chat_template.jinja").exists() or "chat_template" in (out / "merged" / "tokenizer_config.json").read_text()


def test_qlora_trains_adapters_over_a_4bit_base_on_this_cpu(wide64_model_dir, dataset, tmp_path):
    import bitsandbytes as bnb

    cfg = config(method="qlora")
    model = load_for_training(str(wide64_model_dir), "qlora", cfg, CPU)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_type == "nf4" for m in four_bit)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    out = finetune(str(wide64_model_dir), dataset, cfg, ModelConfig(), tmp_path)
    t = train_json(out)
    assert t["method"] == "qlora" and t["history"][-1]["loss"] < t["history"][0]["loss"]
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged  # merged into the full-precision base: what gets quantized later


def test_qlora_names_a_layer_the_cpu_4bit_kernel_cannot_pack(tiny_model_dir):
    with pytest.raises(ValueError, match=r"train.method=qlora on the CPU packs blocks of 64 inputs, but model.layers.0.self_attn."
                                         r"q_proj has 32; use train.method=lora"):
        load_for_training(str(tiny_model_dir), "qlora", config(method="qlora"), CPU)


def test_full_finetuning_trains_every_weight(tiny_model_dir, dataset, tmp_path):
    cfg = config(method="full", learning_rate=1e-3)
    model = load_for_training(str(tiny_model_dir), "full", cfg, CPU)
    assert all(p.requires_grad for p in model.parameters())
    out = finetune(str(tiny_model_dir), dataset, cfg, ModelConfig(), tmp_path)
    assert not (out / "adapter").exists() and train_json(out)["method"] == "full"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    assert all(not torch.equal(base[k], tuned[k]) for k in base if k.endswith("q_proj.weight"))


def test_epochs_decide_the_steps(tiny_model_dir, dataset, tmp_path):
    out = finetune(str(tiny_model_dir), dataset, config(epochs=1.5), ModelConfig(), tmp_path)
    assert train_json(out)["steps_run"] == 6  # 1.5 x 32 rows / 8 per step


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_model_dir, dataset, tmp_path):
    """train.num_processes=2 runs torchrun with two gloo ranks; each computes half of every global
    batch, and the result matches one process on the whole batch. The main rank logs per-step
    metrics to the MLflow run it is given."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("t")).info.run_id
    one = finetune(str(tiny_model_dir), dataset, config(), ModelConfig(), tmp_path / "one")
    two = finetune(str(tiny_model_dir), dataset, config(num_processes=2), ModelConfig(), tmp_path / "two", (uri, run))
    a, b = train_json(one), train_json(two)
    assert a["num_processes"] == 1 and b["num_processes"] == 2
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-4)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    wa = AutoModelForCausalLM.from_pretrained(one / "merged").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(two / "merged").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    logged = client.get_metric_history(run, "loss")
    assert [m.step for m in logged] == [2, 4, 6] and [m.value for m in logged] == pytest.approx([h["loss"] for h in b["history"]])


def test_a_batch_that_cannot_be_split_or_early_stopping_without_evals_is_refused():
    with pytest.raises(ValidationError, match="batch_size 10 does not split evenly over num_processes x grad_accum = 4"):
        TrainConfig(batch_size=10, num_processes=2, grad_accum=2)
    with pytest.raises(ValidationError, match="early_stopping_patience needs eval_every"):
        TrainConfig(early_stopping_patience=2)
