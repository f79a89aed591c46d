"""Chat messages to one prompt: message checks and a plain chat template.

Jinja is not a dependency, so a Hugging Face ``chat_template`` in ``tokenizer_config.json`` is
never evaluated. The default template writes ``"{role}: {content}\\n"`` per message, then
``"assistant:"`` to open the assistant's turn. A model directory may replace both in its
``tokenizer_config.json`` with plain placeholders (no Jinja, no other keys)::

    {"banter_chat_template": {"message": "<|{role}|>\\n{content}\\n",
                              "generation": "<|assistant|>\\n"}}

A missing file or key gives the default; a malformed one is an ``ArtifactError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banter.errors import ArtifactError, InvalidRequest, brief
from producer.modelfiles import companion, read_regular
from producer.validation import defined_fields
from registry.records import Record

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "tokenizer_config.json"
# what OpenAI defines on a message; anything else is refused, as unknown top-level fields are
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "function_call", "tool_call_id",
                  "refusal", "audio")
TEXT_PART_FIELDS = ("type", "text", "prompt_cache_breakpoint")
TEMPLATE_KEY = "banter_chat_template"

Message = tuple[str, str]  # (role, text)


@dataclass(frozen=True)
class ChatTemplate:
    """``message`` is written once per message with ``{role}`` and ``{content}`` replaced (by
    plain substitution: braces in the content stay as they are), then ``generation`` once."""

    message: str = "{role}: {content}\n"
    generation: str = "assistant:"

    def render(self, messages: list[Message]) -> str:
        turns = [self.message.replace("{role}", role).replace("{content}", text)
                 for role, text in messages]
        return "".join(turns) + self.generation


def parse_messages(body: dict) -> list[Message]:
    """``body['messages']`` as (role, text) pairs. Content is a string or a list of
    ``{"type": "text", "text": ...}`` parts (joined with newlines). InvalidRequest names the
    first bad field, e.g. ``messages[2].role``."""
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects",
                             "messages")
    return [_message(message, f"messages[{i}]") for i, message in enumerate(value)]


def _message(message: Any, where: str) -> Message:
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system role (o1 and later)
        role = "system"
    if role not in ROLES:
        raise InvalidRequest(f"'{where}.role' must be one of {', '.join(ROLES)} (or developer, "
                             f"taken as system), got {brief(role)}", f"{where}.role")
    defined_fields(message, MESSAGE_FIELDS, where, "a message")
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise InvalidRequest(f"'{where}.name' must be a string", f"{where}.name")
    for calls in ("tool_calls", "function_call"):
        if message.get(calls):
            raise InvalidRequest(f"'{where}.{calls}': tool calls are not supported by this "
                                 "server", f"{where}.{calls}")
    return role, _content(message.get("content"), f"{where}.content")


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        return "\n".join(_text_part(part, f"{where}[{i}]") for i, part in enumerate(content))
    raise InvalidRequest(f"'{where}' must be a string or a non-empty list of text parts", where)


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise InvalidRequest(f"'{where}' must be {{\"type\": \"text\", \"text\": <string>}}; "
                             "only text parts are supported", where)
    defined_fields(part, TEXT_PART_FIELDS, where, "a text part")
    if part.get("prompt_cache_breakpoint") is not None and \
            not isinstance(part["prompt_cache_breakpoint"], dict):  # accepted, ignored
        raise InvalidRequest(f"'{where}.prompt_cache_breakpoint' must be an object",
                             f"{where}.prompt_cache_breakpoint")
    return part["text"]


def template_for(model_root: Path, record: Record) -> ChatTemplate:
    """The chat template of the registry ``record``: read from the ``tokenizer_config.json``
    beside its artifact; the default for a model with no local files (openai backend). The
    server's files are at fault, not the request, where the file is not the one promoted
    (ChecksumMismatch) or does not hold a template (ModelLoadError): both 503, their client
    message naming no path (the producer log has it). The file is read once: the bytes hashed
    are the bytes parsed."""
    if not record.path:
        return ChatTemplate()
    return companion(model_root, record, TEMPLATE_FILE, "chat template", parse_template)


def load_template(path: Path) -> ChatTemplate:
    """``banter_chat_template`` from the JSON file at ``path``; the default when the file or the
    key is missing."""
    return parse_template(read_regular(path), path)


def parse_template(data: bytes | None, path: Path) -> ChatTemplate:
    """The template in ``data``, the bytes of the file at ``path`` (None: no file)."""
    if data is None:
        return ChatTemplate()
    try:
        config = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise ArtifactError(f"{path} is not a readable JSON file: {exc}", None) from None
    custom = config.get(TEMPLATE_KEY) if isinstance(config, dict) else None
    if custom is None:
        return ChatTemplate()
    if (not isinstance(custom, dict) or not isinstance(custom.get("message"), str)
            or not isinstance(custom.get("generation"), str) or "{content}" not in custom["message"]):
        raise ArtifactError(f"{path}: '{TEMPLATE_KEY}' must be an object with string fields "
                            "'message' (holding '{content}', optionally '{role}') and 'generation'",
                            None)
    return ChatTemplate(custom["message"], custom["generation"])
