"""What people see in the Prefect UI: the data report, the candidate table and the promotion
decision as artifacts of the flow run, and a run name that says what ran."""
from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Metric
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from models.artifacts import atomic_dir, write_json
from tasks.config import PipelineConfig
from tasks.etl import DatasetVersion
from tasks.results import EvalReport, RegistryResult, Selection
from tasks.tracking import ensure_experiment, log_dataset_input, use_tracking


def rename_flow_run(name: str) -> None:
    """Name the current flow run after what it runs on (the dataset version is only known after ETL)."""
    if flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name)


COUNT_LABELS = [("rows_in", "rows in"), ("kept", "kept"), ("quarantined", "quarantined"), ("duplicates", "exact duplicates"),
                ("near_duplicates", "near duplicates"), ("contaminated", "contaminating eval"), ("train", "train"), ("eval", "eval")]


def text_histogram(lengths: list[int], limit: int, bins: int = 12, width: int = 40) -> list[str]:
    """Token lengths as bars of text: the Prefect UI renders Markdown but no local pictures."""
    import numpy as np

    counts, edges = np.histogram(lengths, bins=bins, range=(0, max(limit, 1)))
    top = max(int(counts.max()), 1)
    return [f"{int(lo):>6}-{int(hi):<6} {'█' * round(width * c / top):<{width}} {c}" for c, lo, hi in zip(counts, edges, edges[1:])]


def data_report(dataset: DatasetVersion) -> str:
    """The dataset version in Markdown: every count, why rows were rejected, token lengths, sources."""
    import pyarrow.parquet as pq

    m, c = dataset.manifest, dataset.counts
    lines = [f"# Dataset {dataset.version}", "", "| " + " | ".join(h for _, h in COUNT_LABELS) + " |",
             "|" + "---|" * len(COUNT_LABELS), "| " + " | ".join(str(c.get(k, 0)) for k, _ in COUNT_LABELS) + " |", "",
             "Rows in = kept + quarantined + exact duplicates + near duplicates + contaminating eval.", "",
             "## Why rows were quarantined", ""]
    reasons = m.get("quarantine_reasons") or {}
    lines += ["| reason | rows |", "|---|---|", *[f"| {r} | {n} |" for r, n in reasons.items()]] if reasons else ["None."]
    lines += ["", f"Each quarantined row, with file, line and reason: `{dataset.path / 'quarantine.jsonl'}`; rows removed as "
              f"duplicates or contamination: `{dataset.path / 'removed.jsonl'}`.", "", "## Tokens per row (chat template applied)", "",
              "| split | rows | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|"]
    for split, t in m["token_lengths"].items():
        lines.append(f"| {split} | {t['rows']} | {t.get('mean', '-')} | {t.get('p50', '-')} | {t.get('p90', '-')} | "
                     f"{t.get('p99', '-')} | {t.get('max', '-')} |")
    limit = m["config"]["max_tokens"]
    train_lengths = pq.read_table(dataset.path / "train.parquet", columns=["tokens"]).column("tokens").to_pylist()
    lines += ["", f"Train rows by token length (limit {limit}; picture: `lengths.png`):", "", "```",
              *text_histogram(train_lengths, limit), "```", "", "## Sources", "", "| file | format | shape | sha256 | bytes |",
              "|---|---|---|---|---|"]
    lines += [f"| {s['uri']} | {s['format']} | {s['record_shape']} | {s['sha256'][:16]} | {s['bytes']} |" for s in m["sources"]]
    return "\n".join(lines)


def log_dataset(cfg: PipelineConfig, run_id: str | None, dataset: DatasetVersion, home: Path) -> str:
    """The dataset as an MLflow dataset input of the run (a run of its own for ETL alone), with the
    manifest, data report and length picture as artifacts under data/."""
    client = use_tracking(cfg.registry, home)
    own_run = run_id is None
    if own_run:
        exp_id = ensure_experiment(client, f"smelt-{cfg.preset}", home / "mlartifacts")
        run_id = client.create_run(exp_id, run_name=f"etl-{dataset.version}", tags={
            "smelt.stage": "etl", "smelt.dataset_version": dataset.version}).info.run_id
    log_dataset_input(client, run_id, dataset, "training")
    for name in ("manifest.json", "lengths.png"):
        client.log_artifact(run_id, str(dataset.path / name), artifact_path="data")
    client.log_text(run_id, data_report(dataset), "data/report.md")
    if own_run:
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in dataset.counts.items()])
        client.set_terminated(run_id, "FINISHED")
    return run_id


