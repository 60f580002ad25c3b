"""`smelt` command line. Configures SMELT_HOME before Prefect, MLflow or BentoML is imported."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import loadtest
from cli import stack
from models.settings import configure_environment, quiet_library_logs, smelt_home

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="smelt: train -> quantize -> evaluate -> register -> package an LLM, on Prefect, MLflow and BentoML.")
console = Console(width=160)  # wide enough for the summary table in logs and CI, not just terminals
models_app = typer.Typer(no_args_is_help=True, help="Inspect models in the MLflow registry.")
app.add_typer(models_app, name="models")
data_app = typer.Typer(no_args_is_help=True, help="Feed new data to the watched folder; retrains follow through Prefect.")
app.add_typer(data_app, name="data")
CONFIG_OPTION = typer.Option("tiny-cpu", "--config", "-c", help="Preset or YAML file whose registry settings (gate, tracking URI) apply.")


def load_or_exit(config: str, overrides: list[str]):
    from tasks.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)


@app.command()
def run(
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides, e.g. train.steps=50 quant.methods='[none]'."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset name (infra/configs/NAME.yaml) or path to a YAML file."),
) -> None:
    """Run the whole pipeline: ETL, LoRA fine-tuning, quantization, evaluation, MLflow registration, Bento build."""
    home = configure_environment()
    quiet_library_logs()
    cfg = load_or_exit(config, overrides or [])  # refuse a bad config before any work starts
    use_running_prefect(home)  # `smelt up` is running: report the run to its UI
    from flows.pipeline import pipeline

    console.print(f"smelt: preset [bold]{cfg.preset}[/bold], home {home}")
    t0 = time.perf_counter()
    result = pipeline(cfg)
    print_summary(result, time.perf_counter() - t0)


@app.command("train")
def train_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides, e.g. train.method=qlora train.num_processes=2."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset name (infra/configs/NAME.yaml) or path to a YAML file."),
) -> None:
    """ETL and training alone: fine-tune the base (train.method: lora, qlora or full) and distil the draft.

    Checkpoints every train.checkpoint_every steps; if the run is killed, the same command resumes
    from the last checkpoint. Loss, learning rate, grad norm and tokens/s go to MLflow every
    train.log_every steps. train.num_processes=N trains on N processes (torchrun on the CPU).
    """
    home = configure_environment()
    quiet_library_logs()
    cfg = load_or_exit(config, overrides or [])
    use_running_prefect(home)
    from flows.pipeline import train
    from models.artifacts import read_json

    console.print(f"smelt train: preset [bold]{cfg.preset}[/bold], method {cfg.train.method}, home {home}")
    result = train(cfg)
    t = read_json(Path(result["finetuned"]) / "train.json")
    resumed = f", resumed from step {t['resumed_from_step']}" if t.get("resumed_from_step") else ""
    early = f", stopped early at step {t['steps_run']}" if t.get("stopped_early") else ""
    console.print(f"fine-tuned ({t['method']}, {t['steps_run']} steps on {t['num_processes']} process(es){resumed}{early}): "
                  f"train loss {t['final_loss']:.4f}, eval loss {t['eval_loss'] or float('nan'):.4f}, {t['train_tokens_per_s']:,.0f} tokens/s "
                  f"-> {result['finetuned']}")
    if result["draft"]:
        d = read_json(Path(result["draft"]) / "train.json")
        pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        console.print(f"draft distilled ({d['steps_run']} steps): acceptance on {d['acceptance_rows']} eval prompts "
                      f"{pct(d['acceptance_before'])} before, {pct(d['acceptance_after'])} after -> {result['draft']}")
    console.print(f"MLflow run {result['mlflow_run_id']}")


@app.command()
def presets() -> None:
    """List the shipped config presets."""
    from tasks.config import PRESETS_DIR

    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{p.stem}[/bold]: {first}")


@app.command("show-config")
def show_config(
    overrides: Optional[list[str]] = typer.Argument(None),
    config: str = typer.Option("tiny-cpu", "--config", "-c"),
) -> None:
    """Print the fully resolved config (preset + overrides) as YAML, after validation."""
    import yaml

    cfg = load_or_exit(config, overrides or [])
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def use_running_prefect(home) -> bool:
    """Point Prefect at the server `smelt up` started unless PREFECT_API_URL already says where; True if set."""
    if "PREFECT_API_URL" not in os.environ and (api := stack.running_url(home, "prefect")):
        os.environ["PREFECT_API_URL"] = api
    return "PREFECT_API_URL" in os.environ


def registry_client(config: str):
    """(client, pipeline config, home) for registry commands; bad config exits 2."""
    home = configure_environment()
    quiet_library_logs()
    cfg = load_or_exit(config, [])
    from tasks.tracking import use_tracking

    return use_tracking(cfg.registry, home), cfg, home


def champion_name(client, name: Optional[str], cfg) -> str:
    """NAME, or the preset's registered name; exits 2 when it has no champion to package or serve."""
    from tasks.promote import current_champion

    name = name or cfg.registered_name
    if current_champion(client, name) is None:
        fail(f"{name!r} has no champion yet: run `smelt run` or `smelt promote {name} VERSION` first", 2)
    return name


