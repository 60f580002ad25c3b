"""Training on top of transformers' Trainer: pretraining, LoRA fine-tuning and draft distillation
all go through `fit_causal_lm`, so there is one loop to trust (and, later, one to checkpoint)."""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from models.chat import Example

log = logging.getLogger(__name__)


class TokenBlocks(Dataset):
    """Texts joined by EOS into one token stream and cut into fixed-length blocks."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # [n_blocks, seq_len]

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, seq_len: int, copy_every: int = 0, seed: int = 0) -> "TokenBlocks":
        """Texts joined by EOS and cut into blocks of `seq_len` tokens.

        `copy_every=k` makes every k-th block a random token sequence written twice: its second
        half is predictable only by looking back and copying, which grows induction (copy) heads
        within a few hundred steps. Brief pretraining on text alone leaves a base that cannot
        copy a name from a prompt, and fine-tuning then cannot teach it in minutes.
        """
        ids: list[int] = []
        for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(enc + [tokenizer.bos_token_id])
        n = len(ids) // seq_len
        blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # [n_blocks, seq_len]
        if copy_every:
            gen = torch.Generator().manual_seed(seed)
            half = seq_len // 2
            rows = blocks[::copy_every]  # a view: writes land in `blocks`
            vocab = torch.unique(blocks)  # draw from tokens real text uses, not unused special ids
            rows[:, :half] = vocab[torch.randint(len(vocab), (len(rows), half), generator=gen)]
            rows[:, half: 2 * half] = rows[:, :half]
        return cls(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class ExampleSet(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


@dataclass
class PadCollator:
    """Right-pads a batch; padded label positions are -100 so they carry no loss."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class LossProgress(ProgressCallback):
    """The usual progress bar, with the latest loss in its postfix instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}")


def fit_causal_lm(
    model, dataset: Dataset, *, steps: int, batch_size: int, lr: float, seed: int,
    device: torch.device, desc: str, pad_id: int = 0,
) -> dict:
    """Train `model` in place for `steps` optimizer steps; return loss and throughput stats."""
    with tempfile.TemporaryDirectory(prefix="smelt-trainer-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(pad_id))
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgress())
        if len(dataset) == 0:
            raise ValueError(f"{desc}: no training rows")
        log.info("%s: %d steps of batch %d", desc, steps, batch_size)
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": float(result.training_loss),
        "final_loss": float(losses[-1]) if losses else float(result.training_loss),
        "train_seconds": round(seconds, 2),
        "steps": steps,
    }
