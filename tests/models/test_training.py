import torch

from models.chat import tokenize_example
from models.training import ExampleSet, TokenBlocks, fit_causal_lm


def test_prompt_tokens_carry_no_loss(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = tokenize_example(tok, "What is two plus two?", "4", max_len=64)
    n_prompt = sum(1 for label in ex.labels if label == -100)
    assert 0 < n_prompt < len(ex.labels)
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]).startswith("4")


def test_copy_blocks_repeat_a_random_run_of_real_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [f"function number {i} returns a value for the caller" for i in range(60)]
    plain = TokenBlocks.from_texts(texts, tok, 32).blocks
    blocks = TokenBlocks.from_texts(texts, tok, 32, copy_every=2, seed=0).blocks
    assert torch.equal(blocks[0, :16], blocks[0, 16:]) and torch.equal(blocks[2, :16], blocks[2, 16:])
    assert not torch.equal(blocks[0], plain[0])  # replaced by a random run...
    assert set(blocks[0].tolist()) <= set(plain.flatten().tolist())  # ...of tokens real text uses
    assert torch.equal(blocks[1], plain[1])  # other blocks stay real text


def test_fit_lowers_the_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.training import PadCollator

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = ExampleSet([tokenize_example(tok, f"count {i}", "yes", 32) for i in range(16)])
    batch = PadCollator(tok.pad_token_id)([rows[i] for i in range(16)])

    def loss() -> float:
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss()
    fit_causal_lm(model, rows, steps=30, batch_size=8, lr=1e-2, seed=0, device=torch.device("cpu"),
                  desc="test", pad_id=tok.pad_token_id)
    assert loss() < 0.3 * before


def test_lora_training_leaves_the_config_untouched(tiny_model_dir, tmp_path):
    """peft edits the lists it is given; a changed config would change every later content hash."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.config import LoraConfig, ModelConfig, TrainConfig
    from tasks.etl import DatasetVersion
    from tasks.train import train_lora

    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]), ds_dir / "train.parquet")
    cfg = TrainConfig(lora=LoraConfig(r=2, alpha=4, modules_to_save=["embed_tokens"]), steps=2, batch_size=4, device="cpu")
    before = cfg.model_dump()
    out = train_lora(str(tiny_model_dir), DatasetVersion("v", ds_dir), cfg, ModelConfig(), tmp_path / "home")
    assert cfg.model_dump() == before
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "merged" / "model.safetensors").exists()
