"""What people see in the Prefect UI: the data report, the candidate table and the promotion
decision as artifacts of the flow run, and a run name that says what ran."""
from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from tasks.etl import DatasetVersion


def rename_flow_run(name: str) -> None:
    """Name the current flow run after what it runs on (the dataset version is only known after ETL)."""
    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name)


def data_report(dataset: DatasetVersion) -> str:
    c = dataset.counts
    lines = [f"# Dataset {dataset.version}", "", "| rows in | kept | quarantined | duplicates | train | eval |",
             "|---|---|---|---|---|---|",
             f"| {c.get('rows_in')} | {c.get('kept')} | {c.get('quarantined')} | {c.get('duplicates')} | {c.get('train')} | {c.get('eval')} |",
             "", f"Rows in = kept + quarantined + duplicates. Quarantined rows and their reasons: `{dataset.path / 'quarantine.jsonl'}`."]
    return "\n".join(lines)


def candidate_rows(reports: list[dict], registry: dict) -> list[dict]:
    return [{"version": v, "quant": r["quant_method"], "decoding": r["strategy"], "exact_match": round(r["exact_match"], 4),
             "field_accuracy": round(r["field_accuracy"], 4), "tokens_per_s": round(r["tokens_per_s"], 1),
             "draft_acceptance": r.get("draft_acceptance"), "chosen": i == registry["chosen"], "why": registry["reasons"][i]}
            for i, (v, r) in enumerate(zip(registry["versions"], reports))]


def decision_report(registry: dict) -> str:
    verdict = "promoted to champion" if registry["promoted"] else "not promoted"
    return (f"# {registry['name']}: challenger v{registry['challenger']} {verdict}\n\n{registry['gate_reason']}\n\n"
            f"Champion: v{registry['champion']}. Numbers compared: `{registry.get('gate_numbers')}`")


@task(name="report-data", cache_policy=NO_CACHE)
def report_data_task(preset: str, dataset: DatasetVersion) -> None:
    rename_flow_run(f"{preset}-{dataset.version}")
    create_markdown_artifact(data_report(dataset), key="smelt-data-report", description=f"dataset {dataset.version}")


@task(name="report-results", cache_policy=NO_CACHE)
def report_results_task(reports: list[dict], registry: dict) -> None:
    create_table_artifact(candidate_rows(reports, registry), key="smelt-candidates", description="every candidate, measured")
    create_markdown_artifact(decision_report(registry), key="smelt-promotion", description="the gate's decision")
