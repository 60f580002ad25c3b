"""Point Prefect, MLflow and BentoML at SMELT_HOME. Must run before any of them is imported:
each reads its home from the environment once, at import."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".smelt"


def smelt_home() -> Path:
    return Path(os.environ.get("SMELT_HOME", DEFAULT_HOME)).resolve()


def configure_environment(home: Path | None = None) -> Path:
    """Set (only where unset) the variables that keep every service's state under SMELT_HOME."""
    home = (home or smelt_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["SMELT_HOME"] = str(home)
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline: avoid a telemetry error at start
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOGGING_LEVEL": "INFO",  # task-run start/finish lines are the pipeline's progress log
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",  # offline, and nobody asked to be counted
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # torch.compile's kernels and graphs: a restarted server or benchmark warms up from here, not from zero
        "TORCHINDUCTOR_CACHE_DIR": str(home / "compile-cache"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return home


def quiet_library_logs() -> None:
    """Silence import-time chatter that says nothing about the user's run."""
    import logging

    # torchao registers enums with torch's pytree (a deprecation note per enum); bitsandbytes looks
    # for an optional hub kernel for 4-bit CPU matmul and falls back to its own when offline.
    for name in ("torch.utils._pytree", "bitsandbytes.backends.cpu.ops", "mlflow.utils.uv_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
