"""MLflow pyfunc wrapper of a candidate, logged as "model from code".

`mlflow.pyfunc.load_model("models:/<name>@champion")` loads the candidate directory logged
as an artifact and generates through models/, exactly as evaluation and serving do.
This module imports only mlflow and models/, so loading needs neither Prefect nor tasks/.
"""
from __future__ import annotations

import mlflow
import pandas as pd


class CandidateModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from models.candidate import load_candidate
        from models.device import resolve_device

        self.candidate = load_candidate(context.artifacts["candidate"], resolve_device("auto"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        max_new = (params or {}).get("max_new_tokens")
        return [self.candidate.generate(p, max_new).text for p in model_input["prompt"]]


mlflow.models.set_model(CandidateModel())