def candidate_rows(reports: list[EvalReport], registry: RegistryResult, base: EvalReport | None = None,
                   which: str = "table") -> list[dict]:
    """One formatted row per candidate (and the base model as a reference row), with the selection's
    reason; the columns are the metrics declared with `which` ('table' or 'summary') in EvalReport."""
    rows = []
    for i, r in enumerate(reports):
        row = {"version": registry.versions[i], "quant": r.quant_method, "decoding": r.strategy, **r.cells(which)}
        rows.append({**row, "chosen": "yes" if i == registry.chosen else "no", "why": registry.reasons[i]})
    if base is not None:
        rows.append({"version": "base", "quant": base.quant_method, "decoding": base.strategy, **base.cells(which),
                     "chosen": "-", "why": "reference: the base model before fine-tuning"})
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]).replace("|", "/") for h in header) + " |" for r in rows]
    return "\n".join(lines)


def evaluation_markdown(reports: list[EvalReport], base: EvalReport | None, selection: Selection, registry: RegistryResult) -> str:
    policy = selection.policy
    lm_eval = {r.candidate: r.lm_eval for r in reports if r.lm_eval}
    parts = [
        f"# Candidates of {registry.name}",
        "",
        f"Policy **{policy['policy']}** on **{policy['metric']}**, ranked by **{policy['speed_metric']}**: accepted within "
        f"{policy['max_accuracy_drop']:.1%} of the full-precision fine-tuned model ({selection.reference_accuracy:.1%})"
        + (f" and above the base model ({selection.base_accuracy:.1%})." if policy["require_above_base"] and base else "."),
        "",
        markdown_table(candidate_rows(reports, registry, base)),
        "",
        *([f"Fine-tuning gain on the eval split (full precision, plain decoding, vs the base model): "
           f"{gain_line(finetune_gain(reports, base))}.", ""] if finetune_gain(reports, base) else []),
        f"Machine memory bandwidth measured in this run: {reports[0].machine_bandwidth_gbs or 0:.1f} GB/s "
        "(read: a sum over 256 MiB). BW share = weight bytes x decode tokens/s over it.",
    ]
    if lm_eval:
        parts += ["", "## lm-evaluation-harness", "", "```json", json.dumps(lm_eval, indent=2, default=str), "```"]
    parts += ["", f"## Decision: {decision_line(registry)}", "", registry.gate_reason]
    return "\n".join(parts)


