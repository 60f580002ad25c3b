"""Dataset ETL: files in any common format and record shape in; a versioned, validated dataset out.

Three steps, each a plain function with a thin Prefect task:
1. `plan_ingest`: expand the sources, hash them and cut large ones into shards; the version id
   is a hash of the inputs (content and path), the ETL config, the tokenizer and the ETL code. A version
   that already exists is returned at once.
2. `ingest_shard` (one mapped task per shard, so a Dask runner spreads them over a cluster):
   read, normalise, map each record to the canonical chat form, count tokens with the preset's
   chat template, and write valid rows to a Parquet part; bad rows go to quarantine with
   file, line and reason. Streams: memory is bounded by a batch, not by the file.
3. `merge_shards`: drop exact (and optionally near) duplicates across all parts, remove
   training rows that contaminate the eval split, and write train/eval Parquet, the quarantine,
   the removed rows, a manifest and a length histogram into the version folder, atomically.

Guarantees: a bad file stops the run with its name; rows_in = kept + quarantined + duplicates +
near_duplicates + contaminated, always; a row's split follows from its content hash, so
appending data never moves an old row between train and eval.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.artifacts import Artifact, artifact, digest, file_digest, read_json, write_json
from models.config import ModelConfig
from tasks.config import REPO_ROOT, EtlConfig
from tasks.data.formats import DataError, EmptyFolder, Shard, SourcePlan, expand_source, plan_source, position_unit, read_records
from tasks.data.quality import NearDuplicates, fingerprints, in_table, ngram_hashes, plain_texts, row_id, rows_hitting, split_of
from tasks.data.shapes import Row, RowError, content_text, context_of, detect_shape, to_row

__all__ = ["DataError", "DatasetVersion", "build_dataset"]
log = logging.getLogger(__name__)

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("messages", MESSAGES), ("prompt", pa.string()), ("completion", pa.string()),
    ("source", pa.string()), ("position", pa.int64()), ("tokens", pa.int32()),
    ("rejected", pa.string()),  # a preference pair's rejected answer to the same context; null for other rows
])
PART_SCHEMA = ROW_SCHEMA.append(pa.field("split", pa.string()))
BATCH_ROWS = 2048
# What decides a dataset version's rows: this module and the readers, shape mapping and quality
# filters it runs (tasks/data/bench.py only times them).
ETL_CODE = ("tasks.etl", "tasks.data.formats", "tasks.data.quality", "tasks.data.shapes")


@dataclass
class DatasetVersion:
    """One processed dataset: train/eval Parquet splits of canonical chat rows and a manifest."""

    version: str
    path: Path
    counts: dict = field(default_factory=dict)

    def rows(self, split: str) -> list[dict]:
        return pq.read_table(self.path / f"{split}.parquet").to_pylist()

    @property
    def manifest(self) -> dict:
        return read_json(self.path / "manifest.json")


@dataclass
class IngestPlan:
    version: str
    out: Path
    work: Path
    sources: list[SourcePlan]
    tokenizer: str
    chat_template: str | None
    done: bool

    @property
    def shards(self) -> list[Shard]:
        return [] if self.done else [s for src in self.sources for s in src.shards]


# ---- 1. plan ---------------------------------------------------------------------------------


def resolve_source(source: str) -> str:
    if "://" in source:
        return source
    p = Path(source)
    return str(p if p.is_absolute() else REPO_ROOT / p)


def expand_sources(cfg: EtlConfig) -> list[tuple[str, str]]:
    """(uri, format) of every input file. An empty folder adds nothing (a watched folder starts
    empty); no input at all is an error."""
    out = []
    for source in map(resolve_source, cfg.sources):
        try:
            out.extend(expand_source(source, cfg.format))
        except EmptyFolder as e:
            log.warning("%s", e)
    if not out:
        raise DataError(f"no input file in {cfg.sources}")
    return out


def tokenizer_identity(source: str) -> str:
    """What the token counts depend on: the tokenizer file's content if local, else its hub id."""
    tok = Path(source) / "tokenizer.json"
    return file_digest(tok) if tok.exists() else source


