import pytest
import torch

from models.candidate import assemble_candidate, load_candidate
from models.config import DecodeConfig
from models.quant import quantize_model

PROMPTS = ["Extract the city: Bob lives in Paris.", "def foo(x): return x + 1", "The quick brown fox"]


@pytest.fixture(scope="module")
def quant_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-none")
    quantize_model("none", tiny_model_dir, out, [])
    return out


def test_speculative_strategies_are_lossless_under_greedy(quant_dir, tiny_draft_dir, tmp_path):
    decode = DecodeConfig(max_new_tokens=12, num_draft_tokens=3)
    outputs = {}
    for strategy in ("plain", "draft", "prompt-lookup"):
        path = assemble_candidate(quant_dir, tiny_draft_dir, strategy, decode, tmp_path / strategy)
        cand = load_candidate(path, torch.device("cpu"))
        assert cand.recipe.strategy == strategy and cand.recipe.quant_method == "none"
        assert (cand.draft is not None) == (strategy == "draft")
        outputs[strategy] = [cand.generate(p).token_ids for p in PROMPTS]
    assert outputs["draft"] == outputs["plain"]
    assert outputs["prompt-lookup"] == outputs["plain"]
    assert sum(map(len, outputs["plain"])) >= 12  # tokens were produced: the comparison is not vacuous


def test_draft_strategy_without_draft_is_refused(quant_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a trained draft"):
        assemble_candidate(quant_dir, None, "draft", DecodeConfig(), tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_candidate_uses_the_stored_chat_template(quant_dir, tmp_path):
    from transformers import AutoTokenizer

    from models.chat import render_prompt

    cand = load_candidate(assemble_candidate(quant_dir, None, "plain", DecodeConfig(), tmp_path / "p"), torch.device("cpu"))
    stored = AutoTokenizer.from_pretrained(quant_dir)
    conversation = render_prompt(stored, "hi there")
    assert conversation == render_prompt(cand.tokenizer, "hi there")
    assert conversation.startswith("<|user|>\nhi there<|end|>") and conversation.endswith("<|assistant|>\n")


def test_draft_acceptance_is_one_for_a_model_drafting_for_itself(quant_dir, tiny_model_dir, tmp_path):
    decode = DecodeConfig(max_new_tokens=10, num_draft_tokens=3)
    cand = load_candidate(assemble_candidate(quant_dir, tiny_model_dir, "draft", decode, tmp_path / "self"), torch.device("cpu"))
    outputs = [cand.generate(p) for p in PROMPTS]
    assert sum(o.new_tokens for o in outputs) > 0
    assert cand.draft_acceptance(PROMPTS, outputs) == 1.0
    plain = load_candidate(assemble_candidate(quant_dir, None, "plain", decode, tmp_path / "plain"), torch.device("cpu"))
    assert plain.draft_acceptance(PROMPTS, [plain.generate(p) for p in PROMPTS]) is None


def test_draft_agreement_counts_positions_where_the_draft_would_propose_the_target_token(tiny_draft_dir):
    from transformers import AutoModelForCausalLM

    from models.decoding import draft_agreement

    draft = AutoModelForCausalLM.from_pretrained(tiny_draft_dir).eval()
    prompt = [5, 17, 42, 99]
    own = draft.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 4:].tolist()
    assert draft_agreement(own, prompt, draft) == (6, 6)
    with torch.no_grad():
        first_guess = draft(torch.tensor([prompt])).logits[0, -1].argmax().item()
    wrong_first = [(first_guess + 1) % draft.config.vocab_size] + own[1:]
    agree, total = draft_agreement(wrong_first, prompt, draft)
    assert total == 6 and agree <= 5


def test_compiled_recipes_give_the_eager_candidates_tokens_whole_and_streamed(quant_dir, tiny_draft_dir, tmp_path):
    from transformers import TextIteratorStreamer

    from models.chat import render_context
    from models.decoding import GenerateDecoder, SamplingParams
    from models.fastgen import CompiledDecoder

    eager = load_candidate(assemble_candidate(quant_dir, None, "plain", DecodeConfig(max_new_tokens=12), tmp_path / "e"),
                           torch.device("cpu"))
    want = [eager.generate(p).token_ids for p in PROMPTS]
    assert isinstance(eager.decoder, GenerateDecoder)  # no compile: transformers' generate serves everything
    for strategy in ("plain", "draft"):
        decode = DecodeConfig(max_new_tokens=12, num_draft_tokens=3, compile=True)
        cand = load_candidate(assemble_candidate(quant_dir, tiny_draft_dir, strategy, decode, tmp_path / strategy),
                              torch.device("cpu"))
        fast = cand.decoder.fast
        assert isinstance(fast, CompiledDecoder) and (fast.draft is not None) == (strategy == "draft")
        got = [cand.generate(p) for p in PROMPTS]
        assert [g.token_ids for g in got] == want, strategy
        assert all(g.first_token_s is not None and 0 < g.first_token_s <= g.seconds for g in got)
        stream = TextIteratorStreamer(cand.tokenizer, skip_prompt=True, skip_special_tokens=True)
        whole = cand.complete(render_context(cand.tokenizer, PROMPTS[0]), SamplingParams(12), streamer=stream)
        assert "".join(stream).strip() == whole.text
