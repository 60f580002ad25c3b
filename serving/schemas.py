"""Request and response shapes of the OpenAI-compatible API (the subset smelt serves).

Requests are validated here (types, ranges, a non-empty message list); limits that depend on the
loaded model or the server's settings (max_tokens ceiling, context length) are checked by the app.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logit_bias...)

    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Default: the serving recipe's max_new_tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy, the setting the candidate was evaluated with.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="One choice per prompt.")
    stream_options: dict | None = None
    # Accepted by OpenAI but not served here: refused by name rather than silently ignored.
    logprobs: bool | int | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("logprobs", "tools", "response_format")
    @classmethod
    def _unsupported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="Raw text, continued as is (no chat template).")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, so clients raise their usual exceptions with our message."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
