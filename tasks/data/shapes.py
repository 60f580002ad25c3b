"""Record shapes -> one canonical chat form: a list of {role, content} messages ending with the
assistant's answer (the tokens training learns and evaluation scores).

| shape             | fields                                         |
|-------------------|------------------------------------------------|
| prompt-completion | prompt, completion (optional system)           |
| alpaca            | instruction, optional input, output            |
| chat              | messages: [{role, content}] (OpenAI chat)      |
| sharegpt          | conversations: [{from, value}]                 |
| text              | text (raw corpus; one assistant message)       |
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Literal

Shape = Literal["prompt-completion", "alpaca", "chat", "sharegpt", "text"]
SHAPES: tuple[str, ...] = ("chat", "sharegpt", "alpaca", "prompt-completion", "text")
# Keys that identify a shape, checked in SHAPES order ("text" last: chat rows may carry a text field).
SIGNATURES = {"chat": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
              "prompt-completion": ("prompt", "completion"), "text": ("text",)}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
BLANK_RUN = re.compile(r"\n{3,}")


class RowError(ValueError):
    """One row cannot be used; the message is the quarantine reason."""


def detect_shape(obj: dict) -> str | None:
    """The first shape whose identifying keys the row has any of; None if it has none."""
    for shape in SHAPES:
        if any(k in obj for k in SIGNATURES[shape]):
            return shape
    return None


def normalise(text: str) -> str:
    """NFC Unicode, Unix newlines, no control or zero-width characters, no trailing spaces,
    at most one blank line in a row, no leading/trailing whitespace."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL.sub("", text).replace("\u00a0", " ")
    return BLANK_RUN.sub("\n\n", TRAILING_SPACE.sub("\n", text)).strip()


def text_field(obj: dict, key: str, *, optional: bool = False, where: str = "") -> str:
    value = obj.get(key)
    if value is None:
        if optional:
            return ""
        raise RowError(f"missing field '{where}{key}'")
    if not isinstance(value, str):
        raise RowError(f"field '{where}{key}' is {json_type(value)}, not a string")
    value = normalise(value)
    if not value and not optional:
        raise RowError(f"field '{where}{key}' is empty")
    return value


def list_field(obj: dict, key: str) -> list:
    value = obj.get(key)
    if value is None:
        raise RowError(f"missing field '{key}'")
    if isinstance(value, str):  # CSV cells hold nested lists as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"field '{key}' is text that is not a JSON list: {e.msg}") from None
    if not isinstance(value, list):
        raise RowError(f"field '{key}' is {json_type(value)}, not a list")
    if not value:
        raise RowError(f"field '{key}' is empty")
    return value


def check_turns(messages: list[dict]) -> list[dict]:
    """Optional system message first, then user/assistant strictly alternating, ending with the assistant."""
    expected = "user"
    for i, m in enumerate(messages, start=1):
        role = m["role"]
        if role == "system" and i == 1:
            continue
        if role != expected:
            raise RowError(f"message {i} has role '{role}' where '{expected}' was expected "
                           "(optional system first, then user/assistant turns, ending with assistant)")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise RowError(f"the last message has role '{messages[-1]['role']}'; a training row must end with the assistant's answer")
    return messages


def turns(obj: dict, key: str, noun: str, speaker: str, content: str, roles: dict[str, str], unknown: str) -> list[dict]:
    """A list of turn objects as canonical messages: `speaker` names the role (mapped by `roles`),
    `content` holds the text; `unknown` is the reason for a speaker not in `roles`."""
    out = []
    for i, m in enumerate(list_field(obj, key), start=1):
        if not isinstance(m, dict):
            raise RowError(f"{noun} {i} is {json_type(m)}, not an object")
        who = text_field(m, speaker, where=f"{key}[{i}].")
        if who.lower() not in roles:
            raise RowError(unknown.format(i=i, who=who))
        out.append({"role": roles[who.lower()], "content": text_field(m, content, where=f"{key}[{i}].")})
    return check_turns(out)


def chat_messages(obj: dict) -> list[dict]:
    return turns(obj, "messages", "message", "role", "content", CHAT_ROLES,
                 "message {i} has unknown role '{who}' (system, user or assistant)")


def sharegpt_messages(obj: dict) -> list[dict]:
    return turns(obj, "conversations", "turn", "from", "value", SHAREGPT_ROLES,
                 "turn {i} is from unknown speaker '{who}' (" + ", ".join(sorted(SHAREGPT_ROLES)) + ")")


def alpaca_messages(obj: dict) -> list[dict]:
    instruction = text_field(obj, "instruction")
    extra = text_field(obj, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": text_field(obj, "output")}]


def prompt_completion_messages(obj: dict) -> list[dict]:
    system = text_field(obj, "system", optional=True)
    turns = [{"role": "user", "content": text_field(obj, "prompt")},
             {"role": "assistant", "content": text_field(obj, "completion")}]
    return ([{"role": "system", "content": system}] if system else []) + turns


def text_messages(obj: dict) -> list[dict]:
    # A raw corpus row has no prompt: the whole text is what the model learns to produce.
    return [{"role": "assistant", "content": text_field(obj, "text")}]


CONVERTERS = {"chat": chat_messages, "sharegpt": sharegpt_messages, "alpaca": alpaca_messages,
              "prompt-completion": prompt_completion_messages, "text": text_messages}


def json_type(value) -> str:
    """A value's type in JSON's words (what the user wrote), not Python's."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def to_messages(obj, shape: str) -> list[dict]:
    """The canonical chat form of one record of `shape`; raises RowError with the quarantine reason."""
    if not isinstance(obj, dict):
        raise RowError(f"row is {json_type(obj)}, not an object")
    return CONVERTERS[shape](obj)


def context_of(messages: list[dict]) -> list[dict]:
    """Everything before the final answer: what a model is given when it is asked to produce it."""
    return messages[:-1]


def content_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)
