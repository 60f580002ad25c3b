"""The preference stage as the pipeline calls it: pairs from a dataset version, DPO over a LoRA adapter
on the fine-tuned model, merged into a folder shaped like fine-tune's; refused with a way out when the
dataset holds no pairs."""
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from models.config import LoraConfig, PreferenceConfig, TrainConfig
from tasks.data.formats import DataError
from tasks.etl import DatasetVersion
from tasks.train import tune_preferences


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Bob from Oslo ordered {i} cups."}, {"role": "assistant", "content": f'{{"qty": {i}}}'}]


def dataset(path, pairs: bool) -> DatasetVersion:
    rows = [{"messages": messages(i), "rejected": (f'{{"qty": {i + 1}}}' if pairs and i % 3 else None)} for i in range(40)]
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:32]), path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[32:]), path / "eval.parquet")
    return DatasetVersion(path.name, path)


@pytest.fixture
def finetuned(tiny_model_dir, tmp_path):
    out = tmp_path / "finetuned-x"
    shutil.copytree(tiny_model_dir, out / "merged")
    (out / "train.json").write_text(json.dumps({"method": "lora"}))
    return out


def config(method: str) -> TrainConfig:
    return TrainConfig(max_seq_len=48, log_every=2, checkpoint_every=0, device="cpu",
                       preference=PreferenceConfig(method=method, steps=4, batch_size=8, learning_rate=5e-3,
                                                   lora=LoraConfig(r=4, alpha=8)))


def test_dpo_stage_writes_a_merged_model_beside_its_adapter_and_stats(finetuned, tmp_path):
    ds = dataset(tmp_path / "pairs", pairs=True)
    out = tune_preferences(finetuned, ds, config("dpo"), tmp_path / "home")
    assert out.name.startswith("preferred-dpo-") and out != finetuned
    stats = json.loads((out / "train.json").read_text())
    assert stats["method"] == "dpo" and stats["pairs"] == 21 and stats["steps"] == 4  # rows 1..31 with i % 3 != 0
    assert stats["sft"] == str(finetuned) and stats["history"][-1]["step"] == 4
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    sft = AutoModelForCausalLM.from_pretrained(finetuned / "merged")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not merged.state_dict()[name].equal(sft.state_dict()[name])  # the adapter was folded in
    assert tune_preferences(finetuned, ds, config("dpo"), tmp_path / "home") == out  # a rerun reuses it


def test_none_keeps_the_fine_tuned_model_and_no_pairs_is_refused_with_a_way_out(finetuned, tmp_path):
    ds = dataset(tmp_path / "plain", pairs=False)
    assert tune_preferences(finetuned, ds, config("none"), tmp_path / "home") == finetuned
    with pytest.raises(DataError, match=r"needs preference pairs.*orders-preference\.jsonl.*method=none"):
        tune_preferences(finetuned, ds, config("dpo"), tmp_path / "home")


def test_orpo_from_the_base_skips_sft(tiny_model_dir, tmp_path):
    from tasks.train import finetune

    ds = dataset(tmp_path / "pairs", pairs=True)
    cfg = config("orpo")
    cfg = cfg.model_copy(update={"preference": cfg.preference.model_copy(update={"start": "base"})})
    assert cfg.stages() == ("preference", "draft")
    assert finetune(str(tiny_model_dir), ds, cfg, None, tmp_path / "home") is None  # no SFT stage at all
    out = tune_preferences(None, ds, cfg, tmp_path / "home", base=str(tiny_model_dir))
    stats = json.loads((out / "train.json").read_text())
    assert out.name.startswith("preferred-orpo-") and stats["sft"] is None and stats["start"] == tiny_model_dir.as_posix()
    assert stats["history"][-1]["loss"] < stats["history"][0]["loss"]
    assert (out / "merged" / "config.json").exists() and (out / "merged" / "tokenizer.json").exists()


def test_starting_from_the_base_needs_a_preference_method():
    with pytest.raises(ValueError, match="start=base skips SFT, so it needs a preference method"):
        PreferenceConfig(method="none", start="base")
