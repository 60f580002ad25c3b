"""ETL at scale, measured: a benchmark (not a test) of `build_dataset` on a large JSONL file next
to a plain `pandas.read_json(lines=True)` load of the same file.

    uv run smelt data bench                 # 1,000,000 rows (about 1 GB), several minutes
    uv run smelt data bench --rows 20000    # a quick check
    uv run python -m bench.etl 20000 /tmp/bench

Each measured job runs in a fresh child process so its peak memory (its high-water RSS) is its
own, not the benchmark's or the other job's. pandas only parses the file into a frame; smelt also
hashes and shards it, validates and normalises every row, renders the chat template and counts
tokens, deduplicates, checks eval contamination and writes the versioned Parquet dataset. The
ratios say what that costs next to the simplest load of the same bytes. MB are MiB (2**20 bytes).

This module imports nothing heavy at the top: the parent process stays small, so a child can
never inherit a large memory high-water mark from it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.settings import REPO_ROOT, smelt_home

GENERATOR = "bench-chat-v3"  # bump when the generated content changes: old files are then rewritten
DEFAULT_MAX_TOKENS = 1024  # a ~1 KB row is ~450 tokens with the embedded tokenizer; the preset's 160 would reject all

# ---- the input file ----------------------------------------------------------------------------

# Share of rows that are not a fresh, valid row. Every line stays a JSON object so that pandas can
# load the same file (read_json aborts on a single unparsable line; smelt would quarantine it).
DUPLICATE = 0.03  # an exact copy of a recent line: dropped by dedup
VARIANT = 0.01  # a recent row with its prompt re-cased and re-punctuated: a different id and split key,
#                 the same fingerprint, so a train/eval pair is caught as contamination
INVALID = 0.01  # a JSON object smelt must quarantine (missing/empty/mistyped fields, bad roles, turn order)
OVERLONG = 0.005  # valid, but far over max_tokens: quarantined by the token limit

NAMES = ["Ana", "Bob", "Chen", "Dara", "Elif", "Farah", "Gustavo", "Hana", "Ivan", "José", "Kofi", "Lena", "Mateo",
         "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena", "Yusuf",
         "Zoë", "Łukasz", "Amara", "Bjorn", "Chloé", "Dmitri", "Esther", "Felipe", "Greta", "Hiroshi", "Ingrid"]
CITIES = ["Lisbon", "Seattle", "Paris", "Seoul", "Chicago", "Rome", "Nairobi", "Lima", "Oslo", "Kraków", "Osaka",
          "Toronto", "Austin", "Berlin", "Madrid", "Dublin", "Cairo", "Perth", "Quito", "Hanoi", "Zürich", "Porto"]
ITEMS = ["chairs", "lamps", "tables", "desks", "monitors", "keyboards", "kettles", "blenders", "backpacks", "jackets",
         "headphones", "printers", "routers", "sofas", "mattresses", "bicycles", "helmets", "tents", "drills", "mugs"]
ADJECTIVES = ["damaged", "late", "missing", "wrong", "scratched", "incomplete", "delayed", "faulty", "dented",
              "mislabelled", "leaking", "broken", "unopened", "returned", "duplicated", "overcharged"]
CARRIERS = ["DHL", "UPS", "FedEx", "the postal service", "a local courier", "our own fleet", "GLS", "DPD"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEAMS = ["billing", "logistics", "returns", "warehouse", "quality", "customer care", "fraud review", "payments"]
SYSTEMS = ["You are a support agent for an online store.", "Answer as a concise, friendly support assistant.",
           "You resolve order problems; be precise about amounts and dates.", "You are the store's help desk.",
           "Reply in plain English and end with the next steps."]
# Every sentence starts and ends within a few words of a high-entropy id (order, invoice, parcel,
# case, account, return, ticket), so two different rows never share a 16-word window by chance, not
# even across a sentence or turn boundary: contamination comes from the deliberate variants alone.
USER_SENTENCES = [
    "Order {oid} had {q} {item}; {q2} arrived {adj} on {day}, see photo {pid}.",
    "Order {oid} left {city} with {carrier} on {day}; tracking {pid} has not moved.",
    "Invoice {inv} charged {price} EUR, not the {price2} EUR of order {oid}.",
    "Why were the {item} in parcel {pid} {adj} when they reached {city} (order {oid})?",
    "On {day} {name2} promised a refund of {price} EUR under case {case}.",
    "Order {oid} to {city} is {adj} again, the {nth} time since ticket {case}.",
    "Does code {code} still apply to account {acct}?",
    "The box for order {oid} weighed {kg} kg, label {pid} claims {kg2} kg.",
    "Quote {inv} is approved: we need {q} {item} in {city} by {day}, order {oid}.",
    "Return {rma} of {q2} {item} on {day} is still open, order {oid}.",
]
ASSISTANT_SENTENCES = [
    "Sorry order {oid} arrived {adj}; case {case} is open.",
    "Case {case}: the {team} team refunds {price} EUR to card {card}, ref {pid}.",
    "Tracking {pid}: {q} {item} leave {city} on {day} with {carrier}, order {oid}.",
    "Parcel {pid} should arrive within {q2} working days of {day}, order {oid}.",
    "Invoice {inv} no longer has the {delta} EUR charge, case {case}.",
    "Return {rma} arrived {day}; credit note {inv} for {price} EUR follows.",
    "Account {acct} keeps code {code} until month {month}, case {case}.",
    "Questions on order {oid}? Reply to case {case} and {name2} will help.",
]


def _slots(rng: random.Random) -> dict:
    q = rng.randint(1, 40)
    price = rng.randint(5, 4000)
    return {
        "q": q, "q2": rng.randint(1, q), "item": rng.choice(ITEMS), "day": rng.choice(DAYS), "adj": rng.choice(ADJECTIVES),
        "oid": f"{rng.randint(0, 999_999):06d}", "carrier": rng.choice(CARRIERS), "city": rng.choice(CITIES),
        "inv": f"INV-{rng.randint(0, 99_999_999):08d}", "price": f"{price}.{rng.randint(0, 99):02d}",
        "price2": f"{rng.randint(5, 4000)}.{rng.randint(0, 99):02d}",
        "delta": f"{rng.randint(1, 300)}.{rng.randint(0, 99):02d}", "pid": f"PX{rng.randint(0, 10**10 - 1):010d}",
        "name2": rng.choice(NAMES), "nth": rng.choice(["second", "third", "fourth", "fifth"]),
        "acct": f"AC-{rng.randint(0, 9_999_999):07d}", "code": f"SAVE{rng.randint(10, 60)}-{rng.randint(0, 99_999):05d}",
        "kg": rng.randint(1, 80), "kg2": rng.randint(1, 80), "rma": f"RMA-{rng.randint(0, 9_999_999):07d}",
        "case": f"CS-{rng.randint(0, 99_999_999):08d}", "team": rng.choice(TEAMS), "card": f"{rng.randint(0, 9999):04d}",
        "month": rng.randint(1, 12),
    }


def _text(rng: random.Random, sentences: list[str], chars: int) -> str:
    """Fresh random sentences until about `chars` characters (every sentence has its own numbers)."""
    out, n = [], 0
    while n < chars:
        s = rng.choice(sentences).format(**_slots(rng))
        out.append(s)
        n += len(s) + 1
    return " ".join(out)


def _chat(rng: random.Random) -> dict:
    name, city, ticket = rng.choice(NAMES), rng.choice(CITIES), f"{rng.randint(0, 9_999_999):07d}"
    user = f"Ticket {ticket} from {name} in {city}. " + _text(rng, USER_SENTENCES, rng.randint(330, 500))
    answer = f"Hello {name}, about ticket {ticket}: " + _text(rng, ASSISTANT_SENTENCES, rng.randint(220, 360))
    return {"messages": [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def _variant(rng: random.Random, row: dict) -> dict:
    """The same row up to case and punctuation (what a copy-paste through another tool produces)."""
    msgs = [dict(m) for m in row["messages"]]
    user = msgs[1]["content"]
    msgs[1]["content"] = rng.choice([user.upper(), user.lower(), user.replace(".", "!").replace(",", ";"),
                                     user.replace(". ", " -- ")])
    return {"messages": msgs}


def _invalid(rng: random.Random, row: dict) -> dict:
    """A parseable JSON object that is not a usable training row."""
    msgs = [dict(m) for m in row["messages"]]
    kind = rng.randrange(7)
    if kind == 0:
        del msgs[2]["content"]  # missing field
    elif kind == 1:
        msgs[2]["content"] = "   \u200b "  # empty after normalisation
    elif kind == 2:
        msgs[1]["role"] = "customer"  # unknown role
    elif kind == 3:
        msgs = msgs[:2]  # ends with the user
    elif kind == 4:
        msgs[2]["content"] = rng.randint(0, 10**6)  # not a string
    elif kind == 5:
        return {"messages": []}  # empty list
    else:
        return {"messages": msgs[1]["content"]}  # a string where the list belongs
    return {"messages": msgs}


def _line(rng: random.Random, recent: list[tuple[str, dict]]) -> tuple[str, dict | None]:
    """One JSONL line and the row to remember for later copies (None: not a fresh valid row)."""
    u = rng.random()
    if recent and u < DUPLICATE:
        return rng.choice(recent)[0], None
    u -= DUPLICATE
    if recent and u < VARIANT:
        return json.dumps(_variant(rng, rng.choice(recent)[1]), ensure_ascii=False), None
    u -= VARIANT
    if u < INVALID:
        return json.dumps(_invalid(rng, _chat(rng)), ensure_ascii=False), None
    u -= INVALID
    row = _chat(rng)
    if u < OVERLONG:
        row["messages"][2]["content"] += " " + _text(rng, ASSISTANT_SENTENCES, 5000)
        return json.dumps(row, ensure_ascii=False), None
    return json.dumps(row, ensure_ascii=False), row


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def bench_file_ready(path: Path, rows: int, seed: int) -> bool:
    """True when `path` is a finished file of this generator, row count and seed (its marker says
    so and the size still matches)."""
    try:
        meta = json.loads(_marker(path).read_text())
        return (meta.get("generator"), meta.get("rows"), meta.get("seed")) == (GENERATOR, rows, seed) and \
            path.stat().st_size == meta["bytes"]
    except (OSError, ValueError, KeyError):
        return False


def write_bench_file(path: str | Path, rows: int, seed: int = 0, progress: bool = True) -> Path:
    """Write `rows` chat rows of about 1 KB each as JSONL, deterministically from `seed`: one record
    shape (system/user/assistant `messages`), each row distinct, with a few percent exact
    duplicates, prompt variants, invalid rows and over-long rows (see the shares above). Written to
    a temp file and renamed; a marker file next to it records rows, seed and size."""
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _marker(path).unlink(missing_ok=True)  # a marker only ever describes a finished file
    rng = random.Random(seed)
    recent: list[tuple[str, dict]] = []  # a bounded pool of earlier rows to copy from
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f, \
                tqdm(total=rows, unit="row", unit_scale=True, desc=f"writing {path.name}", disable=not progress) as bar:
            chunk: list[str] = []
            for i in range(rows):
                line, row = _line(rng, recent)
                chunk.append(line)
                if row is not None:
                    if len(recent) < 4096:
                        recent.append((line, row))
                    else:
                        recent[rng.randrange(4096)] = (line, row)
                if len(chunk) == 10_000 or i == rows - 1:
                    f.write("\n".join(chunk) + "\n")
                    bar.update(len(chunk))
                    chunk = []
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    tmp_marker = tmp.with_suffix(".meta")
    tmp_marker.write_text(json.dumps({"generator": GENERATOR, "rows": rows, "seed": seed, "bytes": path.stat().st_size}))
    os.replace(tmp_marker, _marker(path))
    return path


# ---- measured jobs, one per child process -------------------------------------------------------


class Clock:
    """Started by a job once its imports and setup are done: wall seconds cover the work alone."""

    def __init__(self):
        self.t0, self.rss_kib = None, 0

    def start(self) -> None:
        self.rss_kib = _rss_kib()  # what imports and setup left resident: the floor under the peak
        self.t0 = time.perf_counter()


def job_pandas(args: dict, clock: Clock) -> dict:
    import pandas as pd

    clock.start()
    df = pd.read_json(args["path"], lines=True)
    return {"rows_loaded": len(df)}


def job_tokenizer(args: dict, clock: Clock) -> dict:
    """Setup, not measured: build (or find) the preset's tokenizer once, outside the timed jobs."""
    from models.settings import configure_environment

    configure_environment(Path(args["home"]))
    from tasks.config import load_config
    from tasks.etl import prepare_tokenizer

    cfg = load_config(args["config"])
    clock.start()
    return {"tokenizer": prepare_tokenizer(cfg.model, Path(args["home"])), "chat_template": cfg.model.chat_template}


