"""`smelt data ingest` through real Prefect (shards as mapped tasks on a local 2-worker Dask
cluster), with the data report in Prefect and the dataset version as an MLflow dataset input."""
import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tasks.config import load_config
from tasks.etl import build_dataset, prepare_tokenizer
from tests.helpers import smelt_env

pytestmark = pytest.mark.integration


def write_inputs(folder):
    folder.mkdir()
    lines = [json.dumps({"prompt": f"Order {i}: {i % 7} cups of tea to Oslo, please.", "completion": json.dumps({"qty": i % 7})})
             for i in range(300)]
    lines[40] = "{not json"
    lines[250] = json.dumps({"prompt": "no answer"})
    (folder / "orders.jsonl").write_text("\n".join(lines + lines[:5]) + "\n")  # five exact duplicates at the end
    (folder / "more.csv").write_text("instruction,input,output\n" + "".join(
        f'Give the quantity,"{i} boxes to Rome",{i}\n' for i in range(60)))


def in_subprocess(home, code: str) -> str:
    code = "from models.settings import configure_environment; configure_environment()\n" + code  # this home's stores
    proc = subprocess.run([sys.executable, "-c", code], env=smelt_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("etl-flow")
    write_inputs(tmp / "data")
    home = tmp / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "data", "ingest", str(tmp / "data"), "--config", "micro-cpu", "--prefect",
         "--set", "etl.task_runner=dask", "--set", "etl.dask_workers=2", "--set", "etl.shard_mb=0.004"],
        env=smelt_env(home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    version = re.search(r"Dataset ([0-9a-f]{12})", proc.stdout).group(1)
    return tmp, home, version, proc.stdout


def test_shards_ran_on_two_dask_workers_and_match_the_in_process_result(ingested):
    tmp, home, version, out = ingested
    manifest = json.loads((home / "datasets" / version / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 4
    assert len({s["worker"] for s in manifest["shards"]}) == 2  # both worker processes took shards
    cfg = load_config("micro-cpu", [f"etl.sources={json.dumps([str(tmp / 'data')])}", "etl.shard_mb=0.004"]).etl
    local = build_dataset(cfg, tmp / "local-home", prepare_tokenizer(load_config("micro-cpu").model, home))
    assert local.version == version  # how shards are run is not part of what the data is
    for split in ("train", "eval"):
        assert (pq.read_table(local.path / f"{split}.parquet").to_pylist()
                == pq.read_table(home / "datasets" / version / f"{split}.parquet").to_pylist())
    c = manifest["counts"]
    assert (c["rows_in"], c["quarantined"], c["duplicates"]) == (365, 2, 5)
    assert c["rows_in"] == c["kept"] + c["quarantined"] + c["duplicates"] + c["near_duplicates"] + c["contaminated"]
    assert f"│ {c['rows_in']} " in out and "quarantine.jsonl" in out


def test_data_report_is_a_prefect_artifact_and_the_version_an_mlflow_dataset_input(ingested):
    _, home, version, _ = ingested
    report = in_subprocess(home, """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:  # the ephemeral server on this home's Prefect database
    arts = c.request('POST', '/artifacts/filter', json={'artifacts': {'key': {'any_': ['smelt-data-report']}}}).json()
print(json.dumps([a['data'] for a in arts]))
""")
    (markdown,) = json.loads(report)
    assert f"# Dataset {version}" in markdown and "malformed JSON" in markdown and "█" in markdown
    got = json.loads(in_subprocess(home, """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
(run,) = c.search_runs([c.get_experiment_by_name('smelt-micro-cpu').experiment_id])
d = run.inputs.dataset_inputs[0].dataset
print(json.dumps({'digest': d.digest, 'profile': json.loads(d.profile), 'metrics': run.data.metrics,
                  'data': sorted(f.path for f in c.list_artifacts(run.info.run_id, 'data'))}))
"""))
    assert got["digest"] == version and got["profile"]["rows_in"] == 365 and got["metrics"]["quarantined"] == 2
    assert got["data"] == ["data/lengths.png", "data/manifest.json", "data/report.md"]


def test_a_bad_file_fails_the_ingest_command_with_its_name_and_line(tmp_path):
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n'
                   '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    proc = subprocess.run([sys.executable, "-m", "cli.main", "data", "ingest", str(bad), "--config", "micro-cpu"],
                          env=smelt_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"smelt data ingest: input file {bad} mixes record shapes: line 1 is prompt-completion, line 2 is chat"
            in proc.stdout + proc.stderr)
    assert not (tmp_path / "home" / "datasets").exists() or not any(
        (d / "manifest.json").exists() for d in (tmp_path / "home" / "datasets").iterdir())


def test_without_a_server_ingest_runs_in_process_fast_and_logs_to_mlflow(tmp_path):
    src = tmp_path / "parts.jsonl"
    src.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"Order {i}: {i % 7} cups of tea to Oslo."}]},
        {"role": "assistant", "content": [{"type": "text", "value": json.dumps({"qty": i % 7})}]}]}) + "\n"
        for i in range(40)))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "data", "ingest", str(src), "--config", "micro-cpu"],
                          env=smelt_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    version = re.search(r"Dataset ([0-9a-f]{12})", proc.stdout).group(1)
    assert not (tmp_path / "home" / "prefect" / "prefect.db").exists()  # no temporary Prefect server was started
    got = json.loads(in_subprocess(tmp_path / "home", """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
(run,) = c.search_runs([c.get_experiment_by_name('smelt-micro-cpu').experiment_id])
print(json.dumps({'digest': run.inputs.dataset_inputs[0].dataset.digest}))
"""))
    assert got["digest"] == version


def test_a_file_that_quarantines_everything_fails_with_reasons_and_no_traceback(tmp_path):
    corpus = tmp_path / "corpus.txt"  # one long document per line, no blank lines: one over-long paragraph
    corpus.write_text("".join(f"Document {i} tells how order {i} for {i % 9 + 2} boxes of tea went from Oslo to Rome "
                              f"by train, then by ship, and arrived on day {i + 3} in good order.\n" for i in range(60)))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "data", "ingest", str(corpus), "--config", "micro-cpu"],
                          env=smelt_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert "smelt data ingest: after validation the dataset has 0 train and 0 eval rows" in out
    assert "over the limit of N (etl.max_tokens)" in out and "set etl.text_unit=line" in out
    assert "Every rejected row, with its file, line and reason: " in out
