"""Stage configs that live above models/, composed into the one `PipelineConfig` a flow takes.

`load_config(path, overrides)` reads a YAML preset, applies `key.sub=value` overrides and
validates everything before any work starts; errors name the field, the value and the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from models.config import DecodeConfig, Device, ModelConfig, QuantConfig, StrictModel, TrainConfig
from models.settings import REPO_ROOT, load_settings
from tasks.data.formats import Format

PRESETS_DIR = REPO_ROOT / "infra" / "configs"
DEFAULT_PRESET = "tiny-cpu"


class EtlConfig(StrictModel):
    """Dataset ETL: which inputs, how to read them, and what counts as a usable row."""

    sources: list[str] = Field(
        default_factory=lambda: ["data/orders.jsonl"],
        description="Files, folders or fsspec URIs (s3://..., gs://...): JSONL, JSON arrays, CSV/TSV, Parquet, `datasets` "
                    "folders (save_to_disk) or plain text, compressed or not; relative paths resolve from the repo root.",
    )
    format: Format = Field("auto", description="Input format; 'auto' reads it from the file suffix (and sniffs .json).")
    record_shape: Literal["auto", "prompt-completion", "alpaca", "chat", "sharegpt", "text", "preference",
                          "sharegpt-preference", "openai-preference"] = Field(
        "auto", description="Record shape; 'auto' detects it per file from the fields (prompt/completion, "
                            "instruction/input/output, messages, conversations, text; preference pairs: prompt/chosen/rejected, "
                            "conversations/chosen/rejected, input/preferred_output/non_preferred_output). A file mixing "
                            "shapes is refused.")
    text_unit: Literal["paragraph", "line", "file"] = Field("paragraph", description="What one record of a plain-text corpus is.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation, chosen by content hash.")
    max_tokens: int | None = Field(None, ge=8, description="Rows longer than this after the chat template and tokenizer are "
                                                          "quarantined; None: train.max_seq_len.")
    near_dedup: bool = Field(False, description="Also drop near-duplicates (MinHash LSH over word 5-grams).")
    near_dedup_threshold: float = Field(0.85, gt=0, le=1, description="Estimated Jaccard similarity that makes a near-duplicate.")
    minhash_perms: int = Field(64, ge=16, le=512, description="MinHash permutations (more: finer estimate, slower).")
    contamination_ngram: int = Field(13, ge=0, description="Training rows sharing a sequence of this many words with an eval "
                                                           "row are removed from training (0 = only exact matches).")
    shard_mb: float = Field(64, gt=0, description="Size of the pieces large inputs are cut into; each is one Prefect task.")
    task_runner: Literal["threads", "dask"] = Field("threads", description="Runner of the shard tasks: threads in this "
                                                                          "process, or a Dask cluster (prefect-dask).")
    dask_address: str | None = Field(None, description="Scheduler of an existing Dask cluster (tcp://host:8786); None: "
                                                       "start a local cluster of dask_workers processes.")
    dask_workers: int = Field(2, ge=1, description="Worker processes of the local Dask cluster.")

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("sources must list at least one file")
        return v

    def version_fields(self) -> dict:
        """The settings that change the dataset (how it is cut into shards and where they run do not)."""
        return self.model_dump(exclude={"shard_mb", "task_runner", "dask_address", "dask_workers"})


class EvalConfig(StrictModel):
    max_samples: int = Field(48, ge=1, description="Eval-split rows each candidate is scored on.")
    device: Device = "auto"
    concurrent_streams: int = Field(8, ge=1, le=256, description="Requests sent together to measure aggregate tokens/s.")
    json_constrained: bool = Field(False, description="Also answer every eval prompt with decoding constrained to a JSON "
                                                      "object (the API's response_format json_object) and report its "
                                                      "exact match: for tasks whose answers are JSON.")
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="EleutherAI lm-evaluation-harness tasks run on every plain candidate, e.g. [smelt-embedded, arc_easy]. "
                    "'smelt-embedded' is this dataset's eval split as a local lm-eval task; tasks whose dataset must come "
                    "from the hub are skipped with a message when offline.",
    )
    timing_passes: int = Field(3, ge=1, le=50, description="Interleaved rounds that time every candidate's batch-1 "
                                                             "tokens/s on the same prompts; the median is the speed, "
                                                             "(max - min) / median its spread.")
    timing_prompts: int = Field(16, ge=1, description="Eval prompts each timing round decodes per candidate.")
    lm_eval_limit: int | None = Field(None, ge=1, description="Documents per lm-eval task; None: all (the embedded task: max_samples).")


class SelectConfig(StrictModel):
    """Which evaluated candidate becomes the challenger: the policy and its thresholds."""

    policy: Literal["fastest-within", "most-accurate"] = Field(
        "fastest-within",
        description="fastest-within: the fastest accepted candidate; most-accurate: the most accurate accepted one.",
    )
    metric: Literal["exact_match", "field_f1", "field_accuracy"] = Field(
        "exact_match", description="Accuracy metric the policy compares.")
    speed_metric: Literal["tokens_per_s", "decode_tokens_per_s", "concurrent_tokens_per_s"] = Field(
        "tokens_per_s", description="Speed the policy ranks by (end-to-end batch-1 tokens/s by default).")
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Accepted only within this much of the full-precision fine-tuned model (1 point).")
    require_above_base: bool = Field(True, description="Accepted only if more accurate than the base model before fine-tuning.")


class RegistryConfig(StrictModel):
    model_name: str | None = Field(None, description="Registered model name; default smelt-<model.name>.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store, e.g. http://mlflow:5000; default $MLFLOW_TRACKING_URI, "
                          "else SQLite under SMELT_HOME.",
    )
    gate_metric: Literal["exact_match", "field_f1", "field_accuracy"] = Field(
        "exact_match", description="Accuracy the promotion gate compares with the champion's (same eval split).")
    accuracy_tolerance: float = Field(0.02, ge=0, le=1, description="A challenger may be this much less accurate than the champion.")
    speed_margin: float = Field(0.10, ge=0, le=1, description="A challenger may be this fraction slower than the champion.")


class PackageConfig(StrictModel):
    build_bento: bool = Field(True, description="Run `bentoml build` for the champion at the end.")


class OrchestrationConfig(StrictModel):
    """Prefect deployments, schedules and retraining on new data (`smelt deploy`, `smelt data`)."""

    work_pool: str = Field(default_factory=lambda: load_settings().work_pool,
                           description="Prefect work pool the deployments run on; default SMELT_WORK_POOL, else the local "
                                       "process pool smelt-local that `smelt up` starts a worker for.")
    watch_dir: str = Field("incoming", description="Watched data folder; new JSONL files there trigger a retrain. "
                                                   "Relative paths resolve from SMELT_HOME.")
    watch_uri: str | None = Field(None, description="An fsspec URI (s3://bucket/prefix, gs://..., file://...) whose JSONL "
                                                     "files `smelt data watch` mirrors into watch_dir; None: watch watch_dir itself.")
    pipeline_cron: str | None = Field(None, description="Cron schedule of the full pipeline; off by default.")
    etl_cron: str | None = Field(None, description="Cron schedule of ETL alone; off by default.")
    retrain_cron: str | None = Field(None, description="Cron schedule of the retrain flow (it also runs on new data).")
    quiet_seconds: float = Field(10.0, ge=0, description="The watcher waits until the folder has not changed for this "
                                                         "long, so a burst of files triggers one retrain.")


class PipelineConfig(StrictModel):
    """Everything one pipeline run needs; the Prefect UI renders it as a form."""

    preset: str = Field(DEFAULT_PRESET, description="Name of the preset this config came from.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    etl: EtlConfig = Field(default_factory=EtlConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    package: PackageConfig = Field(default_factory=PackageConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _rows_fit_training(self) -> "PipelineConfig":
        # A row longer than training's window would be cut, silently losing its answer.
        if self.etl.max_tokens is None:
            self.etl.max_tokens = self.train.max_seq_len
        elif self.etl.max_tokens > self.train.max_seq_len:
            raise ValueError(f"etl.max_tokens ({self.etl.max_tokens}) is over train.max_seq_len ({self.train.max_seq_len}): "
                             "longer rows would be truncated in training; lower etl.max_tokens or raise train.max_seq_len")
        return self

    @model_validator(mode="after")
    def _reference_is_built(self) -> "PipelineConfig":
        if "none" not in self.quant.methods:
            raise ValueError("quant.methods must include 'none': the selection policy compares every candidate with "
                             "the full-precision fine-tuned model")
        return self

    @property
    def registered_name(self) -> str:
        return self.registry.model_name or f"smelt-{self.model.name}"


def watched_folder(cfg: OrchestrationConfig, home: Path) -> Path:
    p = Path(cfg.watch_dir)
    return p if p.is_absolute() else Path(home) / p


def with_watched_data(cfg: PipelineConfig, home: Path) -> PipelineConfig:
    """The config a retrain runs: the configured sources plus everything in the watched folder."""
    folder = watched_folder(cfg.orchestration, home)
    folder.mkdir(parents=True, exist_ok=True)
    return cfg.model_copy(update={"etl": cfg.etl.model_copy(update={"sources": [*cfg.etl.sources, str(folder)]})})


class ConfigError(ValueError):
    """A preset or override that cannot be used; the message says which field and why."""


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or preset named {name_or_path!r}; presets: {known}")


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"])
        value = e.get("input")
        lines.append(f"  {field} = {value!r}: {e['msg']}")
    return "\n".join(lines)


def merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (lists and values are replaced, not joined)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's settings; `extends: <preset>` at its top takes that preset's and changes only what it lists."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = preset_path(str(parent))
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path}: `extends: {parent}` makes a loop ({' -> '.join(p.name for p in seen)})")
    return merged(read_preset(parent_path, (*seen, parent_path.resolve())), data)


def load_config(name_or_path: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> PipelineConfig:
    path = preset_path(name_or_path)
    data = read_preset(path, (path.resolve(),))
    data.setdefault("preset", path.stem)
    for o in overrides or []:
        apply_override(data, o)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
