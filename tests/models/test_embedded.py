"""The embedded default's shipped weights (models/embedded.py, models/shipped.py): built by the
command the repo ships, hash-checked at load, refused clearly when missing, altered or built from
other settings, and fine-tuned with LoRA by the same code the pipeline runs."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.curriculum import PROBES
from models.config import EmbeddedBuildConfig, LoraConfig, ModelConfig, TinyLlamaSpec, TrainConfig
from models.embedded import build_release, grow_llama, new_llama, train_tokenizer, unpack_release
from models.shipped import release as shipped_release
from models.shipped import MANIFEST, ShippedWeightsError, sha256_file, verify
from tasks.config import REPO_ROOT, load_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def micro_release(tmp_path_factory):
    """A release of the micro preset's settings, built by build_release (what `smelt embedded build` runs)."""
    root = tmp_path_factory.mktemp("release")
    (root / "data").mkdir()
    shutil.copy(REPO_ROOT / "data" / "orders.jsonl", root / "data" / "orders.jsonl")
    # grown from a 1-layer seed, as a memory-bound base is: the seed phase, the growth and the base phase all run
    cfg = load_config("micro-cpu", ["model.embedded.pretrain_steps=3", "model.embedded.corpus_max_chars=20000",
                                    "model.embedded.seed_model={hidden_size: 32, num_layers: 1, num_heads: 1, intermediate_size: 64}",
                                    "model.embedded.seed_steps=2"]).model.embedded
    manifest = build_release(cfg, root / "weights", root / "home", CPU, root, "uv run smelt embedded build (test)")
    return root, cfg.model_copy(update={"shipped": "weights"}), manifest


def copy_of(release, tmp_path):
    root, cfg, _ = release
    shutil.copytree(root / "weights", tmp_path / "weights")
    return tmp_path, cfg


