"""`smelt train` killed with SIGKILL mid-training resumes from its last checkpoint when the same
command runs again, and ends at the loss of a run that was never interrupted."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import smelt_env

REPO = Path(__file__).resolve().parents[2]
# Enough steps that the kill lands mid-training on any machine; checkpoints every 40 steps.
ARGS = ["train", "-c", "micro-cpu", "train.steps=400", "train.checkpoint_every=40", "train.log_every=20",
        "train.lora.dropout=0.1", "train.draft_steps=2"]  # dropout: the RNG state must be restored too


def smelt(home: Path, threads: int | None = None, **popen) -> subprocess.Popen:
    # two runs side by side get a core each: OpenMP threads spinning on a shared core slow both many-fold
    env = smelt_env(home, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.Popen([sys.executable, "-m", "cli.main", *ARGS], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def checkpoints(home: Path) -> list[Path]:
    return sorted(home.glob("models/.work-finetuned-*/checkpoints/step-*"))


def finetuned(home: Path) -> dict:
    [out] = home.glob("models/finetuned-*/train.json")
    return json.loads(out.read_text())


def test_sigkill_then_the_same_command_resumes_and_ends_at_the_same_loss(tmp_path):
    home = tmp_path / "home"
    proc = smelt(home, start_new_session=True)  # its own process group: the kill takes the whole job, server too
    deadline = time.monotonic() + 600
    while len(checkpoints(home)) < 2 or checkpoints(home)[-1].name < "step-0000080":
        assert proc.poll() is None, f"smelt train ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not list(home.glob("models/finetuned-*")), "killed mid-training, yet a finished model exists"
    last = int(checkpoints(home)[-1].name.split("-")[1])
    assert 80 <= last < 400

    # Reference: the same command, never interrupted, in a home holding the same base (content-addressed copies).
    ref = tmp_path / "ref"
    for sub in ("datasets", *[f"models/{p.name}" for p in home.glob("models/*") if not p.name.startswith((".", "finetuned"))]):
        shutil.copytree(home / sub, ref / sub)
    reference = smelt(ref, threads=1)
    again = smelt(home, threads=1)
    out, _ = again.communicate(timeout=900)
    ref_out, _ = reference.communicate(timeout=900)
    assert again.returncode == 0, out[-3000:]
    assert reference.returncode == 0, ref_out[-3000:]

    resumed, straight = finetuned(home), finetuned(ref)
    assert f"resuming from step {resumed['resumed_from_step']}" in out and "resumed from step" in out
    assert resumed["resumed_from_step"] == last  # the newest checkpoint, not step 0
    assert straight["resumed_from_step"] == 0 and resumed["steps_run"] == straight["steps_run"] == 400
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-4)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-4)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-4)
    assert not list(home.glob("models/.work-finetuned-*"))  # checkpoints cleared once the model is in place
