"""ETL input side: every input format and every record shape comes out as the same canonical chat rows.

Each test writes small real files, runs the real `build_dataset` with the tiny test tokenizer and
checks the rows it publishes (content, file position, split, token count) and the manifest.
"""
import csv
import gzip
import hashlib
import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import EtlConfig
from tasks.data.formats import DataError, base_suffix, detect_format, plan_source, read_records
from tasks.data.quality import ngram_hashes, row_id, split_of
from tasks.data.shapes import detect_shape, normalise
from tasks.etl import build_dataset, load_tokenizer

EVAL_FRACTION = 0.3
MAX_TOKENS = 256
FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates", "kiwis", "mangos", "grapes", "melons", "lemons", "cherries"]


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def build(tmp_path, tiny_model_dir):
    """Run the real ETL on sources under a fresh home, with the tiny tokenizer."""
    def run(*sources, **settings):
        settings = {"max_tokens": MAX_TOKENS, "eval_fraction": EVAL_FRACTION, **settings}
        cfg = EtlConfig(sources=[str(s) for s in sources], **settings)
        return build_dataset(cfg, tmp_path / "home", str(tiny_model_dir))
    return run


def pc_records(n: int = 12, start: int = 0) -> list[dict]:
    return [{"prompt": f"Order {i}: how many {FRUITS[i % 12]} did the customer ask for?",
             "completion": f"{i + 2} {FRUITS[i % 12]}"} for i in range(start, start + n)]


def pc_messages(rec: dict) -> list[dict]:
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def write_jsonl(path, rows, *, newline="\n"):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + newline for r in rows),
                    encoding="utf-8", newline="")
    return path


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def count_tokens(model_dir, messages) -> int:
    tok = load_tokenizer(str(model_dir), None)
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def kept(ds) -> dict[int, dict]:
    """Kept rows of both splits by their file position."""
    rows = ds.rows("train") + ds.rows("eval")
    by_pos = {r["position"]: r for r in rows}
    assert len(by_pos) == len(rows), "two kept rows claim the same position"
    return by_pos


def assert_canonical(ds, expected: dict[int, list[dict]], source: str, model_dir) -> None:
    """The dataset holds exactly `expected` (position -> messages) from `source`, in canonical form,
    each row in the split its content hash picks, with its true token count."""
    rows = kept(ds)
    assert {p: r["messages"] for p, r in rows.items()} == expected
    for r in rows.values():
        users = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert r["source"] == source
        assert r["prompt"] == (users[-1] if users else "")
        assert r["completion"] == r["messages"][-1]["content"] and r["messages"][-1]["role"] == "assistant"
        assert r["id"] == row_id(r["messages"])
        assert r["tokens"] == count_tokens(model_dir, r["messages"])
    for split in ("train", "eval"):
        assert all(split_of(r["messages"], EVAL_FRACTION) == split for r in ds.rows(split))
    want_eval = sum(split_of(m, EVAL_FRACTION) == "eval" for m in expected.values())
    assert (ds.counts["eval"], ds.counts["train"]) == (want_eval, len(expected) - want_eval)
    assert ds.counts["rows_in"] == ds.counts["kept"] + ds.counts["quarantined"] + ds.counts["duplicates"] \
        + ds.counts["near_duplicates"] + ds.counts["contaminated"]


def quarantine(ds) -> list[dict]:
    return [json.loads(line) for line in (ds.path / "quarantine.jsonl").read_text().splitlines()]


def test_sample_records_fill_both_splits():
    # Precondition of the tests below: a dataset with an empty split is refused.
    assert {split_of(pc_messages(r), EVAL_FRACTION) for r in pc_records()} == {"train", "eval"}


# ---- input formats ---------------------------------------------------------------------------


