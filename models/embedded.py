"""The embedded default: a BPE tokenizer and tiny Llama base built locally, offline.

The base is pretrained briefly on text every Python install has (the standard library's
docstrings), so it arrives at fine-tuning with some grasp of English and of copying.
"""
from __future__ import annotations

import ast
import logging
import random
import sysconfig
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.artifacts import atomic_dir, digest, write_json
from models.chat import EMBEDDED_CHAT_TEMPLATE
from models.config import EmbeddedBuildConfig, TinyLlamaSpec
from models.training import FitSpec, TokenBlocks, fit

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def collect_docstrings(max_chars: int) -> list[str]:
    """Docstrings of the standard library's sources, parsed (never imported), in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE where whitespace, punctuation and each digit are tokens of their own.

    GPT-2-style pre-tokenization glues a leading space to a word, so "Oslo" in a sentence and
    "Oslo" inside a JSON string become different tokens and a tiny model must learn to translate
    them before it can copy. Keeping words space-free makes copying an identity mapping.
    """
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = EMBEDDED_CHAT_TEMPLATE
    return fast


def new_llama(spec: TinyLlamaSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def read_extra_texts(files: list[Path]) -> list[str]:
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"tokenizer_extra_files: {f} does not exist")
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def embedded_key(cfg: EmbeddedBuildConfig, root: Path) -> str:
    """Content address of an embedded build: its config and the extra tokenizer files' text."""
    extra_files = [p if p.is_absolute() else root / p for p in map(Path, cfg.tokenizer_extra_files)]
    return digest("embedded-v2", cfg, digest(read_extra_texts(extra_files)))


def pretraining_texts(cfg: EmbeddedBuildConfig) -> list[str]:
    texts = collect_docstrings(cfg.corpus_max_chars)
    random.Random(cfg.seed).shuffle(texts)
    return texts


def build_embedded_tokenizer(cfg: EmbeddedBuildConfig, home: Path, root: Path) -> Path:
    """Build (or reuse) the embedded BPE tokenizer alone: seconds, so ETL can count tokens before
    the base is pretrained. The base built later loads this very tokenizer."""
    out = home / "models" / f"tokenizer-{embedded_key(cfg, root)}"
    if out.exists():
        return out
    extra_files = [p if p.is_absolute() else root / p for p in map(Path, cfg.tokenizer_extra_files)]
    texts = pretraining_texts(cfg)
    # Task words enter the vocabulary: a real tokenizer's corpus covers the domain it will see.
    tokenizer = train_tokenizer(texts + read_extra_texts(extra_files), cfg.vocab_size)
    log.info("tokenizer: %d tokens from %d docstrings", len(tokenizer), len(texts))
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
    return out


def build_embedded(cfg: EmbeddedBuildConfig, home: Path, device: torch.device, root: Path) -> tuple[Path, Path]:
    """Build (or reuse) the tokenizer + pretrained base and an untrained same-tokenizer draft.

    Returns (base_dir, draft_init_dir), both content-addressed by `cfg` and the extra files' content.
    """
    key = embedded_key(cfg, root)
    base_dir, draft_dir = home / "models" / f"base-{key}", home / "models" / f"draft-init-{key}"
    if base_dir.exists() and draft_dir.exists():
        return base_dir, draft_dir
    tokenizer = PreTrainedTokenizerFast.from_pretrained(build_embedded_tokenizer(cfg, home, root))
    texts = pretraining_texts(cfg)
    base = new_llama(cfg.base, tokenizer, cfg.seed)
    blocks = TokenBlocks.from_texts(texts, tokenizer, cfg.pretrain_seq_len, cfg.pretrain_copy_every, cfg.seed)
    stats = fit(base, blocks, FitSpec(steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr,
                                      seed=cfg.seed, desc="pretrain base", log_every=max(1, cfg.pretrain_steps // 20)),
                device=device)
    stats.pop("history")
    with atomic_dir(base_dir) as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "smelt_build.json", {"kind": "embedded-base", "config": cfg.model_dump(), **stats})
    if not draft_dir.exists():
        with atomic_dir(draft_dir) as tmp:
            new_llama(cfg.draft, tokenizer, cfg.seed + 1).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "smelt_build.json", {"kind": "embedded-draft-init", "config": cfg.model_dump()})
    return base_dir, draft_dir
