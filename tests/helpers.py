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
