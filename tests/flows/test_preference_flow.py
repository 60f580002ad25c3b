"""`smelt train` with preference tuning on the micro preset: the task's preference file joins the dataset
version, SFT runs, then DPO on the pairs, then the draft is distilled from the DPO model; the preference
stage is its own MLflow run with its reward curves and the dataset as input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import smelt_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_train_runs_dpo_after_sft_and_tracks_it(tmp_path):
    home = tmp_path / "home"
    args = ["train", "-c", "micro-cpu", "etl.sources=[data/orders.jsonl, data/orders-preference.jsonl]",
            "train.preference.method=dpo", "train.preference.steps=4", "train.preference.batch_size=4",
            "train.log_every=2", "train.steps=4", "train.draft_steps=2"]
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=smelt_env(home),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preference-tuned (dpo, 4 steps on " in proc.stdout and "reward accuracy" in proc.stdout

    [sft] = home.glob("models/finetuned-*")
    [pref] = home.glob("models/preferred-dpo-*")
    stats = json.loads((pref / "train.json").read_text())
    assert stats["method"] == "dpo" and stats["steps"] == 4 and stats["sft"] == str(sft)
    assert stats["pairs"] > 400  # of the 600 shipped pairs: the train split, less those too close to eval rows
    [draft] = [d for d in home.glob("models/draft-*") if not d.name.startswith("draft-init")]
    assert json.loads((draft / "train.json").read_text())["target"] == str(pref)  # distilled from the DPO model

    code = """
import json
from mlflow.tracking import MlflowClient
c = MlflowClient()
[exp] = [e for e in c.search_experiments() if e.name == "smelt-micro-cpu"]
[run] = c.search_runs([exp.experiment_id], "tags.`smelt.stage` = 'preference'")
print(json.dumps({"params": run.data.params, "margins": [m.value for m in c.get_metric_history(run.info.run_id, "rewards/margins")],
                  "inputs": [d.dataset.name for d in run.inputs.dataset_inputs], "status": run.info.status}))
"""
    env = {**smelt_env(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["params"]["method"] == "dpo" and run["status"] == "FINISHED"
    assert len(run["margins"]) == 2  # logged every 2 of 4 steps
    assert run["inputs"] and run["inputs"][0].startswith("smelt-dataset-")


def test_train_with_orpo_from_the_base_skips_sft(tmp_path):
    home = tmp_path / "home"
    args = ["train", "-c", "micro-cpu", "etl.sources=[data/orders.jsonl, data/orders-preference.jsonl]",
            "train.preference.method=orpo", "train.preference.start=base", "train.preference.steps=2",
            "train.preference.batch_size=4", "train.draft_steps=2"]
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=smelt_env(home),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preference-tuned (orpo, 2 steps on " in proc.stdout and "fine-tuned (" not in proc.stdout
    assert not list(home.glob("models/finetuned-*"))
    [pref] = home.glob("models/preferred-orpo-*")
    assert json.loads((pref / "train.json").read_text())["sft"] is None
    [draft] = [d for d in home.glob("models/draft-*") if not d.name.startswith("draft-init")]
    assert json.loads((draft / "train.json").read_text())["target"] == str(pref)
