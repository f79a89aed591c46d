"""``POST /v1/tokenize`` and ``POST /v1/detokenize``: a generate model's own tokenizer, for a
client that counts a prompt's tokens or needs token ids (``logit_bias``), as vLLM's
``/tokenize`` and ``/detokenize`` (under ``/v1/`` here, behind the API key).

The tokenizer is the ``tokenizer.json`` beside the model's artifact, checked against the
digest its registry record holds (as the chat template is) when it is first read, then kept
per version (a worker keeps its own the same way). Padding and truncation the file may set
are switched off, as the worker does.
The ids are the ones a worker gives the same text: prompts are encoded as a whole, special-token
text included (``producer.chat``). A model served by the openai backend has no tokenizer here.
"""

from __future__ import annotations

import threading
from pathlib import Path

from flask import Blueprint, jsonify
from tokenizers import Tokenizer

from banter.errors import InvalidRequest
from banter.jobs import JobKind
from producer import validation as v
from producer.context import Context, ctx
from producer.modelfiles import companion
from producer.openai_api import chat_prompt
from registry.records import Record

blueprint = Blueprint("tokenize", __name__)

TOKENIZER_FILE = "tokenizer.json"
KEPT = 16  # tokenizers kept loaded (model versions); the oldest goes first
_kept: dict[tuple[str, str], Tokenizer] = {}
_lock = threading.Lock()


def tokenizer_for(model_root: Path, record: Record) -> Tokenizer:
    """The tokenizer of the registry ``record``'s version. InvalidRequest for a model with no
    local files (openai backend); ChecksumMismatch (503) when the file is not the one promoted,
    ModelLoadError (503) when it cannot be read: the server's files are at fault, and the client
    message names no path (the producer log has it)."""
    if not record.path:
        raise InvalidRequest(f"model {record.ref} is served by the openai backend: its tokenizer "
                             "is not on this server", "model")
    key = (str(model_root / record.path), record.files.get(TOKENIZER_FILE, ""))
    with _lock:
        if key in _kept:
            return _kept[key]
    tokenizer = companion(model_root, record, TOKENIZER_FILE, "tokenizer", _parse, required=True)
    with _lock:
        if len(_kept) >= KEPT:
            del _kept[next(iter(_kept))]
        _kept[key] = tokenizer
    return tokenizer


def _parse(data: bytes, path: Path) -> Tokenizer:
    """The tokenizer in ``data``, encoding as the worker does: whole, unpadded."""
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise ValueError(f"{path}: {exc}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _model(c: Context, body: dict) -> tuple[Record, Tokenizer]:
    ref = v.string(body, "model", max_len=128) or c.jobs.default_model(JobKind.GENERATE)
    record = c.jobs.resolve(ref, JobKind.GENERATE)
    if record is None:  # not in the registry: a request naming it goes to the openai fallback
        raise InvalidRequest(f"model {ref!r} is not in the registry (a request naming it is "
                             "served upstream): there is no tokenizer for it here", "model")
    return record, tokenizer_for(c.settings.model_root, record)


@blueprint.post("/v1/tokenize")
def tokenize():
    """``{model?, prompt}`` or ``{model?, messages}`` (rendered by the model's chat template,
    as ``/v1/chat/completions`` does) → ``{model, tokens, count}``: the ids a worker gives it."""
    c = ctx()
    c.owner()
    body = c.body()
    v.known_fields(body, ("model", "prompt", "messages"))
    chat = body.get("messages") is not None  # null is absent, as everywhere
    if (body.get("prompt") is not None) == chat:
        raise InvalidRequest("send 'prompt' (a text) or 'messages' (a chat), one of them",
                             "prompt")
    record, tokenizer = _model(c, body)
    if chat:
        prompt = chat_prompt(body, c)
    else:
        prompt = v.string(body, "prompt", required=True, allow_empty=True,
                          max_len=c.settings.max_prompt_chars)
    ids = tokenizer.encode(prompt).ids
    return jsonify({"model": record.ref, "tokens": ids, "count": len(ids)})


@blueprint.post("/v1/detokenize")
def detokenize():
    """``{model?, tokens: [ids]}`` → ``{model, prompt}``: the text of those ids, special tokens
    spelled out."""
    c = ctx()
    c.owner()
    body = c.body()
    v.known_fields(body, ("model", "tokens"))
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise InvalidRequest("'tokens' must be a list of token ids", "tokens")
    record, tokenizer = _model(c, body)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for i, token in enumerate(tokens):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < size:
            raise InvalidRequest(f"'tokens[{i}]' must be a token id of {record.ref} (0 to "
                                 f"{size - 1})", "tokens")
    return jsonify({"model": record.ref,
                    "prompt": tokenizer.decode(tokens, skip_special_tokens=False)})
