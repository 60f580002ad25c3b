"""Fine-tuning jobs: build the trainable model for a method (LoRA, QLoRA, full), run `fit` in this
process or in several (torchrun on the CPU, `accelerate launch` on GPUs), save what was trained,
and merge an adapter into its full-precision base.

A job is a JSON-able description, so the multi-process path runs exactly the code the
single-process path runs: `python -m models.finetune JOB.json` under the launcher.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel

from models.config import LoraConfig, TrainConfig
from models.device import resolve_device
from models.training import Logger, fit, make_accelerator, spec_from

log = logging.getLogger(__name__)
STATS = "stats.json"


class TrainJob(BaseModel):
    """One training run: what to train, on which rows, and where its checkpoints and result go."""

    source: str  # model directory or hub id to start from
    method: str  # lora | qlora | full
    train: TrainConfig
    steps: int
    lr: float
    desc: str
    rows: str  # torch file: list of {input_ids, labels}
    eval_rows: str | None = None
    out: str  # the trained model (adapter or full weights) is written here, atomically
    checkpoints: str | None = None
    pad_id: int = 0
    tracking_uri: str | None = None  # with run_id: where the launched processes' main one logs per-step metrics
    run_id: str | None = None


def qlora_settings(source: str, cfg: TrainConfig, device: torch.device):
    """bitsandbytes 4-bit loading of the frozen base; a clear error where bitsandbytes cannot run it."""
    from transformers import BitsAndBytesConfig

    from models.quant.bnb import check_cpu_packable, unsupported_reason

    if reason := unsupported_reason(device, "nf4"):
        raise RuntimeError(f"train.method=qlora cannot run on {device.type}: {reason}; use train.method=lora")
    if device.type == "cpu":
        check_cpu_packable(Path(source), "train.method=qlora", "use train.method=lora (a full-precision base) for this model")
    dtype = cfg.qlora.compute_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.qlora.quant_type,
                              bnb_4bit_use_double_quant=cfg.qlora.double_quant, bnb_4bit_compute_dtype=getattr(torch, dtype))


def load_for_training(source: str, method: str, cfg: TrainConfig, device: torch.device):
    """The model with exactly the weights `method` trains set to require gradients."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=qlora_settings(source, cfg, device),
                                                     device_map={"": str(device)}, dtype=torch.float32)
        # casts norms to fp32 and lets gradients reach the adapters through the frozen 4-bit layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, dtype=torch.float32)
    if method == "full":
        model.requires_grad_(True)
        return model
    return get_peft_model(model, peft_lora(cfg.lora))


def peft_lora(lora: LoraConfig):
    """peft's LoraConfig for ours."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        # Copies: peft edits these lists in place, which would change our config (and every hash
        # taken of it later in the run).
        target_modules=copy.copy(lora.target_modules), task_type="CAUSAL_LM",
        modules_to_save=list(lora.modules_to_save) or None, ensure_weight_tying=bool(lora.modules_to_save),
    )


def run_job(job: TrainJob, ready: Callable[[], None] | None = None, logger: Logger | None = None) -> dict:
    """Train as the job says, on this process (one of several under a launcher); the main process
    saves the result to `job.out` and returns the stats. `ready` is called once the model and rows
    are loaded, just before training starts (a benchmark starts its clock there); `logger` gets the
    logged points on the main process."""
    from transformers import set_seed

    device = resolve_device(job.train.device)
    acc = make_accelerator(device)
    set_seed(job.train.seed)  # same adapter initialisation on every process and every rerun
    model = load_for_training(job.source, job.method, job.train, device)
    rows = torch.load(job.rows, weights_only=True)
    eval_rows = torch.load(job.eval_rows, weights_only=True) if job.eval_rows else None
    spec = spec_from(job.train, steps=job.steps, lr=job.lr, desc=job.desc, n_rows=len(rows))
    if ready:
        ready()
    stats = fit(model, rows, spec, device=device, pad_id=job.pad_id, eval_rows=eval_rows,
                checkpoint_dir=Path(job.checkpoints) if job.checkpoints else None,
                on_log=logger if acc.is_main_process else None, accelerator=acc)
    stats["peak_rss_mb"] = peak_rss_mb()
    if acc.is_main_process:
        save_trained(acc.unwrap_model(model), Path(job.out), stats)
    acc.wait_for_everyone()
    return stats


def save_trained(model, out: Path, stats: dict) -> None:
    """The adapter (LoRA/QLoRA) or the whole model (full), then stats.json, renamed into place."""
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / STATS).write_text(json.dumps(stats, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def launch_command(n: int, job_file: Path, cfg: TrainConfig, device: torch.device, entry: str) -> list[str]:
    """torchrun on the CPU (gloo): `accelerate launch --cpu` silently runs a single process there
    (shared FACTS.md). On GPUs, accelerate launch, with the user's config for FSDP and the like."""
    if device.type == "cpu":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                "-m", entry, str(job_file)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={n}"]
    if cfg.accelerate_config:
        cmd.append(f"--config_file={cfg.accelerate_config}")
    else:
        cmd.append("--multi_gpu")
    return [*cmd, "-m", entry, str(job_file)]


def train(job: TrainJob, logger: Logger | None = None, entry: str = "models.finetune") -> dict:
    """Run the job here (one process, `logger` gets its points) or under a launcher with
    `train.num_processes` processes, each running module `entry` on the job file (its `__main__`
    calls `run_job`; the module decides where the main process logs)."""
    n = job.train.num_processes
    if n == 1:
        return run_job(job, logger=logger)
    device = resolve_device(job.train.device)
    job_file = Path(job.out).parent / f"{Path(job.out).name}.job.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(job.model_dump_json(indent=2))
    cmd = launch_command(n, job_file, job.train, device, entry)
    log.info("%s: launching %d processes: %s", job.desc, n, " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))}
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{job.desc}: {n}-process training failed (exit {done.returncode}); command: {' '.join(cmd)}")
    return json.loads((Path(job.out) / STATS).read_text())


def merge_adapter(base: str, adapter_dir: Path, out: Path) -> None:
    """Fold the adapter into the full-precision base (`merge_and_unload`) and save it: what gets
    quantized and shipped. A QLoRA adapter merges into the unquantized base as well."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)


if __name__ == "__main__":  # one process of a multi-process run, started by torchrun / accelerate launch
    logging.basicConfig(level=logging.INFO)
    run_job(TrainJob.model_validate_json(Path(sys.argv[1]).read_text()))
