"""models/settings.py: the one reader of process-level SMELT_* settings, and the service's
ServeConfig, which reads its own SMELT_* fields the same way."""
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.settings import BENTO_MODEL_FILE, Settings, bento_model_tag, configure_environment, sqlite_tracking_uri
from serving.config import ServeConfig


@pytest.fixture
def env(monkeypatch):
    for var in ("SMELT_WORK_POOL", "SMELT_HOST", "SMELT_BENTO_MODEL", "MLFLOW_TRACKING_URI", "SMELT_MAX_BATCH_SIZE",
                "SMELT_API_KEY", "SMELT_MLFLOW_BACKEND_STORE_URI"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_settings_come_from_the_environment_with_defaults(env, tmp_path):
    env.setenv("SMELT_HOME", str(tmp_path))
    s = Settings()
    assert (s.home, s.work_pool, s.host, s.bento_model) == (tmp_path, "smelt-local", "127.0.0.1", "smelt-model:latest")
    assert s.tracking_uri == sqlite_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    env.setenv("SMELT_WORK_POOL", "k8s")
    env.setenv("SMELT_HOST", "")  # an empty value (compose, k8s) means unset
    env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    s = Settings()
    assert (s.work_pool, s.host, s.tracking_uri) == ("k8s", "127.0.0.1", "http://127.0.0.1:5000")


def test_configure_environment_points_mlflow_at_the_settings_store(env, tmp_path):
    env.delenv("PREFECT_HOME", raising=False)
    home = configure_environment(tmp_path / "h")
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == sqlite_tracking_uri(home) == Settings().tracking_uri
    assert os.environ["PREFECT_HOME"] == str(home / "prefect")


def test_a_built_bento_serves_its_pinned_tag_else_the_environment(env, tmp_path):
    env.setenv("SMELT_BENTO_MODEL", "dev-model:1")
    assert bento_model_tag(tmp_path) == "dev-model:1"
    pinned = tmp_path / BENTO_MODEL_FILE
    pinned.parent.mkdir(parents=True)
    pinned.write_text("smelt-tiny:abc\n")
    assert bento_model_tag(tmp_path) == "smelt-tiny:abc"
    assert bento_model_tag(Path(__file__).resolve().parents[2]) == "dev-model:1"  # the repo pins nothing


def test_serve_config_reads_its_smelt_variables_and_names_a_bad_one(env):
    env.setenv("SMELT_MAX_BATCH_SIZE", "3")
    env.setenv("SMELT_API_KEY", "")  # unset: no key required
    cfg = ServeConfig()
    assert cfg.max_batch_size == 3 and cfg.api_key is None and cfg.max_queue == 64
    assert ServeConfig(max_batch_size=5).max_batch_size == 5  # arguments win over the environment
    env.setenv("SMELT_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="max_batch_size"):
        ServeConfig()


def test_prefect_run_logs_keep_a_data_error_to_its_message_and_other_errors_to_their_traceback():
    import logging
    import sys

    from models.settings import quiet_library_logs
    from tasks.data.formats import DataError

    quiet_library_logs()
    logger = logging.getLogger("prefect.task_runs")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(self.format(record))

    handler = Keep()
    logger.addHandler(handler)
    try:
        for exc in (DataError("input file x.jsonl is empty"), RuntimeError("a bug")):
            try:
                raise exc
            except Exception:
                logger.error("Task run failed with exception: %r", sys.exc_info()[1], exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert seen[0] == "Task run failed with exception: DataError('input file x.jsonl is empty')"
    assert seen[1].startswith("Task run failed with exception: RuntimeError('a bug')\nTraceback")
