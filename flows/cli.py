"""`smelt` command line. Configures SMELT_HOME before Prefect, MLflow or BentoML is imported."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.env import configure_environment, quiet_library_logs, smelt_home

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="smelt: train -> quantize -> evaluate -> register -> package an LLM, on Prefect, MLflow and BentoML.")
console = Console(width=160)  # wide enough for the summary table in logs and CI, not just terminals


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
    from flows.pipeline import pipeline

    console.print(f"smelt: preset [bold]{cfg.preset}[/bold], home {home}")
    t0 = time.perf_counter()
    result = pipeline(cfg)
    print_summary(result, time.perf_counter() - t0)


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


def print_summary(result: dict, seconds: float) -> None:
    reg = result["registry"]
    table = Table(title=f"Candidates (dataset {result['dataset']}, {result['counts']['train']} train / {result['counts']['eval']} eval rows)")
    for col in ("version", "quant", "decoding", "exact match", "field acc", "tok/s", "draft accept", "p50 s", "size MB", "chosen / why"):
        table.add_column(col)
    for i, r in enumerate(result["reports"]):
        table.add_row(
            reg["versions"][i], r["quant_method"], r["strategy"], f"{r['exact_match']:.1%}", f"{r['field_accuracy']:.1%}",
            f"{r['tokens_per_s']:.0f}", "-" if r.get("draft_acceptance") is None else f"{r['draft_acceptance']:.0%}",
            f"{r['latency_p50_s']:.3f}", f"{r['size_bytes'] / 1e6:.1f}",
            ("[green]yes[/green] " if i == reg["chosen"] else "no: ") + reg["reasons"][i],
        )
    console.print(table)
    gate = "promoted to champion" if reg["promoted"] else "not promoted"
    console.print(f"Registered model [bold]{reg['name']}[/bold]: challenger v{reg['challenger']} {gate} ({reg['gate_reason']}); champion is v{reg['champion']}.")
    home = smelt_home()
    lines = [f"Finished in {seconds:.0f} s. Next:",
             f"  MLflow UI:   uv run mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']} --host 127.0.0.1 --port 5000",
             f"  Prefect UI:  PREFECT_HOME={home / 'prefect'} uv run prefect server start --host 127.0.0.1"]
    if result.get("bento"):
        tag = result["bento"]["bento_tag"]
        lines += [f"  Bento:       {tag}  (BENTOML_HOME={home / 'bentoml'})",
                  f"  Serve it:    BENTOML_HOME={home / 'bentoml'} uv run bentoml serve {tag} --host 127.0.0.1 --port 3000",
                  f"  Container:   BENTOML_HOME={home / 'bentoml'} uv run bentoml containerize {tag}  (needs Docker)"]
    console.print("\n".join(lines))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
