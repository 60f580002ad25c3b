"""Process-level settings, read from the environment in one place, and the environment they imply for
Prefect, MLflow and BentoML.

`Settings` is the one reader of SMELT_HOME, SMELT_WORK_POOL, SMELT_HOST, SMELT_BENTO_MODEL and the
MLflow stores; every package may import it (models/ imports nothing of ours). `configure_environment`
must run before Prefect, MLflow or BentoML is imported: each reads its home from the environment once,
at import.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent  # inside a Bento: its source root, which holds models/ and serving/
DEFAULT_HOME = ".smelt"
# The model-store tag a Bento serves, written into its build context: `bentoml serve <bento>` does not
# apply a bentofile's envs, so a file travelling with the code is the one source that always holds.
BENTO_MODEL_FILE = Path("serving") / "bento_model.txt"


class SmeltSettings(BaseSettings):
    """How SMELT_* variables are read, for every settings class (this one and serving's ServeConfig):
    FIELD from SMELT_FIELD; an empty value counts as unset (compose and k8s files write `KEY: ""`)."""

    model_config = SettingsConfigDict(env_prefix="SMELT_", env_ignore_empty=True, extra="forbid", validate_assignment=True)


class Settings(SmeltSettings):
    home: Path = Field(Path(DEFAULT_HOME), description="SMELT_HOME: everything a run makes (stores, datasets, models).")
    work_pool: str = Field("smelt-local", description="SMELT_WORK_POOL: the Prefect work pool deployments run on.")
    host: str = Field("127.0.0.1", description="SMELT_HOST: the interface the service binds (0.0.0.0 in a container).")
    bento_model: str = Field("smelt-model:latest", description="SMELT_BENTO_MODEL: the model-store tag a service run "
                                                              "from source serves (a built Bento pins its own).")
    mlflow_backend_store_uri: str | None = Field(None, description="SMELT_MLFLOW_BACKEND_STORE_URI: the store `smelt up`'s "
                                                                   "MLflow server uses (e.g. PostgreSQL); default SQLite under home.")
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI",
                                            description="MLFLOW_TRACKING_URI: where runs are tracked; default SQLite under home.")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or sqlite_tracking_uri(self.home)


def load_settings() -> Settings:
    """The settings as the environment says now (configure_environment and tests change SMELT_HOME)."""
    return Settings()


def smelt_home() -> Path:
    return load_settings().home.resolve()


def sqlite_tracking_uri(home: Path) -> str:
    """The MLflow store smelt uses when none is configured: SQLite under SMELT_HOME."""
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def bento_model_tag(root: Path = REPO_ROOT) -> str:
    """The tag this service serves: pinned into the Bento at build time (a Bento always serves the
    model it was built with), else SMELT_BENTO_MODEL for development."""
    pinned = root / BENTO_MODEL_FILE
    return pinned.read_text().strip() if pinned.exists() else load_settings().bento_model


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
        "MLFLOW_TRACKING_URI": sqlite_tracking_uri(home),
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
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(without_data_error_traceback)


def without_data_error_traceback(record) -> bool:
    """Prefect logs a failed run's exception with its traceback. For bad input data (a DataError:
    its message names the file, row and what to do, and the CLI prints it) the traceback only buries
    that message, so the record keeps its one line. Matched by class name: models/ does not import tasks/."""
    exc = record.exc_info[1] if record.exc_info else None
    if any(c.__name__ == "DataError" for c in type(exc).__mro__):
        record.exc_info, record.exc_text = None, None
    return True
