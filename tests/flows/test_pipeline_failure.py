"""A pipeline that fails mid-way leaves its MLflow run marked FAILED and the registry untouched."""
import json
import subprocess
import sys

import pytest

from tests.helpers import smelt_env

pytestmark = pytest.mark.integration


def test_a_failed_flow_marks_its_mlflow_run_failed(tmp_path):
    env = smelt_env(tmp_path)
    missing = tmp_path / "no-such-model"  # found missing when the draft is distilled, after the MLflow run opened
    proc = subprocess.run([sys.executable, "-m", "cli.main", "run", "-c", "micro-cpu", f"model.draft={missing}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert str(missing) in proc.stdout + proc.stderr  # the error names what was missing
    check = subprocess.run([sys.executable, "-c", """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name('smelt-micro-cpu')
runs = c.search_runs([exp.experiment_id])
print(json.dumps({'status': sorted((r.info.run_name.split('-')[0] if 'mlflow.parentRunId' not in r.data.tags else r.info.run_name,
                                   r.info.status) for r in runs), 'models': len(c.search_registered_models())}))
"""], env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    got = json.loads(check.stdout.strip().splitlines()[-1])
    # the parent run and the stage runs opened for live training metrics: none left RUNNING
    assert got == {"status": [["draft", "FAILED"], ["micro", "FAILED"], ["train", "FAILED"]], "models": 0}
