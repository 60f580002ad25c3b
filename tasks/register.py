"""Registration stage: log every candidate to MLflow as a model version, pick the challenger,
and promote it to champion only through the accuracy-and-speed gate."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task

from tasks.caching import STAGE_CACHE
from tasks.config import REPO_ROOT, PipelineConfig, RegistryConfig
from tasks.etl import DatasetVersion

# Serving a candidate needs exactly these; pinned to what produced it.
SERVING_PACKAGES = ["torch", "transformers", "tokenizers", "safetensors", "torchao", "pandas", "mlflow"]
PYFUNC_SOURCE = Path(__file__).with_name("pyfunc_model.py")


@dataclass
class Decision:
    chosen: int
    reasons: list[str]


def select_challenger(reports: list[dict], cfg: RegistryConfig) -> Decision:
    """Most accurate candidate, but a faster one wins if it is within the trade-off margin."""
    best = max(r["exact_match"] for r in reports)
    floor = best - cfg.min_accuracy_gain_to_trade_speed
    eligible = [i for i, r in enumerate(reports) if r["exact_match"] >= floor]
    chosen = max(eligible, key=lambda i: (reports[i]["tokens_per_s"], reports[i]["field_accuracy"]))
    reasons = []
    for i, r in enumerate(reports):
        if i == chosen:
            reasons.append(f"chosen: fastest ({r['tokens_per_s']:.0f} tok/s) within {cfg.min_accuracy_gain_to_trade_speed:.0%} of best exact match")
        elif i not in eligible:
            reasons.append(f"exact match {r['exact_match']:.1%} below {floor:.1%}")
        else:
            reasons.append(f"slower: {r['tokens_per_s']:.0f} vs {reports[chosen]['tokens_per_s']:.0f} tok/s")
    return Decision(chosen, reasons)


def gate(challenger: dict, champion: dict | None, cfg: RegistryConfig) -> tuple[bool, str]:
    """Challenger replaces champion only if not less accurate (minus tolerance) and not much slower."""
    if champion is None:
        return True, "no champion yet"
    acc_floor = champion["exact_match"] - cfg.accuracy_tolerance
    speed_floor = champion["tokens_per_s"] * (1 - cfg.speed_margin)
    if challenger["exact_match"] < acc_floor:
        return False, f"exact match {challenger['exact_match']:.3f} < champion {champion['exact_match']:.3f} - tolerance {cfg.accuracy_tolerance}"
    if challenger["tokens_per_s"] < speed_floor:
        return False, f"{challenger['tokens_per_s']:.1f} tok/s < champion {champion['tokens_per_s']:.1f} x (1 - {cfg.speed_margin})"
    return True, (f"exact match {challenger['exact_match']:.3f} >= {acc_floor:.3f} and "
                  f"{challenger['tokens_per_s']:.1f} tok/s >= {speed_floor:.1f}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ensure_experiment(name: str, artifact_root: Path) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def metrics_of(version) -> dict | None:
    try:
        return {"exact_match": float(version.tags["smelt.exact_match"]),
                "tokens_per_s": float(version.tags["smelt.tokens_per_s"])}
    except (KeyError, ValueError):
        return None


def current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def log_candidate(report: dict, name: str, lineage: dict) -> str:
    """Log one candidate as a pyfunc model version (in a nested run); return its version number."""
    with mlflow.start_run(run_name=report["candidate"], nested=True):
        mlflow.set_tags({**lineage, "smelt.quant_method": report["quant_method"], "smelt.strategy": report["strategy"]})
        mlflow.log_metrics({k: float(report[k]) for k in ("exact_match", "field_accuracy", "tokens_per_s", "draft_acceptance",
                                                          "latency_p50_s", "latency_p95_s", "size_bytes") if report.get(k) is not None})
        mlflow.log_dict(report, "eval_report.json")
        info = mlflow.pyfunc.log_model(
            name="candidate",
            python_model=str(PYFUNC_SOURCE),
            artifacts={"candidate": report["path"]},
            code_paths=[str(REPO_ROOT / "models")],
            pip_requirements=[f"{p}=={pkg_version(p)}" for p in SERVING_PACKAGES],
            signature=ModelSignature(
                inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
            ),
            registered_model_name=name,
        )
    return str(info.registered_model_version)


def tag_version(client: MlflowClient, name: str, version: str, report: dict, lineage: dict) -> None:
    tags = {**lineage, "smelt.candidate": report["candidate"], "smelt.quant_method": report["quant_method"],
            "smelt.strategy": report["strategy"], "smelt.exact_match": report["exact_match"],
            "smelt.field_accuracy": report["field_accuracy"], "smelt.tokens_per_s": report["tokens_per_s"],
            "smelt.size_bytes": report["size_bytes"], "smelt.draft_acceptance": report.get("draft_acceptance")}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def find_version(client: MlflowClient, name: str, candidate: str, dataset: str) -> str | None:
    """Reuse a version already registered for this exact candidate and dataset (reruns add nothing)."""
    try:
        hits = client.search_model_versions(f"name = '{name}' and tags.`smelt.candidate` = '{candidate}'")
    except MlflowException:
        return None
    hits = [v for v in hits if v.tags.get("smelt.dataset_version") == dataset]
    return str(hits[0].version) if hits else None


def promote_through_gate(client: MlflowClient, name: str, version: str, report: dict, cfg: RegistryConfig) -> tuple[bool, str]:
    """Move `champion` to `version` if the gate passes (the old champion keeps `previous-champion`);
    the decision and its numbers are recorded on the version."""
    champ = current_champion(client, name)
    if champ is not None and str(champ.version) == version:
        promoted, why = True, "already champion"
    else:
        promoted, why = gate(report, metrics_of(champ) if champ else None, cfg)
        if promoted:
            if champ is not None:
                client.set_registered_model_alias(name, "previous-champion", champ.version)
            client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "smelt.gate", f"{'promoted' if promoted else 'refused'}: {why}")
    return promoted, why


def register_candidates(cfg: PipelineConfig, dataset: DatasetVersion, reports: list[dict], home: Path) -> dict:
    """Register every candidate, set `challenger`, and promote to `champion` if the gate passes."""
    client, name = MlflowClient(), cfg.registered_name
    exp_id = ensure_experiment(f"smelt-{cfg.preset}", home / "mlartifacts")
    lineage = {"smelt.dataset_version": dataset.version, "smelt.preset": cfg.preset,
               "smelt.base_model": cfg.model.base, "smelt.draft_model": cfg.model.draft,
               "smelt.git_commit": git_commit(), "smelt.version": pkg_version("smelt")}
    decision = select_challenger(reports, cfg.registry)
    mlflow.set_experiment(experiment_id=exp_id)  # nested runs and logged models follow the active experiment
    with mlflow.start_run(run_name=f"{cfg.preset}-{dataset.version}"):
        mlflow.set_tags(lineage)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump(mode="json")).items()})
        mlflow.log_dict(dataset.counts, "dataset_counts.json")
        versions = []
        for report in reports:
            v = find_version(client, name, report["candidate"], dataset.version) or log_candidate(report, name, lineage)
            tag_version(client, name, v, report, lineage)
            versions.append(v)
        chosen = versions[decision.chosen]
        client.set_registered_model_alias(name, "challenger", chosen)
        promoted, why = promote_through_gate(client, name, chosen, reports[decision.chosen], cfg.registry)
        mlflow.set_tags({"smelt.challenger": chosen, "smelt.promoted": str(promoted), "smelt.gate_reason": why})
    champion = current_champion(client, name)
    return {"name": name, "versions": versions, "chosen": decision.chosen, "reasons": decision.reasons,
            "challenger": chosen, "promoted": promoted, "gate_reason": why,
            "champion": str(champion.version) if champion else None}


@task(name="register", cache_policy=STAGE_CACHE, persist_result=True)
def register_task(cfg: PipelineConfig, dataset: DatasetVersion, reports: list[dict], home: str) -> dict:
    return register_candidates(cfg, dataset, reports, Path(home))
