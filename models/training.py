"""smelt's training loop, on Accelerate: pretraining of the embedded base, fine-tuning (LoRA, QLoRA,
full) and draft distillation all go through `fit`, so there is one loop to trust.

What it adds over a bare loop, and why it is not transformers' Trainer:
- the data order is a pure function of (seed, step), so a resumed run and a run over N processes
  see exactly the batches a single uninterrupted run sees;
- the loss of a step is normalised by the label tokens of the whole global batch, so gradient
  accumulation and DDP give the same update as one big batch;
- checkpoints (the weights being trained, optimizer, scheduler, RNG, progress) are written to a
  temporary folder and renamed into place, and only trainable weights are stored;
- optional packing of rows into full sequences, with attention kept inside each row.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from models.chat import Example

log = logging.getLogger(__name__)
Logger = Callable[[int, dict], None]  # (step, metrics) -> None; called on the main process only


class ExampleSet(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": list(e.input_ids), "labels": list(e.labels)}


class PackedSet(Dataset):
    """Rows packed greedily, in a seeded order, into sequences of at most `max_len` tokens.

    Each row keeps its own positions (0, 1, ...), which is how transformers recognises packed rows
    and keeps attention inside each one; the first label of every row is masked, as the
    shift inside the loss would have dropped it for a row on its own.
    """

    def __init__(self, rows: Dataset, max_len: int, seed: int):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        self.packs: list[dict] = []
        cur: dict = {"input_ids": [], "labels": [], "position_ids": []}
        for i in order:
            r = rows[i]
            n = len(r["input_ids"])
            if cur["input_ids"] and len(cur["input_ids"]) + n > max_len:
                self.packs.append(cur)
                cur = {"input_ids": [], "labels": [], "position_ids": []}
            cur["input_ids"] += r["input_ids"]
            cur["labels"] += [-100] + list(r["labels"][1:])
            cur["position_ids"] += list(range(n))
        if cur["input_ids"]:
            self.packs.append(cur)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict:
        return self.packs[i]


@dataclass
class PadCollator:
    """Right-pads a batch; padded label positions are -100 so they carry no loss. Packed rows get
    position ids (and no attention mask, so the model builds the per-row causal mask)."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        packed = "position_ids" in rows[0]
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        pos = torch.arange(width).repeat(len(rows), 1)  # [batch, width]; padding: one more "row" from 0
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
            if packed:
                pos[i, :n] = torch.as_tensor(r["position_ids"])
                pos[i, n:] = torch.arange(width - n)
        batch = {"input_ids": ids, "labels": labels}
        if packed:
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = mask
        return batch


def label_tokens(row: dict) -> int:
    """Tokens a row contributes to the loss: labels after the one-token shift that are not masked."""
    return sum(1 for t in row["labels"][1:] if t != -100)


@dataclass
class FitSpec:
    """How `fit` trains: everything but the model and the data."""

    steps: int
    batch_size: int  # global: rows per optimizer step over all processes and micro-batches
    lr: float
    desc: str = "train"
    grad_accum: int = 1
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 0.0
    packing: bool = False
    max_seq_len: int = 0  # packing only
    bf16: bool = False  # forward under bfloat16 autocast (weights and optimizer stay fp32)
    shuffle: bool = True  # False: rows in dataset order (a curriculum whose order matters)


def spec_from(cfg, *, steps: int, lr: float, desc: str, n_rows: int) -> FitSpec:
    """The FitSpec of a TrainConfig; `epochs`, when set, decides the steps."""
    if cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))
    return FitSpec(steps=steps, batch_size=cfg.batch_size, lr=lr, desc=desc, grad_accum=cfg.grad_accum,
                   schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                   max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, log_every=cfg.log_every,
                   checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                   eval_every=cfg.eval_every, patience=cfg.early_stopping_patience,
                   min_delta=cfg.early_stopping_min_delta, packing=cfg.packing, max_seq_len=cfg.max_seq_len)


