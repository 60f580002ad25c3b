"""`ServeConfig`: the service's limits and security settings, read from SMELT_* environment variables
(a Bento is configured by its environment: `bentoml serve`, containers, Kubernetes)."""
from __future__ import annotations

import os

from pydantic import Field, SecretStr

from models.config import StrictModel


class ServeConfig(StrictModel):
    max_tokens: int = Field(512, ge=1, description="SMELT_MAX_TOKENS: the most new tokens one request may ask for.")
    max_batch_size: int = Field(8, ge=1, description="SMELT_MAX_BATCH_SIZE: greedy plain-strategy requests decoded together.")
    batch_wait_ms: float = Field(5.0, ge=0, description="SMELT_BATCH_WAIT_MS: how long the first request waits for company.")
    max_queue: int = Field(64, ge=0, description="SMELT_MAX_QUEUE: requests waiting beyond those running; more get 429.")
    retry_after_s: int = Field(1, ge=1, description="SMELT_RETRY_AFTER_S: the Retry-After a refused request is given.")
    api_key: SecretStr | None = Field(None, description="SMELT_API_KEY: if set, requests need `Authorization: Bearer <key>`.")
    model_id: str | None = Field(None, description="SMELT_MODEL_ID: the model name clients send; default the registered name.")
    device: str = Field("auto", description="SMELT_DEVICE: auto, cpu or cuda.")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "ServeConfig":
        env = os.environ if environ is None else environ
        values = {name: env[f"SMELT_{name.upper()}"] for name in cls.model_fields if f"SMELT_{name.upper()}" in env}
        return cls.model_validate({k: v for k, v in values.items() if v != ""})