def fail(message: str, code: int = 1) -> None:
    # escaped: the message is text, not markup; unwrapped: a path or line number stays whole
    console.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(code)


@models_app.command("list")
def models_list(
    name: Optional[str] = typer.Argument(None, help="Registered model name; all registered models if left out."),
    config: str = CONFIG_OPTION,
) -> None:
    """Versions with their aliases, key metrics, gate decisions and lineage."""
    client, _, _ = registry_client(config)
    from tasks.promote import RegistryError, list_versions

    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    if not names:
        console.print("No registered models yet: run `smelt run` first.")
    for n in names:
        try:
            rows = list_versions(client, n)
        except RegistryError as err:
            fail(str(err))
        console.print(versions_table(n, rows))


def versions_table(name: str, rows: list[dict]) -> Table:
    table = Table(title=f"{name} ({len(rows)} versions)")
    for col in ("version", "aliases", "exact match", "field acc", "tok/s", "quant", "decoding", "dataset", "config",
                "commit", "created", "gate"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("gate", "aliases"))
    for r in rows:
        pct = lambda v: "-" if v in (None, "None") else f"{float(v):.1%}"  # noqa: E731
        table.add_row(r["version"], ", ".join(r["aliases"]), pct(r["exact_match"]), pct(r["field_accuracy"]),
                      "-" if r["tokens_per_s"] is None else f"{float(r['tokens_per_s']):.0f}", r["quant_method"] or "-",
                      r["strategy"] or "-", r["dataset_version"] or "-", r["config_hash"] or "-", (r["git_commit"] or "-")[:8],
                      r["created"], (r["rolled_back"] and f"rolled back {r['rolled_back']}") or r["gate"] or "-")
    return table


@app.command()
def promote(
    name: str = typer.Argument(..., help="Registered model name, e.g. smelt-tiny-embedded."),
    version: str = typer.Argument(..., help="Model version to make champion."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate refuses; needs --reason."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded on the version (required with --force)."),
    config: str = CONFIG_OPTION,
) -> None:
    """Make VERSION the champion if it passes the accuracy-and-speed gate against the current champion."""
    client, cfg, home = registry_client(config)
    from tasks.promote import RegistryError
    from tasks.promote import promote as promote_version

    try:
        result = promote_version(client, name, version, cfg.registry, home, force=force, reason=reason)
    except RegistryError as err:
        fail(str(err), 2)
    if not result.promoted:
        fail(f"Refused: v{version} stays off champion (champion is v{result.champion}): {result.reason}")
    previous = f"; previous champion v{result.previous_champion}" if result.previous_champion else ""
    console.print(f"[green]{name}: v{result.version} is champion[/green] ({result.reason}{previous}).")


