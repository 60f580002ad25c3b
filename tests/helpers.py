"""Helpers shared by tests that start servers or run the `smelt` CLI in a subprocess."""
import os
import socket


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on right now (servers in tests bind to localhost only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def smelt_env(home, **overrides) -> dict:
    """The environment of a `smelt` subprocess with its own SMELT_HOME: every service location derived
    from that home (none inherited from this process), and PREFECT_API_URL left for the CLI to find."""
    env = {**os.environ, "SMELT_HOME": str(home)}
    for var in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "BENTOML_HOME", "PREFECT_API_URL"):
        env.pop(var, None)
    return {**env, **overrides}


def ensure_docker() -> None:
    """A Docker daemon for container tests: the running one, or dockerd started here (root) on the
    loopback only (no bridge, no iptables; containers use host networking). Skips, naming the install
    command, where Docker is not installed (.ci/run installs it)."""
    import shutil
    import subprocess
    import time

    import pytest

    def answers() -> bool:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0

    if shutil.which("docker") and answers():
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("no Docker daemon: `apt-get install -y docker.io debootstrap haproxy` as root (.ci/run does)")
    log = open("/tmp/smelt-dockerd.log", "ab")
    subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false"], stdout=log, stderr=log,
                     start_new_session=True)
    deadline = time.monotonic() + 60
    while not answers():
        assert time.monotonic() < deadline, "dockerd did not answer in 60 s; see /tmp/smelt-dockerd.log"
        time.sleep(1)