def test_jsonl_rows_come_out_canonical_with_line_numbers(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = write_jsonl(tmp_path / "orders.jsonl", recs[:6] + [""] + recs[6:])  # a blank line still counts as a line
    ds = build(src)
    expected = {i + 1: pc_messages(r) for i, r in enumerate(recs[:6])} | {i + 8: pc_messages(r) for i, r in enumerate(recs[6:])}
    assert_canonical(ds, expected, str(src), tiny_model_dir)
    assert (ds.counts["rows_in"], ds.counts["kept"], ds.counts["quarantined"]) == (12, 12, 0)
    assert ds.manifest["sources"][0]["format"] == "jsonl"


def test_jsonl_with_bom_and_crlf_line_endings(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = tmp_path / "windows.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in recs).encode())
    ds = build(src)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)


def test_json_array_rows_are_numbered_by_row(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = tmp_path / "orders.json"
    src.write_text(json.dumps(recs, indent=2))
    ds = build(src)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)
    assert ds.manifest["sources"][0]["format"] == "json"


def test_json_array_with_utf8_bom_is_read(build, tmp_path, tiny_model_dir):
    # Windows tools write a BOM before the '['; the sniffer sees through it, so the reader must too.
    recs = pc_records()
    src = tmp_path / "bom.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    ds = build(src)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)


def test_json_suffix_holding_json_lines_is_read_as_jsonl(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = write_jsonl(tmp_path / "export.json", recs)
    assert detect_format(str(src)) == "jsonl"
    ds = build(src)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)
    assert ds.manifest["sources"][0]["format"] == "jsonl"


def test_csv_with_quoted_commas_and_multiline_cells_keeps_true_line_numbers(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    recs[2] = {"prompt": "Order 2: pears, plums and figs,\nall in one box?", "completion": "3 items, boxed"}
    src = write_csv(tmp_path / "orders.csv", ["prompt", "completion"], [[r["prompt"], r["completion"]] for r in recs])
    ds = build(src)
    # header is line 1; the two-line cell of record 3 pushes every later record down one line
    expected = {(i + 2 if i <= 2 else i + 3): pc_messages(r) for i, r in enumerate(recs)}
    assert_canonical(ds, expected, str(src), tiny_model_dir)
    assert ds.manifest["sources"][0]["format"] == "csv"


def test_tsv(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = write_csv(tmp_path / "orders.tsv", ["prompt", "completion"], [[r["prompt"], r["completion"]] for r in recs], "\t")
    ds = build(src)
    assert_canonical(ds, {i + 2: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)
    assert ds.manifest["sources"][0]["format"] == "tsv"


def test_csv_cell_holding_a_json_list_of_messages(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = write_csv(tmp_path / "chat.csv", ["messages"], [[json.dumps(pc_messages(r))] for r in recs])
    ds = build(src)
    assert_canonical(ds, {i + 2: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)
    assert ds.manifest["sources"][0]["record_shape"] == "chat"


def test_parquet_split_by_row_groups_numbers_rows_across_shards(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    recs[9] = {"prompt": "Order 9: how many melons?", "completion": None}
    src = tmp_path / "orders.parquet"
    pq.write_table(pa.Table.from_pylist(recs), src, row_group_size=4)
    ds = build(src, shard_mb=1e-6)  # one shard per row group
    assert ds.manifest["sources"][0]["shards"] == 3
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs) if i != 9}, str(src), tiny_model_dir)
    assert quarantine(ds) == [{"file": str(src), "row": 10, "reason": "missing field 'completion'", "record": recs[9]}]


def test_parquet_of_chat_messages(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": pc_messages(r)} for r in recs]), src)
    ds = build(src)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)


def test_datasets_folder(build, tmp_path, tiny_model_dir):
    import datasets

    recs = pc_records()
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(recs).save_to_disk(str(folder))
    ds = build(folder)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(folder), tiny_model_dir)
    assert ds.manifest["sources"][0]["format"] == "hf"


def test_datasets_dict_folder_reads_every_split_in_name_order(build, tmp_path, tiny_model_dir):
    import datasets

    recs = pc_records()
    folder = tmp_path / "hfdict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs[:8]),
                          "test": datasets.Dataset.from_list(recs[8:])}).save_to_disk(str(folder))
    ds = build(folder)
    ordered = recs[8:] + recs[:8]  # "test" sorts before "train"
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(ordered)}, str(folder), tiny_model_dir)


