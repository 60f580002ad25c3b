"""The pipeline reporting to the servers `smelt up` starts: Prefect API and MLflow over HTTP."""
import json
import subprocess
import sys

import pytest

from cli.stack import start_services, stop_services
from tests.helpers import free_port, smelt_env

pytestmark = pytest.mark.integration


def test_pipeline_runs_against_smelt_up_servers(tmp_path):
    states = {s.service: s for s in start_services(tmp_path, ports={"mlflow": free_port(), "prefect": free_port()})}
    try:
        env = smelt_env(tmp_path, MLFLOW_TRACKING_URI=states["mlflow"].api_url)  # `smelt run` finds the Prefect server itself
        proc = subprocess.run([sys.executable, "-m", "cli.main", "run", "-c", "micro-cpu", "package.build_bento=false"],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        check = subprocess.run([sys.executable, "-c", f"""
import json, httpx
from mlflow.tracking import MlflowClient
c = MlflowClient()
champ = c.get_model_version_by_alias('smelt-micro-embedded', 'champion')
flows = httpx.post('{states["prefect"].api_url}/flow_runs/filter', json={{}}).json()
print(json.dumps({{'champ_source': champ.source, 'flow_states': [f['state_type'] for f in flows]}}))
"""], env=env, capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stderr
        got = json.loads(check.stdout.strip().splitlines()[-1])
        assert got["champ_source"].startswith("models:/") or "mlflow-artifacts" in got["champ_source"]
        assert got["flow_states"] == ["COMPLETED", "COMPLETED"]  # the pipeline and its smelt-ingest subflow
        assert (tmp_path / "mlartifacts").is_dir()  # the server stored the logged models under SMELT_HOME
    finally:
        stop_services(tmp_path)
