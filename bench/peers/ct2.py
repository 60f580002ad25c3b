"""CTranslate2 (OpenNMT's C++ engine) as a bench peer: its converter writes float32 / int8 /
int8_float32 models from the fp32 weights, and its `Generator` decodes them.

CTranslate2 takes prompts as token strings of the same vocabulary (the converter copies it), so the
prompts are the tokens smelt's own loops decode. `int8` quantizes weights to int8 per output row and
runs int8 GEMMs; `int8_float32` keeps the non-matmul parts in float32.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from models.decoding import Generation, encode

NAME = "ctranslate2"
FORMATS = ("float32", "int8", "int8_float32")
INSTALL = "uv sync  (ctranslate2 is in the dev dependency group; or: uv pip install ctranslate2)"


def missing() -> str | None:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return f"ctranslate2 is not installed; install it with: {INSTALL}"
    return None


def convert(model_dir: Path, out: Path, fmt: str) -> Path:
    """The CTranslate2 model of `model_dir` (a transformers checkpoint) in `fmt`, written to `out`."""
    from ctranslate2.converters import TransformersConverter

    if not (out / "model.bin").exists():
        TransformersConverter(str(model_dir)).convert(str(out), quantization=fmt, force=True)
    return out


def model_bytes(path: Path) -> int:
    return (path / "model.bin").stat().st_size


def decoder(generator, tokenizer, max_new_tokens: int):
    """decode(prompt_text) -> Generation at batch 1, streamed so the first token is timed."""
    eos = tokenizer.eos_token

    def decode(text: str) -> Generation:
        ids = encode(tokenizer, text)
        tokens, first, t0 = [], None, time.perf_counter()
        for step in generator.generate_tokens(tokenizer.convert_ids_to_tokens(ids), max_length=max_new_tokens,
                                              sampling_topk=1, end_token=eos):
            first = time.perf_counter() - t0 if first is None else first
            tokens.append(step.token_id)
        seconds = time.perf_counter() - t0
        if len(tokens) < max_new_tokens and tokens[-1:] != [tokenizer.eos_token_id]:
            tokens.append(tokenizer.eos_token_id)  # stopped at EOS without yielding it (older CTranslate2): smelt's loops keep it
        return Generation(tokens, seconds, first, prompt_tokens=len(ids))
    return decode


def batch_decoder(generator, tokenizer, max_new_tokens: int):
    """decode(prompt_texts) -> one Generation per prompt, decoded together in one batch."""
    def decode(texts: list[str]) -> list[Generation]:
        batch = [tokenizer.convert_ids_to_tokens(encode(tokenizer, t)) for t in texts]
        t0 = time.perf_counter()
        results = generator.generate_batch(batch, max_length=max_new_tokens, sampling_topk=1,
                                           include_prompt_in_result=False, end_token=tokenizer.eos_token,
                                           return_end_token=True)
        seconds = time.perf_counter() - t0
        return [Generation(r.sequences_ids[0], seconds, prompt_tokens=len(b)) for r, b in zip(results, batch)]
    return decode


def recipes(model_dir: Path, setup, workdir: Path) -> list:
    import ctranslate2

    from bench.serve import Recipe

    out = []
    texts = [setup.texts[i % len(setup.texts)] for i in range(setup.streams)]
    for fmt in FORMATS:
        path = convert(model_dir, workdir / fmt, fmt)
        generator = ctranslate2.Generator(str(path), device="cpu", compute_type=fmt,
                                          intra_threads=torch.get_num_threads())
        one = decoder(generator, setup.tokenizer, setup.max_new_tokens)
        many = batch_decoder(generator, setup.tokenizer, setup.max_new_tokens)
        out.append(Recipe(f"{NAME} {fmt}", f"{NAME} {fmt}", NAME, model_bytes(path),
                          lambda i, one=one: one(setup.texts[i]), lambda many=many: many(texts)))
    return out
