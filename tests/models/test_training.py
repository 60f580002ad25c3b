"""smelt's training loop (models/training.py) on a tiny random Llama: loss, packing, data order,
accumulation, early stopping and checkpoints."""
import math

import pytest
import torch
from safetensors.torch import load_file

from models.chat import tokenize_example
from models.training import (
    BatchOrder,
    ExampleSet,
    FitSpec,
    PackedSet,
    PadCollator,
    batch_loss,
    fit,
    label_tokens,
    latest_checkpoint,
    trainable_names,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def model_of(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def rows_of(tok, n: int = 24) -> ExampleSet:
    return ExampleSet([tokenize_example(tok, f"order {i} from Oslo", f"qty {i} day {i % 7}", 48) for i in range(n)])


def test_prompt_tokens_carry_no_loss(tok):
    ex = tokenize_example(tok, "What is two plus two?", "4", max_len=64)
    n_prompt = sum(1 for label in ex.labels if label == -100)
    assert 0 < n_prompt < len(ex.labels)
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]).startswith("4")


def test_fit_lowers_the_loss_and_reports_what_it_did(tiny_model_dir, tok):
    model = model_of(tiny_model_dir)
    rows = ExampleSet([tokenize_example(tok, f"count {i}", "yes", 32) for i in range(16)])
    batch = PadCollator(tok.pad_token_id)([rows[i] for i in range(16)])

    def loss() -> float:
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss()
    seen = []
    stats = fit(model, rows, FitSpec(steps=30, batch_size=8, lr=1e-2, log_every=10), device=CPU, pad_id=tok.pad_token_id,
                eval_rows=rows, on_log=lambda step, m: seen.append((step, sorted(m))))
    assert loss() < 0.3 * before
    assert [h["step"] for h in stats["history"]] == [10, 20, 30]
    assert (10, ["epoch", "grad_norm", "learning_rate", "loss", "tokens_per_s"]) in seen
    assert seen[-1] == (30, ["eval_loss"]) and stats["eval_loss"] == pytest.approx(loss(), rel=1e-4)
    assert stats["train_tokens"] == 30 * 8 * sum(len(r["input_ids"]) for r in rows) / len(rows)  # same length rows
    assert stats["history"][-1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)  # cosine ran to its end


def test_packed_rows_score_exactly_as_they_do_alone(tiny_model_dir, tok):
    """Packing must not let a row attend to the one before it: the summed loss over packed
    sequences equals the summed loss of the same rows one by one."""
    model = model_of(tiny_model_dir).eval()
    rows = rows_of(tok, 10)
    packed = PackedSet(rows, max_len=64, seed=0)
    assert len(packed) < len(rows)  # several rows per sequence
    assert sorted(x for p in packed.packs for x in p["input_ids"]) == sorted(x for r in rows for x in r["input_ids"])
    collate = PadCollator(tok.pad_token_id)
    total = sum(label_tokens(rows[i]) for i in range(len(rows)))
    assert sum(label_tokens(p) for p in packed.packs) == total
    with torch.no_grad():
        alone = sum(batch_loss(model, collate([rows[i]]), total).item() for i in range(len(rows)))
        together = batch_loss(model, collate(packed.packs), total).item()
        shifted = dict(collate(packed.packs))
        shifted["position_ids"] = torch.arange(shifted["input_ids"].shape[1]).expand_as(shifted["input_ids"])
        leaky = batch_loss(model, shifted, total).item()  # one causal mask over the whole pack
    assert abs(together - alone) < 1e-5
    # a random-init model attends almost uniformly, so a leak moves the loss only a little; still the
    # check above tells it apart (measured: 6e-7 packed vs 1.1e-4 leaking)
    assert abs(leaky - alone) > 20 * max(abs(together - alone), 1e-6)


def test_batch_order_is_a_function_of_seed_and_step_alone():
    order = BatchOrder(n_rows=10, batch_size=4, seed=3)
    steps = [order.global_batch(s) for s in range(5)]  # 20 items: two full epochs
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10))  # each epoch is a permutation
    assert BatchOrder(10, 4, 3).global_batch(4) == steps[4]  # a fresh order (a resumed run) agrees
    assert BatchOrder(10, 4, 4).global_batch(0) != steps[0]
    for world, accum in [(1, 2), (2, 1), (2, 2), (4, 1)]:
        parts = [b for r in range(world) for b in order.micro_batches(3, r, world, accum)]
        assert len(parts) == world * accum and sorted(sum(parts, [])) == sorted(steps[3])


def test_gradient_accumulation_gives_the_update_of_one_big_batch(tiny_model_dir, tok):
    rows = rows_of(tok, 16)
    weights = []
    for accum in (1, 4):
        model = model_of(tiny_model_dir)
        fit(model, rows, FitSpec(steps=3, batch_size=8, lr=1e-2, grad_accum=accum), device=CPU, pad_id=tok.pad_token_id)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_early_stopping_stops_and_keeps_the_best_weights(tiny_model_dir, tok):
    model = model_of(tiny_model_dir)
    rows = rows_of(tok, 16)
    # min_delta is so large that only the first evaluation counts as a gain: stop at the next one
    spec = FitSpec(steps=50, batch_size=8, lr=1e-2, eval_every=2, patience=1, min_delta=100.0)
    stats = fit(model, rows, spec, device=CPU, pad_id=tok.pad_token_id, eval_rows=rows)
    assert stats["stopped_early"] and stats["steps_run"] == 4
    assert stats["eval_loss"] == pytest.approx(stats["best_eval_loss"], rel=1e-5)  # step-2 weights restored


def test_checkpoints_hold_only_trained_weights_and_a_rerun_resumes(tiny_model_dir, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    rows = rows_of(tok, 16)
    spec = FitSpec(steps=6, batch_size=4, lr=1e-2, checkpoint_every=2, keep_checkpoints=2, log_every=1)

    def lora_model():
        torch.manual_seed(0)
        return get_peft_model(model_of(tiny_model_dir), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))

    straight = fit(lora_model(), rows, spec, device=CPU, pad_id=tok.pad_token_id)
    first = fit(lora_model(), rows, spec, device=CPU, pad_id=tok.pad_token_id,
                checkpoint_dir=tmp_path / "ck")
    ckpts = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert ckpts == ["step-0000002", "step-0000004"]  # older ones pruned, no temporary folders left
    model = lora_model()
    stored = load_file(latest_checkpoint(tmp_path / "ck") / "model.safetensors")
    assert set(stored) == trainable_names(model) and all("lora_" in k for k in stored)
    # A rerun over the same checkpoints starts at step 4 and ends where the uninterrupted run ended.
    again = fit(model, rows, spec, device=CPU, pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "ck")
    assert again["resumed_from_step"] == 4 and first["resumed_from_step"] == 0
    assert [h["loss"] for h in again["history"]] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-5)
    assert not math.isnan(again["final_loss"])


def test_batch_order_can_keep_the_rows_own_order():
    order = BatchOrder(10, 4, seed=0, shuffle=False)
    assert [order.global_batch(s) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert sorted(BatchOrder(10, 10, seed=0).global_batch(0)) == list(range(10))  # shuffled: a permutation
