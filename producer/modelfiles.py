"""A served model's companion files as the producer reads them (``tokenizer_config.json`` for
its chat template, ``tokenizer.json`` for ``/v1/tokenize``): beside the artifact its registry
record names, and as they were promoted."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, TypeVar

from banter.errors import ArtifactError, ChecksumMismatch, ModelLoadError
from registry.records import Record

log = logging.getLogger("banter.producer")
T = TypeVar("T")


def read_regular(path: Path) -> bytes | None:
    """The file's bytes; None when it is not there. ArtifactError when it is not a regular file
    (a FIFO would never end)."""
    if path.exists() and not path.is_file():
        raise ArtifactError(f"{path} is not a regular file", None)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def companion(model_root: Path, record: Record, name: str, what: str,
              parse: Callable[[bytes | None, Path], T], required: bool = False) -> T:
    """``parse`` of the bytes of the file ``name`` beside ``record``'s artifact (None: not
    there, unless ``required``: then it cannot be read) and its path. The server's files are
    at fault, not the request, where the file is not the one promoted (ChecksumMismatch) or
    cannot be read or parsed (ModelLoadError: ``parse`` raises ArtifactError, OSError or
    ValueError): both 503, their client message naming ``what`` and no path (the producer log
    has it: ``{what}_changed``, ``{what}_unreadable``). The file is read once: the bytes
    hashed are the bytes parsed."""
    path = (model_root / record.path).parent / name
    event = what.replace(" ", "_")
    try:
        data = read_regular(path)
        if data is None and required:
            raise OSError(f"{path} is not there")
        digest = None if data is None else hashlib.sha256(data).hexdigest()
        if record.files and digest != record.files.get(name):
            log.error(f"{event}_changed", extra={"path": str(path), "ref": record.ref})
            raise ChecksumMismatch(f"model {record.ref}'s files changed since it was promoted; "
                                   "an admin finds which in the producer log")
        return parse(data, path)
    except (ArtifactError, OSError, ValueError) as exc:
        log.error(f"{event}_unreadable", extra={"error": str(exc), "ref": record.ref})
        raise ModelLoadError(f"model {record.ref}'s {what} cannot be read; an admin finds why "
                             "in the producer log") from None
