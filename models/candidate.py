"""A candidate is what would ship: quantized weights + optional draft + serving recipe.

Layout of a candidate directory (self-contained, so MLflow and BentoML can carry it whole):
    model/        quantized (or full-precision) weights, tokenizer with its chat template, smelt_quant.json
    draft/        the draft model for speculative decoding (only for strategy 'draft')
    recipe.json   quantization method, decoding strategy and its settings, compile flag
Evaluation and serving both load candidates through `load_candidate`, so measured numbers
describe the artifact that ships.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.artifacts import Artifact, read_json, write_json
from models.batching import Batcher
from models.chat import render_context
from models.config import DecodeConfig, DecodeStrategy, StrictModel
from models.decoding import Decoder, GenerateDecoder, Generation, Preferring, SamplingParams, draft_acceptance, encode, strategy_kwargs
from models.device import prefill_dtype
from models.fastgen import CompiledDecoder
from models.quant import load_quantized, quant_method

RECIPE = "recipe.json"


class Recipe(StrictModel):
    """How a candidate decodes (its recipe.json): the weights' quantization, the decoding strategy and
    its settings. Serving, evaluation and `smelt bench` read it through `decoder_for`."""

    quant_method: str = "none"
    strategy: DecodeStrategy = "plain"
    draft_model: str | None = None  # the draft artifact's name, for lineage (strategy 'draft' only)
    compile: bool = False  # greedy plain/draft requests decode with the compiled static-cache loop
    max_new_tokens: int = 64
    num_draft_tokens: int = 4
    prompt_lookup_tokens: int = 5


def link_tree(src: Path, dst: Path) -> None:
    """Copy a directory using hard links where possible (weights are large and immutable)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def assemble_candidate(quant_dir: Path, draft_dir: Path | None, strategy: str, decode: DecodeConfig, out: Path) -> Path:
    """Write a self-contained candidate directory (atomically; reused when present) and return it.
    `out` is named by the caller, e.g. with `models.artifacts.artifact`."""
    art = Artifact(out)
    if art.exists():
        return out
    with art.build() as tmp:
        link_tree(quant_dir, tmp / "model")
        if strategy == "draft":
            if draft_dir is None:
                raise ValueError("strategy 'draft' needs a trained draft model")
            link_tree(draft_dir, tmp / "draft")
        recipe = Recipe(quant_method=quant_method(quant_dir), strategy=strategy,
                        draft_model=draft_dir.name if strategy == "draft" else None, compile=decode.compile,
                        max_new_tokens=decode.max_new_tokens, num_draft_tokens=decode.num_draft_tokens,
                        prompt_lookup_tokens=decode.prompt_lookup_tokens)
        write_json(tmp / RECIPE, recipe.model_dump())
    return out


@dataclass
class Candidate:
    model: torch.nn.Module
    tokenizer: object
    draft: torch.nn.Module | None
    recipe: Recipe
    decoder: Decoder  # `decoder_for(...)`: how this recipe decodes

    def generate(self, prompt: str | list[dict], max_new_tokens: int | None = None) -> Generation:
        """Answer a user prompt (or a conversation so far), rendered with the chat template stored at
        training time (greedy)."""
        return self.complete(render_context(self.tokenizer, prompt), SamplingParams(max_new_tokens or self.recipe.max_new_tokens))

    def complete(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        """Continue already-rendered text with this candidate's decoding strategy."""
        return self.decoder.complete(prompt_text, params, streamer)

    def batcher(self, slots: int, max_len: int, prefill_tokens: int = 256, prefill: str = "auto") -> Batcher:
        """A continuous batch of `slots` rows decoding as this recipe does (the service's engine);
        `prefill`: the dtype choice for prompts (models/device.py `prefill_dtype`)."""
        r = self.recipe
        k = {"draft": r.num_draft_tokens, "prompt-lookup": r.prompt_lookup_tokens}.get(r.strategy, 0)
        return Batcher(self.model, self.tokenizer.eos_token_id, slots, max_len, r.strategy, self.draft, k,
                       compile=r.compile, prefill_tokens=prefill_tokens, prefill_dtype=prefill_dtype(self.model, prefill))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def draft_acceptance(self, prompts: list[str | list[dict]], outputs: list[Generation]) -> float | None:
        """Share of the target's greedy tokens the draft agrees with (None without a draft)."""
        if self.draft is None:
            return None
        prompt_ids = [encode(self.tokenizer, render_context(self.tokenizer, p)) for p in prompts]
        return draft_acceptance(self.draft, prompt_ids, [o.token_ids for o in outputs])


def decoder_for(model, tokenizer, draft, recipe: Recipe) -> Decoder:
    """The decode loop a recipe ships (serving, evaluation and `smelt bench` all decode through it).

    transformers' generate with the strategy's arguments serves every request; with `compile`, smelt's
    compiled static-cache loop (speculative with the draft) serves the greedy requests it can, and
    prompt lookup stays on generate (the compiled loop has no n-gram proposer).
    """
    strategy = recipe.strategy
    generate = GenerateDecoder(model, tokenizer, strategy_kwargs(strategy, draft, recipe.num_draft_tokens,
                                                                   recipe.prompt_lookup_tokens))
    if not recipe.compile or strategy not in ("plain", "draft"):
        return generate
    fast = CompiledDecoder(model, tokenizer, draft if strategy == "draft" else None, recipe.num_draft_tokens)
    return Preferring(fast, generate)


def load_candidate(path: Path, device: torch.device) -> Candidate:
    path = Path(path)
    recipe = Recipe.model_validate(read_json(path / RECIPE))
    model = load_quantized(path / "model", device)
    tokenizer = AutoTokenizer.from_pretrained(path / "model")
    draft = None
    if (path / "draft").exists():
        draft = AutoModelForCausalLM.from_pretrained(path / "draft", use_safetensors=True).to(device).eval()
    return Candidate(model, tokenizer, draft, recipe, decoder_for(model, tokenizer, draft, recipe))
