"""Dataset ETL: JSONL {prompt, completion} rows in; a versioned, validated dataset out.

Guarantees: a bad file stops the run with its name; a bad row goes to quarantine.jsonl with
file, line and reason; rows_in = kept + quarantined + duplicates; the split follows from each
row's content hash (appending data never moves an old row); output is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.artifacts import atomic_dir, digest, file_digest, read_json, write_json
from tasks.config import REPO_ROOT, EtlConfig


class DataError(ValueError):
    """A whole input file cannot be used; the message names it."""


@dataclass
class DatasetVersion:
    version: str
    path: Path
    counts: dict = field(default_factory=dict)

    def rows(self, split: str) -> list[dict]:
        return pq.read_table(self.path / f"{split}.parquet").to_pylist()


def resolve_source(source: str) -> Path:
    p = Path(source)
    return p if p.is_absolute() else REPO_ROOT / p


def expand_sources(sources: list[str]) -> list[Path]:
    """Files to read: a folder stands for the JSONL files in it (hidden ones, e.g. half-copied temp
    files, are skipped), in sorted order so the dataset version does not depend on listing order."""
    out = []
    for source in sources:
        p = resolve_source(source)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.jsonl") if q.is_file() and not q.name.startswith(".")))
        else:
            out.append(p)
    return out


def normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def validate_row(obj, max_prompt_chars: int) -> tuple[dict | None, str | None]:
    """Return (clean_row, None) or (None, reason)."""
    if not isinstance(obj, dict):
        return None, f"row is a {type(obj).__name__}, not an object"
    clean = {}
    for key in ("prompt", "completion"):
        value = obj.get(key)
        if value is None:
            return None, f"missing field '{key}'"
        if not isinstance(value, str):
            return None, f"field '{key}' is {type(value).__name__}, not a string"
        clean[key] = normalise(value)
        if not clean[key]:
            return None, f"field '{key}' is empty"
    if len(clean["prompt"]) > max_prompt_chars:
        return None, f"field 'prompt' has {len(clean['prompt'])} chars, over the limit {max_prompt_chars}"
    return clean, None


def read_source(path: Path, max_prompt_chars: int):
    """Yield (line_no, row, reason, raw) for each non-blank line of a JSONL file."""
    if not path.exists():
        raise DataError(f"input file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"input file {path} is not UTF-8 text (byte {e.start})") from None
    if not any(line.strip() for line in lines):
        raise DataError(f"input file {path} is empty")
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield no, None, f"malformed JSON: {e.msg} at column {e.colno}", line
            continue
        row, reason = validate_row(obj, max_prompt_chars)
        yield no, row, reason, line


def split_of(row: dict, eval_fraction: float) -> str:
    # Keyed on the prompt alone: one prompt never sits in both splits, so eval stays uncontaminated.
    h = int(hashlib.sha256(row["prompt"].encode()).hexdigest()[:8], 16)
    return "eval" if h / 0xFFFFFFFF < eval_fraction else "train"


def build_dataset(cfg: EtlConfig, home: Path) -> DatasetVersion:
    """Validate, deduplicate and split the sources into a content-addressed dataset version."""
    paths = expand_sources(cfg.sources)
    for p in paths:
        if not p.exists():
            raise DataError(f"input file {p} does not exist")
    version = digest("etl-v1", cfg, [file_digest(p) for p in paths])
    out = home / "datasets" / version
    if out.exists():
        return DatasetVersion(version, out, read_json(out / "manifest.json")["counts"])
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    quarantine, seen = [], set()
    counts = {"rows_in": 0, "kept": 0, "quarantined": 0, "duplicates": 0}
    for p in paths:
        for no, row, reason, raw in read_source(p, cfg.max_prompt_chars):
            counts["rows_in"] += 1
            if reason:
                counts["quarantined"] += 1
                quarantine.append({"file": str(p), "line": no, "reason": reason, "raw": raw})
                continue
            key = (row["prompt"], row["completion"])
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            counts["kept"] += 1
            splits[split_of(row, cfg.eval_fraction)].append(row)
    counts.update(train=len(splits["train"]), eval=len(splits["eval"]))
    if not splits["train"] or not splits["eval"]:
        raise DataError(f"after validation the dataset has {counts['train']} train and {counts['eval']} eval rows; both must be non-empty")
    with atomic_dir(out) as tmp:
        for name, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{name}.parquet")
        (tmp / "quarantine.jsonl").write_text("".join(json.dumps(q) + "\n" for q in quarantine))
        write_json(tmp / "manifest.json", {
            "version": version, "counts": counts, "config": cfg.model_dump(),
            "sources": [{"path": str(p), "sha256_16": file_digest(p)} for p in paths],
            "schema": {"prompt": "string", "completion": "string"},
        })
    return DatasetVersion(version, out, counts)


# Not cached by Prefect: the version id already hashes the source files' contents, which an
# inputs-only cache key would miss when a file changes in place.
@task(name="etl", cache_policy=NO_CACHE)
def etl_task(cfg: EtlConfig, home: str) -> DatasetVersion:
    return build_dataset(cfg, Path(home))
