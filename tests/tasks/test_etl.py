"""The ETL stage end to end: bad input, normalisation and deduplication, contamination, the stable
split and version id, sharding, the manifest, and the shipped sample data.

Every test runs the real `build_dataset` on small files it writes, with the tiny test tokenizer.
"""
import hashlib
import json
import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import REPO_ROOT, EtlConfig, load_config
from tasks.data.quality import row_id, split_of
from tasks.etl import DataError, build_dataset, load_tokenizer, prepare_tokenizer

EVAL_FRACTION = 0.3
MAX_TOKENS = 256
FRUITS = ["apples", "pears", "plums", "figs", "limes", "dates", "kiwis", "mangos", "grapes", "melons", "lemons", "cherries"]
TURN_ORDER = "(optional system first, then user/assistant turns, ending with assistant)"
NO_SHAPE = ("no field of a known record shape (prompt/completion, instruction/output, messages, conversations, text, "
            "chosen/rejected)")


# ---- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def build(home, tiny_model_dir):
    """Run the real ETL on sources under `home`, with the tiny tokenizer."""
    def run(*sources, chat_template=None, **settings):
        settings = {"max_tokens": MAX_TOKENS, "eval_fraction": EVAL_FRACTION, **settings}
        cfg = EtlConfig(sources=[str(s) for s in sources], **settings)
        return build_dataset(cfg, home, str(tiny_model_dir), chat_template)
    return run


def record(shape: str, i: int) -> dict:
    """Good sample record i of a record shape."""
    fruit = FRUITS[i % 12]
    q, a = f"Order {i}: how many {fruit} did the customer ask for?", f"{i + 2} {fruit}"
    if shape == "pc":
        return {"prompt": q, "completion": a}
    if shape == "alpaca":
        return {"instruction": q, "input": "", "output": a}
    if shape == "chat":
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if shape == "sharegpt":
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    return {"text": f"Order {i} asked for {i + 2} {fruit} and shipped on day {i + 1}."}