def plan_ingest(cfg: EtlConfig, tokenizer: str, chat_template: str | None, home: Path) -> IngestPlan:
    inputs = expand_sources(cfg)
    cache = home / "datasets" / ".plans"
    shard_bytes = max(1, int(cfg.shard_mb * (1 << 20)))
    sources = [plan_source(uri, fmt, shard_bytes, cache) for uri, fmt in inputs]
    # No name: the key alone names the folder, and is the dataset version carried in lineage tags.
    out = artifact(home / "datasets", "", cfg.version_fields(), tokenizer_identity(tokenizer), chat_template,
                   [(s.uri, s.format, s.sha256) for s in sources], code=ETL_CODE)
    return IngestPlan(out.path.name, out.path, out.work, sources, tokenizer, chat_template, out.exists())


# ---- 2. one shard ----------------------------------------------------------------------------


@lru_cache(maxsize=4)
def load_tokenizer(source: str, chat_template: str | None):
    # A local tokenizer.json needs only the fast-tokenizer class; AutoTokenizer would import torch
    # (about 650 MB) into every ETL process and Dask worker. Hub ids keep their own class.
    if (Path(source) / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(source)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
    if chat_template:
        tok.chat_template = chat_template
    return tok


class ShardWriter:
    """Buffers one shard's rows, counts tokens in batches, and writes valid rows to the Parquet part
    and rejected ones to its quarantine, both in input order."""

    def __init__(self, shard: Shard, part: Path, quarantine, cfg: EtlConfig, tokenizer):
        self.shard, self.part, self.quarantine, self.cfg, self.tok = shard, part, quarantine, cfg, tokenizer
        self.unit = position_unit(shard.format)
        # (position, Row, None) for a valid row, (position, record, reason) for a rejected one
        self.buffer: list[tuple[int, object, str | None]] = []
        self.writer = pq.ParquetWriter(part, PART_SCHEMA)
        self.kept = self.quarantined = 0
        self.split_counts: Counter = Counter()

    def add(self, position: int, row: Row) -> None:
        self.buffer.append((position, row, None))
        if len(self.buffer) >= BATCH_ROWS:
            self.flush()

    def reject(self, position: int, reason: str, record) -> None:
        self.buffer.append((position, record, reason))

    def flush(self) -> None:
        valid = [r for _, r, reason in self.buffer if reason is None]
        # a pair is as long as the longer of its two conversations
        texts = [self.tok.apply_chat_template(c, tokenize=False) for r in valid for c in conversations(r)]
        # The Rust tokenizer directly: only lengths are needed, not Python lists of ids.
        encodings = self.tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        lengths = iter(len(e) for e in encodings)
        rows = []
        for position, item, reason in self.buffer:
            n = max(next(lengths) for _ in conversations(item)) if reason is None else 0
            if reason is None and n > self.cfg.max_tokens:
                reason = f"{n} tokens with the chat template, over the limit of {self.cfg.max_tokens} (etl.max_tokens)"
            if reason is None:
                rows.append(canonical_row(item, self.shard.source, position, n, self.cfg.eval_fraction))
            else:
                self.quarantined += 1
                record = quarantined_form(item)
                entry = {"file": self.shard.source, self.unit: position, "reason": reason, "record": record}
                self.quarantine.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self.kept += len(rows)
        self.split_counts.update(r["split"] for r in rows)
        if rows:
            self.writer.write_table(pa.Table.from_pylist(rows, PART_SCHEMA))
        self.buffer = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def quarantined_form(item):
    """What the quarantine shows of a rejected item: the record as read, or the canonical form of a row
    rejected after mapping (over-long)."""
    if not isinstance(item, Row):
        return item
    return item.messages if item.rejected is None else {"messages": item.messages, "rejected": item.rejected}


def conversations(row: Row) -> list[list[dict]]:
    """What the chat template renders for a row: its messages, and for a pair the rejected answer in place of the chosen."""
    if row.rejected is None:
        return [row.messages]
    return [row.messages, row.messages[:-1] + [{"role": "assistant", "content": row.rejected}]]


def canonical_row(row: Row, source: str, position: int, tokens: int, eval_fraction: float) -> dict:
    messages = row.messages
    users = [m["content"] for m in messages if m["role"] == "user"]
    return {"id": row_id(messages, row.rejected), "messages": messages, "prompt": users[-1] if users else "",
            "completion": messages[-1]["content"], "source": source, "position": position, "tokens": tokens,
            "rejected": row.rejected, "split": split_of(messages, eval_fraction)}


class ShapeTracker:
    """The file's record shape: fixed by config, or detected from its first recognisable row;
    a later row of another shape is a file-level error."""

    def __init__(self, cfg: EtlConfig, shard: Shard):
        self.fixed = cfg.record_shape != "auto" or shard.format == "text"
        self.shape = "text" if shard.format == "text" else (None if cfg.record_shape == "auto" else cfg.record_shape)
        self.first, self.shard, self.unit = None, shard, position_unit(shard.format)

    def of(self, position: int, record) -> str:
        if self.fixed or not isinstance(record, dict):
            return self.shape or "prompt-completion"
        seen = detect_shape(record)
        if seen is None:
            raise RowError("no field of a known record shape (prompt/completion, instruction/output, messages, "
                           "conversations, text, chosen/rejected)")
        if self.shape is None:
            self.shape, self.first = seen, position
        elif seen != self.shape:
            raise DataError(f"input file {self.shard.source} mixes record shapes: {self.unit} {self.first} is "
                            f"{self.shape}, {self.unit} {position} is {seen}; split the file or pass --schema")
        return self.shape


def ingest_shard(shard: Shard, index: int, plan: IngestPlan, cfg: EtlConfig) -> dict:
    """Validate one shard into `part-NNNNN.parquet` + its quarantine; returns its counts. A part
    finished before a crash is reused, not redone."""
    plan.work.mkdir(parents=True, exist_ok=True)
    stem = plan.work / f"part-{index:05d}"
    meta = stem.with_suffix(".json")
    if meta.exists():
        return read_json(meta)
    tok = load_tokenizer(plan.tokenizer, plan.chat_template)
    shapes, rows_in = ShapeTracker(cfg, shard), 0
    tmp_part, tmp_q = stem.with_suffix(f".parquet.tmp-{os.getpid()}"), stem.with_suffix(f".quarantine.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        with open(tmp_q, "w", encoding="utf-8") as quarantine:
            out = ShardWriter(shard, tmp_part, quarantine, cfg, tok)
            try:
                for position, record, error in read_records(shard, cfg.text_unit):
                    rows_in += 1
                    try:
                        if error:
                            raise RowError(error)
                        out.add(position, to_row(record, shapes.of(position, record)))
                    except RowError as e:
                        out.reject(position, str(e), record)
            finally:
                out.close()
        if rows_in == 0:
            raise DataError(f"input file {shard.source} is empty (no records)")
    except BaseException:
        for f in (tmp_part, tmp_q):  # a failed shard leaves nothing behind
            f.unlink(missing_ok=True)
        raise
    os.replace(tmp_part, stem.with_suffix(".parquet"))
    os.replace(tmp_q, stem.with_suffix(".quarantine.jsonl"))
    result = {"index": index, "source": shard.source, "format": shard.format, "shape": shapes.shape,
              "rows_in": rows_in, "quarantined": out.quarantined, "valid": out.kept,
              "splits": dict(out.split_counts), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    write_json(meta, result)
    seconds = time.perf_counter() - t0
    print(f"shard {index} ({Path(shard.source).name}): {rows_in:,} rows, {out.kept:,} valid, {out.quarantined:,} quarantined "
          f"in {seconds:.1f} s ({rows_in / max(seconds, 1e-9):,.0f} rows/s)")
    return result


# ---- 3. merge --------------------------------------------------------------------------------


class Removed:
    """Rows dropped as duplicates or contamination: counted by kind and written to removed.jsonl."""

    def __init__(self, path: Path):
        self.file = open(path, "w", encoding="utf-8")
        self.counts: Counter = Counter()

    def add(self, kind: str, row: dict, reason: str, with_content: bool = True) -> None:
        self.counts[kind] += 1
        entry = {"kind": kind, "file": row["source"], "position": row["position"], "reason": reason}
        if with_content:
            entry["messages"] = row["messages"]
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.file.close()


def part_batches(plan: IngestPlan, results: list[dict], columns: list[str] | None = None):
    """(result, batch) over every part in shard order, streamed."""
    for r in results:
        pf = pq.ParquetFile(plan.work / f"part-{r['index']:05d}.parquet")
        for batch in pf.iter_batches(batch_size=8192, columns=columns):
            yield r, batch


def find_duplicates(plan: IngestPlan, results: list[dict], cfg: EtlConfig, removed: Removed) -> dict[int, np.ndarray]:
    """Per part, [rows] bool: the row repeats an earlier one, exactly or (optionally) nearly.
    Memory: one 16-byte id per distinct row (about 100 MB per million rows)."""
    seen: set[bytes] = set()
    near = NearDuplicates(cfg.near_dedup_threshold, cfg.minhash_perms) if cfg.near_dedup else None
    drop = {r["index"]: np.zeros(r["valid"], bool) for r in results}
    row_no: Counter = Counter()
    columns = ["id", "source", "position"] + (["messages"] if near else [])
    for r, batch in part_batches(plan, results, columns):
        for row in batch.to_pylist():
            i = row_no[r["index"]]
            row_no[r["index"]] += 1
            rid = bytes.fromhex(row["id"])
            if rid in seen:
                drop[r["index"]][i] = True
                removed.add("duplicates", row, f"exact duplicate of row {row['id']}", with_content=False)
                continue
            seen.add(rid)
            if near and (other := near.seen(row["id"], content_text(row["messages"]))):
                drop[r["index"]][i] = True
                removed.add("near_duplicates", row, f"near-duplicate (MinHash Jaccard >= {cfg.near_dedup_threshold}) "
                                                    f"of row {other}")
    return drop


@dataclass
class EvalIndex:
    """What contamination is checked against: the eval split's n-grams, texts and prompts,
    as sorted uint64 hash tables."""

    ngrams: np.ndarray
    texts: np.ndarray
    prompts: np.ndarray


def write_eval(plan: IngestPlan, results: list[dict], drop: dict, n: int, path: Path) -> tuple[EvalIndex, np.ndarray]:
    """Write eval.parquet and, in the same pass, index what contamination is checked against;
    returns the index and the eval rows' token lengths."""
    grams, texts, prompts, lengths = [], [], [], []
    with pq.ParquetWriter(path, ROW_SCHEMA) as writer:
        for table in split_tables(plan, results, drop, "eval"):
            writer.write_table(table)
            lengths.append(table.column("tokens").to_numpy())
            rows = table.column("messages").to_pylist()
            whole = plain_texts([content_text(m) for m in rows])
            texts.append(fingerprints(whole))
            prompts.append(fingerprints([content_text(context_of(m)) for m in rows if len(m) > 1]))
            if n:
                grams.append(ngram_hashes(whole, n)[0])
    table_of = lambda parts: np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)  # noqa: E731
    return EvalIndex(table_of(grams), table_of(texts), table_of(prompts)), joined(lengths)


def joined(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, np.int32)


def split_tables(plan: IngestPlan, results: list[dict], drop: dict[int, np.ndarray], split: str):
    """Kept rows of one split, part by part, in batches."""
    offsets: Counter = Counter()
    for r, batch in part_batches(plan, results):
        start = offsets[r["index"]]
        offsets[r["index"]] += batch.num_rows
        keep = ~drop[r["index"]][start:start + batch.num_rows] & (batch.column("split").to_numpy(zero_copy_only=False) == split)
        table = pa.Table.from_batches([batch]).filter(pa.array(keep))
        if table.num_rows:
            yield table.drop_columns(["split"])


def contamination(table: pa.Table, index: EvalIndex, n: int) -> dict[int, str]:
    """Row number -> reason, for training rows that overlap the eval split."""
    rows = table.column("messages").to_pylist()
    whole = plain_texts([content_text(m) for m in rows])  # normalised once for both checks below
    reasons: dict[int, str] = {}
    if n:
        hashes, row_of = ngram_hashes(whole, n)
        for i in rows_hitting(hashes, row_of, index.ngrams):
            reasons[int(i)] = f"shares a {n}-word sequence with the eval split"
    for i in np.flatnonzero(in_table(fingerprints([content_text(context_of(m)) for m in rows]), index.prompts)):
        if len(rows[i]) > 1:
            reasons[int(i)] = "same prompt as an eval row (up to case and punctuation)"
    for i in np.flatnonzero(in_table(fingerprints(whole), index.texts)):
        reasons[int(i)] = "same text as an eval row (up to case and punctuation)"
    return reasons


def write_train(plan: IngestPlan, results: list[dict], drop: dict, index: EvalIndex, cfg: EtlConfig,
                path: Path, removed: Removed) -> np.ndarray:
    """Write train.parquet without the rows that contaminate eval; return its token lengths."""
    lengths = []
    with pq.ParquetWriter(path, ROW_SCHEMA) as writer:
        for table in split_tables(plan, results, drop, "train"):
            reasons = contamination(table, index, cfg.contamination_ngram)
            for i, reason in sorted(reasons.items()):
                removed.add("contaminated", table.slice(i, 1).to_pylist()[0], reason)
            table = table.filter(pa.array([i not in reasons for i in range(table.num_rows)]))
            writer.write_table(table)
            lengths.append(table.column("tokens").to_numpy())
    return joined(lengths)


def length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"rows": 0}
    q = np.percentile(lengths, [50, 90, 99])
    return {"rows": int(len(lengths)), "total": int(lengths.sum()), "mean": round(float(lengths.mean()), 1),
            "min": int(lengths.min()), "p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(lengths.max())}


def reason_kinds(quarantine: Path, top: int = 12, file: str | None = None) -> dict[str, int]:
    """Quarantine reasons grouped by kind (numbers masked), most common first; of one input file if given."""
    kinds: Counter = Counter()
    with open(quarantine, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            if file is None or entry["file"] == file:
                kinds[re.sub(r"\d+", "N", entry["reason"])[:120]] += 1
    return dict(kinds.most_common(top))


def concat_quarantine(plan: IngestPlan, results: list[dict], dest: Path) -> None:
    with open(dest, "wb") as out:
        for r in results:
            with open(plan.work / f"part-{r['index']:05d}.quarantine.jsonl", "rb") as f:
                shutil.copyfileobj(f, out)


def check_shapes(results: list[dict]) -> dict[str, str]:
    """Record shape per source; shards of one file that disagree are a mixed file."""
    shapes: dict[str, str] = {}
    for r in results:
        if r["shape"] and shapes.setdefault(r["source"], r["shape"]) != r["shape"]:
            raise DataError(f"input file {r['source']} mixes record shapes: {shapes[r['source']]} in one part, "
                            f"{r['shape']} in another; split the file or pass --schema")
    return shapes


def merge_shards(plan: IngestPlan, results: list[dict], cfg: EtlConfig) -> DatasetVersion:
    if plan.out.exists():
        return load_version(plan.out)
    results = sorted(results, key=lambda r: r["index"])
    shapes = check_shapes(results)
    with Artifact(plan.out).build() as tmp:  # clears plan.work (the finished parts) once the version is in place
        removed = Removed(tmp / "removed.jsonl")
        try:
            drop = find_duplicates(plan, results, cfg, removed)
            index, eval_lengths = write_eval(plan, results, drop, cfg.contamination_ngram, tmp / "eval.parquet")
            lengths = {"train": write_train(plan, results, drop, index, cfg, tmp / "train.parquet", removed),
                       "eval": eval_lengths}
        finally:
            removed.close()
        concat_quarantine(plan, results, tmp / "quarantine.jsonl")
        counts = count_rows(results, removed, lengths)
        if not counts["train"] or not counts["eval"]:
            # the version is not published: keep its quarantine where the message says (plan.work outlives a failure)
            shutil.copyfile(tmp / "quarantine.jsonl", plan.work / "quarantine.jsonl")
            raise DataError(empty_dataset(counts, plan, cfg, plan.work / "quarantine.jsonl"))
        manifest = build_manifest(plan, cfg, results, shapes, counts, lengths, tmp / "quarantine.jsonl")
        write_json(tmp / "manifest.json", manifest)
        plot_lengths(lengths, cfg.max_tokens, tmp / "lengths.png")
    warn_mostly_quarantined(results, plan, cfg, plan.out / "quarantine.jsonl")
    return DatasetVersion(plan.version, plan.out, counts)


def count_rows(results: list[dict], removed: Removed, lengths: dict) -> dict:
    counts = {"rows_in": sum(r["rows_in"] for r in results), "quarantined": sum(r["quarantined"] for r in results),
              "duplicates": removed.counts["duplicates"], "near_duplicates": removed.counts["near_duplicates"],
              "contaminated": removed.counts["contaminated"], "train": len(lengths["train"]), "eval": len(lengths["eval"])}
    counts["kept"] = counts["train"] + counts["eval"]
    accounted = sum(counts[k] for k in ("kept", "quarantined", "duplicates", "near_duplicates", "contaminated"))
    if accounted != counts["rows_in"]:  # a bug, never bad data: refuse to publish a dataset that lost rows
        raise RuntimeError(f"row accounting is off: {counts}")
    return counts


def empty_dataset(counts: dict, plan: IngestPlan, cfg: EtlConfig, quarantine: Path) -> str:
    """Why no usable dataset came out: the counts, the top quarantine reasons, where the rejected rows
    are and what setting would help."""
    lines = [f"after validation the dataset has {counts['train']} train and {counts['eval']} eval rows; both must be "
             f"non-empty. Of {counts['rows_in']:,} rows read: {counts['quarantined']:,} quarantined, "
             f"{counts['duplicates'] + counts['near_duplicates']:,} duplicates, {counts['contaminated']:,} contaminated, "
             f"{counts['kept']:,} kept."]
    reasons = reason_kinds(quarantine, top=5)
    if reasons:
        lines += ["Top quarantine reasons:"] + [f"  {n:>7,}  {kind}" for kind, n in reasons.items()]
        lines.append(f"Every rejected row, with its file, line and reason: {quarantine}")
    lines += [f"Hint: {h}" for h in hints(reasons, plan, cfg, counts)]
    return "\n".join(lines)


def warn_mostly_quarantined(results: list[dict], plan: IngestPlan, cfg: EtlConfig, quarantine: Path) -> None:
    """A file that lost most of its rows is likely read the wrong way: say why, where, and what would help."""
    for source in dict.fromkeys(r["source"] for r in results):
        rows_in = sum(r["rows_in"] for r in results if r["source"] == source)
        lost = sum(r["quarantined"] for r in results if r["source"] == source)
        if rows_in and lost * 2 > rows_in:
            reasons = reason_kinds(quarantine, top=3, file=source)
            print(f"warning: {lost:,} of {rows_in:,} rows of {source} were quarantined: "
                  + "; ".join(f"{n:,} x {kind}" for kind, n in reasons.items()) + f" (all in {quarantine})")
            for h in hints(reasons, plan, cfg, None):
                print(f"  hint: {h}")


def hints(reasons: dict[str, int], plan: IngestPlan, cfg: EtlConfig, counts: dict | None) -> list[str]:
    """Settings that would help with these quarantine reasons (kinds, as `reason_kinds` groups them)."""
    text = " ".join(reasons)
    out = []
    if "(etl.max_tokens)" in text:
        plain = any(s.format == "text" for s in plan.sources)
        if plain and cfg.text_unit == "paragraph":
            out.append("plain text is read one paragraph (up to a blank line) per row; for one document per line "
                       "set etl.text_unit=line (`smelt run etl.text_unit=line`, `smelt data ingest --set etl.text_unit=line`)")
        out.append(f"rows over etl.max_tokens ({cfg.max_tokens}, from train.max_seq_len) are rejected: raise "
                   "train.max_seq_len or shorten the rows")
    if "no field of a known record shape" in text:
        out.append("name the fields as one of the record shapes (prompt/completion, instruction/output, messages, "
                   "conversations, text) or map them with --schema (etl.record_shape)")
    if "only text parts can be trained on" in text:
        out.append("smelt trains text models: drop the image/audio parts (or the rows that need them)")
    if counts and counts["kept"] and (not counts["train"] or not counts["eval"]):
        out.append(f"{counts['kept']} rows kept are too few for a split at etl.eval_fraction={cfg.eval_fraction}: "
                   "add rows or change etl.eval_fraction")
    return out


def build_manifest(plan: IngestPlan, cfg: EtlConfig, results: list[dict], shapes: dict, counts: dict,
                   lengths: dict, quarantine: Path) -> dict:
    return {
        "version": plan.version,
        "counts": counts,
        "quarantine_reasons": reason_kinds(quarantine),
        "sources": [{"uri": s.uri, "format": s.format, "sha256": s.sha256, "bytes": s.size, "shards": len(s.shards),
                     "record_shape": shapes.get(s.uri)} for s in plan.sources],
        "schema": {f.name: str(f.type) for f in ROW_SCHEMA},
        "token_lengths": {split: length_stats(v) for split, v in lengths.items()},
        "tokenizer": {"source": plan.tokenizer, "identity": tokenizer_identity(plan.tokenizer),
                      "chat_template_sha": digest(plan.chat_template) if plan.chat_template else None},
        "config": cfg.model_dump(),
        "shards": [{k: r[k] for k in ("index", "source", "rows_in", "quarantined", "valid", "worker")} for r in results],
    }


def plot_lengths(lengths: dict, limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0, max(limit, 1), 41)
    for split, v in lengths.items():
        ax.hist(v, bins=bins, alpha=0.6, label=f"{split} ({len(v)} rows)")
    ax.axvline(limit, color="black", linestyle="--", label=f"limit {limit}")
    ax.set_xlabel("tokens per row (chat template applied)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper left")  # a fixed place: "best" searches and is slow on big histograms
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_version(path: Path) -> DatasetVersion:
    manifest = read_json(path / "manifest.json")
    return DatasetVersion(manifest["version"], path, manifest["counts"])


# ---- the stage, in-process -------------------------------------------------------------------


def build_dataset(cfg: EtlConfig, home: Path, tokenizer: str, chat_template: str | None = None) -> DatasetVersion:
    """Plan, ingest every shard and merge, in this process (the Prefect flow maps the shards instead)."""
    if cfg.max_tokens is None:
        raise ValueError("etl.max_tokens must be set (PipelineConfig sets it from train.max_seq_len)")
    plan = plan_ingest(cfg, tokenizer, chat_template, home)
    if plan.done:
        return load_version(plan.out)
    # Threads, like the flow's default runner: tokenizing releases the GIL, so shards overlap.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda job: ingest_shard(job[1], job[0], plan, cfg), enumerate(plan.shards)))
    return merge_shards(plan, results, cfg)


def prepare_tokenizer(cfg: ModelConfig, home: Path) -> str:
    """The tokenizer ETL counts tokens with: the preset base's own (the embedded one is built in seconds)."""
    if cfg.base != "embedded":
        return cfg.base
    if cfg.embedded.shipped:  # hash-checked in place; no torch import (`smelt data ingest` answers sooner)
        from models.shipped import release

        return str(release(cfg.embedded, REPO_ROOT) / "base")
    from models.embedded import build_embedded_tokenizer

    return str(build_embedded_tokenizer(cfg.embedded, home, REPO_ROOT))


# Not cached by Prefect: the version id already hashes the inputs' contents, which an inputs-only
# cache key would miss when a file changes in place; a finished version is found by its id at once.
@task(name="prepare-tokenizer", cache_policy=NO_CACHE)
def prepare_tokenizer_task(cfg: ModelConfig, home: str) -> str:
    return prepare_tokenizer(cfg, Path(home))


@task(name="plan-etl", cache_policy=NO_CACHE)
def plan_task(cfg: EtlConfig, tokenizer: str, chat_template: str | None, home: str) -> IngestPlan:
    return plan_ingest(cfg, tokenizer, chat_template, Path(home))


@task(name="ingest-shard", cache_policy=NO_CACHE, task_run_name="ingest-shard-{index}")
def ingest_shard_task(shard: Shard, index: int, plan: IngestPlan, cfg: EtlConfig) -> dict:
    return ingest_shard(shard, index, plan, cfg)


@task(name="merge-etl", cache_policy=NO_CACHE)
def merge_task(plan: IngestPlan, results: list[dict], cfg: EtlConfig) -> DatasetVersion:
    return load_version(plan.out) if plan.done else merge_shards(plan, results, cfg)
