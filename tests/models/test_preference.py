"""DPO and ORPO with TRL on a tiny random Llama: the loss falls, chosen answers pull ahead of rejected
ones, and a run killed with SIGKILL resumes from its checkpoint with the losses of an uninterrupted run."""
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from models.config import LoraConfig, PreferenceConfig
from models.preference import fit_preferences, pair_records

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def toy_pairs(n: int) -> list[dict]:
    """Right JSON vs a near miss (wrong qty or broken JSON) for the same request."""
    return pair_records([{"messages": [{"role": "user", "content": f"Bob from Oslo ordered {i} cups."},
                                       {"role": "assistant", "content": f'{{"qty": {i}}}'}],
                          "rejected": f'{{"qty": {i + 1}}}' if i % 2 else f'{{"qty": {i}'} for i in range(n)])


def fit(model_dir: Path, out: Path, method: str, steps: int = 12, **kw) -> dict:
    cfg = PreferenceConfig(method=method, steps=steps, batch_size=8, learning_rate=5e-3, lora=LoraConfig(r=4, alpha=8))
    pairs = toy_pairs(32)
    return fit_preferences(model_dir, AutoTokenizer.from_pretrained(model_dir), pairs, pairs[:8], method, cfg,
                           out / "adapter", out / "checkpoints", max_len=48, seed=0, device=CPU, log_every=2, **kw)


def test_pairs_come_from_rows_with_a_rejected_answer_only():
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": None},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "good"}], "rejected": "bad"}]
    assert pair_records(rows) == [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                                   "chosen": [{"role": "assistant", "content": "good"}],
                                   "rejected": [{"role": "assistant", "content": "bad"}]}]


def test_dpo_loss_falls_and_the_chosen_answer_pulls_ahead(tiny_model_dir, tmp_path):
    stats = fit(tiny_model_dir, tmp_path, "dpo")
    first, last = stats["history"][0], stats["history"][-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at the start
    assert last["loss"] < first["loss"] - 0.01
    assert last["rewards/margins"] > first["rewards/margins"] + 0.02
    assert stats["eval_rewards/accuracies"] > 0.5 and stats["eval_rewards/margins"] > 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_orpo_trains_without_a_reference_model(tiny_model_dir, tmp_path):
    stats = fit(tiny_model_dir, tmp_path, "orpo")
    losses = [h["loss"] for h in stats["history"]]
    assert losses[-1] < losses[0]
    assert all("log_odds_ratio" in h and "nll_loss" in h for h in stats["history"])


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
sys.path.insert(0, {repo!r})
from tests.models.test_preference import fit

class KillAtSix(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)

fit(Path({model!r}), Path({out!r}), "dpo", steps=8, checkpoint_every=4, callbacks=[KillAtSix()])
"""


def test_sigkill_mid_training_then_rerun_resumes_with_the_same_losses(tiny_model_dir, tmp_path):
    killed = tmp_path / "killed"
    script = textwrap.dedent(KILLED_RUN).format(repo=str(REPO), model=str(tiny_model_dir), out=str(killed))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (killed / "adapter").exists()

    resumed = fit(tiny_model_dir, killed, "dpo", steps=8, checkpoint_every=4)
    straight = fit(tiny_model_dir, tmp_path / "straight", "dpo", steps=8, checkpoint_every=4)
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6, 8]
    for a, b in zip(resumed["history"], straight["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (resumed["history"], straight["history"])
