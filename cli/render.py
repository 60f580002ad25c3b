"""What the `smelt` commands print: tables and summaries, kept out of the commands so a command
reads as parse -> run -> render, and a table changes in one place."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from models.settings import smelt_home

console = Console(width=160)  # wide enough for the summary table in logs and CI, not just terminals


def pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def print_train_result(result, train: dict | None, draft: dict | None, preferred: dict | None = None) -> None:
    """`smelt train`: the fine-tuning run (from its train.json; None when SFT was skipped), the
    preference stage's reward accuracy and margin, and the distilled draft's acceptance."""
    if t := train:
        resumed = f", resumed from step {t['resumed_from_step']}" if t.get("resumed_from_step") else ""
        early = f", stopped early at step {t['steps_run']}" if t.get("stopped_early") else ""
        console.print(f"fine-tuned ({t['method']}, {t['steps_run']} steps on {t['num_processes']} process(es){resumed}{early}): "
                      f"train loss {t['final_loss']:.4f}, eval loss {t['eval_loss'] or float('nan'):.4f}, "
                      f"{t['train_tokens_per_s']:,.0f} tokens/s -> {result.finetuned}")
    if preferred:
        p = preferred
        console.print(f"preference-tuned ({p['method']}, {p['steps']} steps on {p['pairs']} pairs): train loss {p['train_loss']:.4f}; "
                      f"on {p['eval_pairs']} eval pairs reward accuracy {pct(p.get('eval_rewards/accuracies'))}, "
                      f"margin {p.get('eval_rewards/margins') or float('nan'):.3f} -> {result.preferred}")
    if draft:
        d = draft
        console.print(f"draft distilled ({d['steps_run']} steps): acceptance on {d['acceptance_rows']} eval prompts "
                      f"{pct(d['acceptance_before'])} before, {pct(d['acceptance_after'])} after -> {result.draft}")
    console.print(f"MLflow run {result.mlflow_run_id}")


def versions_table(name: str, rows: list[dict]) -> Table:
    """`smelt models list`: one registered model's versions, with the metrics EvalReport declares `listed`."""
    from tasks.results import EvalReport

    listed = {k: m for k, m in EvalReport.metrics().items() if m.listed}  # numbers are tag strings; "None" when unmeasured
    table = Table(title=f"{name} ({len(rows)} versions)")
    for col in ("version", "aliases", *(m.label for m in listed.values()), "quant", "decoding", "dataset", "config",
                "commit", "created", "gate"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("gate", "aliases"))
    for r in rows:
        numbers = [m.show(None if r[k] in (None, "None") else float(r[k])) for k, m in listed.items()]
        table.add_row(r["version"], ", ".join(r["aliases"]), *numbers, r["quant_method"] or "-",
                      r["strategy"] or "-", r["dataset_version"] or "-", r["config_hash"] or "-", (r["git_commit"] or "-")[:8],
                      r["created"], (r["rolled_back"] and f"rolled back {r['rolled_back']}") or r["gate"] or "-")
    return table


def print_data_summary(result) -> None:
    """`smelt data ingest`: the dataset version's counts and where it was written."""
    from tasks.report import COUNT_LABELS

    c = result.counts
    table = Table(title=f"Dataset {result.dataset}")
    for _, header in COUNT_LABELS:
        table.add_column(header)
    table.add_row(*[str(c.get(k, 0)) for k, _ in COUNT_LABELS])
    console.print(table)
    console.print(f"written to {result.path} (train.parquet, eval.parquet, manifest.json, quarantine.jsonl, removed.jsonl, "
                  f"lengths.png); MLflow run {result.mlflow_run_id}")


def print_table(title: str, cells: list[list[str]]) -> None:
    table = Table(title=title)
    for i, header in enumerate(cells[0]):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in cells[1:]:
        table.add_row(*row)
    console.print(table)


def print_etl_benchmark(result: dict, rows: int) -> None:
    """`smelt data bench`: smelt next to pandas, then what smelt kept and removed."""
    from bench.etl import table_rows

    print_table(f"ETL benchmark: {rows:,} rows, {result['file_mb']:,.0f} MB JSONL ({result['cpus']} CPUs)", table_rows(result))
    c = result["smelt"]["counts"]
    console.print(f"smelt kept {c['kept']:,} ({c['train']:,} train / {c['eval']:,} eval); removed {c['quarantined']:,} "
                  f"quarantined, {c['duplicates']:,} duplicates, {c['contaminated']:,} contaminated. pandas only parses: "
                  f"no validation, dedup or tokens.")
    console.print(f"written to {Path(result['file']).parent / 'etl-benchmark.json'}")


