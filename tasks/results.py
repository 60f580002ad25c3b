"""What the stages hand each other: typed results, and every reported metric declared once.

A metric is a field of `EvalReport` annotated with its `Metric`: the display name and format the
candidate tables use (terminal, Markdown, Prefect, pictures), whether it is logged to MLflow (as a
metric of the candidate's run and a `smelt.<key>` tag on its model version), whether `smelt models
list` shows it, and whether `smelt run`'s terminal summary does. Tables, tags, MLflow keys and the
bench read these declarations, so adding a metric is one annotated field (and the line that
measures it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class Metric:
    """How one number is shown and tracked. `fmt`: a format string, or 'ms' (seconds shown as
    milliseconds) or 'MB' (bytes shown as megabytes)."""

    label: str
    fmt: str = "{:.3g}"
    table: bool = False  # a column of the candidate table (terminal, Markdown, Prefect artifact)
    summary: bool = False  # a column of `smelt run`'s terminal summary (a subset of the table)
    tracked: bool = True  # an MLflow metric of the candidate's run and a smelt.<key> tag on its model version
    listed: bool = False  # a column of `smelt models list`
    bench: bool = False  # a column of `smelt bench`'s table (BenchRow)

    def show(self, value: Any) -> str:
        if value is None:
            return "-"
        if self.fmt == "ms":
            return f"{value * 1000:.1f}"
        if self.fmt == "MB":
            return f"{value / 1e6:.2f}"
        return self.fmt.format(value)


# Shared with the bench's rows (bench/serve.py): one declaration, one label, one MLflow key.
TOKENS_PER_S = Metric("tok/s", "{:.0f}", table=True, summary=True, listed=True)
DECODE_TOKENS_PER_S = Metric("decode tok/s", "{:.0f}", table=True, bench=True)
TTFT_S = Metric("TTFT ms", "ms", table=True, summary=True, bench=True)
CONCURRENT_TOKENS_PER_S = Metric("8-stream tok/s", "{:.0f}", table=True, summary=True, bench=True)
DRAFT_ACCEPTANCE = Metric("draft accept", "{:.0%}", table=True, summary=True, bench=True)
WEIGHT_BYTES = Metric("weights MB", "MB", table=True, summary=True, bench=True)
EFFECTIVE_BANDWIDTH_GBS = Metric("GB/s", "{:.2f}", bench=True)
BANDWIDTH_SHARE = Metric("BW share", "{:.1%}", table=True, bench=True)


@functools.cache
def declared_metrics(cls: type[BaseModel]) -> dict[str, Metric]:
    return {name: m for name, f in cls.model_fields.items() for m in f.metadata if isinstance(m, Metric)}


class Result(BaseModel):
    """A stage's result: strict about unknown keys, and readable back from its own JSON."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def metrics(cls) -> dict[str, Metric]:
        """{field name: Metric} in declaration order (the order of every table); read once per class,
        since every table cell asks."""
        return declared_metrics(cls)

    @classmethod
    def metric(cls, name: str) -> Metric:
        return cls.metrics()[name]

    def tracked_numbers(self) -> dict[str, float]:
        """The tracked metrics that have a value, as floats (MLflow metrics)."""
        return {k: float(getattr(self, k)) for k, m in self.metrics().items() if m.tracked and getattr(self, k) is not None}

    def cells(self, which: str = "table") -> dict[str, str]:
        """{label: formatted value} of the metrics flagged `which` ('table', 'summary' or 'bench')."""
        return {m.label: m.show(getattr(self, k)) for k, m in self.metrics().items() if getattr(m, which)}


class EvalReport(Result):
    """One candidate evaluated on the eval split: accuracy, speed and memory, through the serving code."""

    candidate: str
    path: str = ""
    quant_method: str
    strategy: str
    draft_artifact: Optional[str] = None
    eval_split: str = ""
    # accuracy
    exact_match: Annotated[float, Metric("exact match", "{:.1%}", table=True, summary=True, listed=True)] = 0.0
    field_accuracy: Annotated[float, Metric("field acc", "{:.1%}", listed=True)] = 0.0
    field_f1: Annotated[float, Metric("field F1", "{:.1%}", table=True, summary=True)] = 0.0
    perplexity: Annotated[Optional[float], Metric("ppl", "{:.2f}", table=True, summary=True)] = None
    # the same rows answered with decoding constrained to a JSON object (eval.json_constrained)
    exact_match_json: Annotated[Optional[float], Metric("EM json-constrained", "{:.1%}", table=True)] = None
    # speed at batch 1, and of concurrent requests through the serving engine
    # tokens_per_s: the median of interleaved timing passes (models/measure.py: interleaved_speeds);
    # the spread, (max - min) / median over those passes, says how far noise could move it
    tokens_per_s: Annotated[float, TOKENS_PER_S] = 0.0
    tokens_per_s_spread: Annotated[Optional[float], Metric("± spread", "{:.1%}", table=True, summary=True)] = None
    decode_tokens_per_s: Annotated[Optional[float], DECODE_TOKENS_PER_S] = None
    ttft_s: Annotated[Optional[float], TTFT_S] = None
    latency_p50_s: Annotated[Optional[float], Metric("p50 s", "{:.3f}", table=True)] = None
    latency_p95_s: Annotated[Optional[float], Metric("p95 s", "{:.3f}", table=True)] = None
    concurrent_tokens_per_s: Annotated[Optional[float], CONCURRENT_TOKENS_PER_S] = None
    draft_acceptance: Annotated[Optional[float], DRAFT_ACCEPTANCE] = None
    # size and memory
    size_bytes: Annotated[Optional[int], Metric("size MB", "MB")] = None
    weight_bytes: Annotated[Optional[int], WEIGHT_BYTES] = None
    effective_bandwidth_gbs: Annotated[Optional[float], EFFECTIVE_BANDWIDTH_GBS] = None
    bandwidth_share: Annotated[Optional[float], BANDWIDTH_SHARE] = None
    peak_memory_bytes: Annotated[Optional[int], Metric("peak mem MB", "MB", table=True)] = None
    load_s: Annotated[Optional[float], Metric("load s", "{:.2f}")] = None
    # what the numbers rest on
    latencies_s: list[float] = []
    tokens_per_s_passes: list[float] = []
    new_tokens: int = 0
    samples: int = 0
    concurrent_streams: Optional[int] = None
    weight_bytes_note: Optional[str] = None
    machine_bandwidth_gbs: Optional[float] = None
    examples: list[dict] = []
    lm_eval: Optional[dict] = None

    @property
    def label(self) -> str:
        """'quant/strategy', as the tables and pictures label a candidate."""
        return f"{self.quant_method}/{self.strategy}"


