"""Peer engines in the serving benchmark: converted from the same fp32 weights, timed in the same
turns, lossless formats give the baseline's tokens, and a missing engine is skipped with a message."""
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.peers import peer_recipes
from bench.serve import bench_candidates
from models.quant import quantize_model

PROMPTS = ["Extract name, city, item, qty and day as JSON.\nBob from Oslo ordered 3 cups on Monday.",
           "Extract name, city, item, qty and day as JSON.\nOn Friday, Lena bought 12 maps in Lima."]


@pytest.fixture(scope="module")
def varied_fp32(tiny_model_dir, tmp_path_factory):
    """The tiny model with weights scaled up, so its greedy tokens vary (a freshly initialised one
    repeats one token, which any engine would match)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    src = tmp_path_factory.mktemp("varied")
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(src)
    return quantize_model("none", src, tmp_path_factory.mktemp("none") / "model", [])


def test_ctranslate2_formats_are_timed_with_the_recipes_and_float32_matches_the_baseline(varied_fp32, tmp_path):
    lines = []
    result = bench_candidates({"none": varied_fp32}, None, PROMPTS, max_new_tokens=12, streams=3, passes=1,
                              echo=lines.append, peers_dir=tmp_path)
    rows = {r["recipe"]: r for r in result["rows"]}
    assert {"ctranslate2 float32", "ctranslate2 int8", "ctranslate2 int8_float32"} <= set(rows)
    float32 = rows["ctranslate2 float32"]
    assert float32["same_tokens_as_baseline"] == len(PROMPTS)  # the same weights and greedy: the same tokens
    assert float32["decode_tokens_per_s"] > 0 and float32["ttft_s"] > 0 and float32["concurrency"] == "batched"
    assert rows["ctranslate2 int8"]["weight_bytes"] < float32["weight_bytes"]
    assert any("peer ctranslate2: converting" in line for line in lines)


def test_the_float32_conversion_decodes_varied_tokens_like_transformers(varied_fp32, tmp_path):
    """Guards the test above: the model's greedy answers are not one repeated token."""
    from bench.serve import Setup

    from models.chat import render_context

    tok = AutoTokenizer.from_pretrained(varied_fp32)
    setup = Setup(tok, [render_context(tok, p) for p in PROMPTS], None, 12, 2, 3)
    recipe = next(r for r in peer_recipes(varied_fp32, setup, tmp_path) if r.name == "ctranslate2 float32")
    tokens = recipe.decode(0).token_ids
    assert len(set(tokens)) > 2, tokens
    batch = recipe.streams()
    assert [g.token_ids for g in batch][0] == tokens


def test_a_peer_that_is_not_installed_is_skipped_with_the_install_command(varied_fp32, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed: `import ctranslate2` raises
    lines = []
    assert peer_recipes(varied_fp32, None, tmp_path, echo=lines.append) == []
    assert lines and "ctranslate2 is not installed" in lines[0] and "uv " in lines[0]


def test_an_answer_that_ends_at_eos_keeps_one_eos_like_smelts_loops(varied_fp32, tmp_path):
    """A copy of the model whose EOS is the token it answers first: every engine stops at once."""
    from transformers import GenerationConfig

    from bench.serve import Setup
    from models.chat import render_context
    from models.decoding import encode

    tok = AutoTokenizer.from_pretrained(varied_fp32)
    model = AutoModelForCausalLM.from_pretrained(varied_fp32).eval()
    text = render_context(tok, PROMPTS[0])
    with torch.inference_mode():
        first = int(model(torch.tensor([encode(tok, text)])).logits[0, -1].argmax())
    stops = tmp_path / "stops"
    tok.eos_token = tok.convert_ids_to_tokens(first)
    model.config.eos_token_id = first
    model.generation_config = GenerationConfig(eos_token_id=first, pad_token_id=first)
    model.save_pretrained(stops)
    tok.save_pretrained(stops)
    setup = Setup(tok, [text], None, 12, 1, 3)
    recipe = next(r for r in peer_recipes(stops, setup, tmp_path / "peers") if r.name == "ctranslate2 float32")
    assert recipe.decode(0).token_ids == [first]  # the EOS once: as transformers' generate and smelt's loops give it
