"""Roll the champion's container out behind a proxy with no failed requests (`smelt rollout`).

HAProxy (Debian's package) listens on 127.0.0.1:<port> with two server slots, blue and green; one is
the active container, the other is in maintenance. A rollout starts the new champion's container on a
free port, waits for its /readyz, and then, through HAProxy's runtime API (its admin socket, no
reload), points the idle slot at it, makes it ready and sets the old slot to drain: new requests go to
the new container at once, requests in flight on the old one finish, and clients' keep-alive
connections to the proxy stay open. (nginx was tried first: its graceful reload closes idle client
keep-alive connections, and a client that sends on one at that instant gets "connection closed
without response": 1 in 6 reloads under 8 persistent clients.) When the old slot has no session left
it goes to maintenance and its container is stopped. Old images stay for `smelt rollback`. The state
of a deployment lives under SMELT_HOME/deploy/<name>/, with the logs of every container it stopped in logs/.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from models.artifacts import atomic_write_text, write_json
from tasks.config import RegistryConfig
from tasks.container import ContainerError, container_running, docker, run_container, save_logs, stop_container, wait_ready
from tasks.package import containerize_champion
from tasks.results import Deployment

SLOTS = ("blue", "green")
HAPROXY_CFG = """# written by smelt rollout; changed at run time through admin.sock (tasks/deploy.py), rewritten to match
global
    stats socket {dir}/admin.sock mode 600 level admin
    pidfile {dir}/haproxy.pid
    daemon
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 60s
    # A request the server closed on without any answer (a container stopping) is sent again, to the
    # other slot if need be; an answer, even an error, is never repeated.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend smelt
    bind 127.0.0.1:{port}
    default_backend champion
backend champion
{servers}
"""


def deploy_dir(home: Path, registered: str) -> Path:
    return Path(home) / "deploy" / registered


def read_state(folder: Path) -> dict:
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_pid(folder: Path) -> int | None:
    try:
        pid = int((folder / "haproxy.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def write_config(folder: Path, proxy_port: int, slots: dict[str, int | None], active: str) -> Path:
    """haproxy.cfg with each slot's port (None: not used yet) and only `active` taking requests."""
    lines = [f"    server {slot} 127.0.0.1:{slots.get(slot) or 1}{'' if slot == active else ' disabled'}" for slot in SLOTS]
    cfg = folder / "haproxy.cfg"
    atomic_write_text(cfg, HAPROXY_CFG.format(dir=folder.resolve(), port=proxy_port, servers="\n".join(lines)))
    return cfg


