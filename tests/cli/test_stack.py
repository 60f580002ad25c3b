"""`smelt up/down/status` against real MLflow and Prefect servers on free ports, each test in its own SMELT_HOME."""
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from cli.stack import (
    SPECS,
    PortInUseError,
    ServiceError,
    ServiceSpec,
    ServiceState,
    log_path,
    port_free,
    running_url,
    service_status,
    start_services,
    state_path,
    stop_services,
    write_state,
)
from tests.helpers import free_port


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def home(tmp_path):
    yield tmp_path
    stop_services(tmp_path)  # even when the test failed: never leave a server behind


def status_of(home, service):
    return {row.service: row for row in service_status(home)}[service]


def fake_state(home, pid: int, command: list[str], port: int) -> ServiceState:
    url = f"http://127.0.0.1:{port}"
    state = ServiceState("mlflow", pid, port, url, url, command, str(log_path(home, "mlflow")), "2026-01-01T00:00:00+00:00")
    write_state(home, state)
    return state


def test_mlflow_up_status_reuse_client_down(home):
    port = free_port()
    [state] = start_services(home, ["mlflow"], {"mlflow": port}, timeout=90)
    assert not state.already_running and state.url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"{state.url}/health", trust_env=False).status_code == 200
    saved = json.loads(state_path(home, "mlflow").read_text())
    assert (saved["pid"], saved["port"], saved["url"]) == (state.pid, port, state.url)
    row = status_of(home, "mlflow")
    assert row.running and row.healthy and row.pid == state.pid
    assert not status_of(home, "prefect").running

    [again] = start_services(home, ["mlflow"], {"mlflow": port})
    assert again.already_running and again.pid == state.pid
    assert running_url(home, "mlflow") == state.url and running_url(home, "prefect") is None

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=state.api_url, registry_uri=state.api_url)
    run = client.create_run(client.create_experiment("stack-test"))
    client.log_text(run.info.run_id, "hello", "note.txt")
    assert [p.read_text() for p in (home / "mlartifacts").rglob("note.txt")] == ["hello"]  # proxied into SMELT_HOME
    assert client.search_registered_models() == []
    assert (home / "mlflow.db").exists()

    assert stop_services(home) == ["mlflow"]
    assert not group_alive(state.pid) and port_free(port) and not state_path(home, "mlflow").exists()
    assert stop_services(home) == []


@pytest.mark.integration
def test_prefect_up_status_down(home):
    port = free_port()
    [state] = start_services(home, ["prefect"], {"prefect": port}, timeout=120)
    assert httpx.get(f"{state.url}/api/health", trust_env=False).status_code == 200
    assert httpx.post(f"{state.url}/api/flows/filter", json={}, trust_env=False).json() == []
    assert (home / "prefect" / "prefect.db").exists()  # PREFECT_HOME came from this home, not the parent's env
    assert status_of(home, "prefect").healthy
    assert running_url(home, "prefect") == f"http://127.0.0.1:{port}/api"

    assert stop_services(home, ["prefect"]) == ["prefect"]
    assert not group_alive(state.pid) and port_free(port) and not state_path(home, "prefect").exists()


def test_stale_state_file_is_cleaned_up(home):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_state(home, dead.pid, [sys.executable, "-m", "mlflow", "server"], free_port())
    assert not status_of(home, "mlflow").running
    assert not state_path(home, "mlflow").exists()

    fake_state(home, dead.pid, [sys.executable, "-m", "mlflow", "server"], free_port())
    assert running_url(home, "mlflow") is None and stop_services(home) == []
    assert not state_path(home, "mlflow").exists()


def test_live_pid_running_another_command_is_not_signalled(home):
    fake_state(home, os.getpid(), ["not", "what", "smelt", "started"], free_port())  # a reused pid: this very test
    assert not status_of(home, "mlflow").running
    assert stop_services(home) == []  # and we are still here


def test_occupied_port_is_refused_and_stale_state_dropped(home):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        fake_state(home, dead.pid, [sys.executable, "-m", "mlflow", "server"], port)
        with pytest.raises(PortInUseError, match=f"port {port} .* already in use"):
            start_services(home, ["mlflow"], {"mlflow": port})
    assert not state_path(home, "mlflow").exists()


SLEEPER = """import os, sys, time
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""
CRASH = """import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("boom: bad config")
sys.exit(3)
"""


def test_server_that_exits_early_is_reported_and_its_sibling_stopped(home, monkeypatch):
    # Process supervision only, so stand-in commands: one server still starting (it records its pid and sleeps)
    # and one that crashes, with a message in its log, once the first is up.
    pid_file = home / "sibling.pid"
    crash = ServiceSpec(lambda home, port: [sys.executable, "-c", CRASH, str(pid_file)], "/health", "", "MLFLOW_TRACKING_URI")
    sleeper = ServiceSpec(lambda home, port: [sys.executable, "-c", SLEEPER, str(pid_file)], "/api/health", "/api", "PREFECT_API_URL")
    monkeypatch.setitem(SPECS, "mlflow", crash)
    monkeypatch.setitem(SPECS, "prefect", sleeper)
    with pytest.raises(ServiceError, match=r"(?s)mlflow exited with code 3.*mlflow\.log.*boom: bad config"):
        start_services(home, ["mlflow", "prefect"], {"mlflow": free_port(), "prefect": free_port()}, timeout=30)
    assert not group_alive(int(pid_file.read_text()))  # the sibling this call started was stopped too
    assert not state_path(home, "mlflow").exists() and not state_path(home, "prefect").exists()


def test_server_not_healthy_in_time_is_stopped(home):
    port = free_port()
    with pytest.raises(ServiceError, match=r"mlflow was not healthy in time \(timeout 1 s\).*mlflow\.log"):
        start_services(home, ["mlflow"], {"mlflow": port}, timeout=1)  # MLflow needs ~10 s to import and start
    assert not state_path(home, "mlflow").exists() and port_free(port)


def test_commands_report_and_explain(home, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from cli import stack

    app = typer.Typer()
    for command in (stack.up, stack.down, stack.status):
        app.command()(command)
    monkeypatch.setenv("SMELT_HOME", str(home))
    runner = CliRunner()
    assert "--prefect-port" in runner.invoke(app, ["up", "--help"]).output
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0 and result.output.count("stopped") == 3  # mlflow, prefect, worker
    assert "no smelt server was running" in runner.invoke(app, ["down"]).output
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        result = runner.invoke(app, ["up", "--only", "mlflow", "--mlflow-port", str(other.getsockname()[1])])
    assert result.exit_code == 1 and "already in use" in result.output