@dataclass
class Progress:
    """Training progress saved with each checkpoint (accelerate pickles it beside the weights)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_eval: float = math.inf
    evals_without_gain: int = 0
    stopped_early: bool = False
    best_state: dict = field(default_factory=dict)  # trainable weights at the best eval loss
    history: list = field(default_factory=list)  # logged points, also kept in train.json

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class BatchOrder:
    """Which rows form each micro-batch: a seeded permutation per epoch, read as one endless stream.

    Step `s` takes stream items [s*B, (s+1)*B); process `r` of `w` takes every w-th of them and
    splits its share into `grad_accum` micro-batches. Nothing depends on earlier steps, so a resumed
    or multi-process run reads exactly the rows a single uninterrupted run reads.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def item(self, k: int) -> int:
        if not self.shuffle:  # rows in their own order: a curriculum that is already random and ordered
            return k % self.n
        epoch = k // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()}
        return self._perms[epoch][k % self.n]

    def global_batch(self, step: int) -> list[int]:
        return [self.item(k) for k in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[list[int]]:
        return split(self.global_batch(step), rank, world, grad_accum)


def split(global_rows: list[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """Process `rank`'s share of a global batch (every world-th row), cut into micro-batches."""
    mine = global_rows[rank::world]
    size = len(mine) // grad_accum
    return [mine[i * size:(i + 1) * size] for i in range(grad_accum)]


def batch_loss(model, batch: dict, n_labels: int) -> torch.Tensor:
    """Summed token loss of `batch` divided by `n_labels` (the label tokens of the whole global batch).

    No KV cache: transformers builds the per-row mask of packed sequences only without one.
    """
    return model(**batch, use_cache=False, num_items_in_batch=max(1, n_labels)).loss


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(root: Path | None) -> Path | None:
    """The newest complete checkpoint (complete = renamed into place), or None."""
    if root is None or not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    return done[-1] if done else None


def save_checkpoint(acc, root: Path, step: int, keep: int) -> Path:
    """accelerate's save_state into a temporary folder, renamed into place once every rank wrote."""
    final, tmp = root / f"step-{step:07d}", root / f".tmp-step-{step:07d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash while writing
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def make_accelerator(device: torch.device):
    from accelerate import Accelerator

    # The scheduler steps once per optimizer step: accelerate would otherwise step it once per process,
    # assuming each process saw 1/N of the steps, which is not how BatchOrder splits the data.
    return Accelerator(cpu=device.type == "cpu", step_scheduler_with_optimizer=False)


@torch.no_grad()
def eval_loss(model, rows: Dataset, collate: PadCollator, batch_size: int, device: torch.device) -> float:
    """Mean loss per label token over `rows` (unpacked, on this process alone)."""
    total = sum(label_tokens(rows[i]) for i in range(len(rows)))
    if total == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    loss = 0.0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]).items()}
        loss += batch_loss(model, batch, total).item()
    model.train(was_training)
    return loss