def job_smelt(args: dict, clock: Clock) -> dict:
    from models.settings import configure_environment

    home = Path(args["home"])
    configure_environment(home)  # only fills what the environment leaves unset
    from tasks.config import EtlConfig, load_config
    from tasks.etl import build_dataset, load_tokenizer

    cfg = load_config(args["config"])
    etl = EtlConfig.model_validate({**cfg.etl.model_dump(), "sources": [args["path"]], "max_tokens": args["max_tokens"]})
    load_tokenizer(args["tokenizer"], args["chat_template"])  # loading it is setup, not ingestion
    clock.start()
    if args.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        ds = prof.runcall(build_dataset, etl, home, args["tokenizer"], args["chat_template"])
        prof.dump_stats(args["profile"])
    else:
        ds = build_dataset(etl, home, args["tokenizer"], args["chat_template"])
    manifest = ds.manifest
    return {"rows_loaded": ds.counts["rows_in"], "counts": ds.counts, "dataset": str(ds.path),
            "token_lengths": manifest["token_lengths"], "shards": manifest["shards"],
            "quarantine_reasons": manifest["quarantine_reasons"], "etl": etl.version_fields()}


JOBS = {"pandas": job_pandas, "smelt": job_smelt, "tokenizer": job_tokenizer}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _child(fn_name: str, args_json: str, out: str) -> None:
    """Body of the child process: run one job and write its measurements to `out` as JSON.

    Peak memory: the process's own high-water RSS (VmHWM, the counter ru_maxrss reads for a live
    process) or, if higher, RUSAGE_CHILDREN's ru_maxrss (processes the job started). RUSAGE_SELF's
    ru_maxrss is reported too but not used: Linux carries the parent's high-water mark over an
    exec into it, so it can never read below the benchmark process's own peak."""
    import resource

    t_start = time.perf_counter()
    clock = Clock()
    extra = resolve_job(fn_name)(json.loads(args_json), clock)
    end = time.perf_counter()
    t0 = clock.t0 if clock.t0 is not None else t_start
    hwm_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    result = {"job": fn_name, "seconds": end - t0, "setup_seconds": t0 - t_start,
              "peak_rss_mb": max(hwm_kib, children_kib) / 1024, "peak_rss_self_mb": hwm_kib / 1024,
              "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_rss_children_mb": children_kib / 1024, "rss_start_mb": clock.rss_kib / 1024,
              "rss_end_mb": _rss_kib() / 1024, "pid": os.getpid(), **extra}
    Path(out).write_text(json.dumps(result, default=str))


