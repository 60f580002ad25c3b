import json

import pytest

from tasks.config import EtlConfig
from tasks.etl import DataError, build_dataset

GOOD = [{"prompt": f"Extract the number from: I have {i} cats", "completion": str(i)} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_rows_are_quarantined_with_file_line_and_reason_and_counts_add_up(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD + [
        "{not json",
        {"prompt": "x"},
        {"prompt": 3, "completion": "y"},
        {"prompt": "   ", "completion": "y"},
        ["a", "list"],
        GOOD[0],  # exact duplicate
    ])
    ds = build_dataset(EtlConfig(sources=[str(src)], eval_fraction=0.25), tmp_path / "home")
    c = ds.counts
    assert c["rows_in"] == 46
    assert (c["kept"], c["quarantined"], c["duplicates"]) == (40, 5, 1)
    assert c["rows_in"] == c["kept"] + c["quarantined"] + c["duplicates"]
    assert c["train"] + c["eval"] == c["kept"] and c["eval"] > 0
    quarantine = [json.loads(line) for line in (ds.path / "quarantine.jsonl").read_text().splitlines()]
    reasons = {q["line"]: q["reason"] for q in quarantine}
    assert all(q["file"] == str(src) for q in quarantine)
    assert reasons[41].startswith("malformed JSON")
    assert reasons[42] == "missing field 'completion'"
    assert reasons[43] == "field 'prompt' is int, not a string"
    assert reasons[44] == "field 'prompt' is empty"
    assert reasons[45] == "row is a list, not an object"


def test_same_input_gives_same_version_and_split_is_stable_when_appending(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    cfg = EtlConfig(sources=[str(src)], eval_fraction=0.3)
    first = build_dataset(cfg, tmp_path / "home")
    assert build_dataset(cfg, tmp_path / "home").version == first.version
    eval_before = {r["prompt"] for r in first.rows("eval")}
    write_jsonl(src, GOOD + [{"prompt": f"new row {i}", "completion": "n"} for i in range(20)])
    second = build_dataset(cfg, tmp_path / "home")
    assert second.version != first.version
    eval_after = {r["prompt"] for r in second.rows("eval")}
    assert eval_before <= eval_after  # no old row moved between splits
    assert not eval_after & {r["prompt"] for r in second.rows("train")}


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"\xff\xfe\x00bad", "is not UTF-8"), (b"\n\n", "is empty")],
)
def test_unusable_file_stops_the_run_naming_it(tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        build_dataset(EtlConfig(sources=[str(src)]), tmp_path / "home")
    assert str(src) in str(err.value)
    assert not (tmp_path / "home" / "datasets").exists() or not list((tmp_path / "home" / "datasets").iterdir())


def test_shipped_sample_data_is_clean(tmp_path):
    ds = build_dataset(EtlConfig(), tmp_path / "home")
    assert ds.counts["quarantined"] == 0 and ds.counts["kept"] == 3000
    assert json.loads(ds.rows("eval")[0]["completion"])["qty"] >= 1


def test_shipped_sample_data_is_what_its_generator_makes():
    import runpy

    from tasks.config import REPO_ROOT

    gen = runpy.run_path(str(REPO_ROOT / "data" / "generate_orders.py"))
    shipped = [json.loads(line) for line in (REPO_ROOT / "data" / "orders.jsonl").read_text().splitlines()]
    assert shipped == gen["make_rows"](3000)