def test_a_release_holds_bf16_weights_and_a_manifest_of_how_they_were_made(micro_release):
    root, cfg, manifest = micro_release
    on_disk = json.loads((root / "weights" / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["command"] == "uv run smelt embedded build (test)" and manifest["seed"] == cfg.seed
    assert manifest["tokens_seen"] == (3 + 2) * cfg.pretrain_batch_size * cfg.pretrain_seq_len
    assert [p["step"] for p in manifest["loss_curve"]] == [1, 2, 3]
    assert [(p["phase"], p["step"]) for p in manifest["skill_curve"]] == [
        ("seed", 1), ("seed", 2), ("grown", 0), ("base", 1), ("base", 2), ("base", 3)]
    assert all(set(p) == {"phase", "step", *PROBES} and all(0 <= p[k] <= 1 for k in PROBES) for p in manifest["skill_curve"])
    # growing keeps what the seed computes: its last probe scores are the grown model's first
    seed_end, grown = manifest["skill_curve"][1], manifest["skill_curve"][2]
    assert all(abs(seed_end[k] - grown[k]) < 0.02 for k in PROBES)
    assert manifest["seed_phase"]["train_tokens"] == 2 * cfg.pretrain_batch_size * cfg.pretrain_seq_len
    assert "cpu_flags" in manifest["machine"] and manifest["config"]["base"] == cfg.base.model_dump()
    assert {"base/model.safetensors", "draft/model.safetensors", "base/tokenizer.json"} <= set(manifest["files"])
    assert all(sha256_file(root / "weights" / f) == h for f, h in manifest["files"].items())
    assert json.loads((root / "weights" / "base" / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (root / "weights.tmp").exists()


def test_loading_unpacks_full_precision_copies_that_match_the_shipped_weights(micro_release):
    root, cfg, _ = micro_release
    base, draft = unpack_release(cfg, root / "home", root)
    shipped = AutoModelForCausalLM.from_pretrained(root / "weights" / "base")
    unpacked = AutoModelForCausalLM.from_pretrained(base)
    assert next(unpacked.parameters()).dtype == torch.float32
    assert all(torch.equal(a.float(), b) for a, b in zip(shipped.state_dict().values(), unpacked.state_dict().values()))
    assert (draft / "tokenizer.json").exists() and AutoModelForCausalLM.from_pretrained(draft).num_parameters() < unpacked.num_parameters()


def test_an_altered_file_is_refused_with_its_name_and_the_rebuild_command(micro_release, tmp_path):
    root, cfg = copy_of(micro_release, tmp_path)
    weights = root / "weights" / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match=r"weights/base/model.safetensors does not match .*manifest.json.*"
                                                  r"uv run smelt embedded build"):
        shipped_release(cfg, root)


def test_a_missing_file_or_manifest_is_refused_with_its_name(micro_release, tmp_path):
    root, cfg = copy_of(micro_release, tmp_path)
    (root / "weights" / "draft" / "model.safetensors").unlink()
    with pytest.raises(ShippedWeightsError, match=r"weights/draft/model.safetensors is missing .*git checkout"):
        shipped_release(cfg, root)
    (root / "weights" / MANIFEST).unlink()
    with pytest.raises(ShippedWeightsError, match=r"manifest.json is missing"):
        verify(root / "weights", "the command")


def test_settings_that_differ_from_the_build_are_refused(micro_release):
    root, cfg, _ = micro_release
    other = cfg.model_copy(update={"pretrain_lr": cfg.pretrain_lr * 2})
    with pytest.raises(ShippedWeightsError, match=r"differs from the build .*fields: pretrain_lr.*shipped=null"):
        shipped_release(other, root)


def test_lora_fine_tunes_a_shipped_base_at_micro_scale(micro_release, tmp_path):
    """LoRA on a base loaded from shipped files (a few steps on a few rows): adapters learn, the
    frozen base stays as shipped, and the merge is what gets quantized."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.etl import DatasetVersion
    from tasks.train import finetune

    root, cfg, _ = micro_release
    base, _ = unpack_release(cfg, tmp_path / "home", root)
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "orders.jsonl").read_text().splitlines()[:24]]
    msgs = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.Table.from_pylist(msgs[:16]), tmp_path / "ds" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(msgs[16:]), tmp_path / "ds" / "eval.parquet")
    train = TrainConfig(method="lora", lora=LoraConfig(r=4, alpha=8), steps=4, batch_size=4, learning_rate=2e-2,
                        max_seq_len=96, log_every=1, checkpoint_every=0, device="cpu")
    out = finetune(str(base), DatasetVersion("micro", tmp_path / "ds"), train, ModelConfig(), tmp_path / "home")
    t = json.loads((out / "train.json").read_text())
    assert t["method"] == "lora" and t["steps_run"] == 4 and t["history"][-1]["loss"] < t["history"][0]["loss"]
    assert (out / "adapter").exists()
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    changed = [k for k in before if not torch.equal(before[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers moved


def test_growing_a_model_keeps_its_function_and_adds_heads_units_and_layers():
    tok = train_tokenizer(["growing keeps the function of the small model"] * 20, 300)
    small = new_llama(TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128), tok, seed=0)
    with torch.no_grad():  # a trained model's weights are far from init: make the check meaningful
        for p in small.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    big = grow_llama(small, TinyLlamaSpec(hidden_size=192, num_layers=4, num_heads=6, intermediate_size=384), seed=0)
    assert big.config.num_hidden_layers == 4 and big.config.hidden_size == 192 and big.config.head_dim == 32
    x = torch.randint(0, len(tok), (2, 24))
    small_logits, big_logits = small.eval()(x).logits, big.eval()(x).logits
    assert small_logits.std() > 1  # logits that differ between tokens, so equality below means something
    torch.testing.assert_close(big_logits, small_logits, atol=2e-3 * small_logits.abs().max().item(), rtol=0)
    assert big.num_parameters() > 5 * small.num_parameters()


def test_a_seed_model_that_cannot_grow_into_the_base_is_refused():
    base = TinyLlamaSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256)
    with pytest.raises(ValueError, match="head size"):
        EmbeddedBuildConfig(base=base, seed_model=TinyLlamaSpec(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128))
    with pytest.raises(ValueError, match="num_layers .* larger than base"):
        EmbeddedBuildConfig(base=base, seed_model=TinyLlamaSpec(hidden_size=64, num_layers=6, num_heads=2, intermediate_size=128))


def test_the_default_preset_ships_a_memory_bound_base_and_a_draft_8x_smaller_that_verify():
    """tiny-cpu's committed weights: every file matches its manifest hash, they fit the 50 MB budget in
    bf16, the base's fp32 weights are bigger than a 32 MB L3 cache and the draft is at least 8x smaller."""
    cfg = load_config("tiny-cpu").model.embedded
    release = shipped_release(cfg, REPO_ROOT)
    manifest = json.loads((release / MANIFEST).read_text())
    stored = sum((release / name).stat().st_size for name in manifest["files"])
    assert stored <= 50 * 2**20
    params = manifest["parameters"]
    assert params["base"] * 4 > 32 * 2**20 and params["base"] >= 8 * params["draft"]
    assert manifest["config"] == cfg.model_dump(mode="json", exclude={"shipped"})
    assert manifest["machine"]["cpu_flags"] and manifest["tokens_seen"] > 0
    # it was built to copy by content: the last skill probe of the base phase copies most repeats
    last = [s for s in manifest["skill_curve"] if s["phase"] == "base"][-1]
    assert last["copy_apart"] >= 0.5 and last["copy_adjacent"] >= 0.5