def resolve_job(name: str):
    """A job of this module by name, or any module's as "package.module:function"."""
    if ":" in name:
        import importlib

        module, fn = name.split(":", 1)
        return getattr(importlib.import_module(module), fn)
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}: one of {', '.join(JOBS)} or module:function")
    return JOBS[name]


def measure_in_child(fn_name: str, args: dict, timeout: float | None = None) -> dict:
    """Run job `fn_name` (a key of JOBS) in a fresh Python process; returns its wall seconds (the
    work, after imports and setup), peak RSS in MB (the child's high-water RSS, or its own
    children's ru_maxrss if higher; see `_child`) and whatever the job reports. The child's
    output (logs, progress) passes through."""
    resolve_job(fn_name)  # an unknown job fails here, not in the child
    with tempfile.TemporaryDirectory(prefix="smelt-bench-") as d:
        out = Path(d) / "result.json"
        code = f"from bench.etl import _child; _child({fn_name!r}, {json.dumps(args)!r}, {str(out)!r})"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO_ROOT, env=env, timeout=timeout)
        if proc.returncode or not out.exists():
            raise RuntimeError(f"benchmark job {fn_name} failed (exit code {proc.returncode}); its output is above")
        return json.loads(out.read_text())


# ---- the benchmark ------------------------------------------------------------------------------


