"""`smelt` command line. Every command starts with `prepare` (SMELT_HOME before Prefect, MLflow or
BentoML is imported, quiet library logs, the config validated before any work); what it prints is
in cli/render.py."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from bench import loadtest
from cli import stack
from cli.render import (console, print_data_summary, print_etl_benchmark, print_serve_benchmark, print_summary,
                        print_train_benchmark, print_train_result, versions_table)
from models.settings import configure_environment, quiet_library_logs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="smelt: train -> quantize -> evaluate -> register -> package an LLM, on Prefect, MLflow and BentoML.")
models_app = typer.Typer(no_args_is_help=True, help="Inspect models in the MLflow registry.")
app.add_typer(models_app, name="models")
data_app = typer.Typer(no_args_is_help=True, help="Feed new data to the watched folder; retrains follow through Prefect.")
app.add_typer(data_app, name="data")
embedded_app = typer.Typer(no_args_is_help=True, help="The embedded default's own models: build the shipped weights.")
app.add_typer(embedded_app, name="embedded")
CONFIG_OPTION = typer.Option("tiny-cpu", "--config", "-c", help="Preset or YAML file whose registry settings (gate, tracking URI) apply.")


def load_or_exit(config: str, overrides: list[str]):
    from tasks.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)


def prepare(config: str, overrides: Optional[list[str]] = None, prefect: Optional[str] = None):
    """(home, config): the preamble every command that does work shares. `prefect="use"` reports to
    the server `smelt up` started, if one runs; `prefect="require"` exits 2 without one."""
    home = configure_environment()
    quiet_library_logs()
    cfg = load_or_exit(config, overrides or [])  # refuse a bad config before any work starts
    if prefect == "use":
        use_running_prefect(home)  # `smelt up` is running: report the run to its UI
    elif prefect == "require":
        prefect_api_or_exit(home)
    return home, cfg


@app.command()
def run(
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides, e.g. train.steps=50 quant.methods='[none]'."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset name (infra/configs/NAME.yaml) or path to a YAML file."),
) -> None:
    """Run the whole pipeline: ETL, LoRA fine-tuning, quantization, evaluation, MLflow registration, Bento build."""
    home, cfg = prepare(config, overrides, prefect="use")
    from flows.pipeline import pipeline
    from tasks.data.formats import DataError

    console.print(f"smelt: preset [bold]{cfg.preset}[/bold], home {home}")
    t0 = time.perf_counter()
    try:
        result = pipeline(cfg)
    except DataError as err:
        fail(f"smelt run: {err}", 2)
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
    home, cfg = prepare(config, overrides, prefect="use")
    from flows.pipeline import train
    from models.artifacts import read_json
    from tasks.data.formats import DataError

    console.print(f"smelt train: preset [bold]{cfg.preset}[/bold], method {cfg.train.method}, home {home}")
    try:
        result = train(cfg)
    except DataError as err:
        fail(f"smelt train: {err}", 2)
    draft = read_json(Path(result.draft) / "train.json") if result.draft else None
    preferred = read_json(Path(result.preferred) / "train.json") if result.preferred else None
    sft = read_json(Path(result.finetuned) / "train.json") if result.finetuned else None
    print_train_result(result, sft, draft, preferred)


@embedded_app.command("build")
def embedded_build(
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides, e.g. model.embedded.pretrain_steps=100."),
    config: str = typer.Option("tiny-cpu", "--config", "-c", help="Preset whose model.embedded settings to build."),
    out: Optional[Path] = typer.Option(None, "--out", help="Release folder; default: the preset's model.embedded.shipped."),
) -> None:
    """Pretrain the embedded base on the curriculum (text, copy blocks, key-value records) and write it,
    with its tokenizer and draft init, as bf16 safetensors plus a manifest (command, config, seed, tokens
    seen, loss curve, skill curve, sha256 of every file, CPU flags).

    While it runs it prints greedy accuracy on held-out blocks per skill: copy_adjacent (a run repeated
    at once) and copy_apart (repeated after text), scored on the repeated words only; records (key: value
    restated as JSON), text. A base that stays near 0% on copy_apart will not learn the extraction task
    with LoRA.

    Hours on 2 CPU cores; checkpoints under SMELT_HOME, so the same command resumes after a kill.
    The folder is replaced only when everything is written. Commit it: `smelt run` then loads it.
    """
    home, cfg = prepare(config, overrides)
    from models.device import resolve_device
    from models.embedded import build_release
    from tasks.config import REPO_ROOT

    emb = cfg.model.embedded
    target = out or (REPO_ROOT / emb.shipped if emb.shipped else None)
    if target is None:
        fail("no --out given and the preset sets no model.embedded.shipped folder", 2)
    command = "uv run smelt embedded build " + " ".join(sys.argv[3:])
    console.print(f"smelt embedded build: {emb.base.model_dump()} -> {target}, {emb.pretrain_steps} steps")
    manifest = build_release(emb, target, home, resolve_device(cfg.train.device), REPO_ROOT, command.strip())
    console.print(f"wrote {target}: {len(manifest['files'])} files, {manifest['tokens_seen']:,} tokens seen, "
                  f"final loss {manifest['train']['final_loss']:.3f}, {manifest['wall_seconds']:.0f} s")


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
    home, cfg = prepare(config)
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
    """Put the previous champion back as champion (no gate: this is the emergency lever). If NAME is
    deployed (`smelt deploy`), its container is rolled back the same way, without failed requests."""
    client, cfg, home = registry_client(config)
    from tasks.deploy import is_deployed
    from tasks.promote import RegistryError
    from tasks.promote import rollback as rollback_model

    try:
        result = rollback_model(client, name, home, reason)
    except RegistryError as err:
        fail(str(err), 2)
    console.print(f"[green]{name}: champion is v{result.version} again[/green] ({result.reason}).")
    if is_deployed(home, name):
        roll_out(name, cfg, home, None)


def roll_out(name: str, cfg, home: Path, port: Optional[int]) -> None:
    from tasks.container import ContainerError
    from tasks.deploy import deploy_champion, read_state, deploy_dir

    port = port or read_state(deploy_dir(home, name)).get("proxy_port", 3000)
    try:
        dep = deploy_champion(name, cfg.registry, home, port)
    except ContainerError as err:
        fail(str(err), 2)
    if not dep.changed:
        console.print(f"{dep.image_tag} already serves on http://127.0.0.1:{dep.proxy_port}/v1.")
        return
    was = f", replacing {dep.replaced} (drained, stopped)" if dep.replaced else ""
    console.print(f"[green]{dep.image_tag}[/green] serves on http://127.0.0.1:{dep.proxy_port}/v1 "
                  f"(container {dep.container}, ready in {dep.ready_seconds:.0f} s{was}).")


@app.command()
def rollout(
    name: Optional[str] = typer.Argument(None, help="Registered model name; default the preset's."),
    port: Optional[int] = typer.Option(None, help="Port of the proxy on 127.0.0.1 (default 3000, or where NAME runs now)."),
    stop: bool = typer.Option(False, "--stop", help="Stop NAME's proxy and container instead (images stay)."),
    config: str = CONFIG_OPTION,
) -> None:
    """Serve the champion's container behind HAProxy on 127.0.0.1:PORT; rerun after a promotion to roll the
    new champion out with no failed requests (new container ready, proxy switched, old one drained and
    stopped; its image stays for `smelt rollback`, which rolls back the same way). Builds the image first
    if needed (`smelt containerize`). SMELT_* serving settings of this shell (SMELT_API_KEY,
    SMELT_MAX_TOKENS, ...) go to the container."""
    client, cfg, home = registry_client(config)
    if stop:
        from tasks.deploy import undeploy

        undeploy(home, name or cfg.registered_name)
        console.print(f"{name or cfg.registered_name}: proxy and container stopped.")
        return
    roll_out(champion_name(client, name, cfg), cfg, home, port)


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
    console.print(f"Bento [bold]{result.bento_tag}[/bold] (model {result.model_tag}).\n"
                  f"  Serve it:   uv run smelt serve {name}\n"
                  f"  Container:  uv run smelt containerize {name}   then   uv run smelt rollout {name}  (needs Docker)")


@app.command()
def containerize(
    name: Optional[str] = typer.Argument(None, help="Registered model name; default the preset's."),
    config: str = CONFIG_OPTION,
) -> None:
    """Build the champion's Bento into a Docker image NAME:vVERSION, labelled with its lineage.

    Needs a running Docker daemon. The base image is made here from Debian packages the first time
    (infra/docker/base-image.sh: root and debootstrap, 1-2 min); no image registry is used. Torch comes
    from PyTorch's CPU index where reachable (SMELT_TORCH_INDEX to change it), else from PyPI.
    """
    client, cfg, home = registry_client(config)
    from tasks.container import ContainerError
    from tasks.package import containerize_champion

    name = champion_name(client, name, cfg)
    try:
        image = containerize_champion(name, cfg.registry, home)
    except ContainerError as err:
        fail(str(err), 2)
    how = (f"built in {image.build_seconds:.0f} s, {image.size_bytes / 1e9:.2f} GB" if image.built
           else "reused: same Bento")
    console.print(f"Image [bold]{image.image_tag}[/bold] ({how}) from Bento {image.bento_tag}.\n"
                  f"  Run it:  docker run -d --network host -e SMELT_API_KEY=... {image.image_tag} --port 3000")


@app.command()
def serve(
    name: Optional[str] = typer.Argument(None, help="Registered model name; default the preset's."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 127.0.0.1 keeps it on this machine."),
    port: int = typer.Option(3000, help="Port of the HTTP API (OpenAI-compatible under /v1)."),
    config: str = CONFIG_OPTION,
) -> None:
    """Serve the champion's Bento (packaging it first if needed) with `bentoml serve`; Ctrl-C stops it.

    Settings come from the environment: SMELT_API_KEY, SMELT_MAX_TOKENS, SMELT_MAX_BATCH_SIZE (rows of
    the continuous batch), SMELT_MAX_QUEUE, SMELT_MAX_SEQ_LEN, SMELT_PREFILL_TOKENS, SMELT_PREFILL_DTYPE, SMELT_WARM_ROWS,
    SMELT_DEVICE (see serving/config.py and models/engine.py).
    """
    import subprocess

    client, cfg, home = registry_client(config)
    from tasks.package import package_champion

    name = champion_name(client, name, cfg)
    tag = package_champion(name, cfg.registry, home).bento_tag
    console.print(f"Serving {tag} on http://{host}:{port} (OpenAI API at http://{host}:{port}/v1)")
    proc = subprocess.run([sys.executable, "-m", "bentoml", "serve", tag, "--host", host, "--port", str(port)])
    raise typer.Exit(proc.returncode)


def prefect_api_or_exit(home) -> None:
    if not use_running_prefect(home):
        fail("no Prefect server: run `smelt up` (or set PREFECT_API_URL) first", 2)


def watched_setup(config: str):
    """(home, config, watched folder) for the `data` commands, which need a Prefect server for their events."""
    home, cfg = prepare(config, prefect="require")
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
    home, cfg = prepare(config, overrides, prefect="require")
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
    prefect: Optional[bool] = typer.Option(None, "--prefect/--no-prefect", help="Run as a Prefect flow (a temporary "
                                           "server if `smelt up` is not running) or in this process; default: a flow "
                                           "when a server is up or etl.task_runner=dask, else in this process."),
) -> None:
    """Run the ETL stage alone: validate, normalise, deduplicate, check contamination, split and version the data.

    Prints the version id and every count; bad rows are quarantined with file, line and reason, and
    the data report goes to MLflow (and to the Prefect run when a server is up). Ingesting the same
    input again is free. With `smelt up` running, the ingest is a Prefect flow run in its UI;
    without, it runs in this process at once (a temporary Prefect server would cost more than a
    small file does).
    """
    overrides = [f"etl.sources={json.dumps(paths)}", f"etl.format={fmt}", f"etl.record_shape={schema}", *(overrides or [])]
    home, cfg = prepare(config, overrides)
    from tasks.data.formats import DataError

    running = use_running_prefect(home)  # a flow run reports to `smelt up`'s server when one runs
    as_flow = prefect if prefect is not None else running or cfg.etl.task_runner == "dask"
    try:
        result = etl_through_prefect(cfg) if as_flow else etl_in_process(cfg, home)
    except DataError as err:
        fail(f"smelt data ingest: {err}", 2)
    print_data_summary(result)


def etl_through_prefect(cfg):
    from flows.pipeline import etl

    return etl(cfg)


def etl_in_process(cfg, home: Path):
    """The smelt-etl flow's steps as plain calls: the same dataset version and MLflow run, no Prefect."""
    from tasks.etl import build_dataset, prepare_tokenizer
    from tasks.report import log_dataset
    from tasks.results import EtlResult

    dataset = build_dataset(cfg.etl, home, prepare_tokenizer(cfg.model, home), cfg.model.chat_template)
    run_id = log_dataset(cfg, None, dataset, home)
    return EtlResult(mlflow_run_id=run_id, dataset=dataset.version, counts=dataset.counts, path=str(dataset.path))


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
    home, _ = prepare(config)  # the jobs load the preset again in their own processes
    from bench.etl import run_etl_benchmark

    result = run_etl_benchmark(rows, workdir or home / "bench" / "etl", seed, config, max_tokens, keep_dataset,
                               echo=console.print)
    print_etl_benchmark(result, rows)


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
    peers: bool = typer.Option(False, "--peers", help="Also convert the same fp32 weights with other engines and time them "
                                                      "in the same turns: CTranslate2 float32 / int8 / int8_float32. A peer "
                                                      "that is not installed is skipped with the command that installs it."),
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
    from bench.serve import run_serve_benchmark

    name = champion_name(client, name, cfg)
    result = run_serve_benchmark(client, name, cfg, home, prompts, max_new_tokens or cfg.decode.max_new_tokens, streams,
                                 passes, with_random, out, echo=console.print, peers=peers)
    print_serve_benchmark(name, result)


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
    home, _ = prepare(config, overrides)  # validated here; the trainers load it again in their own processes
    from bench.train import run_train_benchmark

    workdir = workdir or home / "bench" / "train"
    result = run_train_benchmark(workdir, home, config, overrides or [], steps, echo=console.print)
    print_train_benchmark(result, config, steps, workdir / "train-benchmark.json")


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


app.command()(stack.up)
app.command()(stack.down)
app.command()(stack.status)
app.command()(loadtest.loadtest)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
