"""One preference row, in any of three formats, to the standard ``{"prompt", "chosen", "rejected"}`` strings.

Formats (detected per row, see :func:`detect_format`):

* standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
* conversational: ``chosen``/``rejected`` are lists of ``{"role", "content"}`` messages and ``prompt`` is a list of
  messages, or absent (then the prompt is the messages ``chosen`` and ``rejected`` share at their start). The text
  comes from the tokenizer's chat template;
* HH-style (Anthropic HH-RLHF): no ``prompt``; ``chosen``/``rejected`` are full
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcripts, split after the last ``"\\n\\nAssistant:"`` marker they share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2

from .errors import DataError, first_line, row_error

__all__ = ["Format", "detect_format", "to_standard"]

Format = Literal["standard", "conversational", "hh"]
FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")
HH_MARKER = "\n\nAssistant:"
_REPR_LIMIT = 40


def detect_format(row: dict[str, Any]) -> Format:
    """``"conversational"`` if any field is a list, else ``"hh"`` if ``prompt`` is absent or null, else ``"standard"``.

    Only the shape is looked at; :func:`to_standard` validates the values. A non-dict row raises :class:`DataError`.
    """
    if not isinstance(row, dict):
        raise DataError(f"a row must be a dict, got {_kind(row)}")
    if any(isinstance(row.get(field), list) for field in FIELDS):
        return "conversational"
    if row.get("prompt") is None:
        return "hh"
    return "standard"


def to_standard(row: dict[str, Any], *, source: str, index: int, tokenizer: Any = None) -> dict[str, str]:
    """Convert and validate one row; return ``{"prompt", "chosen", "rejected"}`` as non-blank strings.

    ``source`` and ``index`` (0-based row within the source) only locate errors. ``tokenizer`` must have a chat
    template for conversational rows. A numeric ``margin`` is kept (reward-model training); other extra fields are
    ignored. Every problem raises a one-line :class:`DataError`
    naming the source, the row and the field.
    """
    if not isinstance(row, dict):
        problem = f"a row must be an object with 'prompt', 'chosen', 'rejected', got {_kind(row)}"
        raise row_error(source, index, None, problem)
    at = _Row(row, source, index)
    fmt = detect_format(row)
    if fmt == "conversational":
        pair = _from_conversational(at, tokenizer)
    elif fmt == "hh":
        pair = _from_hh(at)
    else:
        pair = _from_standard(at)
    _check_pair(at, pair)
    margin = row.get("margin")  # optional: a per-pair margin for reward-model training (TRL's `margin` column)
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
            raise at.error("margin", f"must be a finite number, got {margin!r}")
        pair["margin"] = float(margin)
    return pair


@dataclass(frozen=True)
class _Row:
    """A row with its location, for field access that reports problems by file, row and field."""

    data: dict[str, Any]
    source: str
    index: int

    def error(self, field: str | None, problem: str) -> DataError:
        return row_error(self.source, self.index, field, problem)

    def value(self, field: str) -> str | list[Any]:
        """The field's value, checked to be present, a string or a list, and not empty."""
        if field not in self.data:
            raise self.error(field, "is missing")
        value = self.data[field]
        if value is None:
            raise self.error(field, "is missing (null)")
        if not isinstance(value, str | list):
            raise self.error(field, f"must be a string or a list of messages, got {_kind(value)}")
        if isinstance(value, list) and not value or isinstance(value, str) and not value.strip():
            raise self.error(field, "is empty")
        return value


def _from_standard(at: _Row) -> dict[str, str]:
    # detect_format sends a row here only when no field is a list, so each value is a string.
    return {field: at.value(field) for field in FIELDS}


def _from_hh(at: _Row) -> dict[str, str]:
    """Split two HH transcripts right after the last ``"\\n\\nAssistant:"`` that lies in their common prefix."""
    chosen, rejected = at.value("chosen"), at.value("rejected")
    cut = chosen[: _shared_prefix_len(chosen, rejected)].rfind(HH_MARKER)
    if cut < 0:
        problem = "is missing, and 'chosen'/'rejected' are not HH-style transcripts sharing a '\\n\\nAssistant:' turn"
        raise at.error("prompt", problem)
    end = cut + len(HH_MARKER)
    return {"prompt": chosen[:end], "chosen": chosen[end:], "rejected": rejected[end:]}


