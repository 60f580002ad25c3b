"""Structured output: decoding constrained by a JSON schema, with llguidance.

Chosen over xgrammar and outlines because it installs as one Rust wheel with no dependencies
(xgrammar brings a TVM FFI runtime, outlines a stack of its own), computes a token mask on the CPU
in tens of microseconds, and is one of the backends vLLM, SGLang and llama.cpp use. Its own torch
helper compiles a kernel with torch.compile on first use; the mask is applied here in a few numpy
and torch calls instead, so nothing joins dynamo's cache of the decode steps.

A `Constraint` is one request's matcher: `mask` sets the logits of tokens that would break the
schema to -inf (EOS is allowed exactly when the JSON is complete), `consume` commits a chosen token.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

# Whitespace between JSON tokens: models write `{"a": 1, "b": 2}` (json.dumps' own style) or indent, and
# forcing compact JSON pushed the fine-tuned default off its answers (0/12 exact vs 12/12 allowed);
# bounded, so a model cannot spend its tokens on spaces.
WHITESPACE = r"[\x20\x0A\x0D\x09]{1,16}"
_TOKENIZERS: dict[int, object] = {}
_LOCK = threading.Lock()


class SchemaError(ValueError):
    """The response_format's schema cannot be enforced; the message says why."""


def ll_tokenizer(tokenizer):
    """llguidance's view of a fast Hugging Face tokenizer (built once per tokenizer: ~1 s on a large vocabulary)."""
    import llguidance.hf

    with _LOCK:
        if id(tokenizer) not in _TOKENIZERS:
            _TOKENIZERS[id(tokenizer)] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
        return _TOKENIZERS[id(tokenizer)]


def json_grammar(schema: dict, tokenizer) -> str:
    """The grammar for JSON valid under `schema` (up to 16 whitespace characters between tokens); SchemaError
    naming the problem when the schema is not valid or not supported."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_pattern": WHITESPACE})
    except (ValueError, TypeError) as err:
        raise SchemaError(f"the JSON schema is not valid: {err}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tokenizer))
    if is_error:
        raise SchemaError(f"the JSON schema cannot be enforced: {messages[0]}")
    return grammar


class Constraint:
    """One request's grammar state over the tokenizer's vocabulary."""

    def __init__(self, grammar: str, tokenizer):
        from llguidance import LLMatcher

        self.vocab = len(tokenizer)
        self.matcher = LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise SchemaError(self.matcher.get_error())

    def allowed(self) -> torch.Tensor:
        """Tokens the grammar allows next, a bool mask [vocab]."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] (the model's head may be wider than the tokenizer) with disallowed tokens at -inf."""
        out = torch.full_like(logits, float("-inf"))
        allowed = self.allowed().to(logits.device)
        out[: self.vocab][allowed] = logits[: self.vocab][allowed]
        return out

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    def done(self) -> bool:
        """The JSON is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped()
