"""Input formats: find the files behind each source, plan them into shards, and read records.

Every reader yields `(position, record, error)`: `position` is the 1-based line (line formats) or
row (JSON arrays, Parquet, `datasets` folders) a quarantine entry points at; `record` is a dict
or None; `error` says why a row could not even be parsed. Whole-file problems raise DataError
naming the file. Sources are local paths or fsspec URIs (s3://, gcs://, ...).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import fsspec
from fsspec.utils import infer_compression

Format = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "hf", "text"]
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "hf", "text")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BLOCK = 1 << 23
EXTRA = "\x00extra"  # where csv puts cells beyond the header


class DataError(ValueError):
    """A whole input cannot be used; the message names the file."""


class EmptyFolder(DataError):
    """A folder source holds no data file (a watched folder starts that way)."""


@dataclass(frozen=True)
class Shard:
    """A piece of one source read by one task: bytes [start, end) of a JSONL file, row groups
    [start, end) of a Parquet file, or (start=0, end=None) a whole file."""

    source: str
    format: str
    start: int = 0
    end: int | None = None
    first: int = 1  # position (line or row) of the shard's first record


@dataclass(frozen=True)
class SourcePlan:
    uri: str
    format: str
    sha256: str
    size: int
    shards: tuple[Shard, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, d: dict) -> "SourcePlan":
        return cls(**{**d, "shards": tuple(Shard(**s) for s in d["shards"])})


def open_binary(uri: str):
    try:
        return fsspec.open(uri, "rb", compression="infer").open()
    except FileNotFoundError:
        raise DataError(f"input file {uri} does not exist") from None
    except (PermissionError, IsADirectoryError, OSError) as e:
        raise DataError(f"input file {uri} cannot be read: {e}") from None


def base_suffix(uri: str) -> str:
    """The format extension, looking through a compression suffix (data.jsonl.gz -> .jsonl)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    if infer_compression(name):
        name = name.rsplit(".", 1)[0]
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def is_hf_folder(fs, path: str) -> bool:
    return fs.isdir(path) and any(fs.exists(f"{path.rstrip('/')}/{m}") for m in HF_MARKERS)


def expand_source(source: str, fmt: str) -> list[tuple[str, str]]:
    """(uri, format) of each input a source stands for: a file, a `datasets` folder, or a folder of
    files and `datasets` folders (recursively, hidden ones skipped, sorted so the version never
    depends on listing order)."""
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise DataError(f"input {source} does not exist")
    if fmt == "hf" or (fmt == "auto" and is_hf_folder(fs, path)):
        return [(source, "hf")]
    if not fs.isdir(path):
        return [(source, fmt if fmt != "auto" else detect_format(source))]
    root = path.rstrip("/")
    found = fs.find(root, withdirs=True, detail=True)
    hf_dirs = [p for p, info in found.items() if info["type"] == "directory" and fmt == "auto" and is_hf_folder(fs, p)]
    out = []
    for p in sorted(found):
        rel = p[len(root) + 1:]
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden or half-copied temp files, _SUCCESS markers
        uri = fs.unstrip_protocol(p) if "://" in source else p
        if p in hf_dirs:
            out.append((uri, "hf"))
        elif (found[p]["type"] == "file" and not any(p.startswith(d + "/") for d in hf_dirs)
              and (fmt != "auto" or base_suffix(p) in EXTENSIONS)):
            out.append((uri, fmt if fmt != "auto" else detect_format(uri)))
    if not out:
        raise EmptyFolder(f"folder {source} holds no file of a known format ({', '.join(sorted(EXTENSIONS))}); pass --format")
    return out


def detect_format(uri: str) -> str:
    suffix = base_suffix(uri)
    if suffix not in EXTENSIONS:
        raise DataError(f"unknown format of input file {uri} (suffix '{suffix}'): pass --format, one of {', '.join(FORMATS)}")
    fmt = EXTENSIONS[suffix]
    if fmt == "json":  # .json holds either one array or (often) JSON lines
        with open_binary(uri) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        fmt = "json" if head.startswith(b"[") else "jsonl"
    return fmt


def file_fingerprint(uri: str) -> tuple[str, int, bool]:
    """(sha256 and size of the file as stored, whether its (decompressed) content has a non-blank byte)."""
    h, size = hashlib.sha256(), 0
    with fsspec.open(uri, "rb").open() as f:  # the stored bytes: what `sha256sum` of the file says
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
            size += len(block)
    with open_binary(uri) as f:
        content = any(block.strip() for block in iter(lambda: f.read(BLOCK), b""))
    return h.hexdigest(), size, content


