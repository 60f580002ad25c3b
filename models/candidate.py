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
from models.chat import render_context
from models.config import DecodeConfig
from models.decoding import Generation, SamplingParams, draft_agreement, finish, generate_batch, generate_text, strategy_kwargs
from models.fastgen import CompiledDecoder, cut
from models.quant import load_quantized, quant_method

RECIPE = "recipe.json"


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
        write_json(tmp / RECIPE, {
            "quant_method": quant_method(quant_dir),
            "strategy": strategy,
            "draft_model": draft_dir.name if strategy == "draft" else None,
            "compile": decode.compile,
            "max_new_tokens": decode.max_new_tokens,
            "num_draft_tokens": decode.num_draft_tokens,
            "prompt_lookup_tokens": decode.prompt_lookup_tokens,
        })
    return out


@dataclass
class Candidate:
    model: torch.nn.Module
    tokenizer: object
    draft: torch.nn.Module | None
    recipe: dict
    fast: CompiledDecoder | None = None  # recipe 'compile': smelt's compiled static-cache loop (models/fastgen.py)

    def generate(self, prompt: str | list[dict], max_new_tokens: int | None = None) -> Generation:
        """Answer a user prompt (or a conversation so far), rendered with the chat template stored at
        training time (greedy)."""
        return self.complete(render_context(self.tokenizer, prompt), SamplingParams(max_new_tokens or self.recipe["max_new_tokens"]))

    def complete(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        """Continue already-rendered text with this candidate's decoding strategy."""
        if self.compiled_for(params):
            return self.complete_compiled(prompt_text, params, streamer)
        extra = strategy_kwargs(self.recipe["strategy"], self.draft, self.recipe["num_draft_tokens"],
                                self.recipe["prompt_lookup_tokens"])
        return generate_text(self.model, self.tokenizer, prompt_text, params, extra, streamer)

    def compiled_for(self, params: SamplingParams) -> bool:
        """The compiled loop serves greedy requests without stop strings (it has no sampler and no stop
        check); others, and the prompt-lookup strategy, go through transformers' generate."""
        return self.fast is not None and params.temperature <= 0 and not params.stop

    def complete_compiled(self, prompt_text: str, params: SamplingParams, streamer=None) -> Generation:
        ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        on_token = None
        if streamer is not None:  # the transformers streamer protocol: the prompt first, then each new token
            streamer.put(torch.tensor([ids]))
            on_token = lambda t: streamer.put(torch.tensor([t]))  # noqa: E731
        out = self.fast.decode(ids, params.max_new_tokens, self.tokenizer.eos_token_id, on_token)
        if streamer is not None:
            streamer.end()
        return finish(self.tokenizer, out.token_ids, params, out.seconds, len(ids), out.first_token_s)

    def complete_batch(self, prompt_texts: list[str], params: list[SamplingParams]) -> list[Generation]:
        """Several greedy requests in one forward per step; only the plain strategy batches."""
        if not self.batchable(params):
            raise ValueError("only greedy requests of a plain-strategy candidate can be batched")
        if not all(self.compiled_for(p) for p in params):
            return generate_batch(self.model, self.tokenizer, prompt_texts, params)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
        outs = self.fast.decode_batch(ids, max(p.max_new_tokens for p in params), self.tokenizer.eos_token_id)
        return [finish(self.tokenizer, cut(o.token_ids, p.max_new_tokens, self.tokenizer.eos_token_id), p, o.seconds,
                       len(i), o.first_token_s) for o, p, i in zip(outs, params, ids)]

    def batchable(self, params: list[SamplingParams]) -> bool:
        # transformers' assisted generation runs at batch size 1 only (shared FACTS.md).
        return self.recipe["strategy"] == "plain" and all(p.temperature <= 0 for p in params)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def draft_acceptance(self, prompts: list[str | list[dict]], outputs: list[Generation]) -> float | None:
        """Share of the target's greedy tokens the draft agrees with (None without a draft)."""
        if self.draft is None:
            return None
        agree = total = 0
        for prompt, out in zip(prompts, outputs):
            prompt_ids = self.tokenizer(render_context(self.tokenizer, prompt), add_special_tokens=False)["input_ids"]
            a, t = draft_agreement(out.token_ids, prompt_ids, self.draft)
            agree, total = agree + a, total + t
        return agree / total if total else None


def load_candidate(path: Path, device: torch.device) -> Candidate:
    path = Path(path)
    recipe = read_json(path / RECIPE)
    model = load_quantized(path / "model", device)
    draft = None
    if (path / "draft").exists():
        draft = AutoModelForCausalLM.from_pretrained(path / "draft", use_safetensors=True).to(device).eval()
    fast = None
    if recipe.get("compile") and recipe["strategy"] in ("plain", "draft"):
        fast = CompiledDecoder(model, draft if recipe["strategy"] == "draft" else None, recipe["num_draft_tokens"])
    return Candidate(model, AutoTokenizer.from_pretrained(path / "model"), draft, recipe, fast)
