"""The team stack (infra/docker-compose.yml) brought up for real: images built here from the local base
image, every service on the host's loopback, a pipeline run started through the worker, its model
version read back from MLflow's PostgreSQL with psql. Slow (image builds and a pipeline run):
`uv run pytest -m slow tests/infra/test_compose_stack.py`."""
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from tasks.config import REPO_ROOT
from tests.helpers import ensure_docker, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
COMPOSE_FILE = REPO_ROOT / "infra" / "docker-compose.yml"


def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("no docker compose: apt-get install -y docker-compose")


def get_json(url: str, body: dict | None = None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
            time.sleep(2)


@pytest.fixture(scope="module")
def stack():
    ensure_docker()
    from tasks.container import ensure_base_image

    ensure_base_image()  # tags smelt-base:latest, which the stack's Dockerfiles start FROM
    ports = {"POSTGRES_PORT": free_port(), "PREFECT_PORT": free_port(), "MLFLOW_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "COMPOSE_PROJECT_NAME": "smelt-test",
           "POSTGRES_PASSWORD": "stack-test"}
    base = [*compose_cmd(), "-f", str(COMPOSE_FILE)]

    def compose(*args, timeout=600, check=True):
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    t0 = time.perf_counter()
    compose("up", "-d", "--build", timeout=2400)
    print(f"stack built and started in {time.perf_counter() - t0:.0f} s")
    try:
        wait_for(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api/health", 300)
        wait_for(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/health", 300)
        yield compose, ports
    finally:
        compose("logs", "--tail", "30", check=False)
        compose("down", "-v", timeout=300, check=False)


def test_a_pipeline_run_through_the_worker_registers_a_version_in_postgres(stack):
    compose, ports = stack
    api = f"http://127.0.0.1:{ports['PREFECT_PORT']}/api"
    out = compose("exec", "-T", "worker", "smelt", "deploy", "-c", "micro-cpu", "package.build_bento=false").stdout
    assert "deployed smelt-pipeline/pipeline" in out, out
    run = compose("exec", "-T", "worker", "prefect", "deployment", "run", "smelt-pipeline/pipeline").stdout
    assert "Created flow run" in run, run
    deadline = time.monotonic() + 1200
    while True:
        runs = get_json(f"{api}/flow_runs/filter", {"deployments": {"name": {"any_": ["pipeline"]}}})
        states = [r["state_type"] for r in runs]
        if states and states[0] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, f"pipeline run not finished in 1200 s: {states}"
        time.sleep(5)
    assert states == ["COMPLETED"], compose("logs", "--tail", "60", "worker", check=False).stdout[-4000:]
    count = compose("exec", "-T", "-e", "PGPASSWORD=stack-test", "postgres", "psql", "-h", "127.0.0.1",
                    "-p", str(ports["POSTGRES_PORT"]), "-U", "smelt", "-d", "mlflow", "-tAc",
                    "SELECT count(*) FROM model_versions WHERE name = 'smelt-micro-embedded'").stdout.strip()
    assert int(count) >= 1
    champion = compose("exec", "-T", "-e", "PGPASSWORD=stack-test", "postgres", "psql", "-h", "127.0.0.1",
                       "-p", str(ports["POSTGRES_PORT"]), "-U", "smelt", "-d", "mlflow", "-tAc",
                       "SELECT version FROM registered_model_aliases WHERE alias = 'champion'").stdout.strip()
    assert champion.isdigit()
