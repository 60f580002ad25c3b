"""`smelt bench-train`: smelt's trainer next to a plain transformers.Trainer + peft run on the same
model, rows and settings; each job in a fresh process, so peak memory is per job.

Tokens/s counts the tokens of real rows (padding excluded) over the training loop's wall time,
model loading excluded. Imports stay light here: the heavy ones happen in the child processes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from models.artifacts import write_json
from bench.etl import Clock, measure_in_child

JOBS = ("transformers.Trainer + peft", "smelt", "smelt, packed")


def job_setup(args: dict, clock: Clock) -> dict:
    """Not measured: the preset's dataset and base model (built or found in SMELT_HOME), and the
    tokenized training rows both trainers read."""
    import torch

    from models.settings import configure_environment

    home = configure_environment(Path(args["home"]))
    from tasks.config import load_config
    from tasks.etl import build_dataset, prepare_tokenizer
    from tasks.train import load_tokenizer, prepare_models, training_examples

    cfg = load_config(args["config"], args["overrides"])
    clock.start()
    tokenizer_dir = prepare_tokenizer(cfg.model, home)
    dataset = build_dataset(cfg.etl, home, tokenizer_dir, cfg.model.chat_template)
    base, _ = prepare_models(cfg.model, home, cfg.train.device)
    tokenizer = load_tokenizer(base, cfg.model.chat_template)
    rows = training_examples(tokenizer, dataset.rows("train"), cfg.train.max_seq_len)
    torch.save(rows, args["rows"])
    return {"base": base, "dataset": dataset.version, "rows": len(rows), "pad_id": tokenizer.pad_token_id,
            "train": cfg.train.model_dump(mode="json")}


def job_trainer(args: dict, clock: Clock) -> dict:
    """The plain path: transformers' Trainer over a peft LoRA model, with transformers' own collator."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from models.config import TrainConfig
    from models.device import resolve_device
    from models.finetune import load_for_training

    cfg = TrainConfig.model_validate(args["train"])
    set_seed(cfg.seed)
    model = load_for_training(args["base"], "lora", cfg, resolve_device(cfg.device))
    rows = torch.load(args["rows"], weights_only=True)
    with tempfile.TemporaryDirectory(prefix="smelt-bench-trainer-") as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args["steps"], per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_schedule, warmup_steps=int(cfg.warmup_ratio * args["steps"]),
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.log_every,
            save_strategy="no", report_to="none", seed=cfg.seed, use_cpu=resolve_device(cfg.device).type == "cpu",
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        )
        collator = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(args["base"]), padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator)
        clock.start()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": int(trainer.state.num_input_tokens_seen), "final_loss": losses[-1], "steps": trainer.state.global_step}


def job_smelt(args: dict, clock: Clock) -> dict:
    """smelt's path as `smelt train` runs it: checkpoints and logging included, and saving the adapter;
    the clock starts, as for the Trainer job, once the model and rows are loaded."""
    from models.config import TrainConfig
    from models.finetune import TrainJob, run_job

    cfg = TrainConfig.model_validate({**args["train"], "packing": args["packing"], "num_processes": 1})
    job = TrainJob(source=args["base"], method="lora", train=cfg, steps=args["steps"], lr=cfg.learning_rate,
                   desc="smelt (packed)" if args["packing"] else "smelt", rows=args["rows"], out=args["out"],
                   checkpoints=args["checkpoints"], pad_id=args["pad_id"])
    stats = run_job(job, ready=clock.start)
    return {"tokens": stats["train_tokens"], "final_loss": stats["final_loss"], "steps": stats["steps_run"],
            "packed_rows": stats["packed_rows"]}


def run_train_benchmark(workdir: Path, home: Path, config: str, overrides: list[str], steps: int, echo=print) -> dict:
    """Setup once, then each trainer in its own process; tokens/s and peak RSS side by side."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = workdir / "rows.pt"
    echo(f"setup: dataset and base model of {config} (built once, then found in {home})")
    setup = measure_in_child("bench.train:job_setup", {"home": str(home), "config": config, "overrides": overrides,
                                                             "rows": str(rows)})
    common = {"base": setup["base"], "rows": str(rows), "train": setup["train"], "steps": steps, "pad_id": setup["pad_id"]}
    results = {}
    for name in JOBS:
        echo(f"measuring: {name} ({steps} steps, batch {setup['train']['batch_size']})")
        if name.startswith("smelt"):
            for sub in ("out", "checkpoints"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
            r = measure_in_child("bench.train:job_smelt", {**common, "packing": "packed" in name,
                                                                "out": str(workdir / "out"), "checkpoints": str(workdir / "checkpoints")})
        else:
            r = measure_in_child("bench.train:job_trainer", common)
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        results[name] = r
    base = results[JOBS[0]]
    result = {"config": config, "overrides": overrides, "steps": steps, "cpus": os.cpu_count(), "rows": setup["rows"],
              "dataset": setup["dataset"], "base": setup["base"], "train": setup["train"], "jobs": results,
              "ratios": {name: {"tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
                                "peak_rss": r["peak_rss_mb"] / base["peak_rss_mb"]} for name, r in results.items()}}
    write_json(workdir / "train-benchmark.json", result)
    return result


def table_rows(result: dict) -> list[list[str]]:
    rows = [["trainer", "seconds", "tokens/s", "x Trainer", "peak RSS MB", "x Trainer", "final loss"]]
    for name, r in result["jobs"].items():
        ratio = result["ratios"][name]
        rows.append([name, f"{r['seconds']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{ratio['tokens_per_s']:.2f}x",
                     f"{r['peak_rss_mb']:,.0f}", f"{ratio['peak_rss']:.2f}x", f"{r['final_loss']:.4f}"])
    return rows

