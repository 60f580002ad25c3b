"""The pipeline flow: etl -> train -> quantize -> evaluate -> register -> package. Wiring only."""
from __future__ import annotations

from prefect import flow

from flows.env import smelt_home
from tasks.config import PipelineConfig
from tasks.etl import etl_task
from tasks.evaluate import build_candidates_task, evaluate_task
from tasks.package import package_task
from tasks.quantize import quantize_task
from tasks.register import register_task
from tasks.train import prepare_models_task, train_draft_task, train_lora_task


@flow(name="smelt-pipeline", flow_run_name="{config.preset}", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    home = str(smelt_home())
    dataset = etl_task(config.etl, home)
    base, draft_init = prepare_models_task(config.model, home, config.train.device)
    finetuned = train_lora_task(base, dataset, config.train, config.model, home)
    draft = train_draft_task(finetuned, draft_init, dataset, config.train, home)
    quantized = quantize_task(finetuned, dataset, config.quant, home, config.train.device)
    candidates = build_candidates_task(quantized, draft, config.decode, home)
    reports = [evaluate_task(c, dataset, config.eval, home) for c in candidates]
    registry = register_task(config, dataset, reports, home)
    bento = package_task(registry["name"], registry["champion"]) if config.package.build_bento else None
    return {"dataset": dataset.version, "counts": dataset.counts, "reports": reports, "registry": registry, "bento": bento}