CORPUS = ("The warehouse opens at six.\nTrucks queue at the east gate.\n\n"
          "Apples arrive on Mondays.   \n\n\n"
          "Pears arrive on Tuesdays.\n"
          "Plums come on Wednesdays and figs on Thursdays.\n\n"
          "Limes are counted by the crate.\n")


@pytest.mark.parametrize("unit, expected", [
    ("paragraph", {1: "The warehouse opens at six.\nTrucks queue at the east gate.", 4: "Apples arrive on Mondays.",
                   7: "Pears arrive on Tuesdays.\nPlums come on Wednesdays and figs on Thursdays.",
                   10: "Limes are counted by the crate."}),
    ("line", {1: "The warehouse opens at six.", 2: "Trucks queue at the east gate.", 4: "Apples arrive on Mondays.",
              7: "Pears arrive on Tuesdays.", 8: "Plums come on Wednesdays and figs on Thursdays.",
              10: "Limes are counted by the crate."}),
])
def test_plain_text_corpus_by_paragraph_or_line(build, tmp_path, tiny_model_dir, unit, expected):
    src = tmp_path / "notes.txt"
    src.write_text(CORPUS)
    messages = {p: [{"role": "assistant", "content": t}] for p, t in expected.items()}
    assert {split_of(m, 0.5) for m in messages.values()} == {"train", "eval"}  # precondition
    ds = build(src, text_unit=unit, eval_fraction=0.5)
    rows = kept(ds)
    assert {p: r["messages"] for p, r in rows.items()} == messages
    assert all(r["prompt"] == "" and r["completion"] == expected[p] for p, r in rows.items())
    assert ds.manifest["sources"][0]["record_shape"] == "text"


