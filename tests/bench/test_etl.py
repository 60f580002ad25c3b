"""The ETL benchmark's input file and harness (the benchmark itself is `smelt data bench`)."""
import json

import pandas as pd
import pytest

from bench.etl import bench_file_ready, run_etl_benchmark, write_bench_file


def test_bench_file_is_deterministic_loadable_by_pandas_and_reused(tmp_path):
    a = write_bench_file(tmp_path / "a.jsonl", 3000, seed=1, progress=False)
    b = write_bench_file(tmp_path / "b.jsonl", 3000, seed=1, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert write_bench_file(tmp_path / "c.jsonl", 3000, seed=2, progress=False).read_bytes() != a.read_bytes()
    assert bench_file_ready(a, 3000, 1) and not bench_file_ready(a, 3000, 2) and not bench_file_ready(a, 2999, 1)
    assert len(pd.read_json(a, lines=True)) == 3000  # the baseline can load every line
    sizes = [len(line) for line in a.read_bytes().splitlines()]
    assert 700 < sum(sizes) / len(sizes) < 1400  # about 1 KB a row, as the 1M rows ~ 1 GB
    a.write_text(a.read_text()[:-100])
    assert not bench_file_ready(a, 3000, 1)  # a changed file is written again, not trusted


@pytest.mark.slow
def test_benchmark_runs_both_jobs_and_accounts_for_every_row(tmp_path):
    result = run_etl_benchmark(3000, tmp_path, seed=0, echo=lambda *_: None)
    c = result["smelt"]["counts"]
    assert c["rows_in"] == 3000 == c["kept"] + c["quarantined"] + c["duplicates"] + c["near_duplicates"] + c["contaminated"]
    assert c["quarantined"] > 0 and c["duplicates"] > 0  # the file holds the bad rows it promises
    assert result["pandas"]["rows_loaded"] == 3000 and result["ratio"]["rows_per_s"] > 0
    assert json.loads((tmp_path / "etl-benchmark.json").read_text())["rows"] == 3000
