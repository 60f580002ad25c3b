"""OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) over the engine.

Mounted into the BentoML service at /v1; built by `create_app` so tests can also run it in-process.
Every bad request gets a 4xx in OpenAI's error shape naming what was wrong; nothing a client sends
can stop the server.
"""
from __future__ import annotations

import asyncio
import json
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.chat import render_messages
from models.decoding import Generation, SamplingParams
from models.engine import Busy, Engine
from models.structured import SchemaError, json_grammar
from serving.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, Usage, error_body, new_id, now

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def engine_of(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ApiError(503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"})
    return engine


def check_auth(request: Request, engine: Engine) -> None:
    key = engine.cfg.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {key.get_secret_value()}".encode()):
        raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)", code="invalid_api_key")


def sampling(req: SamplingFields, engine: Engine, prompt_text: str) -> SamplingParams:
    """The request's sampling settings, refused with a 400 when over the server's limits."""
    served = engine.cfg.model_id
    if req.model != served:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves {served!r}", "model", "model_not_found")
    max_tokens = req.max_tokens or min(engine.candidate.recipe.max_new_tokens, engine.cfg.max_tokens)
    if max_tokens > engine.cfg.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {engine.cfg.max_tokens}", "max_tokens")
    used = engine.prompt_tokens(prompt_text)
    need, room = engine.batcher.room(used, max_tokens), engine.batcher.max_len
    if need > room:
        raise ApiError(400, f"the prompt is {used} tokens; with max_tokens {max_tokens} and the speculative lookahead "
                            f"({need} in all) that exceeds the model's context as served: {room} tokens a request (the "
                            f"model's {engine.candidate.context_length}, capped by SMELT_MAX_SEQ_LEN)",
                       "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
    return SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, req.stop_list(), grammar_of(req, engine))


def grammar_of(req: SamplingFields, engine: Engine) -> str | None:
    """The grammar enforcing the response format (None for text); a 400 naming what is wrong with a schema."""
    schema = req.response_format.schema() if req.response_format is not None else None
    if schema is None:
        return None
    try:
        return json_grammar(schema, engine.candidate.tokenizer)
    except SchemaError as err:
        raise ApiError(400, str(err), "response_format") from None


async def generate(engine: Engine, prompt_text: str, params: SamplingParams, request: Request | None = None) -> Generation:
    """One non-streamed request; cancelled when the client disconnects while it waits."""
    try:
        job = engine.submit(prompt_text, params)
    except Busy as err:
        raise ApiError(429, str(err), code="rate_limited", headers={"Retry-After": str(err.retry_after)}) from None
    waiting = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiting.result()
            if request is not None and await request.is_disconnected():
                job.cancel()
    finally:
        if not job.future.done():
            job.cancel()


def usage(gens: list[Generation]) -> dict:
    p, c = sum(g.prompt_tokens for g in gens), sum(g.new_tokens for g in gens)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c).model_dump()


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def stream_chunks(engine: Engine, prompt_text: str, params: SamplingParams, make_chunk, include_usage: bool):
    """Server-sent events: text as the engine decides it (held back only where it could begin a stop
    string). A client that goes away cancels the request: its row is free by the next step."""
    try:
        job = engine.submit(prompt_text, params, stream=True)
    except Busy as err:
        raise ApiError(429, str(err), code="rate_limited", headers={"Retry-After": str(err.retry_after)}) from None

    async def events():
        try:
            yield sse(make_chunk(None, None))  # opens the stream (the chat role) before the first token
            async for piece in job.stream:
                yield sse(make_chunk(piece, None))
            gen = await asyncio.wrap_future(job.future)  # raises if generation failed
            yield sse(make_chunk(None, gen.finish_reason))
            if include_usage:
                yield sse({**make_chunk(None, None), "choices": [], "usage": usage([gen])})
            yield "data: [DONE]\n\n"
        finally:  # closed early (client gone, server stopping): free the row
            if not job.future.done():
                job.cancel()
    return events()


def create_app() -> FastAPI:
    app = FastAPI(title="smelt OpenAI-compatible API", docs_url="/docs", openapi_url="/openapi.json")
    install_error_handlers(app)

    @app.get("/models")
    async def list_models(request: Request) -> dict:
        engine = engine_of(request)
        check_auth(request, engine)
        # `version`: the MLflow model version served, so a rollout can be checked from outside.
        return {"object": "list", "data": [{"id": engine.cfg.model_id, "object": "model", "created": now(), "owned_by": "smelt",
                                            "version": engine.cfg.model_version}]}

    @app.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = engine_of(request)
        check_auth(request, engine)
        rid, created = new_id("cmpl"), now()
        params = [sampling(body, engine, p) for p in body.prompts()]

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}
        if body.stream:
            if len(params) > 1:
                raise ApiError(400, "stream supports one prompt per request", "prompt")
            return streaming(stream_chunks(engine, body.prompts()[0], params[0], chunk, body.include_usage()))
        gens = await asyncio.gather(*(generate(engine, p, sp, request) for p, sp in zip(body.prompts(), params)))
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "usage": usage(gens),
                "choices": [{"index": i, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None} for i, g in enumerate(gens)]}

    @app.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = engine_of(request)
        check_auth(request, engine)
        rid, created = new_id("chatcmpl"), now()
        prompt_text = render_messages(engine.candidate.tokenizer, [m.as_dict() for m in body.messages])
        params = sampling(body, engine, prompt_text)

        def chunk(text, finish):
            delta = {"role": "assistant", "content": ""} if text is None and finish is None else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if body.stream:
            return streaming(stream_chunks(engine, prompt_text, params, chunk, body.include_usage()))
        gen = await generate(engine, prompt_text, params, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "usage": usage([gen]),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": gen.finish_reason}]}

    return app


def streaming(events) -> StreamingResponse:
    # An async iterator fed by the engine thread (loop.call_soon_threadsafe): no thread per stream.
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        count(request, err.status)
        return JSONResponse(error_body(err.message, param=err.param, code=err.code), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        count(request, err.status_code)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        detail = err.detail
        if err.status_code == 400 and "parsing the body" in str(detail):  # FastAPI's words for a body it cannot decode
            detail = "request body is not valid JSON (UTF-8)"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {detail}", kind), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        count(request, 500)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        msg = "request body is not valid JSON (UTF-8)" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        count(request, 400)
        return JSONResponse(error_body(msg, param=where), status_code=400)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        if response.status_code < 400:
            count(request, response.status_code)
        return response


def count(request: Request, code: int) -> None:
    metrics = getattr(getattr(request.app.state, "engine", None), "metrics", None)
    if metrics is not None:
        metrics.count(request.url.path, code)