def test_plain_text_files_one_record_each(build, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = {f"doc{i:02d}.txt": f"Delivery note {i}.\n\nThe {FRUITS[i]} left the depot on day {i}.\n" for i in range(10)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    ds = build(folder, text_unit="file", eval_fraction=0.5)
    assert {(r["source"], r["position"]): r["completion"] for r in ds.rows("train") + ds.rows("eval")} == \
        {(str(folder / name), 1): text.strip() for name, text in texts.items()}


def test_gzip_compressed_jsonl(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = tmp_path / "orders.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    ds = build(src, shard_mb=1e-4)  # a compressed stream is never cut
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)
    assert (ds.manifest["sources"][0]["format"], ds.manifest["sources"][0]["shards"]) == ("jsonl", 1)
    # the manifest names the file as stored: its hash is what `sha256sum orders.jsonl.gz` prints
    assert ds.manifest["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert ds.manifest["sources"][0]["bytes"] == src.stat().st_size


def test_tsv_cells_are_taken_literally_quotes_included(build, tmp_path):
    src = tmp_path / "quotes.tsv"
    src.write_text("prompt\tcompletion\n" + "".join(f'Say "{w}" twice\t"{w}" "{w}"\n' for w in FRUITS), encoding="utf-8")
    ds = build(src)
    assert sorted(r["completion"] for r in ds.rows("train") + ds.rows("eval")) == sorted(f'"{w}" "{w}"' for w in FRUITS)


def test_datasets_folder_inside_a_folder_source_is_read_as_a_dataset(build, tmp_path, tiny_model_dir):
    import datasets

    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", pc_records(6))
    datasets.Dataset.from_list(pc_records(6, start=6)).save_to_disk(str(folder / "hfsub"))
    ds = build(folder)
    assert ds.counts["quarantined"] == 0 and ds.counts["rows_in"] == 12  # not its JSON metadata read as rows
    assert [(s["uri"], s["format"]) for s in ds.manifest["sources"]] == [(str(folder / "a.jsonl"), "jsonl"),
                                                                        (str(folder / "hfsub"), "hf")]
    assert sorted(r["prompt"] for r in ds.rows("train") + ds.rows("eval")) == sorted(r["prompt"] for r in pc_records(12))


def test_folder_of_mixed_files_skips_hidden_and_unknown_ones(build, tmp_path, tiny_model_dir):
    recs = pc_records(18)
    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    a = write_jsonl(folder / "a.jsonl", recs[:6])
    b = write_csv(folder / "b.csv", ["instruction", "input", "output"], [[r["prompt"], "", r["completion"]] for r in recs[6:12]])
    c = folder / "sub" / "c.json"
    c.write_text(json.dumps([{"messages": pc_messages(r)} for r in recs[12:]]))
    (folder / ".hidden.jsonl").write_bytes(b"\xff\xfe not even UTF-8")  # would stop the run if read
    (folder / "_tmp.jsonl").write_text("{half a row")
    (folder / "notes.xml").write_text("<not-data/>")
    ds = build(folder)
    srcs = ds.manifest["sources"]
    assert [(s["uri"], s["format"], s["record_shape"]) for s in srcs] == [
        (str(a), "jsonl", "prompt-completion"), (str(b), "csv", "alpaca"), (str(c), "json", "chat")]
    got = {(r["source"], r["position"]): r["messages"] for r in ds.rows("train") + ds.rows("eval")}
    expected = ({(str(a), i + 1): pc_messages(r) for i, r in enumerate(recs[:6])}
                | {(str(b), i + 2): pc_messages(r) for i, r in enumerate(recs[6:12])}
                | {(str(c), i + 1): pc_messages(r) for i, r in enumerate(recs[12:])})
    assert got == expected
    assert (ds.counts["rows_in"], ds.counts["quarantined"]) == (18, 0)


def test_file_uri_source(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = write_jsonl(tmp_path / "orders.jsonl", recs)
    uri = f"file://{src}"
    ds = build(uri)
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, uri, tiny_model_dir)
    assert ds.manifest["sources"][0]["uri"] == uri


def test_file_uri_folder_lists_file_uris(build, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "one.jsonl", pc_records(6))
    write_jsonl(folder / "two.jsonl", pc_records(6, start=6))
    ds = build(f"file://{folder}")
    assert [s["uri"] for s in ds.manifest["sources"]] == [f"file://{folder}/one.jsonl", f"file://{folder}/two.jsonl"]
    assert ds.counts["kept"] == 12


def test_fsspec_memory_uri_source(build, tiny_model_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    uri = f"memory://smelt-test-{uuid.uuid4().hex}/orders.jsonl"
    recs = pc_records()
    with fsspec.open(uri, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    try:
        ds = build(uri, shard_mb=1e-4)  # remote files are cut into shards too
        assert ds.manifest["sources"][0]["shards"] > 1
        assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, uri, tiny_model_dir)
    finally:
        fs.rm(uri)


def test_explicit_format_reads_a_file_with_an_unknown_suffix(build, tmp_path, tiny_model_dir):
    recs = pc_records()
    src = write_jsonl(tmp_path / "orders.dat", recs)
    with pytest.raises(DataError, match=r"unknown format of input file .*orders\.dat \(suffix '\.dat'\)"):
        build(src)
    ds = build(src, format="jsonl")
    assert_canonical(ds, {i + 1: pc_messages(r) for i, r in enumerate(recs)}, str(src), tiny_model_dir)


# ---- record shapes ---------------------------------------------------------------------------


def shape_case(shape: str, i: int) -> tuple[dict, list[dict]]:
    """(record of `shape`, its canonical messages) for sample i: odd samples use the optional parts
    (system prompt, alpaca input), even ones leave them out."""
    fruit, n = FRUITS[i % 12], i + 2
    q, a = f"Order {i}: how many {fruit} were asked for?", f"{n} {fruit}"
    sys = "You read orders."
    user, answer = {"role": "user", "content": q}, {"role": "assistant", "content": a}
    if shape == "prompt-completion":
        if i % 2:
            return {"system": sys, "prompt": q, "completion": a}, [{"role": "system", "content": sys}, user, answer]
        return {"prompt": q, "completion": a}, [user, answer]
    if shape == "alpaca":
        if i % 2:
            ask, note = "How many items does the note ask for?", f"Customer note {i}: please send {fruit}."
            return {"instruction": ask, "input": note, "output": a}, [{"role": "user", "content": f"{ask}\n\n{note}"}, answer]
        return {"instruction": q, "input": "", "output": a}, [user, answer]
    turns = [("system", sys), ("user", f"Hello, order {i} please."), ("assistant", "Which fruit?"), ("user", q), ("assistant", a)]
    messages = [{"role": r, "content": c} for r, c in turns]
    if shape == "chat":
        return {"messages": messages}, messages
    if shape == "sharegpt":
        speaker = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": speaker[r], "value": c} for r, c in turns]}, messages
    text = f"Order {i} asked for {n} {fruit} and was shipped on day {i + 1}."
    return {"text": text}, [{"role": "assistant", "content": text}]


SHAPES = ["prompt-completion", "alpaca", "chat", "sharegpt", "text"]


@pytest.mark.parametrize("shape", SHAPES)
def test_record_shape_is_detected_and_mapped_to_chat_messages(build, tmp_path, tiny_model_dir, shape):
    cases = [shape_case(shape, i) for i in range(12)]
    assert {split_of(m, EVAL_FRACTION) for _, m in cases} == {"train", "eval"}  # precondition
    assert all(detect_shape(rec) == shape for rec, _ in cases)
    src = write_jsonl(tmp_path / f"{shape}.jsonl", [rec for rec, _ in cases])
    ds = build(src)
    assert_canonical(ds, {i + 1: m for i, (_, m) in enumerate(cases)}, str(src), tiny_model_dir)
    assert ds.manifest["sources"][0]["record_shape"] == shape


def test_explicit_record_shape_overrides_detection(build, tmp_path, tiny_model_dir):
    # Each row carries both a prompt/completion pair and a raw `text`; detection picks the pair.
    recs = [{**r, "text": f"Raw log line {i}: {r['prompt']} -> {r['completion']}"} for i, r in enumerate(pc_records())]
    src = write_jsonl(tmp_path / "both.jsonl", recs)
    auto = build(src)
    assert auto.manifest["sources"][0]["record_shape"] == "prompt-completion"
    assert {r["position"]: r["messages"] for r in auto.rows("train") + auto.rows("eval")} == \
        {i + 1: pc_messages(r) for i, r in enumerate(recs)}
    forced = build(src, record_shape="text")
    assert forced.version != auto.version
    assert forced.manifest["sources"][0]["record_shape"] == "text"
    assert {r["position"]: r["messages"] for r in forced.rows("train") + forced.rows("eval")} == \
        {i + 1: [{"role": "assistant", "content": r["text"]}] for i, r in enumerate(recs)}


def test_explicit_record_shape_quarantines_rows_without_its_fields(build, tmp_path):
    recs = [shape_case("alpaca", i)[0] for i in range(12)]
    src = write_jsonl(tmp_path / "mixed.jsonl", recs + [{"prompt": "Order 99: how many figs?", "completion": "1 fig"}])
    with pytest.raises(DataError, match="mixes record shapes: line 1 is alpaca, line 13 is prompt-completion"):
        build(src)
    ds = build(src, record_shape="alpaca")
    assert ds.counts["kept"] == 12
    assert [(q["line"], q["reason"]) for q in quarantine(ds)] == [(13, "missing field 'instruction'")]


# ---- planning and normalisation, directly ----------------------------------------------------


@pytest.mark.parametrize("name, suffix", [("a.jsonl", ".jsonl"), ("a.jsonl.gz", ".jsonl"), ("s3://b/x/a.CSV", ".csv"),
                                          ("a.csv.bz2", ".csv"), ("README", ""), ("dir/", "")])
def test_base_suffix_looks_through_compression(name, suffix):
    assert base_suffix(name) == suffix


def test_jsonl_plan_cuts_after_newlines_and_knows_each_shards_first_line(tmp_path):
    lines = [json.dumps({"prompt": f"row {i} " + "x" * (i * 7 % 50), "completion": "y"}) for i in range(60)]
    lines[17] = ""  # blank lines count
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines) + "\n")
    data = src.read_bytes()
    plan = plan_source(str(src), "jsonl", 400)
    assert plan.sha256 == hashlib.sha256(data).hexdigest() and plan.size == len(data)
    assert len(plan.shards) > 5
    assert plan.shards[0].start == 0 and plan.shards[-1].end is None
    for prev, nxt in zip(plan.shards, plan.shards[1:]):
        assert prev.end == nxt.start and data[nxt.start - 1:nxt.start] == b"\n"
        assert nxt.first == data[:nxt.start].count(b"\n") + 1
    # read back shard by shard: every non-blank line exactly once, at its true line number
    got = [(pos, rec) for s in plan.shards for pos, rec, _ in read_records(s)]
    assert got == [(i + 1, json.loads(line)) for i, line in enumerate(lines) if line]


def test_plans_are_cached_and_a_changed_file_is_planned_again(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", pc_records())
    cache = tmp_path / "plans"
    first = plan_source(str(src), "jsonl", 1 << 20, cache)
    assert len(list(cache.iterdir())) == 1 and plan_source(str(src), "jsonl", 1 << 20, cache) == first
    write_jsonl(src, pc_records(12, start=1))  # new content: a new plan with a new hash
    assert plan_source(str(src), "jsonl", 1 << 20, cache).sha256 != first.sha256


def test_normalise():
    assert normalise("Cafe\u0301") == "Caf\u00e9"  # NFC
    assert normalise("a\r\nb\rc") == "a\nb\nc"
    assert normalise("zero\u200bwidth\u200c\u200d\u2060\ufeff joiners") == "zerowidth joiners"
    assert normalise("trailing   \nspaces\t\n") == "trailing\nspaces"
    assert normalise("  lead and end  ") == "lead and end"
    assert normalise("a\n\n\n\n\nb") == "a\n\nb"
    assert normalise("no\u00a0break\x07bell") == "no breakbell"


def test_split_follows_the_prompt_and_holds_out_about_the_eval_fraction():
    prompts = [f"Order {i}: how many figs?" for i in range(4000)]
    splits = [split_of([{"role": "user", "content": p}, {"role": "assistant", "content": "1 fig"}], 0.3) for p in prompts]
    assert abs(splits.count("eval") / len(splits) - 0.3) < 0.025
    # the answer never decides: one prompt never sits in both splits
    assert all(split_of([{"role": "user", "content": p}, {"role": "assistant", "content": f"{i} figs"}], 0.3) == sp
               for i, (p, sp) in enumerate(zip(prompts[:300], splits)))
    # a raw text row has no prompt: its whole text decides
    texts = [split_of([{"role": "assistant", "content": f"Note {i}."}], 0.5) for i in range(200)]
    assert 60 < texts.count("eval") < 140


def test_ngram_windows_never_span_two_rows():
    hashes, rows = ngram_hashes(["one two three", "four five six seven", "eight"], 4)
    assert list(rows) == [1]  # only the second row has four words
    again, _ = ngram_hashes(["Four, five; SIX seven!"], 4)
    assert list(again) == list(hashes)  # case and punctuation do not matter
