"""Registration stage: log every candidate to MLflow as a pyfunc model version (in a nested run
of the pipeline's parent run), pick the challenger, and promote it to champion only through
the accuracy-and-speed gate, measured on the same eval split as the champion."""
from __future__ import annotations

import tempfile
from importlib.metadata import version as pkg_version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task

from models.artifacts import read_json, write_json
from models.candidate import RECIPE, Recipe
from tasks.caching import STAGE_CACHE
from tasks.config import REPO_ROOT, PipelineConfig
from tasks.etl import DatasetVersion
from tasks.evaluate import eval_split_key, evaluate_candidate
from tasks.promote import current_champion, promote, version_metrics
from tasks.results import EvalReport, RegistryResult, Selection
from tasks.tracking import lineage_tags, start_child_run, use_tracking

# Serving a candidate needs exactly these; pinned to what produced it.
SERVING_PACKAGES = ["torch", "transformers", "tokenizers", "safetensors", "torchao", "pandas", "mlflow"]
PYFUNC_SOURCE = Path(__file__).with_name("pyfunc_model.py")


def signature_for(candidate_dir: Path) -> ModelSignature:
    """The pyfunc signature; `max_new_tokens` defaults to the candidate's own recipe (MLflow fills a
    missing param with its default, so a fixed default would override what was evaluated)."""
    recipe = Recipe.model_validate(read_json(Path(candidate_dir) / RECIPE))
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", recipe.max_new_tokens)]),
    )


def version_tags(report: EvalReport, lineage: dict) -> dict[str, str]:
    """Tags that make a model version self-describing: lineage, what it is, and every tracked metric."""
    tags = {**lineage, "smelt.candidate": report.candidate, "smelt.quant_method": report.quant_method,
            "smelt.strategy": report.strategy, "smelt.eval_split": report.eval_split,
            "smelt.draft_artifact": report.draft_artifact or "none"}
    tags.update({f"smelt.{k}": str(getattr(report, k)) for k, m in EvalReport.metrics().items() if m.tracked})
    return tags


def find_version(client: MlflowClient, name: str, candidate: str, dataset: str) -> str | None:
    """Reuse a version already registered for this exact candidate and dataset (reruns add nothing)."""
    try:
        hits = client.search_model_versions(f"name = '{name}' and tags.`smelt.candidate` = '{candidate}'")
    except MlflowException:
        return None
    hits = [v for v in hits if v.tags.get("smelt.dataset_version") == dataset]
    return str(hits[0].version) if hits else None


def log_pyfunc(report: EvalReport, name: str, tmp: Path) -> str:
    """Log the candidate as a pyfunc model version in the active run; return the version number."""
    report_file = tmp / "eval_report.json"
    write_json(report_file, report.model_dump(mode="json"))
    example = pd.DataFrame({"prompt": [report.examples[0]["prompt"]]})
    info = mlflow.pyfunc.log_model(
        name="candidate",
        python_model=str(PYFUNC_SOURCE),
        artifacts={"candidate": report.path, "eval_report": str(report_file)},
        code_paths=[str(REPO_ROOT / "models")],
        pip_requirements=[f"{p}=={pkg_version(p)}" for p in SERVING_PACKAGES],
        signature=signature_for(Path(report.path)),
        # MLflow checks the saved model answers this example; a few tokens keep that check cheap.
        input_example=(example, {"max_new_tokens": 4}),
        registered_model_name=name,
    )
    return str(info.registered_model_version)


def register_candidate(client: MlflowClient, name: str, report: EvalReport, parent_id: str, lineage: dict) -> str:
    """A nested run per candidate (metrics + eval report); a new model version unless one exists."""
    existing = find_version(client, name, report.candidate, lineage["smelt.dataset_version"])
    run_id = start_child_run(client, parent_id, report.candidate, {"smelt.quant_method": report.quant_method,
                                                                   "smelt.strategy": report.strategy})
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="smelt-register-") as tmp:
        mlflow.log_metrics(report.tracked_numbers())
        mlflow.log_dict(report.model_dump(mode="json"), "eval_report.json")
        version = existing or log_pyfunc(report, name, Path(tmp))
        mlflow.set_tag("smelt.model_version", version)
    for k, v in version_tags(report, lineage).items():
        client.set_model_version_tag(name, version, k, v)
    return version


def download_candidate(name: str, version: str, dst: Path) -> Path:
    """Fetch a registered candidate directory (the pyfunc's `candidate` artifact) into `dst`."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
    return next(local.rglob(RECIPE)).parent


def champion_on_split(client: MlflowClient, name: str, dataset: DatasetVersion, cfg: PipelineConfig, home: Path) -> dict | None:
    """The champion's numbers on this run's eval split; re-evaluates it if it was measured on another.

    Returns None when the recorded numbers already apply (or there is no champion).
    """
    champ = current_champion(client, name)
    recorded = version_metrics(champ, cfg.registry.gate_metric) if champ is not None else None
    split = eval_split_key(dataset, cfg.eval)
    if champ is None or recorded is None or recorded["eval_split"] == split:
        return None
    local = home / "candidates" / champ.tags.get("smelt.candidate", "-")
    with tempfile.TemporaryDirectory(prefix="smelt-champion-") as tmp:
        cand = local if (local / RECIPE).exists() else download_candidate(name, champ.version, Path(tmp))
        report = evaluate_candidate(cand, dataset, cfg.eval, home)
    metric = cfg.registry.gate_metric
    return {metric: getattr(report, metric), "tokens_per_s": report.tokens_per_s,
            "tokens_per_s_spread": report.tokens_per_s_spread, "eval_split": split,
            "reevaluated_version": str(champ.version)}


def register_candidates(cfg: PipelineConfig, dataset: DatasetVersion, reports: list[EvalReport], selection: Selection,
                        run_id: str, home: Path) -> RegistryResult:
    """Register every candidate, make the selected one `challenger`, and promote it to `champion`
    if the gate passes. With no candidate selected nothing moves."""
    client, name = use_tracking(cfg.registry, home), cfg.registered_name
    lineage = lineage_tags(cfg, dataset)
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)  # logged models follow it
    versions = [register_candidate(client, name, r, run_id, lineage) for r in reports]
    for version, why in zip(versions, selection.reasons):
        client.set_model_version_tag(name, version, "smelt.selection", why[:5000])
    out = {"name": name, "versions": versions, "chosen": selection.chosen, "reasons": selection.reasons}
    if selection.chosen is None:
        champ = current_champion(client, name)
        return RegistryResult(**out, challenger=None, promoted=False, gate_numbers=None,
                              gate_reason="no candidate passed the selection policy; the champion is unchanged",
                              champion=str(champ.version) if champ is not None else None)
    chosen = versions[selection.chosen]
    client.set_registered_model_alias(name, "challenger", chosen)
    result = promote(client, name, chosen, cfg.registry, home, champion_metrics=champion_on_split(client, name, dataset, cfg, home))
    return RegistryResult(**out, challenger=chosen, promoted=result.promoted, gate_reason=result.reason,
                          gate_numbers=result.numbers, champion=result.champion)


@task(name="register", retries=2, retry_delay_seconds=[5, 30], cache_policy=STAGE_CACHE, persist_result=True)
def register_task(cfg: PipelineConfig, dataset: DatasetVersion, reports: list[EvalReport], selection: Selection, run_id: str,
                  home: str) -> RegistryResult:
    # run_id is in the cache key, so each pipeline run registers (reusing versions) under its own run.
    return register_candidates(cfg, dataset, reports, selection, run_id, Path(home))
