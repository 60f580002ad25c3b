"""Training stage: prepare the base (and draft), fine-tune the base with LoRA and merge it,
then distil the draft from the fine-tuned target's own completions."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.artifacts import atomic_dir, digest, write_json
from models.chat import render_context, row_context, row_messages, tokenize_conversation
from models.config import ModelConfig, TrainConfig
from models.device import resolve_device
from models.embedded import build_embedded
from models.training import ExampleSet, fit_causal_lm
from tasks.caching import STAGE_CACHE
from tasks.config import REPO_ROOT
from tasks.etl import DatasetVersion

log = logging.getLogger(__name__)


def prepare_models(cfg: ModelConfig, home: Path, device: str = "auto") -> tuple[str, str | None]:
    """Return (base, draft_init) as loadable paths or hub ids; builds the embedded ones if asked."""
    base, draft = cfg.base, cfg.draft
    if "embedded" in (base, draft):
        emb_base, emb_draft = build_embedded(cfg.embedded, home, resolve_device(device), REPO_ROOT)
        base = str(emb_base) if base == "embedded" else base
        draft = str(emb_draft) if draft == "embedded" else draft
    return base, (None if draft == "none" else draft)


def load_tokenizer(source: str, chat_template: str | None):
    tok = AutoTokenizer.from_pretrained(source)
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def training_examples(tokenizer, rows: list[dict], max_len: int) -> ExampleSet:
    return ExampleSet([tokenize_conversation(tokenizer, row_messages(r), max_len) for r in rows])


def train_lora(base: str, dataset: DatasetVersion, cfg: TrainConfig, model_cfg: ModelConfig, home: Path) -> Path:
    """LoRA-fine-tune `base` on the train split; save the adapter and the merged model. Returns merged dir."""
    key = digest("lora-v1", base, dataset.version, cfg, model_cfg.chat_template)
    out = home / "models" / f"finetuned-{key}"
    if out.exists():
        return out
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(base, model_cfg.chat_template)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    lora = cfg.lora
    peft_model = get_peft_model(model, PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        # Copies: peft edits these lists in place, which would change our config (and every hash
        # taken of it later in the run).
        target_modules=copy.copy(lora.target_modules), task_type="CAUSAL_LM",
        modules_to_save=list(lora.modules_to_save) or None, ensure_weight_tying=bool(lora.modules_to_save),
    ))
    stats = fit_causal_lm(
        peft_model, training_examples(tokenizer, dataset.rows("train"), cfg.max_seq_len),
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate, seed=cfg.seed,
        device=device, desc="LoRA fine-tune", pad_id=tokenizer.pad_token_id,
    )
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp / "adapter")  # the small artifact, kept beside the merge
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp / "merged")
        tokenizer.save_pretrained(tmp / "merged")  # carries the chat template used in training
        write_json(tmp / "train.json", {"base": base, "dataset": dataset.version, "config": cfg.model_dump(), **stats})
    return out


@torch.inference_mode()
def complete_prompts(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions for many prompts (or conversations so far) at once (left-padded batches)."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        texts = [render_context(tokenizer, p) for p in prompts[i:i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]  # [batch, new_tokens]
        outs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return outs


def train_draft(finetuned: Path, draft_init: str, dataset: DatasetVersion, cfg: TrainConfig, home: Path) -> Path | None:
    """Sequence-level distillation: the draft learns to reproduce the target's greedy completions."""
    if cfg.draft_steps == 0:
        return None
    key = digest("draft-v1", str(finetuned), draft_init, dataset.version, cfg)
    out = home / "models" / f"draft-{key}"
    if out.exists():
        return out
    device = resolve_device(cfg.device)
    target_dir = finetuned / "merged"
    tokenizer = load_tokenizer(str(target_dir), None)
    target = AutoModelForCausalLM.from_pretrained(target_dir, use_safetensors=True).to(device).eval()
    prompts = [row_context(r) for r in dataset.rows("train")[: cfg.distill_prompts]]
    completions = complete_prompts(target, tokenizer, prompts, max_new_tokens=cfg.max_seq_len // 2)
    del target
    draft = AutoModelForCausalLM.from_pretrained(draft_init, use_safetensors=True)
    # Empty completions stay: "stop at once" is also behaviour the draft must imitate.
    rows = [{"messages": [*p, {"role": "assistant", "content": c}]} for p, c in zip(prompts, completions)]
    stats = fit_causal_lm(
        draft, training_examples(tokenizer, rows, cfg.max_seq_len), steps=cfg.draft_steps,
        batch_size=cfg.batch_size, lr=cfg.draft_learning_rate, seed=cfg.seed, device=device,
        desc="distil draft", pad_id=tokenizer.pad_token_id,
    )
    with atomic_dir(out) as tmp:
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train.json", {"target": str(finetuned), "draft_init": draft_init,
                                        "distill_rows": len(rows), **stats})
    return out


# Not cached by Prefect: the embedded build is keyed on the content of its extra tokenizer files,
# which an inputs-only key would miss; a finished build is found by its content hash at once.
@task(name="prepare-models", cache_policy=NO_CACHE)
def prepare_models_task(cfg: ModelConfig, home: str, device: str) -> tuple[str, str | None]:
    return prepare_models(cfg, Path(home), device)


@task(name="train-lora", cache_policy=STAGE_CACHE, persist_result=True)
def train_lora_task(base: str, dataset: DatasetVersion, cfg: TrainConfig, model_cfg: ModelConfig, home: str) -> Path:
    return train_lora(base, dataset, cfg, model_cfg, Path(home))


@task(name="train-draft", cache_policy=STAGE_CACHE, persist_result=True)
def train_draft_task(finetuned: Path, draft_init: str | None, dataset: DatasetVersion, cfg: TrainConfig, home: str) -> Path | None:
    return None if draft_init is None else train_draft(finetuned, draft_init, dataset, cfg, home=Path(home))
