"""The OpenAI-compatible app in-process (FastAPI TestClient) over a real tiny candidate and engine.

The same app runs inside `bentoml serve` in tests/flows/test_pipeline_e2e.py with the official client.
"""
import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from models.candidate import assemble_candidate, load_candidate
from models.chat import render_messages, render_prompt, tokenize_example
from models.config import DecodeConfig
from models.decoding import SamplingParams
from models.quant import quantize_model
from serving.config import ServeConfig
from models.engine import Busy, Engine
from serving.metrics import Metrics
from serving.openai_api import create_app

PROMPT = "Extract the city: Bob lives in Paris."


@pytest.fixture(scope="module")
def candidates(varied_model_dir, tiny_draft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    quantize_model("none", varied_model_dir, root / "q", [])
    out = {}
    for compile in (False, True):  # "-compiled": smelt's compiled static-cache loop (decode.compile)
        decode = DecodeConfig(max_new_tokens=16, compile=compile)
        for s in ("plain", "draft"):
            name = s + ("-compiled" if compile else "")
            out[name] = load_candidate(assemble_candidate(root / "q", tiny_draft_dir, s, decode, root / name), torch.device("cpu"))
    return out


def make_client(candidate, **cfg):
    registry = CollectorRegistry()
    app = create_app()
    # prefill in the model's dtype, as the offline decoders these tests compare with do (on an AMX CPU 'auto'
    # prefills in bf16, which may change a random tiny model's greedy tokens; tests/models/test_batching.py covers it)
    cfg = {"warm_rows": 1, "prefill_dtype": "model", **cfg}
    app.state.engine = Engine(candidate, ServeConfig(model_id="tiny", **cfg), Metrics(registry))
    return TestClient(app), registry


@pytest.fixture(scope="module")
def client(candidates):
    return make_client(candidates["plain"])


def chat(client, content=PROMPT, **extra):
    return client.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": content}], **extra})


def test_models_lists_the_served_model(client):
    body = client[0].get("/models").json()
    assert [m["id"] for m in body["data"]] == ["tiny"]


def test_greedy_chat_and_completions_equal_offline_generation(client, candidates):
    cand = candidates["plain"]
    body = chat(client[0]).json()
    offline = cand.generate(PROMPT)
    assert body["choices"][0]["message"]["content"] == offline.text and len(offline.text) > 5
    assert body["usage"]["completion_tokens"] == offline.new_tokens
    assert body["usage"]["prompt_tokens"] == len(cand.tokenizer(render_prompt(cand.tokenizer, PROMPT), add_special_tokens=False)["input_ids"])
    raw = client[0].post("/completions", json={"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 12}).json()
    assert raw["choices"][0]["text"] == cand.complete("def add(a, b):", SamplingParams(12)).text


def read_stream(response) -> tuple[str, list[dict]]:
    events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


@pytest.mark.parametrize("strategy", ["plain", "draft", "draft-compiled"])
def test_streamed_chat_equals_the_whole_answer(candidates, strategy):
    client, _ = make_client(candidates[strategy])
    whole = chat(client).json()["choices"][0]["message"]["content"]
    assert whole == candidates["plain"].generate(PROMPT).text  # every recipe here is lossless
    with client.stream("POST", "/chat/completions", json={"model": "tiny", "stream": True, "stream_options": {"include_usage": True},
                                                          "messages": [{"role": "user", "content": PROMPT}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text, chunks = read_stream(r)
    assert text == whole and whole
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert any(c["choices"] and c["choices"][0]["finish_reason"] in ("stop", "length") for c in chunks)


def test_stop_strings_cut_the_answer_in_streams_and_whole(client, candidates):
    whole = candidates["plain"].complete("def add(a, b):", SamplingParams(16)).text
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    assert stop.strip(), whole
    cut = client[0].post("/completions", json={"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == whole[: whole.index(stop)].strip() and cut["choices"][0]["finish_reason"] == "stop"
    with client[0].stream("POST", "/completions", json={"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 16,
                                                         "stop": stop, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == cut["choices"][0]["text"]


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(client):
    args = {"temperature": 1.5, "top_p": 0.95, "max_tokens": 16}
    a = chat(client[0], seed=7, **args).json()["choices"][0]["message"]["content"]
    b = chat(client[0], seed=7, **args).json()["choices"][0]["message"]["content"]
    others = {chat(client[0], seed=s, **args).json()["choices"][0]["message"]["content"] for s in (1, 2, 3)}
    assert a == b and len(others | {a}) > 1


BAD = [
    ({"content": b"{not json"}, "not valid JSON"),
    ({"content": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}'}, "not valid JSON"),
    ({"json": {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
     "type 'image_url', which is not supported"),
    ({"json": {"model": "tiny", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
               "messages": [{"role": "user", "content": "hi"}]}}, "JSON schema"),
    ({"json": {"model": "tiny", "response_format": {"type": "json_schema"}, "messages": [{"role": "user", "content": "hi"}]}},
     "needs a `json_schema`"),
    ({"json": {"model": "tiny", "response_format": {"type": "xml"}, "messages": [{"role": "user", "content": "hi"}]}},
     "response_format"),
    ({"json": {"model": "tiny", "messages": []}}, "messages"),
    ({"json": {"model": "tiny", "messages": [{"role": "user", "content": 5}]}}, "content"),
    ({"json": {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}}, "role"),
    ({"json": {"model": "other", "messages": [{"role": "user", "content": "hi"}]}}, "not served here"),
    ({"json": {"model": "tiny", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}}, "max_tokens"),
    ({"json": {"model": "tiny", "max_tokens": "many", "messages": [{"role": "user", "content": "hi"}]}}, "max_tokens"),
    ({"json": {"model": "tiny", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}}, "above this server's limit"),
    ({"json": {"model": "tiny", "messages": [{"role": "user", "content": "word " * 5000}]}}, "exceeds the model's context"),
    ({"json": {"model": "tiny", "temperature": -1, "messages": [{"role": "user", "content": "hi"}]}}, "temperature"),
    ({"json": {"model": "tiny", "n": 3, "messages": [{"role": "user", "content": "hi"}]}}, "n:"),
    ({"json": {"model": "tiny", "logprobs": True, "messages": [{"role": "user", "content": "hi"}]}}, "logprobs is not supported"),
    ({"json": {"model": "tiny", "stop": ["a", "b", "c", "d", "e"], "messages": [{"role": "user", "content": "hi"}]}}, "stop"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_requests_get_a_4xx_that_says_why_and_the_server_keeps_serving(client, kwargs, message):
    r = client[0].post("/chat/completions", headers={"content-type": "application/json"}, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert message in r.json()["error"]["message"]
    assert chat(client[0], max_tokens=2).status_code == 200


def test_api_key_is_required_when_configured(candidates):
    client, _ = make_client(candidates["plain"], api_key="s3cret")
    assert chat(client).status_code == 401
    assert client.get("/models").status_code == 401
    ok = client.post("/chat/completions", headers={"Authorization": "Bearer s3cret"},
                     json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200


def test_a_full_queue_answers_429_with_retry_after(candidates):
    client, _ = make_client(candidates["plain"], max_batch_size=1, max_queue=0, retry_after_s=3)
    engine = client.app.state.engine
    job = engine.submit(render_prompt(engine.candidate.tokenizer, PROMPT), SamplingParams(200))
    r = chat(client)
    job.future.result(timeout=120)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert chat(client, max_tokens=2).status_code == 200  # served again once the queue drained


@pytest.mark.parametrize("recipe", ["plain", "draft-compiled"])
def test_concurrent_requests_of_every_kind_share_the_batch_and_answer_as_alone(candidates, recipe):
    """Streamed and whole, greedy and seeded-sampled, in one running batch: each answers as it does alone."""
    cand = candidates[recipe]
    registry = CollectorRegistry()
    engine = Engine(cand, ServeConfig(model_id="tiny", max_batch_size=4, warm_rows=4, prefill_dtype="model"), Metrics(registry))
    prompts = [render_prompt(cand.tokenizer, p) for p in (PROMPT, "The quick brown fox", "def foo(x): return x + 1", "Name the day")]
    params = [SamplingParams(12), SamplingParams(12, temperature=1.0, seed=5), SamplingParams(12), SamplingParams(12)]
    alone = []
    for p, sp in zip(prompts, params):
        alone.append(engine.submit(p, sp).future.result(timeout=120))
    jobs = [engine.submit(p, sp, stream=i % 2 == 0) for i, (p, sp) in enumerate(zip(prompts, params))]
    streamed = {i: "".join(j.stream) for i, j in enumerate(jobs) if j.stream is not None}
    together = [j.future.result(timeout=120) for j in jobs]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert all(streamed[i] == together[i].text for i in streamed)
    greedy = [0, 2, 3]
    assert [alone[i].token_ids for i in greedy] == [candidates["plain"].generate(p, 12).token_ids
                                                    for p in (PROMPT, "def foo(x): return x + 1", "Name the day")]
    steps, rows = registry.get_sample_value("smelt_batch_size_count"), registry.get_sample_value("smelt_batch_size_sum")
    assert rows / steps > 1.5  # the batch ran several requests at once for most of its steps
    assert registry.get_sample_value("smelt_generated_tokens_total") == sum(g.new_tokens for g in alone + together)
    assert registry.get_sample_value("smelt_inter_token_seconds_count") > 0


def test_a_dropped_stream_frees_its_row(candidates):
    """A client that leaves after the first chunk: its request is cancelled and the next one is served."""
    client, registry = make_client(candidates["plain"], max_batch_size=1, max_queue=0)
    with client.stream("POST", "/chat/completions", json={"model": "tiny", "stream": True, "max_tokens": 400,
                                                          "messages": [{"role": "user", "content": PROMPT}]}) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    engine = client.app.state.engine
    for _ in range(100):
        if engine.outstanding == 0:
            break
        threading.Event().wait(0.05)
    assert engine.outstanding == 0 and registry.get_sample_value("smelt_engine_requests_total", {"event": "cancelled"}) == 1
    assert chat(client, max_tokens=2).status_code == 200


def test_content_as_text_parts_equals_plain_content(client):
    parts = [{"type": "text", "text": "Extract the city:"}, {"type": "text", "text": "Bob lives in Paris."}]
    joined = chat(client[0], content="Extract the city:\nBob lives in Paris.").json()
    assert chat(client[0], content=parts).json()["choices"][0]["message"] == joined["choices"][0]["message"]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1,
                                                                                                 "maximum": 99}},
          "required": ["city", "qty"], "additionalProperties": False}


@pytest.mark.parametrize("recipe", ["plain", "draft-compiled"])
def test_json_schema_answers_always_validate(candidates, recipe):
    import jsonschema

    client, _ = make_client(candidates[recipe], max_batch_size=4)
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}}
    for i in range(20):
        body = chat(client, content=f"Order {i}: {PROMPT}", max_tokens=300, response_format=fmt,
                    **({"temperature": 1.0, "seed": i} if i % 2 else {})).json()
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
    anything = chat(client, max_tokens=300, response_format={"type": "json_object"}).json()["choices"][0]
    assert anything["finish_reason"] == "stop" and isinstance(json.loads(anything["message"]["content"]), dict)


def test_unknown_routes_and_server_errors_use_openais_error_shape(client):
    r = client[0].get("/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_metrics_record_tokens_ttft_and_draft_acceptance(candidates):
    client, registry = make_client(candidates["draft"])
    assert chat(client, max_tokens=8).status_code == 200
    assert chat(client, model="nope").status_code == 404
    assert registry.get_sample_value("smelt_generated_tokens_total") > 0
    assert registry.get_sample_value("smelt_time_to_first_token_seconds_count") == 1
    assert registry.get_sample_value("smelt_draft_acceptance_ratio_count") == 1
    assert registry.get_sample_value("smelt_requests_total", {"route": "/chat/completions", "code": "404"}) == 1


def test_serving_tokenizes_a_conversation_exactly_as_training_did(candidates, varied_model_dir):
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(varied_model_dir)  # the tokenizer + template saved at training time
    served = candidates["plain"].tokenizer
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    assert served.chat_template == trained.chat_template
    assert served(render_messages(served, convo))["input_ids"] == trained(render_messages(trained, convo))["input_ids"]
    example = tokenize_example(trained, PROMPT, "Paris", 256)
    n_prompt = example.labels.count(-100)
    assert example.input_ids[:n_prompt] == served(render_prompt(served, PROMPT), add_special_tokens=False)["input_ids"]


def test_engine_survives_a_failing_request(candidates):
    engine = Engine(candidates["plain"], ServeConfig(model_id="tiny"), None)
    bad = engine.submit("", SamplingParams(4))  # no prompt tokens at all: generation raises
    with pytest.raises(Exception):
        bad.future.result(timeout=60)
    ok = engine.submit("x", SamplingParams(2))
    assert ok.future.result(timeout=60).new_tokens >= 1


def test_more_requests_than_rows_wait_for_a_row_and_all_answer(candidates):
    engine = Engine(candidates["plain"], ServeConfig(model_id="tiny", max_batch_size=2, warm_rows=1), None)
    try:
        jobs = [engine.submit(render_prompt(engine.candidate.tokenizer, f"{PROMPT} {i}"), SamplingParams(6)) for i in range(7)]
        assert all(j.future.result(timeout=120).new_tokens > 0 for j in jobs)
    finally:
        engine.close()


def test_busy_is_raised_past_the_queue_limit(candidates):
    engine = Engine(candidates["plain"], ServeConfig(model_id="tiny", max_batch_size=1, max_queue=1), None)
    first = engine.submit("a", SamplingParams(100))
    engine.submit("b", SamplingParams(2))
    with pytest.raises(Busy):
        engine.submit("c", SamplingParams(2))
    first.future.result(timeout=60)
    threading.Event().wait(0.1)


def test_counting_tokens_on_a_request_thread_leaves_the_engine_threads_padding_alone(candidates):
    """A fast tokenizer keeps its padding setting on the shared Rust object: if a request thread's unpadded
    call ran on the engine's tokenizer, it could switch padding off in the middle of the engine thread's
    padded batch encode (HTTP 500 "Unable to create tensor" under load, seen in a rollout test)."""
    cand = candidates["plain"]
    engine = Engine(cand, ServeConfig(model_id="tiny"), None)
    backend = cand.tokenizer.backend_tokenizer
    backend.enable_padding(pad_id=cand.tokenizer.pad_token_id, pad_token=cand.tokenizer.pad_token, direction="left")
    try:
        counted = engine.prompt_tokens(render_prompt(cand.tokenizer, PROMPT))
        assert backend.padding is not None  # what the engine thread set is still set
        assert counted == len(cand.tokenizer(render_prompt(cand.tokenizer, PROMPT), add_special_tokens=False)["input_ids"])
    finally:
        backend.no_padding()
        engine.close()