def print_serve_benchmark(name: str, result: dict) -> None:
    """`smelt bench`: the champion run's recipes, and the random-init model's if it was timed."""
    from bench.serve import table_rows

    print_table(f"{name}: {result['prompts']} prompts x {result['passes']} passes, {result['max_new_tokens']} new tokens, "
                f"{result['cpus']} threads, "
                f"memory bandwidth {result['machine_bandwidth_gbs']:.1f} GB/s", table_rows(result["rows"]))
    if "random" in result:
        print_table(f"random-init {result['random']['parameters'] / 1e6:.0f}M-parameter model, same architecture",
                    table_rows(result["random"]["rows"]))
    console.print(f"written to {result['report']}; MLflow run {result['mlflow_run_id']} (experiment smelt-bench)")


def print_train_benchmark(result: dict, config: str, steps: int, report: Path) -> None:
    """`smelt bench-train`: smelt's trainer next to transformers.Trainer + peft."""
    from bench.train import table_rows

    t = result["train"]
    print_table(f"Training benchmark: {config}, LoRA r={t['lora']['r']}, {steps} steps of batch {t['batch_size']}, "
                f"{result['rows']:,} rows, {result['cpus']} CPUs", table_rows(result))
    console.print(f"written to {report}")


def print_summary(result, seconds: float) -> None:
    """`smelt run`'s ending: the candidates (the metrics EvalReport declares for the summary: the numbers
    the selection turns on; the full table is in the report files), the selection, the gate, what next."""
    from tasks.report import candidate_rows, decision_line, finetune_gain, gain_line

    reg = result.registry
    rows = candidate_rows(result.reports, reg, result.base, which="summary")
    table = Table(title=f"Candidates (dataset {result.dataset}, {result.counts['train']} train / {result.counts['eval']} eval rows)")
    columns = [c for c in rows[0] if c != "why"]
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[("[green]yes[/green]" if row[c] == "yes" else str(row[c])) for c in columns])
    console.print(table)
    for row in rows:
        console.print(f"  v{row['version']} {row['quant']}/{row['decoding']}: {row['why']}")
    if gain := finetune_gain(result.reports, result.base):
        console.print(f"Fine-tuning gain on the eval split (full precision, plain decoding, vs the base model): {gain_line(gain)}.")
    policy = result.selection.policy
    console.print(f"Selection: {policy['policy']} on {policy['metric']} (within {policy['max_accuracy_drop']:.1%} of full "
                  f"precision{', above the base model' if policy['require_above_base'] else ''}), ranked by {policy['speed_metric']}.")
    if reg.challenger is None:
        console.print(f"Registered model [bold]{reg.name}[/bold]: {reg.gate_reason}; champion is v{reg.champion}.")
    else:
        console.print(f"Registered model [bold]{reg.name}[/bold]: {decision_line(reg)} ({reg.gate_reason}); "
                      f"champion is v{reg.champion}.")
    console.print(f"Evaluation report (JSON, Markdown, pictures): {result.report_dir} (also in the MLflow run, under evaluation/)")
    console.print(f"MLflow run {result.mlflow_run_id}; `smelt models list {reg.name}` shows every version.")
    home = smelt_home()
    lines = [f"Finished in {seconds:.0f} s. Next:",
             f"  Versions:    uv run smelt models list {reg.name}",
             "  UIs:         uv run smelt up    (MLflow and Prefect servers on 127.0.0.1; `smelt down` stops them)"]
    if result.bento:
        tag = result.bento.bento_tag
        lines += [f"  Bento:       {tag}  (BENTOML_HOME={home / 'bentoml'})",
                  f"  Serve it:    uv run smelt serve {reg.name}   (OpenAI-compatible API on http://127.0.0.1:3000/v1)",
                  f"  Container:   uv run smelt containerize {reg.name}; uv run smelt rollout {reg.name}  (needs Docker)"]
    console.print("\n".join(lines))
