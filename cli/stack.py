"""`smelt up` / `smelt down` / `smelt status`: local MLflow and Prefect servers for people, on 127.0.0.1.

Each server runs detached in its own session, so its process group holds the server and every worker it
spawns, and `down` stops them together. `SMELT_HOME/run/<service>.json` records what smelt started; `down`
only ever signals a process recorded there, and only while it still runs the recorded command.
Imports only the standard library, httpx, typer, rich, models.artifacts and models.settings: Prefect and MLflow
run in the child processes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Optional, get_args

import httpx
import typer
from rich.console import Console
from rich.table import Table

from models.settings import configure_environment, load_settings, sqlite_tracking_uri
from models.artifacts import write_json

Service = Literal["mlflow", "prefect", "worker"]
SERVICES: tuple[Service, ...] = get_args(Service)  # start order; `down` stops in reverse
DEFAULT_PORTS: dict[str, int] = {"mlflow": 5000, "prefect": 4200, "worker": 4280}
HOST = "127.0.0.1"  # for people on this machine; exposing a server is a deployment decision (see infra/)


class ServiceError(RuntimeError):
    """A server could not be started or stopped; the message says why and where its log is."""


class PortInUseError(ServiceError):
    """The requested port is taken by a program smelt did not start."""


@dataclass(frozen=True)
class ServiceSpec:
    command: Callable[[Path, int], list[str]]
    health_path: str
    api_path: str  # appended to the base URL: what clients point at
    client_env: str  # the variable that points a run at this server
    extra_env: Callable[[Path, int], dict[str, str]] = lambda home, port: {}


@dataclass
class ServiceState:
    """What `SMELT_HOME/run/<service>.json` records about a server smelt started."""

    service: str
    pid: int  # also the process group id: the server leads its own session
    port: int
    url: str  # the UI
    api_url: str  # for clients: MLFLOW_TRACKING_URI or PREFECT_API_URL
    command: list[str]
    log: str
    started_at: str
    already_running: bool = field(default=False)  # found running by `smelt up`; never written to the file


@dataclass
class ServiceStatus:
    service: str
    running: bool
    healthy: bool
    pid: int | None = None
    url: str | None = None


def mlflow_command(home: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        # SMELT_MLFLOW_BACKEND_STORE_URI points it at PostgreSQL (as in production); SQLite under SMELT_HOME otherwise
        "--backend-store-uri", load_settings().mlflow_backend_store_uri or sqlite_tracking_uri(home),
        # new experiments get mlflow-artifacts:/ URIs, proxied to this directory (the pipeline's own
        # experiments keep their file: locations under the same directory)
        "--artifacts-destination", str(home / "mlartifacts"),
        "--host", HOST, "--port", str(port),
        "--workers", "1",  # the default is 4 uvicorn workers; a local UI for one person needs one
    ]


def prefect_command(home: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def worker_command(home: Path, port: int) -> list[str]:
    # --type process creates the pool with the process worker's default job template if it is missing.
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", load_settings().work_pool, "--type", "process", "--with-healthcheck"]


def worker_env(home: Path, port: int) -> dict[str, str]:
    """The worker talks to the Prefect server smelt started and serves its health check on `port`."""
    server = current_state(home, "prefect")
    if server is None:
        raise ServiceError("the worker needs the Prefect server: start it with `smelt up` (without --only worker)")
    return {"PREFECT_API_URL": server.api_url, "PREFECT_WORKER_WEBSERVER_HOST": HOST, "PREFECT_WORKER_WEBSERVER_PORT": str(port)}


SPECS: dict[str, ServiceSpec] = {
    "mlflow": ServiceSpec(mlflow_command, "/health", "", "MLFLOW_TRACKING_URI"),
    # The UI calls the API at PREFECT_UI_API_URL, which otherwise assumes port 4200 whatever --port says.
    "prefect": ServiceSpec(prefect_command, "/api/health", "/api", "PREFECT_API_URL",
                           lambda home, port: {"PREFECT_UI_API_URL": f"http://{HOST}:{port}/api"}),
    "worker": ServiceSpec(worker_command, "/health", "", "SMELT_WORK_POOL", worker_env),
}

# Servers this process started. poll() reaps one that died, which would otherwise linger as a zombie
# that os.kill(pid, 0) still reports alive.
_CHILDREN: dict[int, subprocess.Popen] = {}


# ---- files under SMELT_HOME ----

def state_path(home: Path, service: str) -> Path:
    return Path(home) / "run" / f"{service}.json"


def log_path(home: Path, service: str) -> Path:
    return Path(home) / "logs" / f"{service}.log"


def write_state(home: Path, state: ServiceState) -> None:
    """Temp file + rename: a crash never leaves a half-written state file that looks complete."""
    path = state_path(home, state.service)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(state)
    data.pop("already_running")
    write_json(path, data)


def read_state(home: Path, service: str) -> ServiceState | None:
    path = state_path(home, service)
    try:
        return ServiceState(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # not written by write_state (which is atomic): nothing to trust
        path.unlink(missing_ok=True)
        return None


def tail(path: Path | str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def service_env(home: Path) -> dict[str, str]:
    """The server's environment: this process's, with every home-derived variable forced to `home`'s.
    Forced, not defaulted as configure_environment does, so a parent pointed elsewhere cannot leak in."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the Prefect UI would send its API calls to that server instead
    env.update({
        "SMELT_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),  # holds the server's SQLite database
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline: avoids a telemetry error at start
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",  # no terminal behind a detached server
        "MLFLOW_TRACKING_URI": sqlite_tracking_uri(home),
        # MLflow 3.17 otherwise starts a job runner and 7 huey consumers (8 more Python processes on
        # 2 cores) with their queue in /dev/shm, outside SMELT_HOME; smelt uses no server-side jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    })
    return env


# ---- processes and ports ----

def _reap(pid: int) -> int | None:
    """Exit code of a server this process started and that has exited, else None."""
    proc = _CHILDREN.get(pid)
    return None if proc is None else proc.poll()


def is_running(state: ServiceState) -> bool:
    """True while the recorded pid is alive and still runs the recorded command (pids are reused)."""
    if _reap(state.pid) is not None:
        return False
    try:
        os.kill(state.pid, 0)
        cmdline = Path(f"/proc/{state.pid}/cmdline")
        if not cmdline.parent.exists():  # no /proc (macOS): a session leader is the best evidence left
            return os.getpgid(state.pid) == state.pid
        return cmdline.read_bytes().split(b"\0")[:-1] == [c.encode() for c in state.command]
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False  # gone, or another user's process: not one smelt started


def is_healthy(state: ServiceState, timeout: float = 2.0) -> bool:
    try:
        # trust_env=False: a registry proxy in HTTP(S)_PROXY must not be asked for 127.0.0.1
        resp = httpx.get(state.url + SPECS[state.service].health_path, timeout=timeout, trust_env=False)
        return resp.status_code == 200
    except httpx.HTTPError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn does: a TIME_WAIT connection left by a stopped server is no conflict, a listener is
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def _group_gone(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def terminate(pgid: int, grace: float = 15.0) -> None:
    """SIGTERM the whole group (the server and the uvicorn process it spawned); SIGKILL what outlives `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _group_gone(pgid):
                return
            time.sleep(0.1)
    raise ServiceError(f"process group {pgid} survived SIGKILL")


# ---- start, stop, status ----

def current_state(home: Path, service: str) -> ServiceState | None:
    """The state of a server smelt started that still runs; a stale file (its process gone) is removed."""
    state = read_state(home, service)
    if state is not None and not is_running(state):
        state_path(home, service).unlink(missing_ok=True)
        return None
    return state


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _spawn(home: Path, service: str, port: int) -> ServiceState:
    log, cmd = log_path(home, service), SPECS[service].command(home, port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:  # append: the last run's log survives a restart for post-mortems
        out.write(f"\n--- smelt up {service} at {_now()}: {' '.join(cmd)}\n".encode())
        out.flush()
        # start_new_session: own process group (stopped as one) and no SIGINT from this terminal's Ctrl-C
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**service_env(home), **SPECS[service].extra_env(home, port)}, cwd=home, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    base = f"http://{HOST}:{port}"
    return ServiceState(service, proc.pid, port, base, base + SPECS[service].api_path, cmd, str(log), _now())


def _wait_healthy(state: ServiceState, deadline: float) -> str | None:
    """None once healthy (by `deadline`, a time.monotonic() value); otherwise what went wrong."""
    while time.monotonic() < deadline:
        if is_healthy(state):
            return None
        if not is_running(state):
            code = _reap(state.pid)
            return "exited" + ("" if code is None else f" with code {code}") + " before it became healthy"
        time.sleep(0.5)
    return "was not healthy in time"


def _reuse(state: ServiceState, deadline: float) -> ServiceState:
    """A server smelt started earlier: wait for it (another `smelt up` may still be starting it)."""
    problem = _wait_healthy(state, deadline)
    if problem:
        raise ServiceError(f"{state.service} (pid {state.pid}, started by smelt) is running but {problem}; "
                           f"stop it with `smelt down --only {state.service}`. Last lines of {state.log}:\n{tail(state.log)}")
    state.already_running = True
    return state


def _await_started(home: Path, state: ServiceState, deadline: float, timeout: float) -> ServiceState:
    problem = _wait_healthy(state, deadline)
    if problem:
        _forget(home, state)  # first, so the log quoted below is complete
        raise ServiceError(f"{state.service} {problem} (timeout {timeout:g} s). Last lines of {state.log}:\n{tail(state.log)}")
    return state


def _forget(home: Path, state: ServiceState) -> None:
    terminate(state.pid)
    state_path(home, state.service).unlink(missing_ok=True)


def _check_ports(ports: dict[str, int]) -> None:
    for service, port in ports.items():
        if not port_free(port):
            raise PortInUseError(f"{service}: port {port} on {HOST} is already in use by another program; "
                                 f"stop that program or choose another port with --{service}-port.")


def _spawn_recorded(home: Path, service: str, port: int) -> ServiceState:
    state = _spawn(home, service, port)
    write_state(home, state)  # before waiting, so `smelt down` can stop a server that is still starting
    return state


def start_services(home: Path, which: tuple[str, ...] | list[str] = SERVICES, ports: dict[str, int] | None = None,
                   timeout: float = 120.0) -> list[ServiceState]:
    """Start the servers first, then the worker (it connects to the Prefect server at start)."""
    servers = [s for s in which if s != "worker"]
    states = start_together(home, servers, ports, timeout) if servers else []
    return states + (start_together(home, ["worker"], ports, timeout) if "worker" in which else [])


def start_together(home: Path, which: list[str], ports: dict[str, int] | None = None, timeout: float = 120.0) -> list[ServiceState]:
    """Start the servers in `which` in the background and wait until their health checks answer.

    A server smelt already started is reused (`already_running`), never started twice. New servers start
    together: each spends ~10 s importing its framework, so on 2 cores the waits overlap. If one fails, every
    server this call started is stopped again and ServiceError says why, quoting the end of the failing log.
    """
    home, ports = Path(home).resolve(), {**DEFAULT_PORTS, **(ports or {})}
    existing = {s: current_state(home, s) for s in which}  # drops stale state files
    _check_ports({s: ports[s] for s in which if existing[s] is None})  # refuse before starting anything
    deadline = time.monotonic() + timeout
    started = {s: _spawn_recorded(home, s, ports[s]) for s in which if existing[s] is None}
    try:
        return [_reuse(existing[s], deadline) if existing[s] else _await_started(home, started[s], deadline, timeout)
                for s in which]
    except BaseException:  # a failure or Ctrl-C: leave nothing half-started behind
        for state in started.values():
            _forget(home, state)
        raise


def start_service(home: Path, service: str, port: int, timeout: float = 120.0) -> ServiceState:
    return start_services(home, [service], {service: port}, timeout)[0]


def stop_service(home: Path, service: str, grace: float = 15.0) -> ServiceState | None:
    """Stop a server smelt started; returns its state, or None when none was running."""
    home = Path(home).resolve()
    state = current_state(home, service)
    if state is None:
        return None
    terminate(state.pid, grace)
    state_path(home, service).unlink(missing_ok=True)
    return state


def stop_services(home: Path, which: tuple[str, ...] | list[str] = SERVICES, grace: float = 15.0) -> list[str]:
    """Stop the servers in `which` that smelt started; returns the names of those it stopped."""
    return [s for s in reversed(which) if stop_service(home, s, grace) is not None][::-1]


def service_status(home: Path) -> list[ServiceStatus]:
    rows = []
    for service in SERVICES:
        state = current_state(Path(home).resolve(), service)
        if state is None:
            rows.append(ServiceStatus(service, running=False, healthy=False))
        else:
            rows.append(ServiceStatus(service, True, is_healthy(state), state.pid, state.url))
    return rows


def running_url(home: Path, service: str) -> str | None:
    """The client URL (PREFECT_API_URL / MLFLOW_TRACKING_URI value) of a healthy server smelt started, else None."""
    state = current_state(Path(home).resolve(), service)
    return state.api_url if state is not None and is_healthy(state) else None


# ---- command line (registered in cli/main.py) ----

console = Console()
err_console = Console(stderr=True)
OnlyOption = typer.Option(None, "--only", help="Act on this one only; default: MLflow, Prefect and the Prefect worker.")


def _selected(only: Optional[Service]) -> tuple[str, ...]:
    return SERVICES if only is None else (only,)


def up(
    only: Optional[Service] = OnlyOption,
    mlflow_port: int = typer.Option(DEFAULT_PORTS["mlflow"], min=1, max=65535, help="Port of the MLflow UI and API."),
    prefect_port: int = typer.Option(DEFAULT_PORTS["prefect"], min=1, max=65535, help="Port of the Prefect UI and API."),
    worker_port: int = typer.Option(DEFAULT_PORTS["worker"], min=1, max=65535, help="Port of the Prefect worker's health check."),
    timeout: float = typer.Option(120.0, min=1, help="Seconds to wait for the servers' health checks."),
) -> None:
    """Start local MLflow and Prefect servers and a Prefect worker on 127.0.0.1 in the background, state under SMELT_HOME.

    MLflow serves its UI and model registry from SMELT_HOME/mlflow.db and SMELT_HOME/mlartifacts.

    Prefect serves its UI and API from SMELT_HOME/prefect. The worker runs `smelt deploy`'s deployments
    from the local process pool ($SMELT_WORK_POOL, default smelt-local). Logs go to SMELT_HOME/logs/<server>.log.

    A server smelt already started is reported, not started twice. `smelt down` stops them.
    """
    home, asked = configure_environment(), {"mlflow": mlflow_port, "prefect": prefect_port, "worker": worker_port}
    try:
        states = start_services(home, _selected(only), asked, timeout)
    except ServiceError as err:
        err_console.print(str(err), style="red", markup=False, highlight=False)  # log lines may hold [brackets]
        raise typer.Exit(1)
    print_started(home, states)
    for s in (s for s in states if s.already_running and s.port != asked[s.service]):  # say why the port was ignored
        console.print(f"{s.service} was already running on port {s.port}; `smelt down --only {s.service}` first to move it.")


def print_started(home: Path, states: list[ServiceState]) -> None:
    table = Table("server", "state", "pid", "UI")
    for s in states:
        table.add_row(s.service, "already running" if s.already_running else "[green]started[/green]", str(s.pid), s.url)
    console.print(table)
    console.print(f"Logs: {log_path(home, '<server>')}", soft_wrap=True, highlight=False)
    console.print("Point runs at these servers:")
    for s in (s for s in states if s.service != "worker"):  # soft_wrap: a command to copy must never be wrapped or cut
        console.print(f"  export {SPECS[s.service].client_env}={s.api_url}", soft_wrap=True, highlight=False)


def down(only: Optional[Service] = OnlyOption) -> None:
    """Stop the servers `smelt up` started (recorded in SMELT_HOME/run/); never touches any other process."""
    home = configure_environment()
    stopped = stop_services(home, _selected(only))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "no smelt server was running")


def status() -> None:
    """Show each smelt server: running or stopped, its pid and URL, and whether its health check answers."""
    home = configure_environment()
    table = Table("server", "state", "pid", "UI", "healthy", title=f"smelt servers ({home})")
    for row in service_status(home):
        state = "[green]running[/green]" if row.running else "stopped"
        healthy = "-" if not row.running else ("yes" if row.healthy else "[red]no[/red]")
        table.add_row(row.service, state, str(row.pid or "-"), row.url or "-", healthy)
    console.print(table)
