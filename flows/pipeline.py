"""The pipeline flow: etl -> train (SFT, then DPO/ORPO if configured) -> quantize -> evaluate -> register ->
package. Wiring only."""
from __future__ import annotations

import os

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from models.settings import smelt_home
from tasks.config import EtlConfig, PipelineConfig, with_watched_data
from tasks.etl import DatasetVersion, ingest_shard_task, merge_task, plan_task, prepare_tokenizer_task
from tasks.evaluate import build_candidates_task, build_reference_task, evaluate_base_task, evaluate_task
from tasks.package import package_task
from tasks.quantize import quantize_task
from tasks.register import register_task
from tasks.report import log_dataset_task, report_data_task, report_results_task
from tasks.results import EtlResult, PipelineResult, TrainResult
from tasks.select import select_task
from tasks.tracking import close_run_task, fail_flow_runs, open_run_task, open_stage_run_task, track_stages_task
from tasks.train import finetune_task, preference_task, prepare_models_task, train_draft_task


def mark_tracking_failed(flow, flow_run, state) -> None:
    """A failed or crashed flow run leaves no MLflow run looking as if it were still going."""
    fail_flow_runs(PipelineConfig.model_validate(flow_run.parameters.get("config") or {}), smelt_home(), str(flow_run.id))


@flow(name="smelt-pipeline", flow_run_name="{config.preset}", log_prints=True,
      on_failure=[mark_tracking_failed], on_crashed=[mark_tracking_failed])
def pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineResult:
    home = str(smelt_home())
    dataset = ingest(config, home)
    report_data_task(config.preset, dataset)
    run = open_run_task(config, dataset, home)
    log_dataset_task(config, run, dataset, home)
    base, draft_init = prepare_models_task(config.model, home, config.train.device)
    live = {stage: open_stage_run_task(run, config, home, stage) for stage in config.train.stages()}
    finetuned = finetune_task(base, dataset, config.train, config.model, home, live.get("train"))
    tuned = preference_task(finetuned, base, dataset, config.train, config.model, home, live.get("preference"))
    draft = train_draft_task(tuned, draft_init, dataset, config.train, home, live["draft"])
    quantized = quantize_task(tuned, dataset, config.quant, home, config.train.device)
    track_stages_task(run, config, home, dataset, finetuned, draft, quantized, live, tuned)
    candidates = build_candidates_task(quantized, draft, config.decode, home)
    reports = evaluate_task(candidates, dataset, config.eval, home)
    base_report = evaluate_base_task(build_reference_task(base, tuned, config.decode, home), dataset, config.eval, home)
    selection = select_task(reports, base_report, config.select)
    registry = register_task(config, dataset, reports, selection, run, home)
    ship = config.package.build_bento and registry.champion is not None
    bento = package_task(registry.name, registry.champion, config.registry, home) if ship else None
    report_dir = report_results_task(config, reports, base_report, selection, registry, run, home)
    close_run_task(run, config, home, registry, bento)
    return PipelineResult(dataset=dataset.version, counts=dataset.counts, reports=reports, base=base_report, selection=selection,
                          registry=registry, bento=bento, mlflow_run_id=run, report_dir=report_dir)


def shard_runner(cfg: EtlConfig):
    """Where the shard tasks run: threads here, or a Dask cluster (an existing one, or a local one)."""
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=max(1, min(4, os.cpu_count() or 1)))


@flow(name="smelt-ingest", flow_run_name="ingest-{config.preset}", log_prints=True)
def ingest_shards(config: PipelineConfig, tokenizer: str, home: str) -> DatasetVersion:
    """Plan, one mapped task per shard, merge."""
    plan = plan_task(config.etl, tokenizer, config.model.chat_template, home)
    parts = ingest_shard_task.map(plan.shards, range(len(plan.shards)), unmapped(plan), unmapped(config.etl))
    return merge_task(plan, parts.result(), config.etl)  # .result(): a bad file's DataError fails the flow


def ingest(config: PipelineConfig, home: str) -> DatasetVersion:
    tokenizer = prepare_tokenizer_task(config.model, home)
    return ingest_shards.with_options(task_runner=shard_runner(config.etl))(config, tokenizer, home)


@flow(name="smelt-etl", flow_run_name="{config.preset}-etl", log_prints=True)
def etl(config: PipelineConfig = PipelineConfig()) -> EtlResult:
    """ETL alone: validate, deduplicate and version the data; the data report is the run's artifact."""
    home = str(smelt_home())
    dataset = ingest(config, home)
    report_data_task(config.preset, dataset)
    mlflow_run = log_dataset_task(config, None, dataset, home)
    return EtlResult(mlflow_run_id=mlflow_run, dataset=dataset.version, counts=dataset.counts, path=str(dataset.path))


@flow(name="smelt-train", flow_run_name="{config.preset}-train", log_prints=True,
      on_failure=[mark_tracking_failed], on_crashed=[mark_tracking_failed])
def train(config: PipelineConfig = PipelineConfig()) -> TrainResult:
    """ETL and training alone: fine-tune the base and distil the draft, tracked in MLflow. An
    interrupted run resumes from its last checkpoint when started again with the same config."""
    home = str(smelt_home())
    dataset = ingest(config, home)
    run = open_run_task(config, dataset, home)
    base, draft_init = prepare_models_task(config.model, home, config.train.device)
    live = {stage: open_stage_run_task(run, config, home, stage) for stage in config.train.stages()}
    finetuned = finetune_task(base, dataset, config.train, config.model, home, live.get("train"))
    tuned = preference_task(finetuned, base, dataset, config.train, config.model, home, live.get("preference"))
    draft = train_draft_task(tuned, draft_init, dataset, config.train, home, live["draft"])
    track_stages_task(run, config, home, dataset, finetuned, draft, {}, live, tuned)
    close_run_task(run, config, home, None, None)
    return TrainResult(dataset=dataset.version, counts=dataset.counts, finetuned=None if finetuned is None else str(finetuned),
                       preferred=None if tuned == finetuned else str(tuned),
                       draft=None if draft is None else str(draft), mlflow_run_id=run)


@flow(name="smelt-retrain", flow_run_name="{config.preset}-retrain", log_prints=True)
def retrain(config: PipelineConfig = PipelineConfig(), data_digest: str | None = None) -> PipelineResult:
    """The pipeline on the configured data plus the watched folder; promotes only through the gate.
    `data_digest` records which state of the watched folder triggered the run."""
    return pipeline(with_watched_data(config, smelt_home()))