def pc(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


def messages_of(rec: dict) -> list[dict]:
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def write_lines(path, rows):
    """JSONL: dicts and lists are dumped, strings written as they are (bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def count_tokens(model_dir, messages) -> int:
    tok = load_tokenizer(str(model_dir), None)
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def all_rows(ds) -> list[dict]:
    return ds.rows("train") + ds.rows("eval")


def assert_rows_add_up(counts: dict) -> None:
    assert counts["rows_in"] == (counts["kept"] + counts["quarantined"] + counts["duplicates"]
                                 + counts["near_duplicates"] + counts["contaminated"])
    assert counts["kept"] == counts["train"] + counts["eval"]


def assert_no_dataset(home) -> None:
    """A failed run leaves nothing that looks like a finished dataset version."""
    assert list(home.glob("datasets/*/manifest.json")) == []
    assert list(home.glob("datasets/*/train.parquet")) == []


def test_sample_records_fill_both_splits():
    # Precondition of the tests below: a dataset with an empty split is refused.
    for shape in ("pc", "text"):
        recs = [record(shape, i) for i in range(12)]
        msgs = [messages_of(r) if shape == "pc" else [{"role": "assistant", "content": r["text"]}] for r in recs]
        assert {split_of(m, EVAL_FRACTION) for m in msgs} == {"train", "eval"}


# ---- 1. bad input: whole files ---------------------------------------------------------------


def not_utf8_jsonl(tmp_path):
    src = tmp_path / "latin1.jsonl"
    good = "".join(json.dumps(record("pc", i)) + "\n" for i in range(2)).encode()
    src.write_bytes(good + b'{"prompt": "caf\xe9 order", "completion": "1"}\n')
    return [src], src, r"is not UTF-8 text \(line 3, byte 15 of the line\)"


def not_utf8_csv(tmp_path):
    src = tmp_path / "latin1.csv"
    src.write_bytes(b"prompt,completion\nOrder 1: how many figs?,3 figs\ncaf\xe9 order,1\n")
    return [src], src, r"is not UTF-8 text \(near line"


def not_utf8_text(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"A fine paragraph.\n\nna\xefve caf\xe9\n")
    return [src], src, r"is not UTF-8 text \(line 3, byte 2 of the line\)"


def missing_file(tmp_path):
    src = tmp_path / "nowhere.jsonl"
    return [src], src, "does not exist"


def empty_file(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    return [src], src, "is empty"


def blank_file(tmp_path):
    src = tmp_path / "blank.csv"
    src.write_text("\n \n\t\n")
    return [src], src, "is empty"


def unknown_suffix(tmp_path):
    src = tmp_path / "orders.xml"
    src.write_text("<orders/>")
    return [src], src, r"unknown format of input file .* \(suffix '\.xml'\): pass --format"


def mixed_shapes(tmp_path):
    src = write_lines(tmp_path / "mixed.jsonl", [record("pc", 0), record("pc", 1), record("alpaca", 2), record("pc", 3)])
    return [src], src, "mixes record shapes: line 1 is prompt-completion, line 3 is alpaca"


def broken_json_array(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text(json.dumps([record("pc", i) for i in range(5)])[:-20])
    return [src], src, "is not a valid JSON array"


def broken_parquet(tmp_path):
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"PAR1 this is not really parquet")
    return [src], src, "is not a readable Parquet file"


def broken_datasets_folder(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "dataset_info.json").write_text("{}")
    (src / "state.json").write_text("{not json")
    return [src], src, "is not a readable `datasets` folder"


def folder_without_known_files(tmp_path):
    src = tmp_path / "inbox"
    src.mkdir()
    (src / "notes.xml").write_text("<a/>")
    (src / ".hidden.jsonl").write_text(json.dumps(record("pc", 0)) + "\n")
    return [src], src, r"no input file in \["


def unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file anyway")
    src = write_lines(tmp_path / "locked.jsonl", [record("pc", i) for i in range(12)])
    src.chmod(0)
    return [src], src, "cannot be read"


FILE_ERRORS = [missing_file, unreadable_file, not_utf8_jsonl, not_utf8_csv, not_utf8_text, empty_file, blank_file,
               unknown_suffix, mixed_shapes, broken_json_array, broken_parquet, broken_datasets_folder,
               folder_without_known_files]


@pytest.mark.parametrize("case", FILE_ERRORS, ids=[f.__name__ for f in FILE_ERRORS])
def test_unusable_file_stops_the_run_naming_it(build, home, tmp_path, case):
    sources, named, message = case(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        build(*sources)
    assert str(named) in str(err.value)
    assert_no_dataset(home)


def test_a_good_file_beside_a_bad_one_does_not_make_a_dataset(build, home, tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [record("pc", i) for i in range(12)])
    bad = tmp_path / "zz-bad.jsonl"
    bad.write_bytes(b'{"prompt": "x", "completion": "\xff"}\n')
    with pytest.raises(DataError, match="zz-bad.jsonl is not UTF-8"):
        build(good, bad)
    assert_no_dataset(home)
    bad.write_text(json.dumps(pc("Order 77: how many figs?", "9 figs")) + "\n")  # fixed: the run now succeeds
    ds = build(good, bad)
    assert ds.counts["kept"] == 13 and (ds.path / "manifest.json").exists()


def test_every_row_rejected_is_an_error_not_an_empty_dataset(build, home, tmp_path):
    src = write_lines(tmp_path / "junk.jsonl", ["{oops", {"prompt": 1, "completion": 2}])
    with pytest.raises(DataError, match=r"after validation the dataset has 0 train and 0 eval rows"):
        build(src)
    assert_no_dataset(home)


def test_empty_folder_beside_a_file_is_skipped(build, tmp_path):
    empty = tmp_path / "watched"
    empty.mkdir()
    src = write_lines(tmp_path / "in.jsonl", [record("pc", i) for i in range(12)])
    ds = build(src, empty)
    assert ds.counts["kept"] == 12 and [s["uri"] for s in ds.manifest["sources"]] == [str(src)]


# ---- 1. bad input: single rows ---------------------------------------------------------------

# (id, base shape of the file, the bad line at line 5, quarantine reason)
ROW_ERRORS = [
    ("malformed-json", "pc", '{"prompt": "Order 5", "completion": }', "malformed JSON: Expecting value at column 37"),
    ("unclosed-json", "pc", '{"prompt": "Order 5"', "malformed JSON: Expecting ',' delimiter at column 21"),
    ("missing-field", "pc", {"prompt": "Order 5: how many figs?"}, "missing field 'completion'"),
    ("null-field", "pc", {"prompt": None, "completion": "3 figs"}, "missing field 'prompt'"),
    ("int-not-string", "pc", {"prompt": 5, "completion": "3 figs"}, "field 'prompt' is a number, not a string"),
    ("list-not-string", "pc", {"prompt": "Order 5", "completion": ["3", "figs"]}, "field 'completion' is a list, not a string"),
    ("empty-after-normalising", "pc", {"prompt": " \u200b\r\n\t\u00a0", "completion": "3 figs"}, "field 'prompt' is empty"),
    ("row-is-a-list", "pc", ["Order 5: how many figs?", "3 figs"], "row is a list, not an object"),
    ("no-known-shape", "pc", {"question": "Order 5: how many figs?", "answer": "3 figs"}, NO_SHAPE),
    ("alpaca-missing-output", "alpaca", {"instruction": "Order 5: how many figs?", "input": ""}, "missing field 'output'"),
    ("alpaca-int-input", "alpaca", {"instruction": "Count", "input": 5, "output": "5"}, "field 'input' is a number, not a string"),
    ("assistant-first", "chat", {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Order 5?"},
                                              {"role": "assistant", "content": "3 figs"}]},
     f"message 1 has role 'assistant' where 'user' was expected {TURN_ORDER}"),
    ("two-user-turns", "chat", {"messages": [{"role": "user", "content": "Order 5."}, {"role": "user", "content": "How many?"},
                                             {"role": "assistant", "content": "3 figs"}]},
     f"message 2 has role 'user' where 'assistant' was expected {TURN_ORDER}"),
    ("system-in-the-middle", "chat", {"messages": [{"role": "user", "content": "Order 5?"},
                                                   {"role": "system", "content": "Be brief"},
                                                   {"role": "assistant", "content": "3 figs"}]},
     f"message 2 has role 'system' where 'assistant' was expected {TURN_ORDER}"),
    ("unknown-role", "chat", {"messages": [{"role": "user", "content": "Order 5?"}, {"role": "bot", "content": "3 figs"}]},
     "message 2 has unknown role 'bot' (system, user or assistant)"),
    ("ends-with-user", "chat", {"messages": [{"role": "user", "content": "Order 5?"}, {"role": "assistant", "content": "3 figs"},
                                             {"role": "user", "content": "Thanks"}]},
     "the last message has role 'user'; a training row must end with the assistant's answer"),
    ("message-missing-content", "chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "3 figs"}]},
     "missing field 'messages[1].content'"),
    ("message-not-an-object", "chat", {"messages": ["Order 5?", {"role": "assistant", "content": "3 figs"}]},
     "message 1 is a string, not an object"),
    ("messages-not-a-list", "chat", {"messages": {"role": "user", "content": "Order 5?"}},
     "field 'messages' is an object, not a list"),
    ("messages-empty", "chat", {"messages": []}, "field 'messages' is empty"),
    ("unknown-sharegpt-speaker", "sharegpt",
     {"conversations": [{"from": "alien", "value": "Order 5?"}, {"from": "gpt", "value": "3"}]},
     "turn 1 is from unknown speaker 'alien' (assistant, chatgpt, gpt, human, model, system, user)"),
    ("sharegpt-ends-with-human", "sharegpt", {"conversations": [{"from": "human", "value": "Order 5?"}]},
     "the last message has role 'user'; a training row must end with the assistant's answer"),
    ("sharegpt-missing-value", "sharegpt", {"conversations": [{"from": "human", "value": "Order 5?"}, {"from": "gpt"}]},
     "missing field 'conversations[2].value'"),
    ("empty-text", "text", {"text": "\u200b\u200b  \n\n  "}, "field 'text' is empty"),
]


@pytest.mark.parametrize("shape, bad, reason", [c[1:] for c in ROW_ERRORS], ids=[c[0] for c in ROW_ERRORS])
def test_bad_row_is_quarantined_with_file_line_and_reason(build, tmp_path, shape, bad, reason):
    good = [record(shape, i) for i in range(12)]
    src = write_lines(tmp_path / f"{shape}.jsonl", good[:4] + [bad] + good[4:])
    ds = build(src)
    assert quarantine_of(ds) == [{"file": str(src), "line": 5, "reason": reason,
                                  "record": bad if isinstance(bad, str) else json.loads(json.dumps(bad))}]
    assert {k: ds.counts[k] for k in ("rows_in", "kept", "quarantined", "duplicates", "near_duplicates", "contaminated")} == \
        {"rows_in": 13, "kept": 12, "quarantined": 1, "duplicates": 0, "near_duplicates": 0, "contaminated": 0}
    assert_rows_add_up(ds.counts)
    assert sorted(r["position"] for r in all_rows(ds)) == [1, 2, 3, 4] + list(range(6, 14))


def quarantine_of(ds) -> list[dict]:
    return read_jsonl(ds.path / "quarantine.jsonl")


# (id, the bad CSV line at line 5 of a prompt,completion file, quarantine reason)
CSV_ROW_ERRORS = [
    ("too-many-fields", "Order 5: how many figs?,3 figs,extra", "row has 3 fields, the header has 2"),
    ("too-few-fields", "Order 5: how many figs?", "row has 1 fields, the header has 2"),
    ("empty-cell", "Order 5: how many figs?,", "field 'completion' is empty"),
    ("blank-cell-after-normalising", '"  \u200b  ",3 figs', "field 'prompt' is empty"),
]


@pytest.mark.parametrize("line, reason", [c[1:] for c in CSV_ROW_ERRORS], ids=[c[0] for c in CSV_ROW_ERRORS])
def test_bad_csv_row_is_quarantined_with_its_line(build, tmp_path, line, reason):
    good = [f"{r['prompt']},{r['completion']}" for r in (record("pc", i) for i in range(12))]
    src = tmp_path / "orders.csv"
    src.write_text("\n".join(["prompt,completion", *good[:3], line, *good[3:]]) + "\n", encoding="utf-8")
    ds = build(src)
    [entry] = quarantine_of(ds)
    assert (entry["file"], entry["line"], entry["reason"]) == (str(src), 5, reason)
    assert entry["record"]["prompt"] == line.split(",")[0].strip('"')
    assert (ds.counts["rows_in"], ds.counts["kept"], ds.counts["quarantined"]) == (13, 12, 1)
    assert_rows_add_up(ds.counts)


def test_csv_cell_that_is_not_a_json_list_of_messages(build, tmp_path):
    rows = [json.dumps(record("chat", i)["messages"]) for i in range(12)]
    src = tmp_path / "chat.csv"
    src.write_text("messages\n" + "".join('"' + r.replace('"', '""') + '"\n' for r in rows[:3]) + "hello there\n"
                   + "".join('"' + r.replace('"', '""') + '"\n' for r in rows[3:]))
    ds = build(src)
    assert [(q["line"], q["reason"]) for q in quarantine_of(ds)] == \
        [(5, "field 'messages' is text that is not a JSON list: Expecting value")]
    assert ds.counts["kept"] == 12


def test_bad_rows_in_json_array_and_parquet_are_located_by_row(build, tmp_path):
    recs = [record("pc", i) for i in range(12)]
    arr = tmp_path / "orders.json"
    arr.write_text(json.dumps(recs[:4] + [["a", "list"]] + recs[4:]))
    par = tmp_path / "orders.parquet"
    pq.write_table(pa.Table.from_pylist(recs[:6] + [{"prompt": "Order 6: how many?", "completion": None}] + recs[6:]), par)
    ds = build(arr, par)
    assert [(q["file"], q.get("row"), q.get("line"), q["reason"]) for q in quarantine_of(ds)] == [
        (str(arr), 5, None, "row is a list, not an object"), (str(par), 7, None, "missing field 'completion'")]
    # the same 12 records in both files: the Parquet copies are duplicates
    assert (ds.counts["rows_in"], ds.counts["quarantined"], ds.counts["duplicates"], ds.counts["kept"]) == (26, 2, 12, 12)
    assert_rows_add_up(ds.counts)
    assert {r["source"] for r in all_rows(ds)} == {str(arr)}


def test_row_over_the_token_limit_is_quarantined_with_its_count(build, tmp_path, tiny_model_dir):
    long = pc("Order 5: " + " ".join(f"{FRUITS[i % 12]} crate {i}" for i in range(12)), "12 crates")
    n = count_tokens(tiny_model_dir, messages_of(long))
    assert MAX_TOKENS > n > 2 * max(count_tokens(tiny_model_dir, messages_of(record("pc", i))) for i in range(12))
    good = [record("pc", i) for i in range(12)]
    src = write_lines(tmp_path / "in.jsonl", good[:4] + [long] + good[4:])
    at_limit = build(src, max_tokens=n)  # exactly at the limit: kept
    assert at_limit.counts["quarantined"] == 0 and next(r for r in all_rows(at_limit) if r["position"] == 5)["tokens"] == n
    over = build(src, max_tokens=n - 1)
    assert quarantine_of(over) == [{"file": str(src), "line": 5, "record": messages_of(long),
                                    "reason": f"{n} tokens with the chat template, over the limit of {n - 1} (etl.max_tokens)"}]
    assert (over.counts["rows_in"], over.counts["kept"], over.counts["quarantined"]) == (13, 12, 1)
    assert over.version != at_limit.version


def test_many_bad_rows_in_one_file_are_all_accounted_for(build, tmp_path):
    good = [record("pc", i) for i in range(12)]
    bad = ["{not json", {"prompt": "x"}, {"prompt": 3, "completion": "y"}, {"prompt": "   ", "completion": "y"},
           ["a", "list"], {"question": "?"}, "", "not json either"]
    src = write_lines(tmp_path / "in.jsonl", good[:6] + bad + good[6:] + [good[0], good[1]])
    ds = build(src)
    c = ds.counts
    assert (c["rows_in"], c["kept"], c["quarantined"], c["duplicates"]) == (21, 12, 7, 2)  # the blank line is no row
    assert_rows_add_up(c)
    assert [q["line"] for q in quarantine_of(ds)] == [7, 8, 9, 10, 11, 12, 14]
    assert ds.manifest["quarantine_reasons"] == {
        "malformed JSON: Expecting property name enclosed in double quotes at column N": 1,
        "malformed JSON: Expecting value at column N": 1,
        "missing field 'completion'": 1, "field 'prompt' is a number, not a string": 1, "field 'prompt' is empty": 1,
        "row is a list, not an object": 1, NO_SHAPE: 1}
    removed = read_jsonl(ds.path / "removed.jsonl")
    assert [(r["kind"], r["position"]) for r in removed] == [("duplicates", 21), ("duplicates", 22)]


# ---- 4. normalisation and exact duplicates ---------------------------------------------------


def test_text_is_normalised_and_rows_equal_after_normalising_are_one_duplicate(build, tmp_path):
    raw = pc("Cafe\u0301 order:\u200b how many figs?   \r\nSecond line.\u00a0\r\n", "  2 figs\t")
    clean = pc("Caf\u00e9 order: how many figs?\nSecond line.", "2 figs")
    good = [record("pc", i) for i in range(12)]
    src = write_lines(tmp_path / "in.jsonl", good + [raw, clean])
    ds = build(src)
    [row] = [r for r in all_rows(ds) if r["position"] == 13]
    assert row["messages"] == messages_of(clean) and row["prompt"] == clean["prompt"] and row["id"] == row_id(messages_of(clean))
    assert 14 not in {r["position"] for r in all_rows(ds)}
    assert read_jsonl(ds.path / "removed.jsonl") == [
        {"kind": "duplicates", "file": str(src), "position": 14, "reason": f"exact duplicate of row {row['id']}"}]
    assert (ds.counts["rows_in"], ds.counts["kept"], ds.counts["duplicates"]) == (14, 13, 1)
    assert_rows_add_up(ds.counts)


def test_duplicates_across_files_keep_the_copy_of_the_first_source(build, tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [record("pc", i) for i in range(12)])
    b = write_lines(tmp_path / "b.jsonl", [record("pc", i) for i in range(8, 16)])
    ds = build(b, a)  # sources are read in the order given
    assert ds.counts["duplicates"] == 4 and ds.counts["kept"] == 16
    assert {(r["file"], r["position"]) for r in read_jsonl(ds.path / "removed.jsonl")} == {(str(a), p) for p in (9, 10, 11, 12)}


# ---- 5. near duplicates ----------------------------------------------------------------------

VOCAB = ("truck crate depot north south east west morning evening driver ledger invoice pallet forklift harbor "
         "river bridge market orchard farmer basket wagon ramp dock shelf aisle counter clerk receipt stamp parcel "
         "label carton order route map road field barn silo mill press cellar barrel cask bottle jar lid rope knot "
         "sail anchor tide wave gull pier lamp").split()


def long_text(rng: random.Random, words: int = 120) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(words)]


def text_row(words: list[str]) -> dict:
    return {"text": " ".join(words)}


def same_split_variant(words: list[str], changes: int) -> list[str]:
    """`words` with `changes` words replaced, landing in the same split (so contamination stays out of it)."""
    want = split_of([{"role": "assistant", "content": " ".join(words)}], EVAL_FRACTION)
    for k in range(100):
        out = list(words)
        for j in range(changes):
            out[(j * 37 + 11) % len(out)] = f"zebra{k}x{j}"
        if split_of([{"role": "assistant", "content": " ".join(out)}], EVAL_FRACTION) == want:
            return out
    raise AssertionError("no variant in the same split")


def test_near_duplicate_is_removed_only_with_near_dedup(build, tmp_path):
    rng = random.Random(7)
    texts = [long_text(rng) for _ in range(12)]
    one_word = same_split_variant(texts[3], 1)  # 120 words, one changed: Jaccard of 5-word shingles ~0.92
    many_words = same_split_variant(texts[5], 12)  # one word in ten changed: not a near-duplicate
    src = write_lines(tmp_path / "corpus.jsonl", [text_row(t) for t in texts] + [text_row(one_word), text_row(many_words)])
    plain = build(src, max_tokens=4096)
    assert (plain.counts["kept"], plain.counts["near_duplicates"], plain.counts["contaminated"]) == (14, 0, 0)
    near = build(src, max_tokens=4096, near_dedup=True)
    assert near.version != plain.version
    assert (near.counts["kept"], near.counts["near_duplicates"], near.counts["rows_in"]) == (13, 1, 14)
    assert_rows_add_up(near.counts)
    original = next(r for r in all_rows(near) if r["position"] == 4)
    [entry] = read_jsonl(near.path / "removed.jsonl")
    assert (entry["kind"], entry["file"], entry["position"]) == ("near_duplicates", str(src), 13)
    assert entry["reason"] == f"near-duplicate (MinHash Jaccard >= 0.85) of row {original['id']}"
    assert entry["messages"] == [{"role": "assistant", "content": " ".join(one_word)}]
    assert 14 in {r["position"] for r in all_rows(near)}


# ---- 6. contamination ------------------------------------------------------------------------

NOTE = "the blue truck from depot {k} left the northern yard before sunrise carrying forty crates of fresh pears for market"


def first_in_split(make, split: str, fraction: float = EVAL_FRACTION) -> tuple[int, dict]:
    """The first k whose record make(k) lands in `split`."""
    for k in range(200):
        rec = make(k)
        if split_of(messages_of(rec), fraction) == split:
            return k, rec
    raise AssertionError(f"no candidate in {split}")


def test_training_row_sharing_a_long_ngram_with_eval_is_removed(build, tmp_path):
    k, held_out = first_in_split(lambda k: pc(f"Summarise the note: {NOTE.format(k=k)}.", "Forty crates of pears."), "eval")
    words = NOTE.format(k=k).split()
    assert len(words) >= 16
    # shares 14 consecutive words of the eval prompt (>= 13): contamination
    fourteen, twelve = " ".join(words[2:16]), " ".join(words[2:14])
    _, leaked = first_in_split(lambda j: pc(f"Ticket {j}: driver says {fourteen} and then stopped.", "Late."), "train")
    # shares only 12 consecutive words: a legitimate, different row
    _, near_miss = first_in_split(lambda j: pc(f"Ticket {j}: driver says {twelve} today.", "On time."), "train")
    good = [record("pc", i) for i in range(12)]
    src = write_lines(tmp_path / "in.jsonl", good + [held_out, leaked, near_miss])
    ds = build(src, contamination_ngram=13)
    train_prompts, eval_prompts = {r["prompt"] for r in ds.rows("train")}, {r["prompt"] for r in ds.rows("eval")}
    assert leaked["prompt"] not in train_prompts and near_miss["prompt"] in train_prompts
    expected_eval = {r["prompt"] for r in good + [held_out] if split_of(messages_of(r), EVAL_FRACTION) == "eval"}
    assert eval_prompts == expected_eval and held_out["prompt"] in eval_prompts  # eval untouched
    assert read_jsonl(ds.path / "removed.jsonl") == [{"kind": "contaminated", "file": str(src), "position": 14,
                                                      "reason": "shares a 13-word sequence with the eval split",
                                                      "messages": messages_of(leaked)}]
    assert (ds.counts["contaminated"], ds.counts["kept"], ds.counts["rows_in"]) == (1, 14, 15)
    assert_rows_add_up(ds.counts)
    only_exact = build(src, contamination_ngram=0)  # n-gram check off: the leaked row stays
    assert only_exact.counts["contaminated"] == 0 and leaked["prompt"] in {r["prompt"] for r in only_exact.rows("train")}


def test_training_row_with_an_eval_prompt_up_to_case_and_punctuation_is_removed(build, tmp_path):
    k, held_out = first_in_split(lambda k: pc(f"Where does order {k} ship to?", "Oslo"), "eval")
    variants = [pc(f"where does ORDER {k} ship to{p}", "Bergen") for p in ("", "!", "??", " ...", ";")]
    leaked = next(v for v in variants if split_of(messages_of(v), EVAL_FRACTION) == "train")
    src = write_lines(tmp_path / "in.jsonl", [record("pc", i) for i in range(12)] + [held_out, leaked])
    ds = build(src)
    assert [(r["kind"], r["position"], r["reason"]) for r in read_jsonl(ds.path / "removed.jsonl")] == \
        [("contaminated", 14, "same prompt as an eval row (up to case and punctuation)")]
    assert held_out["prompt"] in {r["prompt"] for r in ds.rows("eval")}


def test_rows_in_non_latin_scripts_are_not_taken_for_contamination(build, tmp_path):
    # Words of other scripts are words: rows that share no text must not collide as "the same prompt".
    towns = ["Москва", "Казань", "Самара", "Пермь", "Омск", "Томск", "Тверь", "Псков", "Курск", "Тула", "Орёл", "Сочи",
             "東京", "大阪", "京都", "札幌"]
    recs = [pc(f"Куда едет заказ {towns[i]}?", f"В город {towns[i]}") for i in range(len(towns))]
    assert {split_of(messages_of(r), EVAL_FRACTION) for r in recs} == {"train", "eval"}
    ds = build(write_lines(tmp_path / "ru.jsonl", recs), max_tokens=1024)
    assert (ds.counts["contaminated"], ds.counts["kept"]) == (0, len(recs))
    near = build(tmp_path / "ru.jsonl", max_tokens=1024, near_dedup=True)
    assert near.counts["near_duplicates"] == 0


# ---- 7. stable split and version id ----------------------------------------------------------


def test_appending_rows_never_moves_an_old_row_between_splits(build, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [record("pc", i) for i in range(20)])
    first = build(src)
    write_lines(src, [record("pc", i) for i in range(60)])
    second = build(src)
    assert second.version != first.version
    for split in ("train", "eval"):
        before, after = {r["id"] for r in first.rows(split)}, {r["id"] for r in second.rows(split)}
        assert before and before <= after
        assert all(split_of(r["messages"], EVAL_FRACTION) == split for r in second.rows(split))
    assert not {r["prompt"] for r in second.rows("eval")} & {r["prompt"] for r in second.rows("train")}
    assert second.counts["kept"] == 60


def test_same_input_twice_is_the_same_version_and_does_no_work(build, home, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [record("pc", i) for i in range(12)])
    first = build(src)
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    start = time.perf_counter()
    again = build(src)
    assert time.perf_counter() - start < 1.0
    assert (again.version, again.path, again.counts) == (first.version, first.path, first.counts)
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (home / "datasets").iterdir()) == [".plans", first.version]  # no work folder left
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content: still the same version
    assert build(src).version == first.version


def test_version_id_changes_with_content_config_and_chat_template(build, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [record("pc", i) for i in range(12)])
    base = build(src).version
    versions = {
        "eval_fraction": build(src, eval_fraction=0.4).version,
        "max_tokens": build(src, max_tokens=200).version,
        "contamination_ngram": build(src, contamination_ngram=8).version,
        "chat_template": build(src, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}").version,
    }
    write_lines(src, [record("pc", i) for i in range(1, 13)])
    versions["content"] = build(src).version
    assert base not in versions.values() and len(set(versions.values())) == len(versions)
    # runner settings are not part of the dataset
    write_lines(src, [record("pc", i) for i in range(12)])
    assert build(src, dask_workers=4).version == base


# ---- 8. sharding -----------------------------------------------------------------------------


LONG_ORDER = pc("Order 33: " + " ".join(f"{FRUITS[i % 12]} crate {i}" for i in range(40)), "40 crates")


def sharded_input(tmp_path):
    """45 lines: a blank line (11), a broken line (32), a row over the token limit (33), an exact
    duplicate (44) and a mistyped row (45) spread over what become several shards."""
    recs = [record("pc", i) for i in range(40)]
    lines = recs[:10] + [""] + recs[10:30] + ["{broken", LONG_ORDER] + recs[30:] + [recs[3], {"prompt": 7, "completion": "x"}]
    return write_lines(tmp_path / "big.jsonl", lines)


def dataset_content(ds) -> dict:
    return {"counts": ds.counts, "train": ds.rows("train"), "eval": ds.rows("eval"),
            "quarantine": sorted(quarantine_of(ds), key=lambda q: q["line"]),
            "removed": read_jsonl(ds.path / "removed.jsonl"),
            "token_lengths": ds.manifest["token_lengths"], "reasons": ds.manifest["quarantine_reasons"]}


def test_tiny_shards_give_the_same_dataset_as_one_shard(build, tmp_path, tiny_model_dir):
    src = sharded_input(tmp_path)
    n = count_tokens(tiny_model_dir, messages_of(LONG_ORDER))
    assert n > MAX_TOKENS
    whole = build_dataset(EtlConfig(sources=[str(src)], max_tokens=MAX_TOKENS, eval_fraction=EVAL_FRACTION),
                          tmp_path / "home-whole", str(tiny_model_dir))
    sharded = build(src, shard_mb=0.0005)  # about 500 bytes a shard
    assert whole.manifest["sources"][0]["shards"] == 1 and sharded.manifest["sources"][0]["shards"] >= 5
    assert sharded.version == whole.version  # how the input is cut is not part of what the data is
    content = dataset_content(sharded)
    assert content == dataset_content(whole)
    # line numbers are the file's own, also in the last shards
    assert [(q["line"], q["reason"]) for q in content["quarantine"]] == [
        (32, "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        (33, f"{n} tokens with the chat template, over the limit of {MAX_TOKENS} (etl.max_tokens)"),
        (45, "field 'prompt' is a number, not a string")]
    assert [(r["kind"], r["position"]) for r in content["removed"]] == [("duplicates", 44)]
    assert sorted(r["position"] for r in content["train"] + content["eval"]) == [*range(1, 11), *range(12, 32), *range(34, 44)]
    assert (content["counts"]["rows_in"], content["counts"]["kept"]) == (44, 40)


@pytest.mark.parametrize("name, content", [("empty.json", "[]\n"), ("header-only.csv", "prompt,completion\n")])
def test_a_file_with_no_records_is_refused_by_name_even_beside_good_files(build, home, tmp_path, name, content):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(record("pc", i)) + "\n" for i in range(20)))
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"input file {tmp_path / name} is empty"):
        build(good, tmp_path / name)
    assert_no_dataset(home)


def test_a_failed_shard_leaves_no_temporary_files(build, home, tmp_path):
    src = tmp_path / "big.jsonl"
    lines = [json.dumps(record("pc", i)).encode() for i in range(40)]
    lines[36] = b'{"prompt": "na\xefve", "completion": "1"}'
    src.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError):
        build(src, shard_mb=0.0005)
    assert not [p for p in (home / "datasets").rglob("*") if ".tmp" in p.name]


def test_bad_byte_in_a_late_shard_names_its_true_line(build, home, tmp_path):
    src = tmp_path / "big.jsonl"
    lines = [json.dumps(record("pc", i)).encode() for i in range(40)]
    lines[36] = b'{"prompt": "na\xefve", "completion": "1"}'
    src.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"big.jsonl is not UTF-8 text \(line 37, byte 14 of the line\)"):
        build(src, shard_mb=0.0005)
    assert_no_dataset(home)


def test_mixed_shapes_in_different_shards_are_refused(build, home, tmp_path):
    # 131-byte lines and 524-byte shards: four lines a shard, so no shard sees both shapes and
    # only the merge, which compares the shards' shapes, can notice.
    rows = [record("pc", i) for i in range(8)] + [record("alpaca", i) for i in range(8)]
    lines = [json.dumps(r)[:-1] + " " * (130 - len(json.dumps(r))) + "}" for r in rows]
    src = write_lines(tmp_path / "mixed.jsonl", lines)
    assert {len(line) for line in src.read_bytes().splitlines(keepends=True)} == {131}
    with pytest.raises(DataError, match="mixed.jsonl mixes record shapes: prompt-completion in one part, alpaca in another"):
        build(src, shard_mb=524 / 2**20)
    assert_no_dataset(home)


# ---- 9. manifest and files -------------------------------------------------------------------


def test_manifest_records_sources_counts_schema_lengths_and_config(build, tmp_path, tiny_model_dir):
    a = write_lines(tmp_path / "a.jsonl", [record("pc", i) for i in range(12)] + ["{broken", {"prompt": "x"}, {"prompt": "y"}])
    b = tmp_path / "b.csv"
    b.write_text("instruction,input,output\n" + "".join(f"Order {i}: count the figs,box {i},{i} figs\n" for i in range(6)))
    ds = build(a, b)
    m = ds.manifest
    assert m["version"] == ds.version and m["counts"] == ds.counts
    assert m["sources"] == [
        {"uri": str(a), "format": "jsonl", "sha256": hashlib.sha256(a.read_bytes()).hexdigest(), "bytes": a.stat().st_size,
         "shards": 1, "record_shape": "prompt-completion"},
        {"uri": str(b), "format": "csv", "sha256": hashlib.sha256(b.read_bytes()).hexdigest(), "bytes": b.stat().st_size,
         "shards": 1, "record_shape": "alpaca"}]
    assert m["schema"] == {"id": "string", "messages": "list<item: struct<role: string, content: string>>", "prompt": "string",
                           "completion": "string", "source": "string", "position": "int64", "tokens": "int32",
                           "rejected": "string"}
    assert m["quarantine_reasons"] == {"missing field 'completion'": 2, "malformed JSON: Expecting property name enclosed "
                                       "in double quotes at column N": 1}
    assert m["config"] == EtlConfig(sources=[str(a), str(b)], max_tokens=MAX_TOKENS, eval_fraction=EVAL_FRACTION).model_dump()
    assert m["tokenizer"]["source"] == str(tiny_model_dir)
    for split in ("train", "eval"):
        tokens = [r["tokens"] for r in ds.rows(split)]
        stats = m["token_lengths"][split]
        assert (stats["rows"], stats["total"]) == (ds.counts[split], sum(tokens))
        assert (stats["min"], stats["max"]) == (min(tokens), max(tokens))
        assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
        assert all(r["tokens"] == count_tokens(tiny_model_dir, r["messages"]) for r in ds.rows(split))
    assert (ds.counts["rows_in"], ds.counts["quarantined"], ds.counts["kept"]) == (21, 3, 18)
    assert (ds.path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pq.read_schema(ds.path / "train.parquet").names == ["id", "messages", "prompt", "completion", "source", "position",
                                                               "tokens", "rejected"]
    assert sorted(p.name for p in ds.path.iterdir()) == ["eval.parquet", "lengths.png", "manifest.json", "quarantine.jsonl",
                                                         "removed.jsonl", "train.parquet"]


# ---- 10. the shipped sample data -------------------------------------------------------------


def test_shipped_sample_data_is_clean(tmp_path, smelt_home):
    cfg = load_config("tiny-cpu")
    tokenizer = prepare_tokenizer(cfg.model, smelt_home)
    ds = build_dataset(cfg.etl, tmp_path / "home", tokenizer)
    c = ds.counts
    assert (c["rows_in"], c["quarantined"], c["duplicates"]) == (3000, 0, 0)
    assert c["kept"] + c["contaminated"] == 3000 and c["eval"] > 200
    assert_rows_add_up(c)
    assert json.loads(ds.rows("eval")[0]["completion"])["qty"] >= 1
    assert ds.manifest["token_lengths"]["train"]["max"] <= cfg.train.max_seq_len


def test_shipped_sample_data_is_what_its_generator_makes():
    import runpy

    gen = runpy.run_path(str(REPO_ROOT / "data" / "generate_orders.py"))
    shipped = [json.loads(line) for line in (REPO_ROOT / "data" / "orders.jsonl").read_text().splitlines()]
    assert shipped == gen["make_rows"](3000)


# ---- the data people have: typed content parts, line corpora, failures that explain ------------


def parts_record(i: int, key: str) -> dict:
    """A chat row whose contents are lists of typed parts (`key`: 'text' as OpenAI writes them, 'value'
    as another tool does), with an extra per-message key."""
    fruit = FRUITS[i % 12]
    return {"messages": [
        {"role": "user", "content": [{"type": "text", key: f"Order {i}:"}, {"type": "text", key: f"how many {fruit}?"}]},
        {"role": "assistant", "content": [{"type": "text", key: f"{i + 2} {fruit}"}], "weight": 1}]}


def test_content_given_as_typed_text_parts_is_joined_and_kept(build, tmp_path):
    rows = [parts_record(i, "text") for i in range(8)] + [parts_record(i, "value") for i in range(8, 16)]
    ds = build(write_lines(tmp_path / "parts.jsonl", rows))
    assert ds.counts["kept"] == 16 and ds.counts["quarantined"] == 0
    by_prompt = {r["prompt"]: r for r in ds.rows("train") + ds.rows("eval")}
    row = by_prompt["Order 9:\nhow many melons?"]
    assert row["completion"] == "11 melons" and [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_a_row_with_a_non_text_part_is_quarantined_naming_the_part(build, home, tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                       {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    ds = build(write_lines(tmp_path / "mixed.jsonl", [parts_record(i, "text") for i in range(12)] + [image]))
    assert ds.counts["quarantined"] == 1
    [entry] = read_jsonl(ds.path / "quarantine.jsonl")
    assert entry["line"] == 13
    assert entry["reason"] == "field 'messages[1].content' part 2 is of type 'image_url'; only text parts can be trained on"


def test_a_file_that_quarantines_everything_says_why_where_and_what_helps(build, home, tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    src = write_lines(tmp_path / "images.jsonl", [image] * 5 + [{"question": "q", "answer": "a"}] * 2)
    with pytest.raises(DataError) as err:
        build(src)
    message = str(err.value)
    assert "Of 7 rows read: 7 quarantined" in message
    lines = message.splitlines()
    top = lines.index("Top quarantine reasons:")
    assert lines[top + 1].split(None, 1) == ["5", "field 'messages[N].content' part N is of type 'image_url'; "
                                                  "only text parts can be trained on"]
    assert lines[top + 2].split(None, 1) == ["2", NO_SHAPE]
    path = message.split("Every rejected row, with its file, line and reason: ", 1)[1].splitlines()[0]
    assert [e["line"] for e in read_jsonl(Path(path))] == [1, 2, 3, 4, 5, 6, 7]
    assert "Hint: smelt trains text models" in message and "Hint: name the fields as one of the record shapes" in message
    assert "Traceback" not in message
    assert_no_dataset(home)


def test_one_document_per_line_needs_text_unit_line_and_the_error_says_so(build, home, tmp_path):
    docs = [f"Document {i} says that order {i} asked for {i + 2} {FRUITS[i % 12]} and shipped on day {i + 1} "
            f"from the {FRUITS[(i + 5) % 12]} warehouse." for i in range(40)]
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(docs) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"(?s)over the limit of N \(etl.max_tokens\).*"
                                        r"Hint: plain text is read one paragraph .* set etl.text_unit=line"):
        build(src)
    assert_no_dataset(home)
    ds = build(src, text_unit="line")
    assert ds.counts["kept"] == 40 and ds.counts["quarantined"] == 0


def test_a_file_that_loses_most_of_its_rows_gets_a_warning_with_reasons(build, tmp_path, capsys):
    rows = [record("pc", i) for i in range(12)] + [{"prompt": "q", "completion": 5}] * 13
    ds = build(write_lines(tmp_path / "half.jsonl", rows))
    assert ds.counts["kept"] == 12 and ds.counts["quarantined"] == 13
    out = capsys.readouterr().out
    assert f"warning: 13 of 25 rows of {tmp_path / 'half.jsonl'} were quarantined: 13 x field 'completion' is a number, " \
           f"not a string (all in {ds.path / 'quarantine.jsonl'})" in out


# ---- preference pairs ------------------------------------------------------------------------


def pair_record(shape: str, i: int) -> dict:
    """Preference pair i in a preference shape: the right count chosen, a wrong one rejected."""
    fruit = FRUITS[i % 12]
    q, good, bad = f"Order {i}: how many {fruit} did the customer ask for?", f"{i + 2} {fruit}", f"{i + 3} {fruit}"
    if shape == "trl":
        return {"prompt": q, "chosen": good, "rejected": bad}
    if shape == "trl-chat":
        return {"prompt": [{"role": "system", "content": "Count."}, {"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}
    if shape == "sharegpt":  # LLaMA-Factory's dpo_en_demo.json
        return {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": good},
                "rejected": {"from": "gpt", "value": bad}}
    return {"input": {"messages": [{"role": "user", "content": q}], "tools": [], "parallel_tool_calls": True},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


@pytest.mark.parametrize("shape,detected", [("trl", "preference"), ("trl-chat", "preference"),
                                            ("sharegpt", "sharegpt-preference"), ("openai", "openai-preference")])
def test_preference_files_in_every_shape_become_pairs(build, tmp_path, shape, detected):
    ds = build(write_lines(tmp_path / f"{shape}.jsonl", [pair_record(shape, i) for i in range(20)]))
    assert ds.counts["kept"] == 20 and ds.counts["quarantined"] == 0
    assert ds.manifest["sources"][0]["record_shape"] == detected
    rows = {r["position"]: r for r in ds.rows("train") + ds.rows("eval")}
    row = rows[8]  # line 8 is pair 7
    assert row["messages"][-2:] == [{"role": "user", "content": "Order 7: how many mangos did the customer ask for?"},
                                    {"role": "assistant", "content": "9 mangos"}]
    assert row["completion"] == "9 mangos" and row["rejected"] == "10 mangos"
    if shape == "trl-chat":
        assert row["messages"][0] == {"role": "system", "content": "Count."}


def test_malformed_pairs_are_quarantined_with_reasons(build, tmp_path):
    good = [pair_record("sharegpt", i) for i in range(12)]
    same = {**pair_record("sharegpt", 40), "rejected": {"from": "gpt", "value": "42 apples"}}
    same["chosen"] = {"from": "gpt", "value": "42 apples"}
    from_user = {**pair_record("sharegpt", 41), "chosen": {"from": "human", "value": "hm"}}
    no_prompt = {"conversations": [], "chosen": "a", "rejected": "b"}
    image = {**pair_record("sharegpt", 42), "rejected": {"from": "gpt", "value": [{"type": "image_url"}]}}
    ds = build(write_lines(tmp_path / "pairs.jsonl", good + [same, from_user, no_prompt, image]))
    assert ds.counts["kept"] == 12 and ds.counts["quarantined"] == 4
    assert [(e["line"], e["reason"]) for e in read_jsonl(ds.path / "quarantine.jsonl")] == [
        (13, "chosen and rejected are the same answer; a preference pair needs two different ones"),
        (14, "field 'chosen' ends with a message from 'human', not the assistant"),
        (15, "field 'conversations' is empty"),
        (16, "field 'rejected.value' part 1 is of type 'image_url'; only text parts can be trained on")]


def test_pairs_dedup_on_the_pair_and_split_by_prompt(build, tmp_path):
    base = [pair_record("trl", i) for i in range(30)]
    other_rejected = [{**pair_record("trl", i), "rejected": f"{i + 9} {FRUITS[i % 12]}"} for i in range(30)]
    ds = build(write_lines(tmp_path / "pairs.jsonl", base + base[:5] + other_rejected))
    assert ds.counts["duplicates"] == 5 and ds.counts["kept"] == 60  # the same prompt with another rejected answer is kept
    by_prompt: dict[str, set] = {}
    for split in ("train", "eval"):
        for r in ds.rows(split):
            by_prompt.setdefault(r["prompt"], set()).add(split)
    assert all(len(splits) == 1 for splits in by_prompt.values())  # one prompt, one split
