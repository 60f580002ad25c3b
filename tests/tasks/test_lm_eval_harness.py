"""lm-evaluation-harness as a library on a tiny random Llama: the embedded task must score exactly what
serving's decoding produces, and hub benchmarks must be skipped, quickly and with a reason, offline."""
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.chat import render_prompt
from models.decoding import SamplingParams, generate_text
from tasks.lm_eval_harness import EMBEDDED_TASK, hub_reachable, run_lm_eval

PROMPTS = [
    "Extract the city: Bob lives in Paris.", "def foo(x): return x + 1", "The quick brown fox", "Order for Henry: 3 apples",
]
ANSWER_TOKENS = 12
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens on the discard port: connections are refused at once


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The shared tiny random Llama with its weights scaled up. At init scale (std 0.02) it only echoes the
    prompt's last token, a newline, so no prompt-format error could change its answer; at std 0.3 the
    answer depends on the whole rendered prompt."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.3)
    return model, bos_adding(AutoTokenizer.from_pretrained(tiny_model_dir))


def bos_adding(tok):
    """Make the tokenizer put BOS in front when asked for special tokens, as Llama's and Gemma's do: the
    project always encodes rendered prompts without them, and lm-eval must do the same."""
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Point the hub endpoint (HF_ENDPOINT) at a closed local port, so no test can reach the network."""
    monkeypatch.setattr(hub_constants, "ENDPOINT", CLOSED_PORT)


def greedy(model, tokenizer, text: str) -> str:
    return generate_text(model, tokenizer, text, SamplingParams(max_new_tokens=ANSWER_TOKENS), {}).text


def test_embedded_task_scores_the_models_own_greedy_answers_as_exact_matches(tiny, tmp_path):
    model, tok = tiny
    answers = [greedy(model, tok, render_prompt(tok, p)) for p in PROMPTS]
    assert all(answers)
    # The check has teeth: a BOS in front or no chat template changes what this model says.
    with_bos = [greedy(model, tok, tok.bos_token + render_prompt(tok, p)) for p in PROMPTS]
    untemplated = [greedy(model, tok, p) for p in PROMPTS]
    assert with_bos != answers and untemplated != answers

    out = run_lm_eval(model, tok, [EMBEDDED_TASK], [{"prompt": p, "completion": a} for p, a in zip(PROMPTS, answers)],
                      None, tmp_path, max_gen_toks=ANSWER_TOKENS)

    assert out["skipped"] == {}
    assert out["results"][EMBEDDED_TASK]["exact_match"] == 1.0
    assert out["results"][EMBEDDED_TASK]["samples"] == len(PROMPTS)


def test_embedded_task_scores_answers_the_model_does_not_give_as_misses_and_honours_the_limit(tiny, tmp_path):
    model, tok = tiny
    rows = [{"prompt": p, "completion": '{"city": "Paris"}'} for p in PROMPTS]

    out = run_lm_eval(model, tok, [EMBEDDED_TASK], rows, 2, tmp_path)

    assert out["results"][EMBEDDED_TASK]["exact_match"] == 0.0
    assert out["results"][EMBEDDED_TASK]["samples"] == 2
    assert all(p.is_relative_to(tmp_path) for p in tmp_path.rglob("*"))  # lm-eval's files stay in the workdir
    assert (tmp_path / "datasets-cache").is_dir()


def test_the_callers_model_and_random_state_are_left_as_they_were(tiny_model_dir, tmp_path):
    """A quantized lm_head (torchao int4) is no longer the tied embedding; HFLM must not re-tie it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    own_head = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.lm_head.weight = own_head
    rng = torch.random.get_rng_state()

    run_lm_eval(model, tok, [EMBEDDED_TASK], [{"prompt": PROMPTS[0], "completion": "x"}], 1, tmp_path)

    assert model.lm_head.weight is own_head
    assert not model.training and model.device.type == "cpu"
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_hub_and_unknown_tasks_are_skipped_quickly_with_reasons_and_the_embedded_one_still_runs(tiny, tmp_path, unreachable_hub):
    model, tok = tiny
    rows = [{"prompt": p, "completion": "x"} for p in PROMPTS]
    t0 = time.perf_counter()

    out = run_lm_eval(model, tok, ["arc_easy", EMBEDDED_TASK, "hellaswg"], rows, 2, tmp_path)

    assert time.perf_counter() - t0 < 30  # lm-eval indexes its registry (seconds); no retries against the hub
    assert list(out["results"]) == [EMBEDDED_TASK] and 0.0 <= out["results"][EMBEDDED_TASK]["exact_match"] <= 1.0
    assert set(out["skipped"]) == {"arc_easy", "hellaswg"}
    offline = out["skipped"]["arc_easy"]
    assert "'allenai/ai2_arc'" in offline and "cannot be downloaded" in offline and "offline" in offline
    unknown = out["skipped"]["hellaswg"]
    assert "unknown lm-eval task 'hellaswg'" in unknown and "'hellaswag'" in unknown  # with the close match


def test_an_embedded_task_without_rows_is_skipped(tiny, tmp_path):
    model, tok = tiny
    out = run_lm_eval(model, tok, [EMBEDDED_TASK], [], None, tmp_path)
    assert out["results"] == {} and "no eval rows" in out["skipped"][EMBEDDED_TASK]  # all skipped: no results


class _NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_probe_counts_any_answer_as_reachable_and_a_refused_connection_as_not(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_reachable(3.0)
    finally:
        server.shutdown()
    monkeypatch.setattr(hub_constants, "ENDPOINT", CLOSED_PORT)
    assert not hub_reachable(3.0)
