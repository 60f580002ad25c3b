"""Record shapes -> one canonical chat form: a list of {role, content} messages ending with the
assistant's answer (the tokens training learns and evaluation scores).

| shape             | fields                                         |
|-------------------|------------------------------------------------|
| prompt-completion | prompt, completion (optional system)           |
| alpaca            | instruction, optional input, output            |
| chat              | messages: [{role, content}] (OpenAI chat)      |
| sharegpt          | conversations: [{from, value}]                 |
| text              | text (raw corpus; one assistant message)       |

Preference pairs (for DPO/ORPO) become the same chat form ending with the chosen answer, plus the
rejected answer beside it (`Row.rejected`):

| shape                | fields                                                              |
|----------------------|---------------------------------------------------------------------|
| preference           | prompt (string or messages), chosen, rejected (strings or messages; |
|                      | optional system) — TRL's standard and conversational forms          |
| sharegpt-preference  | conversations: [{from, value}], chosen and rejected: {from, value}  |
|                      | or strings (LLaMA-Factory's dpo_en_demo)                            |
| openai-preference    | input: {messages}, preferred_output and non_preferred_output:      |
|                      | [{role: assistant, content}] (OpenAI preference fine-tuning)        |

A message's content may also be a list of typed parts, as OpenAI's API writes it
(`[{"type": "text", "text": ...}]`) or with `value` for the text (another common tool's variant);
plain strings in the list count as text parts. Text parts are joined with a newline; a part of
another type (image_url, input_audio, ...) cannot be trained on by a text model, so the row is
quarantined with the part's type. Other keys of a message (`name`, a per-message loss `weight`,
`tool_calls`) are ignored on purpose: smelt trains on the final assistant answer of each row.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

Shape = Literal["prompt-completion", "alpaca", "chat", "sharegpt", "text", "preference", "sharegpt-preference",
                "openai-preference"]
# Preference shapes are told apart by all of their keys, first (a ShareGPT pair also has `conversations`).
PAIR_SIGNATURES = {"openai-preference": ("input", "preferred_output", "non_preferred_output"),
                   "sharegpt-preference": ("conversations", "chosen", "rejected"),
                   "preference": ("prompt", "chosen", "rejected")}
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


@dataclass
class Row:
    """One canonical row: chat messages ending with the answer to learn, and for a preference pair
    the rejected answer to the same context."""

    messages: list[dict]
    rejected: str | None = None


def detect_shape(obj: dict) -> str | None:
    """A preference shape whose keys the row has all of, else the first shape whose identifying keys
    the row has any of; None if it has none."""
    for shape, keys in PAIR_SIGNATURES.items():
        if all(k in obj for k in keys):
            return shape
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


def turns(obj: dict, key: str, noun: str, speaker: str, content: str, roles: dict[str, str], unknown: str,
          whole: bool = True) -> list[dict]:
    """A list of turn objects as canonical messages: `speaker` names the role (mapped by `roles`),
    `content` holds the text; `unknown` is the reason for a speaker not in `roles`. A whole row's turn
    order is checked here; a preference pair's context (`whole=False`) once its answer is appended."""
    out = []
    for i, m in enumerate(list_field(obj, key), start=1):
        if not isinstance(m, dict):
            raise RowError(f"{noun} {i} is {json_type(m)}, not an object")
        who = text_field(m, speaker, where=f"{key}[{i}].")
        if who.lower() not in roles:
            raise RowError(unknown.format(i=i, who=who))
        out.append({"role": roles[who.lower()], "content": content_field(m, content, where=f"{key}[{i}].")})
    return check_turns(out) if whole else out


