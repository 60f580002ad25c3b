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
