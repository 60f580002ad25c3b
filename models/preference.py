"""Preference tuning after SFT: DPO or ORPO with TRL's trainers over a LoRA adapter.

The adapter is new and sits on the fine-tuned (merged) model. DPO's reference policy is that same
model with the adapter switched off (TRL does this when the policy is a peft model and no reference is
given), so no second copy of the weights is held; ORPO needs no reference. Checkpoints are the
transformers Trainer's (adapter, optimizer, scheduler, RNG states, data position): a rerun with the same
`checkpoints` folder resumes from the last one and continues with the same losses.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from models.chat import row_messages
from models.config import PreferenceConfig
from models.finetune import peft_lora
from models.training import Logger

log = logging.getLogger(__name__)
# What TRL logs that a user follows: the loss, and how far chosen answers lead rejected ones.
CURVES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "log_odds_ratio",
          "nll_loss", "learning_rate", "grad_norm")


def pair_records(rows: list[dict]) -> list[dict]:
    """The preference pairs among dataset rows, in TRL's conversational form: `prompt` = the context
    messages, `chosen` / `rejected` = one assistant message each. Rows without a rejected answer are skipped."""
    pairs = []
    for row in rows:
        if not row.get("rejected"):
            continue
        messages = row_messages(row)
        pairs.append({"prompt": messages[:-1], "chosen": [messages[-1]],
                      "rejected": [{"role": "assistant", "content": row["rejected"]}]})
    return pairs


def trainer_class(method: str):
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "orpo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental since TRL 1.0
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise ValueError(f"train.preference.method={method!r}: use dpo or orpo")


def trainer_args(method: str, cfg: PreferenceConfig, out: Path, max_len: int, seed: int, device: torch.device,
                 log_every: int, checkpoint_every: int):
    config_cls, _ = trainer_class(method)
    return config_cls(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, cfg.steps // 20), beta=cfg.beta, max_length=max_len, seed=seed, data_seed=seed,
        logging_steps=min(log_every, cfg.steps), save_strategy="steps", save_steps=checkpoint_every or cfg.steps,
        save_total_limit=2, report_to="none", use_cpu=device.type == "cpu", dataloader_num_workers=0,
        disable_tqdm=True, bf16=False, fp16=False,
    )


def logging_callback(on_log: Logger | None):
    """A TrainerCallback that forwards each logged point (numbers only) to `on_log` and to the log."""
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            point = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if not point:
                return
            if shown := ", ".join(f"{k} {point[k]:.4g}" for k in CURVES if k in point):
                log.info("preference step %d/%d: %s", state.global_step, state.max_steps, shown)
            if on_log:
                on_log(state.global_step, point)

    return Forward()


def fit_preferences(source: Path, tokenizer, pairs: list[dict], eval_pairs: list[dict], method: str, cfg: PreferenceConfig,
                     out: Path, checkpoints: Path, *, max_len: int, seed: int, device: torch.device, log_every: int = 10,
                     checkpoint_every: int = 0, on_log: Logger | None = None, callbacks: list | None = None) -> dict:
    """Train a preference adapter on `source` (a full model folder) over `pairs`; save it to `out` and
    return stats: the logged history, the final training loss, and reward accuracy / margin on
    `eval_pairs` at the end. Resumes from the last checkpoint in `checkpoints`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    set_seed(seed)  # the adapter's initialisation, identical on a rerun
    model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, dtype=torch.float32)
    args = trainer_args(method, cfg, checkpoints, max_len, seed, device, log_every, checkpoint_every)
    _, trainer_cls = trainer_class(method)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                          eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None, processing_class=tokenizer,
                          peft_config=peft_lora(cfg.lora), callbacks=[logging_callback(on_log), *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)  # our callback logs the same points, once
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last:
        log.info("%s: resuming from %s", method, last)
    result = trainer.train(resume_from_checkpoint=last)
    final = trainer.evaluate() if eval_pairs else {}
    trainer.model.save_pretrained(out)
    history = [{"step": h["step"], **{k: v for k, v in h.items() if k in CURVES}}
               for h in trainer.state.log_history if "loss" in h]
    return {"method": method, "pairs": len(pairs), "eval_pairs": len(eval_pairs), "steps": trainer.state.global_step,
            "train_loss": result.training_loss, "history": history,
            **{f"eval_{k.removeprefix('eval_')}": v for k, v in final.items()
               if k.removeprefix("eval_") in ("loss", "rewards/accuracies", "rewards/margins")}}
