"""The embedded default: a BPE tokenizer and tiny Llama base built locally, offline.

The base is pretrained briefly on text every Python install has (the standard library's
docstrings), so it arrives at fine-tuning with some grasp of English and of copying.
"""
from __future__ import annotations

import ast
import json
import logging
import random
import shutil
import sysconfig
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models import shipped
from models.artifacts import Artifact, artifact, digest, write_json
from models.chat import EMBEDDED_CHAT_TEMPLATE
from models.config import CurriculumMix, EmbeddedBuildConfig, TinyLlamaSpec
from models.curriculum import Curriculum, skill_accuracy, skill_probes
from models.training import FitSpec, fit

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


@torch.no_grad()
def grow_llama(small: LlamaForCausalLM, spec: TinyLlamaSpec, seed: int) -> LlamaForCausalLM:
    """`small` widened and deepened to `spec`, computing the same function (up to RMSNorm's epsilon).

    The residual stream [d] becomes [x, 0] in [D]: embeddings get zero new columns, so the tied head
    gives the same logits. RMSNorm over D dims of [x, 0] sees rms(x) * sqrt(d/D), so the old gains are
    scaled by sqrt(d/D). Old heads and MLP units keep their weights and read only the old dims; new
    heads, units and layers start random but write nothing (zero output rows / columns), so training
    grows them from a model that already copies by content. Head size is kept; heads are added.
    """
    c, d, D = small.config, small.config.hidden_size, spec.hidden_size
    config = LlamaConfig(**{**c.to_dict(), "hidden_size": D, "num_hidden_layers": spec.num_layers,
                            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_heads,
                            "intermediate_size": spec.intermediate_size, "head_dim": D // spec.num_heads})
    torch.manual_seed(seed)
    big = LlamaForCausalLM(config)
    scale = (d / D) ** 0.5

    def norm(dst, src) -> None:
        dst.weight.fill_(scale)
        dst.weight[:d] = src.weight * scale

    def widen(dst, src, rows: int, cols: int, zero_rest: bool) -> None:
        if zero_rest:
            dst.weight.zero_()
        dst.weight[:rows, :cols] = src.weight
        dst.weight[:rows, cols:] = 0  # the old units read only the old dims

    big.model.embed_tokens.weight.zero_()
    big.model.embed_tokens.weight[:, :d] = small.model.embed_tokens.weight
    norm(big.model.norm, small.model.norm)
    for k, layer in enumerate(big.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if k >= c.num_hidden_layers:  # a new layer adds nothing to the residual until it learns to
            attn.o_proj.weight.zero_()
            mlp.down_proj.weight.zero_()
            continue
        old = small.model.layers[k]
        norm(layer.input_layernorm, old.input_layernorm)
        norm(layer.post_attention_layernorm, old.post_attention_layernorm)
        for name in ("q_proj", "k_proj", "v_proj"):
            widen(getattr(attn, name), getattr(old.self_attn, name), d, d, zero_rest=False)
        widen(attn.o_proj, old.self_attn.o_proj, d, d, zero_rest=True)
        for name in ("gate_proj", "up_proj"):
            widen(getattr(mlp, name), getattr(old.mlp, name), c.intermediate_size, d, zero_rest=False)
        widen(mlp.down_proj, old.mlp.down_proj, d, c.intermediate_size, zero_rest=True)
    big.tie_weights()
    return big


def read_extra_texts(files: list[Path]) -> list[str]:
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"tokenizer_extra_files: {f} does not exist")
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


# The tokenizer is trained by this module's code alone; its chat template is an input (its text),
# so a change elsewhere in models/chat.py does not retrain it (nor, through its name, the base).
TOKENIZER_CODE = ("models.embedded",)
# The base is pretrained by this module and the training loop; nothing in serving/ or tasks/ decides
# its weights, so editing those must not re-pretrain it (minutes).
BASE_CODE = ("models.embedded", "models.curriculum", "models.training")
DRAFT_INIT_CODE = ("models.embedded",)  # an untrained same-tokenizer Llama: new_llama alone


def extra_texts_digest(cfg: EmbeddedBuildConfig, root: Path) -> str:
    """The extra tokenizer files' text, which the tokenizer's vocabulary is trained on."""
    extra_files = [p if p.is_absolute() else root / p for p in map(Path, cfg.tokenizer_extra_files)]
    return digest(read_extra_texts(extra_files))


def tokenizer_artifact(cfg: EmbeddedBuildConfig, home: Path, root: Path) -> Artifact:
    return artifact(home / "models", "tokenizer", cfg, extra_texts_digest(cfg, root), EMBEDDED_CHAT_TEMPLATE,
                    code=TOKENIZER_CODE)


def pretraining_texts(cfg: EmbeddedBuildConfig) -> list[str]:
    texts = collect_docstrings(cfg.corpus_max_chars)
    random.Random(cfg.seed).shuffle(texts)
    return texts


def build_embedded_tokenizer(cfg: EmbeddedBuildConfig, home: Path, root: Path) -> Path:
    """The shipped tokenizer when `cfg.shipped` is set (hash-checked), else built here.

    Build (or reuse) the embedded BPE tokenizer alone: seconds, so ETL can count tokens before
    the base is pretrained. The base built later loads this very tokenizer."""
    if cfg.shipped:
        return shipped.release(cfg, root) / "base"

    def make(tmp: Path) -> None:
        extra_files = [p if p.is_absolute() else root / p for p in map(Path, cfg.tokenizer_extra_files)]
        texts = pretraining_texts(cfg)
        # Task words enter the vocabulary: a real tokenizer's corpus covers the domain it will see.
        tokenizer = train_tokenizer(texts + read_extra_texts(extra_files), cfg.vocab_size)
        log.info("tokenizer: %d tokens from %d docstrings", len(tokenizer), len(texts))
        tokenizer.save_pretrained(tmp)
    return tokenizer_artifact(cfg, home, root).ensure(make)


def text_ids(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The docstring corpus as one token stream, documents separated by BOS."""
    ids: list[int] = []
    for enc in tokenizer(pretraining_texts(cfg), add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tokenizer.bos_token_id])
    return ids


def pretraining_blocks(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast) -> Curriculum:
    """The curriculum (models/curriculum.py): one fresh block per sequence the base will see."""
    return Curriculum(text_ids(cfg, tokenizer), tokenizer, cfg.pretrain_seq_len,
                      cfg.pretrain_steps * cfg.pretrain_batch_size, cfg.pretrain_mix, cfg.seed)


def skill_logger(model, probes: dict, phase: str, steps: int, curve: list[dict]):
    """fit's on_log hook: greedy accuracy on the held-out probes at every loss log, into `curve`."""
    def log_skills(step: int, metrics: dict) -> None:
        # A falling loss can hide that copying has not formed: the text and JSON punctuation are
        # learnt first. The probe says so directly (`smelt embedded build` prints it; the manifest keeps it).
        if "loss" in metrics:
            skills = skill_accuracy(model, probes)
            curve.append({"phase": phase, "step": step, **skills})
            if sum(1 for c in curve if c["phase"] == phase) % 5 == 1 or step == steps:  # about ten lines a phase
                tqdm.write(f"{phase} step {step}: loss {metrics['loss']:.3f}, skills " +
                           ", ".join(f"{k} {v:.0%}" for k, v in skills.items()))
    return log_skills


def train_seed(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast, device: torch.device, probes: dict,
               curve: list[dict], checkpoint_dir: Path | None) -> tuple[LlamaForCausalLM, dict]:
    """The seed model trained on back-to-back copy blocks alone (where copying forms first)."""
    done = checkpoint_dir / "seed-final" if checkpoint_dir else None
    if done is not None and (done / "config.json").exists():  # a resumed build: the seed phase is over
        return LlamaForCausalLM.from_pretrained(done), json.loads((done / "seed_stats.json").read_text())
    small = new_llama(cfg.seed_model, tokenizer, cfg.seed)
    copies = Curriculum(text_ids(cfg, tokenizer), tokenizer, cfg.pretrain_seq_len, cfg.seed_steps * cfg.pretrain_batch_size,
                        CurriculumMix(text=0, copy_spans=1, records=0), cfg.seed, fixed_progress=0.0)
    spec = FitSpec(steps=cfg.seed_steps, batch_size=cfg.pretrain_batch_size, lr=cfg.seed_lr, seed=cfg.seed,
                   desc="pretrain seed (copy)", schedule="constant_with_warmup", log_every=max(1, cfg.seed_steps // 20),
                   bf16=cfg.pretrain_bf16, shuffle=False,
                   checkpoint_every=max(1, cfg.seed_steps // 10) if checkpoint_dir else 0, keep_checkpoints=1)
    stats = fit(small, copies, spec, device=device, on_log=skill_logger(small, probes, "seed", cfg.seed_steps, curve),
                checkpoint_dir=checkpoint_dir / "seed" if checkpoint_dir else None)
    stats = {k: stats[k] for k in ("final_loss", "train_seconds", "train_tokens")}
    if done is not None:
        small.save_pretrained(done)
        write_json(done / "seed_stats.json", stats)
    return small, stats


def pretrain(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast, device: torch.device,
             checkpoint_dir: Path | None = None) -> tuple[LlamaForCausalLM, dict]:
    """A new base trained on the curriculum (grown from a seed model that copies, when `cfg.seed_model`
    is set); (model, fit's stats with its loss history and the skill curve of every phase)."""
    blocks = pretraining_blocks(cfg, tokenizer)
    probes = skill_probes(blocks, n=8, seed=cfg.seed)
    curve: list[dict] = []
    seed_stats = None
    if cfg.seed_model is not None:
        small, seed_stats = train_seed(cfg, tokenizer, device, probes, curve, checkpoint_dir)
        base = grow_llama(small, cfg.base, cfg.seed)
        curve.append({"phase": "grown", "step": 0, **skill_accuracy(base, probes)})
        tqdm.write("grown to the base: skills " + ", ".join(f"{k} {v:.0%}" for k, v in curve[-1].items()
                                                            if isinstance(v, float)))
    else:
        base = new_llama(cfg.base, tokenizer, cfg.seed)
    spec = FitSpec(steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr, seed=cfg.seed,
                   desc="pretrain base", log_every=max(1, cfg.pretrain_steps // 50), bf16=cfg.pretrain_bf16,
                   shuffle=False,  # the curriculum's blocks are random already, and their order matters
                   checkpoint_every=max(1, cfg.pretrain_steps // 20) if checkpoint_dir else 0, keep_checkpoints=1)
    stats = fit(base, blocks, spec, device=device, checkpoint_dir=checkpoint_dir,
                on_log=skill_logger(base, probes, "base", cfg.pretrain_steps, curve))
    return base, {**stats, "skill_curve": curve, "seed": seed_stats}


def pretrain_base(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast, device: torch.device, tmp: Path) -> None:
    base, stats = pretrain(cfg, tokenizer, device)
    stats.pop("history")
    base.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "smelt_build.json", {"kind": "embedded-base", "config": cfg.model_dump(), **stats})


def save_draft_init(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast, tmp: Path) -> None:
    new_llama(cfg.draft, tokenizer, cfg.seed + 1).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "smelt_build.json", {"kind": "embedded-draft-init", "config": cfg.model_dump()})


def build_embedded(cfg: EmbeddedBuildConfig, home: Path, device: torch.device, root: Path) -> tuple[Path, Path]:
    """Build (or reuse) the tokenizer + pretrained base and an untrained same-tokenizer draft.

    Returns (base_dir, draft_init_dir), each content-addressed by `cfg`, the tokenizer it carries
    and the code that makes it.
    """
    if cfg.shipped:
        return unpack_release(cfg, home, root)
    tok_dir = build_embedded_tokenizer(cfg, home, root)
    base = artifact(home / "models", "base", cfg, tok_dir.name, code=BASE_CODE)
    draft = artifact(home / "models", "draft-init", cfg, tok_dir.name, code=DRAFT_INIT_CODE)
    if base.exists() and draft.exists():
        return base.path, draft.path
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    return (base.ensure(lambda tmp: pretrain_base(cfg, tokenizer, device, tmp)),
            draft.ensure(lambda tmp: save_draft_init(cfg, tokenizer, tmp)))


# ---------------------------------------------------------------------------------------------
# Shipped weights: built once by `smelt embedded build`, committed, loaded by every run.

def unpack_release(cfg: EmbeddedBuildConfig, home: Path, root: Path) -> tuple[Path, Path]:
    """(base, draft_init) in fp32 under SMELT_HOME, converted once from the shipped bf16 files.

    Everything downstream (fine-tuning, quantization, the fp32 reference candidate) starts from the
    same full-precision weights as a locally pretrained base would give.
    """
    release = shipped.release(cfg, root)
    key = json.loads((release / shipped.MANIFEST).read_text())["files"]

    def unpack(name: str):
        def make(tmp: Path) -> None:
            model = LlamaForCausalLM.from_pretrained(release / name, dtype=torch.float32)
            model.save_pretrained(tmp)
            PreTrainedTokenizerFast.from_pretrained(release / "base").save_pretrained(tmp)
            shutil.copy(release / shipped.MANIFEST, tmp / "shipped_manifest.json")
        return artifact(home / "models", f"shipped-{name}", key, code=("models.embedded",)).ensure(make)

    return unpack("base"), unpack("draft")


def draft_init(cfg: EmbeddedBuildConfig, tokenizer: PreTrainedTokenizerFast, checkpoints: Path) -> LlamaForCausalLM:
    """The draft the pipeline distils from the fine-tuned target: the seed model when the draft has its
    shape (it already copies by content, which the target's answers are made of), else a random init."""
    if cfg.seed_model is not None and cfg.draft == cfg.seed_model:
        return LlamaForCausalLM.from_pretrained(checkpoints / "seed-final")
    return new_llama(cfg.draft, tokenizer, cfg.seed + 1)


def build_release(cfg: EmbeddedBuildConfig, out: Path, home: Path, device: torch.device, root: Path,
                  command: str) -> dict:
    """Pretrain the base on the curriculum and write base + draft init + tokenizer to `out` as bf16
    safetensors with a manifest; resumable (checkpoints under SMELT_HOME). Returns the manifest."""
    cfg = cfg.model_copy(update={"shipped": None})
    tok_dir = build_embedded_tokenizer(cfg, home, root)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    work = artifact(home / "embedded-build", "release", cfg, tok_dir.name, code=BASE_CODE).path
    started = time.time()
    base, stats = pretrain(cfg, tokenizer, device, checkpoint_dir=work / "checkpoints")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # bf16 halves the files; fp32 is restored at load (unpack_release), losing only the low mantissa bits
    base.to(torch.bfloat16).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    draft_init(cfg, tokenizer, work / "checkpoints").to(torch.bfloat16).save_pretrained(tmp / "draft")
    tokenizer.save_pretrained(tmp / "draft")
    history = stats.pop("history")
    manifest = {
        "kind": "smelt-embedded-release",
        "command": command,
        "config": cfg.model_dump(mode="json", exclude={"shipped"}),
        "seed": cfg.seed,
        "tokens_seen": (cfg.pretrain_steps + (cfg.seed_steps if cfg.seed_model else 0)) * cfg.pretrain_batch_size
        * cfg.pretrain_seq_len,
        "seed_phase": stats["seed"],  # the seed model's copy-only training before growing (None: no seed)
        "parameters": {"base": base.num_parameters(), "draft": sum(p.numel() for p in new_llama(cfg.draft, tokenizer, 0).parameters())},
        "loss_curve": [{"step": h["step"], "loss": round(h["loss"], 4)} for h in history],
        "train": {k: v for k, v in stats.items() if k in ("final_loss", "train_seconds", "train_tokens_per_s", "resumed_from_step")},
        # greedy accuracy on held-out blocks per skill (models/curriculum.py PROBES) per phase (seed, grown,
        # base), from the resumed step on
        "skill_curve": stats["skill_curve"],
        "wall_seconds": round(time.time() - started, 1),
        "machine": shipped.machine(),
    }
    return shipped.publish(tmp, out, manifest)
