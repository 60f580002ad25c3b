"""Training stage: prepare the base (and draft), fine-tune the base with LoRA and merge it,
then distil the draft from the fine-tuned target's own completions."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.artifacts import Artifact, artifact, read_json, write_json
from models.chat import render_context, row_context, row_messages, tokenize_conversation
from models.config import ModelConfig, TrainConfig
from models.decoding import Generation, SamplingParams, draft_acceptance, encode, generate_batch
from models.device import resolve_device
from models.embedded import build_embedded
from models.finetune import STATS, TrainJob, merge_adapter, train
from models.preference import fit_preferences, pair_records
from tasks.caching import PackageSource
from tasks.config import REPO_ROOT
from tasks.data.formats import DataError
from tasks.etl import DatasetVersion
from tasks.tracking import step_logger

log = logging.getLogger(__name__)
DRAFT_EVAL_ROWS = 64  # eval prompts the draft's acceptance rate is measured on, before and after distillation


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


def training_examples(tokenizer, rows: list[dict], max_len: int) -> list[dict]:
    """Rows as the trainer takes them: token ids and labels (-100 on everything but the answer)."""
    return [{"input_ids": e.input_ids, "labels": e.labels}
            for e in (tokenize_conversation(tokenizer, row_messages(r), max_len) for r in rows)]


# Settings that change how fast or how visibly training runs, never what it learns: outside the key,
# so a rerun with more processes or other checkpoint spacing reuses (and resumes) the same work.
RUN_ONLY = {"num_processes", "accelerate_config", "log_every", "checkpoint_every", "keep_checkpoints", "device"}
DRAFT_ONLY = {"draft_steps", "draft_learning_rate", "distill_prompts"}
PREFERENCE_ONLY = {"preference"}  # preference tuning is its own stage: changing it keeps the SFT result
# What decides the fine-tuned weights: this stage's example building and tokenizer setup, the worker
# and training loop it launches, and the chat rendering the examples are made with.
FINETUNE_CODE = ("tasks.train", "tasks.train_worker", "models.finetune", "models.training", "models.chat")
# Preference tuning: this stage, TRL's trainers as models.preference drives them, the adapter merge.
PREFERENCE_CODE = ("tasks.train", "models.preference", "models.finetune", "models.chat")
# The draft is trained by the same code; the acceptance rates recorded with it come from models.decoding.
DRAFT_CODE = (*FINETUNE_CODE, "models.decoding")


def finetune_artifact(base: str, dataset: DatasetVersion, cfg: TrainConfig, chat_template: str | None, home: Path) -> Artifact:
    return artifact(home / "models", "finetuned", base, dataset.version,
                    cfg.model_dump(mode="json", exclude=RUN_ONLY | DRAFT_ONLY | PREFERENCE_ONLY), chat_template, code=FINETUNE_CODE)


def eval_split(dataset: DatasetVersion, n: int | None) -> list[dict]:
    """The first `n` eval rows, all when `n` is None (none when the version has no eval split)."""
    return dataset.rows("eval")[:n] if (dataset.path / "eval.parquet").exists() else []


def live_logging(tracking: tuple[str, str] | None) -> tuple:
    """(logger, launcher entry) for `train`: per-step points go to the stage's MLflow run, from this
    process or from the main one of a multi-process run."""
    return (step_logger(*tracking) if tracking else None), "tasks.train_worker"


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return str(path)


def finetune(base: str, dataset: DatasetVersion, cfg: TrainConfig, model_cfg: ModelConfig, home: Path,
               tracking: tuple[str, str] | None = None) -> Path | None:
    """Fine-tune `base` on the train split (train.method: lora, qlora or full). Returns a folder with
    `merged/` (what gets quantized), `adapter/` for LoRA/QLoRA, and `train.json`.

    An interrupted run leaves its checkpoints in `models/.work-finetuned-<key>/`; running the same
    config again resumes from the last one. `tracking` = (tracking URI, MLflow run id) for per-step metrics.
    None when train.preference.start=base: preference tuning starts from the base instead.
    """
    if cfg.skips_sft():
        return None
    art = finetune_artifact(base, dataset, cfg, model_cfg.chat_template, home)
    if art.exists():
        return art.path
    work = art.work  # survives a crash: the next run resumes from its checkpoints
    tokenizer = load_tokenizer(base, model_cfg.chat_template)
    job = TrainJob(
        source=base, method=cfg.method, train=cfg, steps=cfg.steps, lr=cfg.learning_rate, desc=f"fine-tune ({cfg.method})",
        rows=write_rows(work / "train-rows.pt", training_examples(tokenizer, dataset.rows("train"), cfg.max_seq_len)),
        eval_rows=write_rows(work / "eval-rows.pt", training_examples(tokenizer, eval_split(dataset, cfg.eval_rows), cfg.max_seq_len)),
        out=str(work / "trained"), checkpoints=str(work / "checkpoints"), pad_id=tokenizer.pad_token_id,
        tracking_uri=tracking[0] if tracking else None, run_id=tracking[1] if tracking else None,
    )
    stats = train(job, *live_logging(tracking))
    with art.build() as tmp:  # clears `work` once the model is in place
        if cfg.method == "full":
            shutil.copytree(work / "trained", tmp / "merged", ignore=shutil.ignore_patterns(STATS))
        else:
            shutil.copytree(work / "trained", tmp / "adapter", ignore=shutil.ignore_patterns(STATS))  # the small artifact
            merge_adapter(base, tmp / "adapter", tmp / "merged")
        tokenizer.save_pretrained(tmp / "merged")  # carries the chat template used in training
        write_json(tmp / "train.json", {"base": base, "dataset": dataset.version, "method": cfg.method,
                                        "config": cfg.model_dump(), **stats})
    return art.path


def tune_preferences(finetuned: Path | None, dataset: DatasetVersion, cfg: TrainConfig, home: Path,
                     tracking: tuple[str, str] | None = None, base: str | None = None,
                     chat_template: str | None = None) -> Path:
    """DPO or ORPO (train.preference.method) on the dataset's preference pairs, starting from the
    fine-tuned model (or from `base` when train.preference.start=base and SFT was skipped). Returns a
    folder shaped like fine-tune's (`merged/`, `adapter/`, `train.json`), so the draft, quantization and
    evaluation take either; with method `none`, the fine-tuned folder itself. An interrupted run
    resumes from its last checkpoint when run again."""
    pref = cfg.preference
    if pref.method == "none":
        return finetuned
    pairs = pair_records(dataset.rows("train"))
    if not pairs:
        raise DataError(f"train.preference.method={pref.method} needs preference pairs (rows with a chosen and a "
                        f"rejected answer), and dataset {dataset.version} has none in its train split: add a preference "
                        f"file to etl.sources (the embedded task's is data/orders-preference.jsonl; `uv run smelt run "
                        f"--config tiny-cpu-dpo` does both) or set train.preference.method=none")
    start = str(finetuned) if finetuned is not None else base
    if start is None:
        raise ValueError("preference tuning needs the fine-tuned model or, with train.preference.start=base, the base")
    art = artifact(home / "models", f"preferred-{pref.method}", start, dataset.version, pref.model_dump(mode="json"),
                   cfg.seed, cfg.max_seq_len, chat_template, code=PREFERENCE_CODE)
    if art.exists():
        return art.path
    work = art.work  # survives a crash: the next run resumes from its checkpoints
    source = finetuned / "merged" if finetuned is not None else Path(base)
    # SFT's merged model carries the chat template it trained with; a base gets the preset's
    tokenizer = load_tokenizer(str(source), None if finetuned is not None else chat_template)
    eval_pairs = pair_records(eval_split(dataset, None))[: pref.eval_pairs]
    log.info("%s on %d preference pairs (%d eval pairs), from %s", pref.method, len(pairs), len(eval_pairs), source)
    stats = fit_preferences(source, tokenizer, pairs, eval_pairs, pref.method, pref, work / "trained", work / "checkpoints",
                            max_len=cfg.max_seq_len, seed=cfg.seed, device=resolve_device(cfg.device),
                            log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                            on_log=step_logger(*tracking) if tracking else None)
    with art.build() as tmp:  # clears `work` once the model is in place
        shutil.copytree(work / "trained", tmp / "adapter")
        merge_adapter(str(source), tmp / "adapter", tmp / "merged")
        tokenizer.save_pretrained(tmp / "merged")
        sft = read_json(finetuned / "train.json") if finetuned is not None else {"method": None}
        write_json(tmp / "train.json", {"sft": None if finetuned is None else str(finetuned), "sft_method": sft.get("method"),
                                        "start": source.as_posix(), "dataset": dataset.version, "config": pref.model_dump(),
                                        **stats})
    return art.path


def greedy_generations(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int,
                       batch_size: int = 32) -> list[Generation]:
    """The target's greedy completions per prompt (or conversation so far), EOS included, decoded
    `batch_size` prompts at a time (left-padded batches of transformers' generate)."""
    texts = [render_context(tokenizer, p) for p in prompts]
    chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    return [g for c in chunks for g in generate_batch(model, tokenizer, c, [SamplingParams(max_new_tokens)] * len(c))]


def train_draft(finetuned: Path, draft_init: str, dataset: DatasetVersion, cfg: TrainConfig, home: Path,
                tracking: tuple[str, str] | None = None) -> Path | None:
    """Sequence-level distillation: the draft learns to reproduce the target's greedy completions.
    Its acceptance rate against the target is measured on the eval split before and after."""
    if cfg.draft_steps == 0:
        return None
    art = artifact(home / "models", "draft", str(finetuned), draft_init, dataset.version,
                   cfg.model_dump(mode="json", exclude=RUN_ONLY), code=DRAFT_CODE)
    if art.exists():
        return art.path
    work = art.work  # survives a crash: the next run resumes from its checkpoints
    device = resolve_device(cfg.device)
    target_dir = finetuned / "merged"
    tokenizer = load_tokenizer(str(target_dir), None)
    target = AutoModelForCausalLM.from_pretrained(target_dir, use_safetensors=True).to(device).eval()
    prompts = [row_context(r) for r in dataset.rows("train")[: cfg.distill_prompts]]
    completions = [g.text for g in greedy_generations(target, tokenizer, prompts, max_new_tokens=cfg.max_seq_len // 2)]
    eval_prompts = [row_context(r) for r in eval_split(dataset, DRAFT_EVAL_ROWS)]
    eval_ids = [encode(tokenizer, render_context(tokenizer, p)) for p in eval_prompts]
    # EOS counts: proposing "stop here" is part of what a draft gets accepted for
    eval_targets = [g.token_ids for g in greedy_generations(target, tokenizer, eval_prompts, max_new_tokens=cfg.max_seq_len // 2)]
    del target
    init = AutoModelForCausalLM.from_pretrained(draft_init, use_safetensors=True).to(device).eval()
    before = draft_acceptance(init, eval_ids, eval_targets)
    del init
    # Empty completions stay: "stop at once" is also behaviour the draft must imitate.
    rows = [{"messages": [*p, {"role": "assistant", "content": c}]} for p, c in zip(prompts, completions)]
    draft_cfg = cfg.model_copy(update={"method": "full", "epochs": None, "early_stopping_patience": 0, "eval_every": 0})
    stats = train(TrainJob(
        source=draft_init, method="full", train=draft_cfg, steps=cfg.draft_steps, lr=cfg.draft_learning_rate,
        desc="distil draft", rows=write_rows(work / "train-rows.pt", training_examples(tokenizer, rows, cfg.max_seq_len)),
        out=str(work / "trained"), checkpoints=str(work / "checkpoints"), pad_id=tokenizer.pad_token_id,
        tracking_uri=tracking[0] if tracking else None, run_id=tracking[1] if tracking else None,
    ), *live_logging(tracking))
    draft = AutoModelForCausalLM.from_pretrained(work / "trained", use_safetensors=True).to(device).eval()
    after = draft_acceptance(draft, eval_ids, eval_targets)
    log.info("draft acceptance on %d eval rows: %s before distillation, %s after", len(eval_prompts), before, after)
    with art.build() as tmp:  # clears `work` once the draft is in place
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train.json", {"target": str(finetuned), "draft_init": draft_init, "distill_rows": len(rows),
                                        "acceptance_before": before, "acceptance_after": after,
                                        "acceptance_rows": len(eval_prompts), **stats})
    return art.path


# Not cached by Prefect: the embedded build is keyed on the content of its extra tokenizer files,
# which an inputs-only key would miss; a finished build is found by its content hash at once.
@task(name="prepare-models", cache_policy=NO_CACHE)
def prepare_models_task(cfg: ModelConfig, home: str, device: str) -> tuple[str, str | None]:
    return prepare_models(cfg, Path(home), device)


# The tracking run is where live metrics go, not an input of the work: outside the cache key.
TRAIN_CACHE = (INPUTS - "tracking") + TASK_SOURCE + PackageSource()


@task(name="fine-tune", cache_policy=TRAIN_CACHE, persist_result=True)
def finetune_task(base: str, dataset: DatasetVersion, cfg: TrainConfig, model_cfg: ModelConfig, home: str,
                  tracking: tuple[str, str] | None = None) -> Path | None:
    return finetune(base, dataset, cfg, model_cfg, Path(home), tracking)


# log_prints off: `datasets` (under TRL) finds a function's globals with dill, which disassembles it with
# print() into a captured stdout; Prefect's print capture would log those ~500 lines of bytecode instead.
@task(name="preference-tune", cache_policy=TRAIN_CACHE, persist_result=True, log_prints=False)
def preference_task(finetuned: Path | None, base: str, dataset: DatasetVersion, cfg: TrainConfig, model_cfg: ModelConfig,
                    home: str, tracking: tuple[str, str] | None = None) -> Path:
    return tune_preferences(finetuned, dataset, cfg, Path(home), tracking, base=base, chat_template=model_cfg.chat_template)


@task(name="train-draft", cache_policy=TRAIN_CACHE, persist_result=True)
def train_draft_task(finetuned: Path, draft_init: str | None, dataset: DatasetVersion, cfg: TrainConfig, home: str,
                     tracking: tuple[str, str] | None = None) -> Path | None:
    return None if draft_init is None else train_draft(finetuned, draft_init, dataset, cfg, Path(home), tracking)