def content_field(obj: dict, key: str, where: str) -> str:
    """A message's text: a string, or the text parts of a list of typed parts joined by newlines."""
    parts = obj.get(key)
    if not isinstance(parts, list):
        return text_field(obj, key, where=where)
    texts = []
    for j, part in enumerate(parts, start=1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RowError(f"field '{where}{key}' part {j} is {json_type(part)}, not a string or a typed part object")
        kind = part.get("type", "text")
        if kind != "text":
            raise RowError(f"field '{where}{key}' part {j} is of type '{kind}'; only text parts can be trained on")
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise RowError(f"field '{where}{key}' part {j} is a text part without a string 'text' (or 'value')")
        texts.append(text)
    return text_field({key: "\n".join(texts)}, key, where=where)


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


def answer(obj: dict, key: str, speaker: str, content: str) -> str:
    """A preference answer: a string, one turn object, or a list of turns whose last is the assistant's."""
    value = obj.get(key)
    if isinstance(value, str) or value is None:
        return text_field(obj, key)
    turn = value
    if isinstance(value, list):
        if not value:
            raise RowError(f"field '{key}' is empty")
        turn = value[-1]
    if not isinstance(turn, dict):
        raise RowError(f"field '{key}' is {json_type(turn)}, not a string or a message object")
    who = turn.get(speaker, "assistant")
    if not isinstance(who, str) or who.lower() not in ("assistant", "gpt", "model", "chatgpt"):
        raise RowError(f"field '{key}' ends with a message from '{who}', not the assistant")
    return content_field(turn, content, where=f"{key}.")


def pair(context: list[dict], chosen: str, rejected: str) -> Row:
    if chosen == rejected:
        raise RowError("chosen and rejected are the same answer; a preference pair needs two different ones")
    messages = check_turns(context + [{"role": "assistant", "content": chosen}])
    if not any(m["role"] == "user" for m in messages):
        raise RowError("a preference pair needs a user prompt")
    return Row(messages, rejected)


def preference_row(obj: dict) -> Row:
    prompt = obj.get("prompt")
    if isinstance(prompt, list):  # TRL's conversational form: the prompt is the messages before the answer
        context = turns(obj, "prompt", "message", "role", "content", CHAT_ROLES,
                        "message {i} has unknown role '{who}' (system, user or assistant)", whole=False)
    else:
        system = text_field(obj, "system", optional=True)
        context = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text_field(obj, "prompt")}]
    return pair(context, answer(obj, "chosen", "role", "content"), answer(obj, "rejected", "role", "content"))


def sharegpt_preference_row(obj: dict) -> Row:
    context = turns(obj, "conversations", "turn", "from", "value", SHAREGPT_ROLES,
                    "turn {i} is from unknown speaker '{who}' (" + ", ".join(sorted(SHAREGPT_ROLES)) + ")", whole=False)
    return pair(context, answer(obj, "chosen", "from", "value"), answer(obj, "rejected", "from", "value"))


def openai_preference_row(obj: dict) -> Row:
    given = obj.get("input")
    if not isinstance(given, dict):
        raise RowError(f"field 'input' is {json_type(given)}, not an object with messages")
    context = turns(given, "messages", "message", "role", "content", CHAT_ROLES,
                    "message {i} has unknown role '{who}' (system, user or assistant)", whole=False)
    return pair(context, answer(obj, "preferred_output", "role", "content"),
                answer(obj, "non_preferred_output", "role", "content"))


PAIR_CONVERTERS = {"preference": preference_row, "sharegpt-preference": sharegpt_preference_row,
                   "openai-preference": openai_preference_row}


def json_type(value) -> str:
    """A value's type in JSON's words (what the user wrote), not Python's."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def to_row(obj, shape: str) -> Row:
    """The canonical form of one record of `shape`; raises RowError with the quarantine reason."""
    if not isinstance(obj, dict):
        raise RowError(f"row is {json_type(obj)}, not an object")
    if shape in PAIR_CONVERTERS:
        return PAIR_CONVERTERS[shape](obj)
    return Row(CONVERTERS[shape](obj))


def context_of(messages: list[dict]) -> list[dict]:
    """Everything before the final answer: what a model is given when it is asked to produce it."""
    return messages[:-1]


def content_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)
