"""MLflow tracking of a pipeline run: one experiment per preset, a parent run per pipeline run,
nested runs per stage (and, from the register stage, per candidate), lineage tags on each.

Runs are addressed by id through `MlflowClient`, never through MLflow's thread-local "active
run", because Prefect may run each task in a different thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import mlflow
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.artifacts import digest, dir_size_bytes, read_json
from models.settings import load_settings, sqlite_tracking_uri
from tasks.config import REPO_ROOT, PipelineConfig, RegistryConfig
from tasks.etl import DatasetVersion
from tasks.results import BentoRef, RegistryResult

PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value


def tracking_uri(cfg: RegistryConfig, home: Path) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then the SQLite store under SMELT_HOME."""
    return cfg.tracking_uri or load_settings().mlflow_tracking_uri or sqlite_tracking_uri(home)


def use_tracking(cfg: RegistryConfig, home: Path) -> MlflowClient:
    uri = tracking_uri(cfg, home)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # bentoml.mlflow and child processes read the variable
    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(cfg: PipelineConfig) -> str:
    return digest("pipeline-config", cfg)


def lineage_tags(cfg: PipelineConfig, dataset: DatasetVersion) -> dict[str, str]:
    """What a run or model version came from; the same tags on runs and on registry versions."""
    return {"smelt.dataset_version": dataset.version, "smelt.config_hash": config_hash(cfg), "smelt.preset": cfg.preset,
            "smelt.base_model": cfg.model.base, "smelt.draft_model": cfg.model.draft, "smelt.git_commit": git_commit(),
            "smelt.version": pkg_version("smelt")}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The preset's experiment; with a local store its artifacts go under SMELT_HOME, with a
    tracking server wherever the server keeps them."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = client.tracking_uri.startswith(("sqlite:", "file:", "/"))
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri() if local else None)


def prefect_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def open_pipeline_run(cfg: PipelineConfig, dataset: DatasetVersion, home: Path) -> str:
    """Create the parent run with the whole resolved config as params; return its id."""
    client = use_tracking(cfg.registry, home)
    exp_id = ensure_experiment(client, f"smelt-{cfg.preset}", home / "mlartifacts")
    tags = lineage_tags(cfg, dataset)
    if flow_id := prefect_flow_run_id():
        tags["smelt.prefect_flow_run_id"] = flow_id
    run = client.create_run(exp_id, run_name=f"{cfg.preset}-{dataset.version}", tags=tags)
    params = [Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def start_child_run(client: MlflowClient, parent_id: str, name: str, tags: dict[str, str] | None = None) -> str:
    parent = client.get_run(parent_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("smelt.")}
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={**inherited, **(tags or {}), "mlflow.parentRunId": parent_id})
    return run.info.run_id


def numbers_of(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_stage(client: MlflowClient, parent_id: str, stage: str, metrics: dict, files: list[Path], params: dict | None = None,
              run_id: str | None = None) -> str:
    """Finish a stage's nested run (made here unless `run_id` is one opened when the stage began):
    its numbers as metrics, its summary files as artifacts. A `history` of per-step points that the
    stage did not already log live (its result was reused) is written now, at the same steps."""
    run_id = run_id or start_child_run(client, parent_id, stage, {"smelt.stage": stage})
    history = metrics.get("history") or []
    if history and not client.get_metric_history(run_id, "loss"):
        points = [Metric(k, float(v), 0, int(h["step"])) for h in history for k, v in h.items() if k != "step"]
        for i in range(0, len(points), 1000):  # log_batch takes at most 1000 metrics per call
            client.log_batch(run_id, metrics=points[i:i + 1000])
    final = {k: v for k, v in numbers_of(metrics).items() if not (history and k in history[-1])}
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in final.items()],
                     params=[Param(k, str(v)[:PARAM_MAX_CHARS]) for k, v in (params or {}).items()])
    for f in files:
        if Path(f).exists():
            client.log_artifact(run_id, str(f), artifact_path=stage)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def step_logger(tracking_uri: str, run_id: str):
    """Per-step training metrics to an MLflow run, one batch call per logged point."""
    client = MlflowClient(tracking_uri=tracking_uri)

    def log_point(step: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None])
    return log_point


def open_stage_run(parent_id: str, cfg: PipelineConfig, home: Path, stage: str) -> tuple[str, str]:
    """A nested run opened before a stage starts, so the stage can log per-step metrics into it live.
    Returns (tracking URI, run id): what a training process needs to reach it."""
    client = use_tracking(cfg.registry, home)
    return client.tracking_uri, start_child_run(client, parent_id, stage, {"smelt.stage": stage})


COLSPEC_TYPES = {"string": "string", "int64": "long", "int32": "integer"}


def dataset_schema(manifest: dict) -> dict:
    """The Parquet schema in MLflow's column-spec form (what its UI shows for a dataset)."""
    message = {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}
    return {"mlflow_colspec": [{"name": k, **({"type": COLSPEC_TYPES[t]} if t in COLSPEC_TYPES else
                                              {"type": "array", "items": message})} for k, t in manifest["schema"].items()]}


