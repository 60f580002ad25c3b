"""The BentoML service: serves one candidate exactly as it was evaluated.

The model is declared once (a BentoML model-store tag, imported from the MLflow champion by
`tasks.package`), loaded in __init__ through models/ — the same loader evaluation used.
"""
from __future__ import annotations

import os
from pathlib import Path

import bentoml
from pydantic import BaseModel, Field

from models.candidate import load_candidate
from models.device import resolve_device

PINNED_MODEL_FILE = Path(__file__).with_name("bento_model.txt")


def model_tag() -> str:
    """The model-store tag this service serves: pinned into the Bento at build time (so a Bento
    always serves the model it was built with), else $SMELT_BENTO_MODEL for development."""
    if PINNED_MODEL_FILE.exists():
        return PINNED_MODEL_FILE.read_text().strip()
    return os.environ.get("SMELT_BENTO_MODEL", "smelt-model:latest")


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, description="User message; the stored chat template wraps it.")
    max_new_tokens: int = Field(64, ge=1, le=1024)


class GenerateResponse(BaseModel):
    text: str
    new_tokens: int
    seconds: float


@bentoml.service(name="smelt", traffic={"timeout": 300}, http={"host": "127.0.0.1"})
class SmeltService:
    model_ref = bentoml.models.BentoModel(model_tag())

    def __init__(self) -> None:
        self.candidate = load_candidate(Path(self.model_ref.path), resolve_device(os.environ.get("SMELT_DEVICE", "auto")))

    @bentoml.api
    def generate(self, request: GenerateRequest) -> GenerateResponse:
        out = self.candidate.generate(request.prompt, request.max_new_tokens)
        return GenerateResponse(text=out.text, new_tokens=out.new_tokens, seconds=round(out.seconds, 4))

    @bentoml.api
    def recipe(self) -> dict:
        return self.candidate.recipe
