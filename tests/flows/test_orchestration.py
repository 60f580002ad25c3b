"""Deployments and retrain-on-new-data against real Prefect and MLflow servers started by `smelt up`."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from cli.stack import SERVICES, is_running, start_services, stop_services
from tasks.config import REPO_ROOT
from tests.helpers import free_port, smelt_env

pytestmark = pytest.mark.integration


def new_rows(path, seed: int, n: int = 120):
    spec = importlib.util.spec_from_file_location("generate_orders", REPO_ROOT / "data" / "generate_orders.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    path.write_text("".join(json.dumps(r) + "\n" for r in gen.make_rows(n, seed=seed)))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("orchestration-home")
    states = {s.service: s for s in start_services(home, SERVICES, {s: free_port() for s in SERVICES})}
    yield home, states
    stop_services(home)
    assert not any(is_running(s) for s in states.values())  # `smelt down` leaves no process behind


def smelt(home, *args, timeout=300):
    env = smelt_env(home)  # the CLI finds the running servers itself
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def flow_runs(api: str, deployment_name: str) -> list[dict]:
    deps = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": [deployment_name]}}}).json()
    if not deps:
        return []
    return httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deps[0]["id"]]}}}).json()


def wait_for_runs(api: str, deployment: str, n: int, timeout: float = 420) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = flow_runs(api, deployment)
        if len(runs) >= n and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        time.sleep(3)
    pytest.fail(f"{deployment}: {n} finished runs not seen in {timeout} s: {[r['state_type'] for r in flow_runs(api, deployment)]}")


def registered_versions(home) -> list[dict]:
    code = ("import json; from mlflow.tracking import MlflowClient; "
            "print(json.dumps([v.tags for v in MlflowClient().search_model_versions(\"name = 'smelt-micro-embedded'\")]))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


def test_new_data_triggers_one_retrain_and_unchanged_data_none(stack, tmp_path):
    home, states = stack
    api = states["prefect"].api_url
    out = smelt(home, "deploy", "-c", "micro-cpu", "package.build_bento=false")
    for name in ("smelt-pipeline/pipeline", "smelt-etl/etl", "smelt-retrain/retrain"):
        assert f"deployed {name}" in out
    deployment = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["retrain"]}}}).json()[0]
    assert "config" in deployment["parameter_openapi_schema"]["properties"]  # the UI renders the typed config form

    data = new_rows(tmp_path / "orders-new.jsonl", seed=99)
    assert "emitted smelt.data.changed" in smelt(home, "data", "add", str(data), "-c", "micro-cpu")
    [run] = wait_for_runs(api, "retrain", 1)
    assert run["state_type"] == "COMPLETED", run["state"]
    versions = registered_versions(home)
    assert versions and all(v["smelt.dataset_version"] == versions[0]["smelt.dataset_version"] for v in versions)
    assert run["parameters"]["data_digest"]  # the event's payload reached the run

    keys = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}).json()}
    assert {"smelt-data-report", "smelt-candidates", "smelt-promotion"} <= keys
    names = [r["name"] for r in httpx.post(f"{api}/flow_runs/filter", json={}).json()]
    assert any(n.startswith("micro-cpu-") and len(n) == len("micro-cpu-") + 12 for n in names)  # preset + dataset version

    assert "content unchanged: no retrain" in smelt(home, "data", "add", str(data), "-c", "micro-cpu")
    time.sleep(8)  # long enough for a trigger to have fired
    assert len(flow_runs(api, "retrain")) == 1


def test_a_burst_of_files_is_announced_once(stack, tmp_path):
    home, states = stack
    folder = home / "incoming"
    code = f"""
import json, threading, time
from pathlib import Path
from flows.watch import watch
folder = Path({str(folder)!r})
def burst():
    for i in range(3):
        (folder / f"burst-{{i}}.jsonl").write_text(Path({str(new_rows(tmp_path / 'b.jsonl', seed=7, n=20))!r}).read_text() + "\\n" * i)
        time.sleep(0.3)
threading.Thread(target=burst).start()
print(json.dumps(watch(Path({str(home)!r}), folder, interval_s=0.2, quiet_s=1.5, max_polls=30)))
"""
    env = smelt_env(home, PREFECT_API_URL=states["prefect"].api_url)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    emitted = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(emitted) == 1 and {"burst-0.jsonl", "burst-1.jsonl", "burst-2.jsonl"} <= set(emitted[0]["files"])


def test_the_uis_show_the_deployments_and_the_champion(stack, tmp_path):
    """Debian's chromium, headless through Playwright: what a person sees after a retrain."""
    import shutil

    from playwright.sync_api import sync_playwright

    home, states = stack
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed: `apt-get install chromium` (.ci/run does this)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])  # no sandbox: CI runs as root
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{states['prefect'].url}/deployments", wait_until="networkidle")
            for name in ("pipeline", "etl", "retrain"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "prefect-deployments.png"), full_page=True)
            page.goto(f"{states['mlflow'].url}/#/models/smelt-micro-embedded")  # MLflow's UI polls: never network-idle
            # the alias chip ("@ champion") on the version's row, not the champion-history tag's name
            page.locator("text=/^@\\s*champion$/").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "mlflow-model.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "prefect-deployments.png").stat().st_size > 10_000
    assert (tmp_path / "mlflow-model.png").stat().st_size > 10_000