def plan_jsonl(uri: str, shard_bytes: int) -> SourcePlan:
    """Hash the file and cut it after newlines into shards of about `shard_bytes`, noting the
    first line number of each, in one read."""
    if infer_compression(uri):  # a compressed stream cannot be entered in the middle
        sha, size, content = file_fingerprint(uri)
        return SourcePlan(uri, "jsonl", sha, size, (Shard(uri, "jsonl"),) if content else ())
    h, cuts, pos, newlines, content = hashlib.sha256(), [(0, 1)], 0, 0, False
    with open_binary(uri) as f:
        for block in iter(lambda: f.read(min(BLOCK, shard_bytes)), b""):
            h.update(block)
            content = content or bool(block.strip())
            last = block.rfind(b"\n")
            if last >= 0 and pos + last + 1 - cuts[-1][0] >= shard_bytes:
                cuts.append((pos + last + 1, newlines + block.count(b"\n", 0, last + 1) + 1))
            newlines += block.count(b"\n")
            pos += len(block)
    cuts = [c for c in cuts if c[0] < pos]
    shards = tuple(Shard(uri, "jsonl", start, cuts[i + 1][0] if i + 1 < len(cuts) else None, first)
                   for i, (start, first) in enumerate(cuts))
    return SourcePlan(uri, "jsonl", h.hexdigest(), pos, shards if content else ())


def plan_parquet(uri: str, shard_bytes: int) -> SourcePlan:
    import pyarrow.parquet as pq

    sha, size, _ = file_fingerprint(uri)
    with open_binary(uri) as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise DataError(f"input file {uri} is not a readable Parquet file: {e}") from None
    shards, start, acc, first, row = [], 0, 0, 1, 1
    for i in range(meta.num_row_groups):
        acc += meta.row_group(i).total_byte_size
        row += meta.row_group(i).num_rows
        if acc >= shard_bytes or i == meta.num_row_groups - 1:
            shards.append(Shard(uri, "parquet", start, i + 1, first))
            start, acc, first = i + 1, 0, row
    return SourcePlan(uri, "parquet", sha, size, tuple(shards) if meta.num_rows else ())


def plan_hf(uri: str) -> SourcePlan:
    fs, path = fsspec.core.url_to_fs(uri)
    h, size = hashlib.sha256(), 0
    for p in sorted(fs.find(path)):
        h.update(p[len(path):].encode())
        with fs.open(p, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
                size += len(block)
    return SourcePlan(uri, "hf", h.hexdigest(), size, (Shard(uri, "hf"),))


def plan_whole(uri: str, fmt: str) -> SourcePlan:
    sha, size, content = file_fingerprint(uri)
    return SourcePlan(uri, fmt, sha, size, (Shard(uri, fmt),) if content else ())


def plan_source(uri: str, fmt: str, shard_bytes: int, cache_dir: Path | None = None) -> SourcePlan:
    """Hash and shard one input. Local files are planned once per (size, mtime): ingesting the same
    input again costs a stat, not a read."""
    key = plan_cache_key(uri, fmt, shard_bytes)
    cached = cache_dir / f"{key}.json" if cache_dir and key else None
    if cached and cached.exists():
        return SourcePlan.from_json(json.loads(cached.read_text()))
    if fmt == "jsonl":
        plan = plan_jsonl(uri, shard_bytes)
    elif fmt == "parquet":
        plan = plan_parquet(uri, shard_bytes)
    elif fmt == "hf":
        plan = plan_hf(uri)
    else:
        plan = plan_whole(uri, fmt)
    if not plan.shards:
        raise DataError(f"input file {uri} is empty")
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(plan.to_json()))
        os.replace(tmp, cached)
    return plan


def plan_cache_key(uri: str, fmt: str, shard_bytes: int) -> str | None:
    if "://" in uri and not uri.startswith("file://"):
        return None
    try:
        st = os.stat(uri.removeprefix("file://"))
    except OSError:
        return None
    if not os.path.isfile(uri.removeprefix("file://")):
        return None
    raw = json.dumps([os.path.abspath(uri.removeprefix("file://")), fmt, shard_bytes, st.st_size, st.st_mtime_ns, "plan-v1"])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


# ---- readers -------------------------------------------------------------------------------


