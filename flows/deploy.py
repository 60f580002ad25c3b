"""Prefect deployments of smelt's flows (`smelt deploy`): the full pipeline, ETL alone, and retrain.

Each takes the whole `PipelineConfig` as its typed parameter, so the Prefect UI renders a form.
They run on a local process work pool by default (`smelt up` starts a worker for it); code is
taken from this checkout. Retrain also runs whenever `smelt.data.changed` is emitted for the
watched folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows.watch import DATA_EVENT, resource_id
from tasks.config import REPO_ROOT, PipelineConfig, watched_folder


@dataclass
class DeploymentSpec:
    name: str
    entrypoint: str
    cron: str | None
    description: str


def deployment_specs(cfg: PipelineConfig) -> list[DeploymentSpec]:
    o = cfg.orchestration
    return [
        DeploymentSpec("pipeline", "flows/pipeline.py:pipeline", o.pipeline_cron, "The whole chain: ETL to Bento."),
        DeploymentSpec("etl", "flows/pipeline.py:etl", o.etl_cron, "ETL alone: a new dataset version and its report."),
        DeploymentSpec("retrain", "flows/pipeline.py:retrain", o.retrain_cron,
                       "The pipeline on the configured data plus the watched folder; runs when new data lands."),
    ]


def retrain_trigger(folder: Path) -> DeploymentEventTrigger:
    """One run per `smelt.data.changed` event for this folder, with the data digest as a parameter."""
    return DeploymentEventTrigger(
        name="new data",
        expect={DATA_EVENT},
        match={"prefect.resource.id": resource_id(folder)},
        parameters={"data_digest": "{{ event.payload.data_digest }}"},
    )


def ensure_work_pool(name: str) -> None:
    """A process work pool with the process worker's default job template, unless one exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))


def deploy_all(cfg: PipelineConfig, home: Path) -> list[str]:
    """Create or update the deployments against the configured Prefect API; returns their names."""
    from prefect import flow

    ensure_work_pool(cfg.orchestration.work_pool)
    params = {"config": cfg.model_dump(mode="json")}
    names = []
    for spec in deployment_specs(cfg):
        source = flow.from_source(source=str(REPO_ROOT), entrypoint=spec.entrypoint)
        triggers = [retrain_trigger(watched_folder(cfg.orchestration, home))] if spec.name == "retrain" else None
        deployment = source.to_deployment(
            name=spec.name, work_pool_name=cfg.orchestration.work_pool, parameters=params, cron=spec.cron,
            triggers=triggers, description=spec.description, tags=["smelt", cfg.preset], concurrency_limit=1,
        )
        # RunnerDeployment.apply, not Flow.deploy: in prefect 3.8.8 deploy() first lists the pool's
        # workers with offset/limit None, which the 3.8.8 server refuses (422).
        deployment.apply(work_pool_name=cfg.orchestration.work_pool)
        names.append(f"{source.name}/{spec.name}")
    return names
