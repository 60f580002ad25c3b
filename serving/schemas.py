"""Request and response shapes of the OpenAI-compatible API (the subset smelt serves).

Requests are validated here (types, ranges, a non-empty message list); limits that depend on the
loaded model or the server's settings (max_tokens ceiling, context length) are checked by the app.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", min_length=1)
    schema_: dict = Field(..., alias="schema", description="A JSON Schema the answer must validate against.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON valid under a schema
    (enforced while decoding: tokens that would break it are never chosen)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a `json_schema` object with a `schema`")
        return self

    def schema(self) -> dict | None:
        """The schema to enforce: None for text, any object for json_object."""
        if self.type == "text":
            return None
        return self.json_schema.schema_ if self.type == "json_schema" else {"type": "object"}


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
    response_format: ResponseFormat | None = None

    @field_validator("logprobs", "tools")
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
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] = Field(..., description="Text, or a list of text parts {type: text, text}.")

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v):
        for i, part in enumerate(v if isinstance(v, list) else []):
            if part.get("type") != "text":
                raise ValueError(f"content part {i} has type {part.get('type')!r}, which is not supported: this model reads "
                                 "text parts only")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} (type text) needs a string `text`")
        return v

    def as_dict(self) -> dict:
        """role and plain-text content; text parts joined by newlines (as the ETL joins them for training)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


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