def plot_accuracy_vs_speed(reports: list[EvalReport], base: EvalReport | None, selection: Selection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    metric, speed = selection.policy["metric"], selection.policy["speed_metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(reports):
        style = {"marker": "*", "s": 220, "color": "tab:green"} if i == selection.chosen else \
            {"marker": "o", "s": 50, "color": "tab:blue" if i in selection.accepted else "tab:gray"}
        point = (getattr(r, speed) or 0, getattr(r, metric))
        ax.scatter(*point, **style)
        ax.annotate(r.label, point, fontsize=7, xytext=(4, 4), textcoords="offset points")
    if base is not None:
        ax.axhline(getattr(base, metric), color="tab:red", linestyle="--", linewidth=1, label="base model")
    ax.axhline(selection.reference_accuracy - selection.policy["max_accuracy_drop"], color="tab:orange",
               linestyle=":", linewidth=1, label="accuracy floor")
    ax.set_xlabel(EvalReport.metric(speed).label)
    ax.set_ylabel(EvalReport.metric(metric).label)
    ax.set_title("Candidates: accuracy vs speed (star: chosen, gray: rejected)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(reports: list[EvalReport], base: EvalReport | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = reports + ([base] if base else [])
    labels = [r.label for r in reports] + (["base model (reference)"] if base else [])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.5))
    ax.boxplot([r.latencies_s for r in shown], vert=False, showfliers=True)
    ax.set_yticks(range(1, len(shown) + 1), labels, fontsize=8)
    ax.set_xlabel("request latency, s (batch 1, eval prompts)")
    ax.set_title("Latency distribution per candidate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_evaluation_report(reports: list[EvalReport], base: EvalReport | None, selection: Selection, registry: RegistryResult,
                            out: Path) -> Path:
    """evaluation.json, evaluation.md and the two pictures, written together (atomically)."""
    with atomic_dir(out) as tmp:
        write_json(tmp / "evaluation.json", {"candidates": [r.model_dump(mode="json") for r in reports],
                                             "base": base.model_dump(mode="json") if base else None,
                                             "selection": selection.model_dump(mode="json"),
                                             "registry": registry.model_dump(mode="json"),
                                             "finetune_gain": finetune_gain(reports, base)})
        (tmp / "evaluation.md").write_text(evaluation_markdown(reports, base, selection, registry))
        plot_accuracy_vs_speed(reports, base, selection, tmp / "accuracy_vs_speed.png")
        plot_latency(reports, base, tmp / "latency.png")
    return out


def decision_line(registry: RegistryResult) -> str:
    """e.g. 'challenger v3 promoted to champion'."""
    return f"challenger v{registry.challenger} {'promoted to champion' if registry.promoted else 'not promoted'}"


def decision_report(registry: RegistryResult) -> str:
    return (f"# {registry.name}: {decision_line(registry)}\n\n{registry.gate_reason}\n\n"
            f"Champion: v{registry.champion}. Numbers compared: `{registry.gate_numbers}`")


@task(name="report-data", cache_policy=NO_CACHE)
def report_data_task(preset: str, dataset: DatasetVersion) -> None:
    rename_flow_run(f"{preset}-{dataset.version}")
    create_markdown_artifact(data_report(dataset), key="smelt-data-report", description=f"dataset {dataset.version}")


@task(name="log-dataset", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def log_dataset_task(cfg: PipelineConfig, run_id: str | None, dataset: DatasetVersion, home: str) -> str:
    return log_dataset(cfg, run_id, dataset, Path(home))


GAIN_METRICS = ("exact_match", "field_f1", "field_accuracy")


def finetune_gain(reports: list[EvalReport], base: EvalReport | None) -> dict:
    """What fine-tuning bought on the eval split: the full-precision fine-tuned model decoding plainly
    (quantization and decoding held out) against the base model, prompted the same way."""
    tuned = next((r for r in reports if r.quant_method == "none" and r.strategy == "plain"), None)
    if tuned is None or base is None:
        return {}
    out = {}
    for m in GAIN_METRICS:
        was, now = getattr(base, m), getattr(tuned, m)
        out |= {f"base_{m}": was, f"finetuned_{m}": now, f"finetune_gain_{m}": now - was}
    return out


def gain_line(gain: dict) -> str:
    """e.g. 'exact match 0.0% -> 41.7% (+41.7 points), field F1 ...' for the summary."""
    parts = [f"{EvalReport.metric(m).label} {gain[f'base_{m}']:.1%} -> {gain[f'finetuned_{m}']:.1%} "
             f"({100 * gain[f'finetune_gain_{m}']:+.1f} points)" for m in GAIN_METRICS[:2] if f"base_{m}" in gain]
    return ", ".join(parts)


def report_results(cfg: PipelineConfig, reports: list[EvalReport], base: EvalReport | None, selection: Selection,
                   registry: RegistryResult, run_id: str, home: Path) -> Path:
    """The evaluation report in SMELT_HOME, in the MLflow run (artifacts under evaluation/, the
    fine-tuning gain as metrics) and in Prefect."""
    out = write_evaluation_report(reports, base, selection, registry, home / "reports" / run_id)
    client = use_tracking(cfg.registry, home)
    client.log_artifacts(run_id, str(out), "evaluation")
    if gain := finetune_gain(reports, base):
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in gain.items()])
    create_table_artifact(candidate_rows(reports, registry, base), key="smelt-candidates", description="every candidate, measured")
    create_markdown_artifact((out / "evaluation.md").read_text() + f"\n\nPictures: MLflow run `{run_id}`, artifacts `evaluation/`; "
                             f"locally `{out}`.", key="smelt-evaluation", description="candidates, selection and decision")
    create_markdown_artifact(decision_report(registry), key="smelt-promotion", description="the gate's decision")
    return out


@task(name="report-results", cache_policy=NO_CACHE)
def report_results_task(cfg: PipelineConfig, reports: list[EvalReport], base: EvalReport | None, selection: Selection,
                        registry: RegistryResult, run_id: str, home: str) -> str:
    return str(report_results(cfg, reports, base, selection, registry, run_id, Path(home)))
