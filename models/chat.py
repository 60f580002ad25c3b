"""Chat formatting shared by training, evaluation and serving.

The chat template is stored with the tokenizer at training time and used unchanged by
serving, so the two tokenize a conversation identically.
"""
from __future__ import annotations

from dataclasses import dataclass

# Used by the embedded default's own tokenizer; hub presets keep their tokenizer's template.
EMBEDDED_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Example:
    """One tokenized training row: loss only on the completion (prompt labels are -100)."""

    input_ids: list[int]
    labels: list[int]


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before it starts its answer."""
    return render_messages(tokenizer, [{"role": "user", "content": prompt}])


def render_messages(tokenizer, messages: list[dict]) -> str:
    """A conversation ([{role, content}, ...]) as the model sees it, ending where the assistant answers."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_full(tokenizer, prompt: str, completion: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
    )


def render_context(tokenizer, context: str | list[dict]) -> str:
    """A bare prompt (one user message) or a conversation so far, ready for the assistant's answer."""
    return render_prompt(tokenizer, context) if isinstance(context, str) else render_messages(tokenizer, context)


def row_messages(row: dict) -> list[dict]:
    """A dataset row's conversation: its canonical `messages`, or a {prompt, completion} pair."""
    if "messages" in row:
        return list(row["messages"])
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def row_context(row: dict) -> list[dict]:
    """What a model is given to produce the row's answer: every message before the last."""
    return row_messages(row)[:-1]


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> Example:
    """Tokenize a conversation with the chat template; loss only on the final answer (the rest is -100)."""
    prompt_ids = tokenizer(render_messages(tokenizer, messages[:-1]), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template's generation prompt is not a prefix of the full conversation")
    full_ids = full_ids[:max_len]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return Example(input_ids=full_ids, labels=labels[:max_len])


def tokenize_example(tokenizer, prompt: str, completion: str, max_len: int) -> Example:
    return tokenize_conversation(tokenizer, row_messages({"prompt": prompt, "completion": completion}), max_len)