def decode_line(raw: bytes, uri: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input file {uri} is not UTF-8 text (line {line}, byte {e.start} of the line)") from None


def read_jsonl(shard: Shard, text_unit: str) -> Iterator[tuple[int, object, str | None]]:
    with open_binary(shard.source) as f:
        if shard.start:
            f.seek(shard.start)
        pos, line = shard.start, shard.first
        for raw in f:
            if shard.end is not None and pos >= shard.end:
                break
            pos += len(raw)
            text = decode_line(raw, shard.source, line)
            if line == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                try:
                    yield line, json.loads(text.rstrip("\r\n")), None  # so a cut-off line errs on its own line
                except json.JSONDecodeError as e:
                    yield line, text.rstrip("\r\n"), f"malformed JSON: {e.msg} at column {e.colno}"
            line += 1


def read_json_array(shard: Shard, text_unit: str) -> Iterator[tuple[int, object, str | None]]:
    import ijson

    with open_binary(shard.source) as f:
        f.seek(3 if f.read(3) == b"\xef\xbb\xbf" else 0)  # ijson rejects the BOM Windows tools write
        try:
            for row, obj in enumerate(ijson.items(f, "item", use_float=True), start=1):
                yield row, obj, None
        except ijson.JSONError as e:
            if "UTF8" in str(e) or "UTF-8" in str(e):
                raise DataError(f"input file {shard.source} is not UTF-8 text ({e})") from None
            raise DataError(f"input file {shard.source} is not a valid JSON array: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"input file {shard.source} is not UTF-8 text ({e.reason})") from None


def text_stream(shard: Shard) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, BOM dropped; a bad byte names the file and line."""
    with open_binary(shard.source) as f:
        for line, raw in enumerate(f, start=1):
            text = decode_line(raw, shard.source, line)
            yield line, (text.lstrip("\ufeff") if line == 1 else text)


def read_delimited(shard: Shard, delimiter: str) -> Iterator[tuple[int, object, str | None]]:
    csv.field_size_limit(1 << 30)
    with open_binary(shard.source) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="strict", newline="")
        # TSV has no quoting: a cell is everything between tabs, quotes included.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(text, delimiter=delimiter, restkey=EXTRA, quoting=quoting)
        try:
            if not reader.fieldnames:
                raise DataError(f"input file {shard.source} has no header row")
            width, start = len(reader.fieldnames), reader.line_num + 1
            for rec in reader:
                if EXTRA in rec:
                    yield start, rec, f"row has {width + len(rec[EXTRA])} fields, the header has {width}"
                elif None in rec.values():
                    yield start, rec, f"row has {sum(v is not None for v in rec.values())} fields, the header has {width}"
                else:
                    yield start, rec, None
                start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise DataError(f"input file {shard.source} is not UTF-8 text (near line {reader.line_num + 1}: {e.reason})") from None
        except csv.Error as e:
            raise DataError(f"input file {shard.source} is not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                            f"(line {reader.line_num}): {e}") from None


def read_csv(shard: Shard, text_unit: str):
    return read_delimited(shard, ",")


def read_tsv(shard: Shard, text_unit: str):
    return read_delimited(shard, "\t")


def read_parquet(shard: Shard, text_unit: str) -> Iterator[tuple[int, object, str | None]]:
    import pyarrow.parquet as pq

    with open_binary(shard.source) as f:
        pf = pq.ParquetFile(f)
        row = shard.first
        for batch in pf.iter_batches(batch_size=2048, row_groups=range(shard.start, shard.end or pf.num_row_groups)):
            for rec in batch.to_pylist():
                yield row, rec, None
                row += 1


def read_hf(shard: Shard, text_unit: str) -> Iterator[tuple[int, object, str | None]]:
    import datasets

    try:
        ds = datasets.load_from_disk(shard.source)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a broken folder
        raise DataError(f"input folder {shard.source} is not a readable `datasets` folder: {e}") from None
    parts = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    row = 1
    for part in parts:
        for batch in part.iter(batch_size=1000):
            for values in zip(*batch.values()):
                yield row, dict(zip(batch.keys(), values)), None
                row += 1


def read_text(shard: Shard, text_unit: str) -> Iterator[tuple[int, object, str | None]]:
    """Plain text: one record per paragraph (blank-line separated), per line, or per file."""
    if text_unit == "file":
        lines = list(text_stream(shard))
        yield 1, {"text": "".join(t for _, t in lines)}, None
        return
    para, first = [], 0
    for line, text in text_stream(shard):
        if text.strip():
            if text_unit == "line":
                yield line, {"text": text}, None
                continue
            first = first or line
            para.append(text)
        elif para:
            yield first, {"text": "".join(para)}, None
            para, first = [], 0
    if para:
        yield first, {"text": "".join(para)}, None


READERS = {"jsonl": read_jsonl, "json": read_json_array, "csv": read_csv, "tsv": read_tsv,
           "parquet": read_parquet, "hf": read_hf, "text": read_text}
LINE_FORMATS = {"jsonl", "csv", "tsv", "text"}


def read_records(shard: Shard, text_unit: str = "paragraph") -> Iterator[tuple[int, object, str | None]]:
    return READERS[shard.format](shard, text_unit)


def position_unit(fmt: str) -> str:
    return "line" if fmt in LINE_FORMATS else "row"