def run_etl_benchmark(rows: int = 1_000_000, workdir: str | Path | None = None, seed: int = 0, config: str = "tiny-cpu",
                      max_tokens: int = DEFAULT_MAX_TOKENS, keep_dataset: bool = False, profile: str | None = None,
                      echo=print) -> dict:
    """Write (or reuse) the input file, then load it with pandas and ingest it with smelt, each in
    its own child process; returns the table's numbers and writes them to workdir/etl-benchmark.json.

    smelt runs `build_dataset` (plan -> ingest the shards on threads -> merge) with the preset's
    tokenizer, chat template and ETL settings, except sources (the file) and max_tokens (the
    preset's limit is far below a 1 KB row); its home is fresh every run. `profile`: a path where
    the smelt job writes cProfile stats (read them with pstats; the profiler slows the job)."""
    workdir = Path(workdir or smelt_home() / "bench" / "etl").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"chat-{rows}-seed{seed}.jsonl"
    if bench_file_ready(path, rows, seed):
        echo(f"reusing {path}")
    else:
        write_bench_file(path, rows, seed)
    file_mb = path.stat().st_size / 2**20

    tok = measure_in_child("tokenizer", {"home": str(workdir / "tokenizer-home"), "config": config})
    home = workdir / "home"
    shutil.rmtree(home, ignore_errors=True)  # fresh: no plan cache, no finished version to return at once
    echo(f"pandas.read_json(lines=True) on {path.name} ({file_mb:.0f} MB, {rows} rows) ...")
    pandas = measure_in_child("pandas", {"path": str(path)})
    echo(f"smelt build_dataset on the same file (home {home}) ...")
    smelt = measure_in_child("smelt", {"path": str(path), "home": str(home), "config": config, "max_tokens": max_tokens,
                                       "tokenizer": tok["tokenizer"], "chat_template": tok["chat_template"],
                                       "profile": profile})
    if not keep_dataset:
        shutil.rmtree(home, ignore_errors=True)
    for r in (pandas, smelt):
        r["rows_per_s"] = rows / r["seconds"]
    result = {
        "rows": rows, "seed": seed, "file": str(path), "file_mb": file_mb, "config": config, "max_tokens": max_tokens,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "pandas": pandas, "smelt": smelt,
        "ratio": {"rows_per_s": smelt["rows_per_s"] / pandas["rows_per_s"],
                  "peak_rss": smelt["peak_rss_mb"] / pandas["peak_rss_mb"]},
    }
    (workdir / "etl-benchmark.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def table_rows(result: dict) -> list[list[str]]:
    """[header, pandas, smelt, ratio] cells of the summary table."""
    rows, mb = result["rows"], result["file_mb"]
    cells = [["job", "rows", "file MB", "seconds", "rows/s", "peak RSS MB", "RSS at start MB"]]
    for name, label in (("pandas", "pandas.read_json(lines=True)"), ("smelt", "smelt build_dataset")):
        r = result[name]
        cells.append([label, f"{rows:,}", f"{mb:,.0f}", f"{r['seconds']:,.1f}", f"{r['rows_per_s']:,.0f}",
                      f"{r['peak_rss_mb']:,.0f}", f"{r['rss_start_mb']:,.0f}"])
    ratio = result["ratio"]
    cells.append(["smelt / pandas", "", "", f"{result['smelt']['seconds'] / result['pandas']['seconds']:.2f}x",
                  f"{ratio['rows_per_s']:.3f}x", f"{ratio['peak_rss']:.2f}x", ""])
    return cells


def format_table(result: dict) -> str:
    cells = table_rows(result)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells)


if __name__ == "__main__":  # python -m bench.etl [ROWS] [WORKDIR]
    res = run_etl_benchmark(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000, sys.argv[2] if len(sys.argv) > 2 else None)
    print(format_table(res))
    print(json.dumps(res["smelt"]["counts"]))