@app.command()
def rollback(
    name: str = typer.Argument(..., help="Registered model name."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded on the demoted version."),
    config: str = CONFIG_OPTION,
) -> None:
    """Put the previous champion back as champion (no gate: this is the emergency lever)."""
    client, _, home = registry_client(config)
    from tasks.promote import RegistryError
    from tasks.promote import rollback as rollback_model

    try:
        result = rollback_model(client, name, home, reason)
    except RegistryError as err:
        fail(str(err), 2)
    console.print(f"[green]{name}: champion is v{result.version} again[/green] ({result.reason}).")


@app.command()
def package(
    name: Optional[str] = typer.Argument(None, help="Registered model name; default the preset's (smelt-<model.name>)."),
    config: str = CONFIG_OPTION,
) -> None:
    """Import models:/NAME@champion into BentoML's model store and build its Bento (serving/ + models/)."""
    client, cfg, home = registry_client(config)
    from tasks.package import package_champion

    name = champion_name(client, name, cfg)
    result = package_champion(name, cfg.registry, home)
    console.print(f"Bento [bold]{result['bento_tag']}[/bold] (model {result['model_tag']}).\n"
                  f"  Serve it:   uv run smelt serve {name}\n"
                  f"  Container:  BENTOML_HOME={home / 'bentoml'} uv run bentoml containerize {result['bento_tag']}  (needs Docker)")


@app.command()
def serve(
    name: Optional[str] = typer.Argument(None, help="Registered model name; default the preset's."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 127.0.0.1 keeps it on this machine."),
    port: int = typer.Option(3000, help="Port of the HTTP API (OpenAI-compatible under /v1)."),
    config: str = CONFIG_OPTION,
) -> None:
    """Serve the champion's Bento (packaging it first if needed) with `bentoml serve`; Ctrl-C stops it.

    Settings come from the environment: SMELT_API_KEY, SMELT_MAX_TOKENS, SMELT_MAX_BATCH_SIZE,
    SMELT_MAX_QUEUE, SMELT_DEVICE (see serving/config.py).
    """
    import subprocess

    client, cfg, home = registry_client(config)
    from tasks.package import package_champion

    name = champion_name(client, name, cfg)
    tag = package_champion(name, cfg.registry, home)["bento_tag"]
    console.print(f"Serving {tag} on http://{host}:{port} (OpenAI API at http://{host}:{port}/v1)")
    proc = subprocess.run([sys.executable, "-m", "bentoml", "serve", tag, "--host", host, "--port", str(port)])
    raise typer.Exit(proc.returncode)


def prefect_api_or_exit(home) -> None:
    if not use_running_prefect(home):
        fail("no Prefect server: run `smelt up` (or set PREFECT_API_URL) first", 2)


def watched_setup(config: str):
    """(home, config, watched folder) for the `data` commands, which need a Prefect server for their events."""
    home = configure_environment()
    cfg = load_or_exit(config, [])
    prefect_api_or_exit(home)
    from tasks.config import watched_folder

    return home, cfg, watched_folder(cfg.orchestration, home)


@app.command()
def deploy(
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides baked into the deployments' default parameters."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset name or YAML file."),
) -> None:
    """Create or update the Prefect deployments: pipeline, etl and retrain (retrain runs on new data).

    Schedules come from orchestration.pipeline_cron / etl_cron / retrain_cron (all off by default).
    They run on the orchestration.work_pool process pool; `smelt up` starts its worker.
    """
    home = configure_environment()
    quiet_library_logs()
    cfg = load_or_exit(config, overrides or [])
    prefect_api_or_exit(home)
    from flows.deploy import deploy_all
    from tasks.config import watched_folder

    for name in deploy_all(cfg, home):
        console.print(f"deployed [bold]{name}[/bold]")
    console.print(f"New data: `uv run smelt data add FILE.jsonl -c {config}` (or drop files into "
                  f"{watched_folder(cfg.orchestration, home)} while `smelt data watch` runs) starts a retrain.")


@data_app.command("ingest")
def data_ingest(
    paths: list[str] = typer.Argument(..., help="Files, folders or fsspec URIs (s3://bucket/prefix) to ingest; the "
                                                "preset's own sources are replaced by these."),
    fmt: str = typer.Option("auto", "--format", "-f", help="jsonl, json, csv, tsv, parquet, hf (a save_to_disk folder) or "
                                                          "text; auto: from the suffix."),
    schema: str = typer.Option("auto", "--schema", "-s", help="Record shape: prompt-completion, alpaca, chat, sharegpt or "
                                                             "text; auto: detected per file."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Other config overrides, e.g. --set etl.near_dedup=true "
                                                                    "--set etl.task_runner=dask (repeatable)."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset whose tokenizer, chat template and length limit apply."),
) -> None:
    """Run the ETL stage alone: validate, normalise, deduplicate, check contamination, split and version the data.

    Prints the version id and every count; bad rows are quarantined with file, line and reason, and
    the data report goes to the Prefect run and to MLflow. Ingesting the same input again is free.
    """
    home = configure_environment()
    quiet_library_logs()
    cfg = load_or_exit(config, [f"etl.sources={json.dumps(paths)}", f"etl.format={fmt}", f"etl.record_shape={schema}",
                                *(overrides or [])])
    use_running_prefect(home)
    from flows.pipeline import etl
    from tasks.data.formats import DataError

    try:
        result = etl(cfg)
    except DataError as err:
        fail(f"smelt data ingest: {err}", 2)
    print_data_summary(result)


def print_data_summary(result: dict) -> None:
    from tasks.report import COUNT_LABELS

    c = result["counts"]
    table = Table(title=f"Dataset {result['dataset']}")
    for _, header in COUNT_LABELS:
        table.add_column(header)
    table.add_row(*[str(c.get(k, 0)) for k, _ in COUNT_LABELS])
    console.print(table)
    console.print(f"written to {result['path']} (train.parquet, eval.parquet, manifest.json, quarantine.jsonl, removed.jsonl, "
                  f"lengths.png); MLflow run {result['mlflow_run_id']}")


@data_app.command("bench")
def data_bench(
    rows: int = typer.Option(1_000_000, "--rows", "-n", min=1000, help="Rows in the generated JSONL file (about 1 KB each)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the input file, the fresh ETL home and "
                                                                  "etl-benchmark.json go; default $SMELT_HOME/bench/etl."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated rows (the file is reused while rows and seed match)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=8, help="etl.max_tokens for the run (the tiny-cpu preset's "
                                                                     "160 would reject every 1 KB row)."),
    keep_dataset: bool = typer.Option(False, "--keep-dataset", help="Keep the built dataset (WORKDIR/home) to inspect its "
                                                                   "quarantine and removed rows; it is deleted by default."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset whose tokenizer, chat template and ETL settings apply."),
) -> None:
    """Benchmark the ETL at scale: rows/s and peak memory of smelt next to pandas.read_json(lines=True).

    Writes a JSONL file of ROWS chat rows (a few percent duplicates, invalid and over-long rows;
    written once, then reused), loads it with pandas, then ingests it with smelt's build_dataset
    (validate, tokenize, dedup, contamination, Parquet), each in its own fresh process so peak RSS
    is per job. Prints both and their ratio; the numbers also go to WORKDIR/etl-benchmark.json.
    The default 1,000,000 rows (about 1 GB) takes several minutes; no Prefect server is needed.
    """
    home = configure_environment()
    from bench.etl import run_etl_benchmark, table_rows

    result = run_etl_benchmark(rows, workdir or home / "bench" / "etl", seed, config, max_tokens, keep_dataset,
                               echo=console.print)
    cells = table_rows(result)
    table = Table(title=f"ETL benchmark: {rows:,} rows, {result['file_mb']:,.0f} MB JSONL ({result['cpus']} CPUs)")
    for i, header in enumerate(cells[0]):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in cells[1:]:
        table.add_row(*row)
    console.print(table)
    c = result["smelt"]["counts"]
    console.print(f"smelt kept {c['kept']:,} ({c['train']:,} train / {c['eval']:,} eval); removed {c['quarantined']:,} "
                  f"quarantined, {c['duplicates']:,} duplicates, {c['contaminated']:,} contaminated. pandas only parses: "
                  f"no validation, dedup or tokens.")
    console.print(f"written to {Path(result['file']).parent / 'etl-benchmark.json'}")


@app.command("bench")
def bench(
    name: Optional[str] = typer.Argument(None, help="Registered model name; default the preset's (smelt-<model.name>)."),
    prompts: int = typer.Option(8, "--prompts", "-n", min=1, help="Eval prompts every recipe decodes, one at a time."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=2, help="Default: the preset's decode.max_new_tokens."),
    streams: int = typer.Option(8, "--streams", min=2, help="Requests decoded together for the aggregate tokens/s."),
    passes: int = typer.Option(3, "--passes", min=1, help="Times every recipe decodes all prompts, taking turns; a recipe's "
                                                           "speed is its median pass, so a slow spell of the machine "
                                                           "neither favours nor hurts one recipe."),
    with_random: bool = typer.Option(True, "--random-100m/--no-random-100m",
                                     help="Also time a random-init ~100M-parameter model of the same architecture, big "
                                          "enough to be bound by memory bandwidth."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON report; default $SMELT_HOME/bench/serve/NAME-vVERSION.json."),
    config: str = CONFIG_OPTION,
) -> None:
    """Time every serving recipe of NAME's champion run against plain transformers generate (fp32, eager).

    One process; the same weights, eval prompts and greedy settings for all. Recipes: each registered
    weight format (fp32, int8, int4...) x decode loop (transformers generate; smelt's compiled
    static-cache loop; the same with the trained draft). Prints decode tokens/s at batch 1, time to
    first token, ratio to the baseline, draft acceptance, weight bytes, effective bandwidth and its
    share of the bandwidth measured in the same run, aggregate tokens/s of STREAMS requests decoded
    together, compile warm-up, and how many prompts gave exactly the baseline's tokens. Writes the
    table as JSON and logs it to MLflow (experiment smelt-bench).
    """
    client, cfg, home = registry_client(config)
    from bench.serve import run_serve_benchmark, table_rows

    name = champion_name(client, name, cfg)
    result = run_serve_benchmark(client, name, cfg, home, prompts, max_new_tokens or cfg.decode.max_new_tokens, streams,
                                 passes, with_random, out, echo=console.print)
    print_table(f"{name}: {result['prompts']} prompts x {result['passes']} passes, {result['max_new_tokens']} new tokens, "
                f"{result['cpus']} threads, "
                f"memory bandwidth {result['machine_bandwidth_gbs']:.1f} GB/s", table_rows(result["rows"]))
    if "random" in result:
        print_table(f"random-init {result['random']['parameters'] / 1e6:.0f}M-parameter model, same architecture",
                    table_rows(result["random"]["rows"]))
    console.print(f"written to {result['report']}; MLflow run {result['mlflow_run_id']} (experiment smelt-bench)")


def print_table(title: str, cells: list[list[str]]) -> None:
    table = Table(title=title)
    for i, header in enumerate(cells[0]):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in cells[1:]:
        table.add_row(*row)
    console.print(table)


@app.command("bench-train")
def bench_train(
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides applied to both trainers, e.g. train.batch_size=32."),
    steps: int = typer.Option(200, "--steps", "-n", min=10, help="Optimizer steps each trainer runs."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where rows, checkpoints and train-benchmark.json go; "
                                                                  "default $SMELT_HOME/bench/train."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset whose model, data and train settings apply."),
) -> None:
    """Benchmark smelt's trainer against a plain transformers.Trainer + peft LoRA run.

    Same base model, training rows, batch size, learning-rate schedule and steps; each trainer runs
    in a fresh process, so peak RSS is its own. Prints training tokens/s (real tokens, padding
    excluded) and peak memory of each, as ratios to the Trainer run; also writes
    WORKDIR/train-benchmark.json. smelt runs as `smelt train` does (checkpoints and logging on),
    once padded like the Trainer and once with packing.
    """
    home = configure_environment()
    from bench.train import run_train_benchmark, table_rows

    load_or_exit(config, overrides or [])
    result = run_train_benchmark(workdir or home / "bench" / "train", home, config, overrides or [], steps, echo=console.print)
    t = result["train"]
    print_table(f"Training benchmark: {config}, LoRA r={t['lora']['r']}, {steps} steps of batch {t['batch_size']}, "
                f"{result['rows']:,} rows, {result['cpus']} CPUs", table_rows(result))
    console.print(f"written to {(workdir or home / 'bench' / 'train') / 'train-benchmark.json'}")


@data_app.command("add")
def data_add(
    paths: list[Path] = typer.Argument(..., help="Data files in any format `smelt data ingest` reads."),
    config: str = CONFIG_OPTION,
) -> None:
    """Copy files into the watched folder and emit `smelt.data.changed` (only if the content changed)."""
    home, _, folder = watched_setup(config)
    from flows.watch import add_files, emit_if_changed

    try:
        added = add_files(paths, folder)
    except FileNotFoundError as err:
        fail(str(err), 2)
    payload = emit_if_changed(home, folder)
    console.print(f"added {len(added)} file(s) to {folder}; " +
                  (f"emitted smelt.data.changed (data {payload['data_digest']})" if payload else "content unchanged: no retrain"))


@data_app.command("watch")
def data_watch(
    interval: float = typer.Option(2.0, min=0.1, help="Seconds between looks at the folder."),
    config: str = CONFIG_OPTION,
) -> None:
    """Watch the data folder; emit `smelt.data.changed` once it changes and settles (Ctrl-C stops)."""
    home, cfg, folder = watched_setup(config)
    from flows.watch import watch

    uri = cfg.orchestration.watch_uri
    console.print(f"watching {uri + ' -> ' if uri else ''}{folder} (quiet period {cfg.orchestration.quiet_seconds:g} s)")
    watch(home, folder, interval, cfg.orchestration.quiet_seconds, source_uri=uri)


# The terminal shows the numbers the selection turns on; the full table is in the report files.
SUMMARY_COLUMNS = ("version", "quant", "decoding", "exact match", "field F1", "ppl", "tok/s", "TTFT ms", "8-stream tok/s",
                   "draft accept", "weights MB", "chosen")


def print_summary(result: dict, seconds: float) -> None:
    from tasks.report import candidate_rows, finetune_gain, gain_line

    reg = result["registry"]
    rows = candidate_rows(result["reports"], reg, result.get("base"))
    table = Table(title=f"Candidates (dataset {result['dataset']}, {result['counts']['train']} train / {result['counts']['eval']} eval rows)")
    for col in SUMMARY_COLUMNS:
        table.add_column(col)
    for row in rows:
        table.add_row(*[("[green]yes[/green]" if row[c] == "yes" else str(row[c])) for c in SUMMARY_COLUMNS])
    console.print(table)
    for row in rows:
        console.print(f"  v{row['version']} {row['quant']}/{row['decoding']}: {row['why']}")
    if gain := finetune_gain(result["reports"], result.get("base")):
        console.print(f"Fine-tuning gain on the eval split (full precision, plain decoding, vs the base model): {gain_line(gain)}.")
    policy = result["selection"]["policy"]
    console.print(f"Selection: {policy['policy']} on {policy['metric']} (within {policy['max_accuracy_drop']:.1%} of full "
                  f"precision{', above the base model' if policy['require_above_base'] else ''}), ranked by {policy['speed_metric']}.")
    if reg["challenger"] is None:
        console.print(f"Registered model [bold]{reg['name']}[/bold]: {reg['gate_reason']}; champion is v{reg['champion']}.")
    else:
        gate = "promoted to champion" if reg["promoted"] else "not promoted"
        console.print(f"Registered model [bold]{reg['name']}[/bold]: challenger v{reg['challenger']} {gate} ({reg['gate_reason']}); "
                      f"champion is v{reg['champion']}.")
    console.print(f"Evaluation report (JSON, Markdown, pictures): {result['report_dir']} (also in the MLflow run, under evaluation/)")
    console.print(f"MLflow run {result['mlflow_run_id']}; `smelt models list {reg['name']}` shows every version.")
    home = smelt_home()
    lines = [f"Finished in {seconds:.0f} s. Next:",
             f"  Versions:    uv run smelt models list {reg['name']}",
             "  UIs:         uv run smelt up    (MLflow and Prefect servers on 127.0.0.1; `smelt down` stops them)"]
    if result.get("bento"):
        tag = result["bento"]["bento_tag"]
        lines += [f"  Bento:       {tag}  (BENTOML_HOME={home / 'bentoml'})",
                  f"  Serve it:    uv run smelt serve {reg['name']}   (OpenAI-compatible API on http://127.0.0.1:3000/v1)",
                  f"  Container:   BENTOML_HOME={home / 'bentoml'} uv run bentoml containerize {tag}  (needs Docker)"]
    console.print("\n".join(lines))


app.command()(stack.up)
app.command()(stack.down)
app.command()(stack.status)
app.command()(loadtest.loadtest)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