def _from_conversational(at: _Row, tokenizer: Any) -> dict[str, str]:
    """Validate the messages, find the prompt messages, and render prompt and completions with the chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise at.error(None, "conversational data (lists of messages) needs a tokenizer with a chat template")
    chosen, rejected = _messages(at, "chosen"), _messages(at, "rejected")
    prompt_value = at.data.get("prompt")
    if isinstance(prompt_value, str) and prompt_value.strip():
        # UltraFeedback-binarized style: a string prompt beside message lists that (usually) repeat it as their
        # first turn. Use the shared leading messages when there are any, else the string as the user turn.
        if _shared_prefix_len(chosen, rejected) and chosen != rejected:
            prompt, start = _shared_leading_messages(at, chosen, rejected)
        else:
            prompt, start = [{"role": "user", "content": prompt_value}], 0
    elif prompt_value is None:
        prompt, start = _shared_leading_messages(at, chosen, rejected)
    else:
        prompt, start = _messages(at, "prompt"), 0
    completions = {"chosen": chosen[start:], "rejected": rejected[start:]}
    for field, messages in completions.items():
        _check_completion(at, field, messages, start)
    return _render_pair(at, tokenizer, prompt, completions)


def _messages(at: _Row, field: str) -> list[dict[str, str]]:
    """The field as validated ``{"role", "content"}`` messages (other keys dropped)."""
    value = at.value(field)
    if isinstance(value, str):
        raise at.error(field, "must be a list of messages, like the row's other message fields, got str")
    return [_message(at, field, i, message) for i, message in enumerate(value)]


def _message(at: _Row, field: str, i: int, message: Any) -> dict[str, str]:
    if not isinstance(message, dict):
        raise at.error(field, f"message {i} must be an object with 'role' and 'content', got {_kind(message)}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise at.error(field, f"message {i} has role {_short(role)}; expected one of 'system', 'user', 'assistant'")
    if not isinstance(content, str):
        raise at.error(field, f"message {i} content must be a string, got {_kind(content)}")
    return {"role": role, "content": content}


def _shared_leading_messages(
    at: _Row, chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], int]:
    """The implicit prompt: the messages both completions start with, and where the completions begin."""
    if chosen == rejected:
        raise at.error("rejected", "equals 'chosen'")
    start = _shared_prefix_len(chosen, rejected)
    if start == 0:
        raise at.error("prompt", "is missing, and 'chosen'/'rejected' share no leading messages to use as the prompt")
    return chosen[:start], start


def _check_completion(at: _Row, field: str, messages: list[dict[str, str]], start: int) -> None:
    """A completion is one or more assistant messages; ``start`` is its offset in the field, for messages."""
    if not messages:
        raise at.error(field, "has no messages after the prompt")
    for i, message in enumerate(messages, start=start):
        if message["role"] != "assistant":
            raise at.error(field, f"message {i} has role '{message['role']}'; completion messages must be 'assistant'")


def _render_pair(
    at: _Row, tokenizer: Any, prompt: list[dict[str, str]], completions: dict[str, list[dict[str, str]]]
) -> dict[str, str]:
    """Prompt text with the generation prompt; each completion is its full conversation's text minus that prefix."""
    prompt_text = _render(at, "prompt", tokenizer, prompt, add_generation_prompt=True)
    pair = {"prompt": prompt_text}
    for field, messages in completions.items():
        full = _render(at, field, tokenizer, prompt + messages, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise at.error(
                field,
                "cannot be split off: the chat template's rendering of the prompt (with add_generation_prompt=True) "
                "is not a prefix of its rendering of the prompt followed by this completion",
            )
        pair[field] = full[len(prompt_text) :]
    return pair


def _render(
    at: _Row, field: str, tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise at.error(field, f"cannot be rendered by the chat template: {first_line(exc)}") from exc


def _check_pair(at: _Row, pair: dict[str, str]) -> None:
    """Every converted field is non-blank and the two completions differ."""
    for field in FIELDS:
        if not pair[field].strip():
            raise at.error(field, "is empty after conversion")
    if pair["chosen"] == pair["rejected"]:
        raise at.error("rejected", "equals 'chosen'")


def _shared_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, messages) two sequences have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    """A one-line ``repr`` of at most about 40 characters, for quoting a bad value in a message."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."