def copy_trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fit(
    model, train: Dataset, spec: FitSpec, *, device: torch.device, pad_id: int = 0, eval_rows: Dataset | None = None,
    checkpoint_dir: Path | None = None, on_log: Logger | None = None, accelerator=None,
) -> dict:
    """Train `model` in place for `spec.steps` optimizer steps; return loss, eval loss and throughput.

    With `checkpoint_dir`, a checkpoint is written every `spec.checkpoint_every` steps and an
    existing one is resumed from (weights, optimizer, scheduler, RNG and the step, which fixes the
    data position). Under torchrun / accelerate launch every process runs this same function.
    """
    from transformers import get_scheduler

    if len(train) == 0:
        raise ValueError(f"{spec.desc}: no training rows")
    acc = accelerator or make_accelerator(device)
    world, rank = acc.num_processes, acc.process_index
    if spec.batch_size % (world * spec.grad_accum):
        raise ValueError(f"{spec.desc}: batch_size {spec.batch_size} does not split over {world} processes x "
                         f"{spec.grad_accum} micro-batches")
    rows = PackedSet(train, spec.max_seq_len, spec.seed) if spec.packing else train
    collate = PadCollator(pad_id)
    order = BatchOrder(len(rows), spec.batch_size, spec.seed, spec.shuffle)
    counts = [label_tokens(rows[i]) for i in range(len(rows))]

    names = trainable_names(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW (one kernel over all tensors) is what transformers' Trainer defaults to on torch >= 2.8 too
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=acc.device.type in ("cpu", "cuda"))
    scheduler = get_scheduler(spec.schedule, optimizer, num_warmup_steps=int(spec.warmup_ratio * spec.steps),
                              num_training_steps=spec.steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    # Checkpoints hold only what is trained: the frozen base is read again from its own files.
    acc.register_save_state_pre_hook(lambda models, weights, _dir: [
        w.pop(k) for w in weights for k in list(w) if k.removeprefix("module.") not in names])
    resumed_from = 0
    if (ckpt := latest_checkpoint(checkpoint_dir)) is not None:
        acc.load_state(str(ckpt), strict=False)
        resumed_from = progress.step
        log.info("%s: resuming from checkpoint %s (step %d of %d)", spec.desc, ckpt.name, progress.step, spec.steps)
        if acc.is_main_process:
            print(f"{spec.desc}: resuming from step {progress.step} ({ckpt})", flush=True)

    inner = acc.unwrap_model(model)
    model.train()
    bar = tqdm(total=spec.steps, initial=progress.step, desc=spec.desc, disable=not acc.is_main_process, unit="step")
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    last_eval = math.nan
    while progress.step < spec.steps and not progress.stopped_early:
        step = progress.step
        t0 = time.perf_counter()
        global_rows = order.global_batch(step)
        n_labels = sum(counts[i] for i in global_rows)  # the whole global batch's label tokens
        micro = split(global_rows, rank, world, spec.grad_accum)
        step_loss, step_tokens = 0.0, 0
        for m, idx in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in collate([rows[i] for i in idx]).items()}
            ctx = acc.no_sync(model) if m < len(micro) - 1 else contextlib.nullcontext()
            with ctx:
                # sum over this micro-batch / tokens of the global batch; DDP averages gradients over
                # processes, so multiply by their number to get the global sum back
                with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                    loss = batch_loss(model, batch, n_labels)
                acc.backward(loss * world)
            step_loss += loss.item()
            step_tokens += sum(len(rows[i]["input_ids"]) for i in idx)
        grad_norm = acc.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = _sum_over_processes(acc, step_loss, step_tokens)
        progress.step += 1
        progress.tokens += step_tokens
        progress.seconds += time.perf_counter() - t0
        window_loss += step_loss
        window_tokens += step_tokens
        bar.update(1)

        if spec.eval_every and eval_rows and progress.step % spec.eval_every == 0 and progress.step < spec.steps:
            last_eval = eval_loss(inner, eval_rows, collate, max(1, spec.batch_size // world), acc.device)
            track_best(progress, inner, last_eval, spec)
            if acc.is_main_process and on_log:
                on_log(progress.step, {"eval_loss": last_eval})
        if progress.step % spec.log_every == 0 or progress.step == spec.steps:
            n = progress.step % spec.log_every or spec.log_every
            point = {"step": progress.step, "loss": window_loss / n, "learning_rate": scheduler.get_last_lr()[0],
                     "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(1e-9, time.perf_counter() - window_start),
                     "epoch": progress.step * spec.batch_size / len(rows)}
            progress.history.append(point)
            bar.set_postfix(loss=f"{point['loss']:.3f}", tok_s=f"{point['tokens_per_s']:.0f}")
            if acc.is_main_process and on_log:
                on_log(progress.step, {k: v for k, v in point.items() if k != "step"})
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        if checkpoint_dir is not None and spec.checkpoint_every and progress.step % spec.checkpoint_every == 0 \
                and progress.step < spec.steps and not progress.stopped_early:
            save_checkpoint(acc, checkpoint_dir, progress.step, spec.keep_checkpoints)
    bar.close()

    if progress.stopped_early and progress.best_state:
        restore(inner, progress.best_state)
    final_eval = eval_loss(inner, eval_rows, collate, max(1, spec.batch_size // world), acc.device) \
        if eval_rows else None
    acc.wait_for_everyone()
    losses = [h["loss"] for h in progress.history]
    stats = {
        "train_loss": sum(losses) / len(losses) if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "eval_loss": final_eval,
        "steps": spec.steps,
        "steps_run": progress.step,
        "stopped_early": progress.stopped_early,
        "best_eval_loss": None if math.isinf(progress.best_eval) else progress.best_eval,
        "resumed_from_step": resumed_from,
        "train_seconds": round(progress.seconds, 2),
        "train_tokens": progress.tokens,
        "train_tokens_per_s": progress.tokens / max(1e-9, progress.seconds),
        "num_processes": world,
        "packed_rows": len(rows) if spec.packing else None,
        "history": progress.history,
    }
    if acc.is_main_process and on_log and final_eval is not None:
        on_log(progress.step, {"eval_loss": final_eval})
    return stats


def track_best(progress: Progress, model, loss: float, spec: FitSpec) -> None:
    """Early stopping bookkeeping: remember the best weights; stop after `patience` evals without gain."""
    if loss < progress.best_eval - spec.min_delta:
        progress.best_eval, progress.evals_without_gain = loss, 0
        progress.best_state = copy_trainable(model)
    else:
        progress.evals_without_gain += 1
        if spec.patience and progress.evals_without_gain >= spec.patience:
            progress.stopped_early = True
            log.info("%s: eval loss did not improve for %d evaluations; stopping at step %d", spec.desc,
                     progress.evals_without_gain, progress.step)


@torch.no_grad()
def restore(model, state: dict) -> None:
    for n, p in model.named_parameters():
        if n in state:
            p.copy_(state[n])


def _sum_over_processes(acc, loss: float, tokens: int) -> tuple[float, int]:
    """The step's loss and token count summed over processes, in one collective."""
    if acc.num_processes == 1:
        return loss, tokens
    both = acc.reduce(torch.tensor([loss, float(tokens)], dtype=torch.float64, device=acc.device), reduction="sum")
    return float(both[0]), int(both[1])
