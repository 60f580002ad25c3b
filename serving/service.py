"""The BentoML service: serves one candidate exactly as it was evaluated, behind an
OpenAI-compatible API (/v1) plus the native `generate` and `recipe` endpoints.

The model is declared once (a BentoML model-store tag, imported from the MLflow champion by
`tasks.package`) and loaded in __init__ through models/, the same loader evaluation used; a
warm-up generation runs before BentoML reports the service ready (/readyz).
"""
from __future__ import annotations

from pathlib import Path

import bentoml
from pydantic import BaseModel, Field

from models.candidate import load_candidate
from models.chat import render_prompt
from models.decoding import SamplingParams
from models.device import resolve_device
from models.engine import Busy, Engine
from models.settings import bento_model_tag, load_settings
from serving.config import ServeConfig
from serving.metrics import Metrics
from serving.openai_api import create_app

openai_app = create_app()


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, description="User message; the stored chat template wraps it.")
    max_new_tokens: int = Field(64, ge=1, le=1024)


class GenerateResponse(BaseModel):
    text: str
    new_tokens: int
    seconds: float


# 127.0.0.1 unless told otherwise: SMELT_HOST=0.0.0.0 in a container, or `bentoml serve --host`.
@bentoml.service(name="smelt", traffic={"timeout": 300}, http={"host": load_settings().host})
@bentoml.asgi_app(openai_app, path="/v1")
class SmeltService:
    model_ref = bentoml.models.BentoModel(bento_model_tag())

    def __init__(self) -> None:
        cfg = ServeConfig()  # SMELT_* variables (models/settings.py: SmeltSettings)
        labels = self.model_ref.info.labels
        cfg.model_id = cfg.model_id or labels.get("registered_model") or self.model_ref.tag.name
        cfg.model_version = cfg.model_version or labels.get("mlflow_version")
        self.candidate = load_candidate(Path(self.model_ref.path), resolve_device(cfg.device))
        # Compile the batch shapes up to SMELT_WARM_ROWS and allocate the cache before /readyz says yes,
        # on the engine's thread: compiled graphs decode at full speed only in the thread that compiled them.
        self.engine = Engine(self.candidate, cfg)
        self.engine.warm_up()
        self.engine.metrics = Metrics()  # counted from the first real request
        openai_app.state.engine = self.engine

    @bentoml.api
    def generate(self, request: GenerateRequest) -> GenerateResponse:
        prompt = render_prompt(self.candidate.tokenizer, request.prompt)
        try:
            job = self.engine.submit(prompt, SamplingParams(request.max_new_tokens))
        except Busy as err:
            raise bentoml.exceptions.ServiceUnavailable(str(err)) from None
        out = job.future.result()
        return GenerateResponse(text=out.text, new_tokens=out.new_tokens, seconds=round(out.seconds, 4))

    @bentoml.api
    def recipe(self) -> dict:
        return self.candidate.recipe.model_dump()