def log_dataset_input(client: MlflowClient, run_id: str, dataset: DatasetVersion, context: str) -> None:
    """Lineage: the run used this dataset version (digest = version id, source = its folder)."""
    m = dataset.manifest
    entity = MlflowDataset(name=f"smelt-dataset-{dataset.version}", digest=dataset.version, source_type="local",
                           source=json.dumps({"uri": str(dataset.path.resolve())}), schema=json.dumps(dataset_schema(m)),
                           profile=json.dumps({**dataset.counts, "sources": [s["uri"] for s in m["sources"]]}))
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


def log_stages(run_id: str, cfg: PipelineConfig, home: Path, dataset: DatasetVersion,
               finetuned: Path, draft: Path | None, quantized: dict[str, Path], live: dict[str, tuple[str, str]] | None = None,
               tuned: Path | None = None) -> None:
    """Nested runs for the stages before evaluation, from the summaries each stage wrote to disk.
    `tuned`: the preference-tuned model, when that stage ran."""
    client = use_tracking(cfg.registry, home)
    log_stage(client, run_id, "etl", dataset.counts, [dataset.path / "manifest.json", dataset.path / "quarantine.jsonl",
                                                      dataset.path / "removed.jsonl"],
              {"dataset_version": dataset.version, "path": dataset.path})
    live = live or {}
    if finetuned is not None:  # None: train.preference.start=base skipped SFT
        train = read_json(finetuned / "train.json")
        train_run = log_stage(client, run_id, "train", train, [finetuned / "train.json"],
                              {"artifact": finetuned.name, "method": train.get("method")}, run_id=live.get("train", (None, None))[1])
        log_dataset_input(client, train_run, dataset, "training")
    if tuned is not None and tuned != finetuned:
        pref = read_json(tuned / "train.json")
        pref_run = log_stage(client, run_id, "preference", pref, [tuned / "train.json"],
                             {"artifact": tuned.name, "method": pref.get("method"), "beta": pref.get("config", {}).get("beta"),
                              "start": pref.get("config", {}).get("start"),
                              "sft_artifact": finetuned.name if finetuned else None}, run_id=live.get("preference", (None, None))[1])
        log_dataset_input(client, pref_run, dataset, "preference")
    if draft is not None:
        log_stage(client, run_id, "draft", read_json(draft / "train.json"), [draft / "train.json"], {"artifact": draft.name},
                  run_id=live.get("draft", (None, None))[1])
    elif "draft" in live:
        client.set_terminated(live["draft"][1], "FINISHED")  # no draft to train: an empty run, closed
    for method, qdir in quantized.items():
        log_stage(client, run_id, f"quantize-{method}", {"size_bytes": dir_size_bytes(qdir)}, [qdir / "smelt_quant.json"], {"artifact": qdir.name})


def finish_pipeline_run(run_id: str, cfg: PipelineConfig, home: Path, registry: RegistryResult | None,
                        bento: BentoRef | None) -> None:
    """Tag the parent run with the registry outcome (none for a training-only run) and end it."""
    client = use_tracking(cfg.registry, home)
    tags = [] if registry is None else [
        RunTag("smelt.challenger", str(registry.challenger)), RunTag("smelt.promoted", str(registry.promoted)),
        RunTag("smelt.gate_reason", registry.gate_reason[:5000]), RunTag("smelt.champion", str(registry.champion))]
    if bento:
        tags.append(RunTag("smelt.bento", bento.bento_tag))
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, "FINISHED")


def fail_flow_runs(cfg: PipelineConfig, home: Path, flow_run_id: str) -> int:
    """Mark the MLflow runs a failed Prefect flow run left RUNNING as FAILED; return how many."""
    client = use_tracking(cfg.registry, home)
    exp = client.get_experiment_by_name(f"smelt-{cfg.preset}")
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], f"tags.`smelt.prefect_flow_run_id` = '{flow_run_id}' and attributes.status = 'RUNNING'")
    for r in runs:
        client.set_terminated(r.info.run_id, "FAILED")
    return len(runs)


# Not cached: every pipeline run gets its own parent run, even when all stages are reused.
@task(name="open-tracking-run", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def open_run_task(cfg: PipelineConfig, dataset: DatasetVersion, home: str) -> str:
    return open_pipeline_run(cfg, dataset, Path(home))


@task(name="open-stage-run", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def open_stage_run_task(run_id: str, cfg: PipelineConfig, home: str, stage: str) -> tuple[str, str]:
    return open_stage_run(run_id, cfg, Path(home), stage)


@task(name="track-stages", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def track_stages_task(run_id: str, cfg: PipelineConfig, home: str, dataset: DatasetVersion,
                      finetuned: Path, draft: Path | None, quantized: dict[str, Path],
                      live: dict[str, tuple[str, str]] | None = None, tuned: Path | None = None) -> None:
    log_stages(run_id, cfg, Path(home), dataset, finetuned, draft, quantized, live, tuned)


@task(name="close-tracking-run", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def close_run_task(run_id: str, cfg: PipelineConfig, home: str, registry: RegistryResult | None, bento: BentoRef | None) -> None:
    finish_pipeline_run(run_id, cfg, Path(home), registry, bento)