def admin(folder: Path, command: str) -> str:
    """One command on HAProxy's runtime API (its admin socket); its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(folder / "admin.sock"))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def start_proxy(folder: Path, proxy_port: int, upstream_port: int) -> None:
    exe = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
    if exe is None:
        raise ContainerError("`smelt rollout` proxies through HAProxy, which is missing: apt-get install -y haproxy")
    cfg = write_config(folder, proxy_port, {"blue": upstream_port}, "blue")
    proc = subprocess.run([exe, "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ContainerError(f"haproxy did not start: {proc.stderr.strip()[-1500:]}")


def switch_slot(folder: Path, proxy_port: int, slots: dict[str, int | None], old: str, new_port: int) -> str:
    """Point the idle slot at `new_port` and make it the one taking requests; the old slot drains.
    Returns the new active slot."""
    new = next(s for s in SLOTS if s != old)
    for command in (f"set server champion/{new} addr 127.0.0.1 port {new_port}", f"set server champion/{new} state ready",
                    f"set server champion/{old} state drain"):
        answer = admin(folder, command).strip()
        if answer and "changed" not in answer.lower():  # HAProxy answers "" or "IP changed from ..." on success
            raise ContainerError(f"haproxy refused `{command}`: {answer}")
    write_config(folder, proxy_port, {**slots, new: new_port}, new)  # what a restart of the proxy would load
    return new


def sessions_on(folder: Path, slot: str) -> int:
    """Requests the slot's server holds now (HAProxy's `scur`)."""
    rows = csv.DictReader(io.StringIO(admin(folder, "show stat").lstrip("# ")))
    return next(int(r["scur"] or 0) for r in rows if r["pxname"] == "champion" and r["svname"] == slot)


def served_version(proxy_port: int, api_key: str | None) -> str | None:
    req = urllib.request.Request(f"http://127.0.0.1:{proxy_port}/v1/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(json.loads(resp.read())["data"][0].get("version"))
    except (OSError, ValueError, KeyError, IndexError):
        return None


def container_env() -> dict[str, str]:
    """The serving settings of this environment (SMELT_API_KEY, SMELT_MAX_*, ...) passed to the container;
    not where things live on this machine."""
    skip = {"SMELT_HOME", "SMELT_HOST", "SMELT_BENTO_MODEL"}
    return {k: v for k, v in os.environ.items() if k.startswith("SMELT_") and k not in skip and not k.startswith("SMELT_MLFLOW")}


def deploy_champion(registered: str, registry: RegistryConfig, home: Path, proxy_port: int = 3000,
                    drain_timeout: float = 120.0) -> Deployment:
    """Serve `models:/<registered>@champion` on 127.0.0.1:`proxy_port`, replacing what serves there now
    without failing a request; the image is built first if needed."""
    image = containerize_champion(registered, registry, home)
    folder = deploy_dir(home, registered)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder)
    if state.get("proxy_port", proxy_port) != proxy_port:
        raise ContainerError(f"{registered} is deployed on port {state['proxy_port']}; deploy there or "
                             f"`smelt rollout {registered} --stop` first")
    old = state.get("active")
    if old and old["image"] == image.image_tag and haproxy_pid(folder) and container_running(old["container"]):
        return Deployment(proxy_port=proxy_port, image_tag=image.image_tag, mlflow_version=image.mlflow_version,
                          container=old["container"], replaced=None, ready_seconds=0.0, changed=False)
    port = free_port()
    name = f"{registered.lower()}-v{image.mlflow_version}-{port}"
    run_container(image.image_tag, name, port, container_env())
    try:
        ready = wait_ready(port, container=name)
    except ContainerError:
        stop_container(name)  # the old one keeps serving
        raise
    active = switch_traffic(folder, proxy_port, state, port, image.mlflow_version, drain_timeout)
    if old and old["container"] != name:
        docker("stop", "-t", "30", old["container"], check=False)  # SIGTERM: the server finishes what it holds
        save_logs(old["container"], folder / "logs" / f"{old['container']}.log")
        stop_container(old["container"])
    slots = {**state.get("slots", {}), active: port}
    state = {"proxy_port": proxy_port, "slots": slots,
             "active": {"container": name, "port": port, "slot": active, "image": image.image_tag,
                        "version": image.mlflow_version},
             "history": state.get("history", []) + [image.image_tag]}
    write_json(folder / "state.json", state)
    return Deployment(proxy_port=proxy_port, image_tag=image.image_tag, mlflow_version=image.mlflow_version,
                      container=name, replaced=old["container"] if old else None, ready_seconds=round(ready, 1), changed=True)


def switch_traffic(folder: Path, proxy_port: int, state: dict, port: int, version: str, drain_timeout: float) -> str:
    """Send new requests to 127.0.0.1:`port` (starting the proxy if none runs) and let the old slot drain;
    returns the active slot once the proxy serves `version` and the old slot holds no request."""
    old = state.get("active")
    running = haproxy_pid(folder) is not None and old is not None
    if running:
        active = switch_slot(folder, proxy_port, state.get("slots", {}), old["slot"], port)
    else:
        start_proxy(folder, proxy_port, port)
        active = "blue"
    deadline = time.monotonic() + 30
    while served_version(proxy_port, os.environ.get("SMELT_API_KEY")) != version:
        if time.monotonic() > deadline:
            raise ContainerError(f"the proxy on 127.0.0.1:{proxy_port} does not serve v{version} 30 s "
                                 f"after the switch (haproxy: {folder / 'haproxy.cfg'})")
        time.sleep(0.5)
    if running:
        deadline = time.monotonic() + drain_timeout
        while sessions_on(folder, old["slot"]) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)  # requests in flight on the old container finish there
        admin(folder, f"set server champion/{old['slot']} state maint")
    return active


def is_deployed(home: Path, registered: str) -> bool:
    return bool(read_state(deploy_dir(home, registered)).get("active"))


def undeploy(home: Path, registered: str) -> None:
    """Stop the proxy and the active container; images stay."""
    folder = deploy_dir(home, registered)
    state = read_state(folder)
    if pid := haproxy_pid(folder):
        os.kill(pid, signal.SIGUSR1)  # soft stop: finishes what it holds
    if state.get("active"):
        save_logs(state["active"]["container"], folder / "logs" / f"{state['active']['container']}.log")
        stop_container(state["active"]["container"])
    if (folder / "state.json").exists():
        (folder / "state.json").unlink()
