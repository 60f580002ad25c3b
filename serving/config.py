"""`ServeConfig`: the service's limits and security settings, read from SMELT_* environment variables
(a Bento is configured by its environment: `bentoml serve`, containers, Kubernetes)."""
from __future__ import annotations

from pydantic import Field, SecretStr

from models.engine import EngineConfig
from models.settings import SmeltSettings


class ServeConfig(EngineConfig, SmeltSettings):
    """The engine's limits (models/engine.py) plus what only the HTTP service needs; FIELD comes from SMELT_FIELD."""

    max_tokens: int = Field(512, ge=1, description="SMELT_MAX_TOKENS: the most new tokens one request may ask for.")
    api_key: SecretStr | None = Field(None, description="SMELT_API_KEY: if set, requests need `Authorization: Bearer <key>`.")
    model_id: str | None = Field(None, description="SMELT_MODEL_ID: the model name clients send; default the registered name.")
    model_version: str | None = Field(None, description="SMELT_MODEL_VERSION: the MLflow version listed by /v1/models; "
                                                        "default the Bento model's label.")
    device: str = Field("auto", description="SMELT_DEVICE: auto, cpu or cuda.")
