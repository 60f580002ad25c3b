"""The production database path: Prefect and MLflow servers on a real PostgreSQL (Debian's package;
`.ci/run` installs it where it is missing). A flow runs and a model is registered through them."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cli.stack import start_services, stop_services
from tests.helpers import free_port

pytestmark = pytest.mark.integration


def pg_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (.ci/run does this)")
    return found


def as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root; drop to the postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def postgres():
    root = Path(tempfile.mkdtemp(prefix="smelt-pg-", dir="/tmp"))  # /tmp: reachable by the postgres user
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    init = as_postgres([pg_tool("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
    assert init.returncode == 0, init.stderr
    start = as_postgres([pg_tool("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                         f"-p {port} -c listen_addresses=127.0.0.1 -k {root}", "start"])
    assert start.returncode == 0, start.stderr + (root / "log").read_text()
    try:
        for db in ("prefect", "mlflow"):
            made = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {db}"],
                                  capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
        yield port
    finally:
        as_postgres([pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def query(port: int, db: str, sql: str) -> str:
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db, "-tAc", sql],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_flow_runs_and_models_land_in_postgres(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"postgresql+asyncpg://postgres@127.0.0.1:{postgres}/prefect")
    monkeypatch.setenv("SMELT_MLFLOW_BACKEND_STORE_URI", f"postgresql+psycopg2://postgres@127.0.0.1:{postgres}/mlflow")
    states = {s.service: s for s in start_services(tmp_path, ["mlflow", "prefect"], {"mlflow": free_port(), "prefect": free_port()})}
    try:
        flow = subprocess.run([sys.executable, "-c", "from prefect import flow\n@flow(name='pg-smoke')\ndef f():\n    return 42\nprint(f())"],
                              env={**os.environ, "PREFECT_API_URL": states["prefect"].api_url}, capture_output=True, text=True, timeout=180)
        assert flow.returncode == 0 and flow.stdout.strip().endswith("42"), flow.stderr[-2000:]
        client = MlflowClient(tracking_uri=states["mlflow"].api_url)
        run = client.create_run(client.create_experiment("pg-smoke"))
        client.create_registered_model("smelt-pg")
        version = client.create_model_version("smelt-pg", f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
        client.set_registered_model_alias("smelt-pg", "champion", version)
        # What the servers stored is in PostgreSQL, not in a SQLite file under SMELT_HOME.
        assert query(postgres, "prefect", "SELECT state_type FROM flow_run f JOIN flow ON flow.id = f.flow_id WHERE flow.name = 'pg-smoke'") == "COMPLETED"
        assert query(postgres, "mlflow", "SELECT alias FROM registered_model_aliases WHERE name = 'smelt-pg'") == "champion"
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "prefect" / "prefect.db").exists()
    finally:
        stop_services(tmp_path)