class BenchRow(Result):
    """One recipe (weight format x decode loop) timed by `smelt bench`, in the bench table's column order."""

    recipe: str
    weights: str
    loop: str
    decode_tokens_per_s: Annotated[float, DECODE_TOKENS_PER_S]
    speedup: Annotated[float, Metric("x baseline", "{:.2f}", bench=True)] = 1.0
    ttft_s: Annotated[float, TTFT_S]
    draft_acceptance: Annotated[Optional[float], DRAFT_ACCEPTANCE] = None
    weight_bytes: Annotated[int, WEIGHT_BYTES]
    effective_bandwidth_gbs: Annotated[Optional[float], EFFECTIVE_BANDWIDTH_GBS] = None
    bandwidth_share: Annotated[Optional[float], BANDWIDTH_SHARE] = None
    concurrent_tokens_per_s: Annotated[float, CONCURRENT_TOKENS_PER_S]
    concurrency_gain: Annotated[float, Metric("x 1 stream", "{:.2f}", bench=True)]
    warmup_s: Annotated[float, Metric("warm-up s", "{:.1f}", bench=True)]
    same_tokens_as_baseline: Annotated[Optional[int], Metric("same tokens", "{}", bench=True, tracked=False)] = None
    tokens_per_s: Annotated[float, TOKENS_PER_S]
    decode_tokens_per_s_passes: list[float] = []
    concurrency: str = ""


class Selection(Result):
    """Which candidate became the challenger, and one reason per candidate (in the reports' order)."""

    chosen: Optional[int]
    accepted: list[int]
    reasons: list[str]
    policy: dict
    reference: str
    reference_accuracy: float
    base: Optional[str] = None
    base_accuracy: Optional[float] = None


class RegistryResult(Result):
    """Every candidate's model version, the challenger, and the gate's decision."""

    name: str
    versions: list[str]
    chosen: Optional[int]
    reasons: list[str]
    challenger: Optional[str]
    promoted: bool
    gate_reason: str
    gate_numbers: Optional[dict] = None
    champion: Optional[str]


class BentoRef(Result):
    """The champion in BentoML's model store and the Bento built around it."""

    model_tag: str
    bento_tag: str


class ContainerImage(Result):
    """The champion's Bento as a Docker image (`smelt containerize`)."""

    image_tag: str
    bento_tag: str
    mlflow_version: str
    built: bool  # False: an image of this tag from the same Bento was reused
    size_bytes: int | None = None
    build_seconds: float | None = None


class Deployment(Result):
    """`smelt deploy`: which image serves behind the proxy on 127.0.0.1:proxy_port, and what it replaced."""

    proxy_port: int
    image_tag: str
    mlflow_version: str
    container: str
    replaced: str | None  # the container that served before, stopped after draining
    ready_seconds: float  # from container start to its /readyz
    changed: bool  # False: this image already served there


class EtlResult(Result):
    """`smelt data ingest` / the smelt-etl flow: the dataset version, its counts and its MLflow run."""

    dataset: str
    counts: dict
    path: str
    mlflow_run_id: str


class TrainResult(Result):
    """`smelt train` / the smelt-train flow: the fine-tuned model, the preference-tuned one (if
    train.preference ran) and the distilled draft (if any)."""

    dataset: str
    counts: dict
    finetuned: Optional[str]  # None when train.preference.start=base skipped SFT
    draft: Optional[str]
    mlflow_run_id: str
    preferred: Optional[str] = None


class PipelineResult(Result):
    """What `smelt run` shows: the dataset, every candidate, the selection, the registry and the Bento."""

    dataset: str
    counts: dict
    reports: list[EvalReport]
    base: Optional[EvalReport]
    selection: Selection
    registry: RegistryResult
    bento: Optional[BentoRef]
    mlflow_run_id: str
    report_dir: str
