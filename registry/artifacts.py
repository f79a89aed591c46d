"""Checking a model artifact before it is promoted: where it is, what it is, its sha256 and
its companion files' (``COMPANIONS`` and the graph's external-data files).

Reads graphs with the ``onnx`` package only: the producer imports this module and must not load
onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx
from tokenizers import Tokenizer

from banter.errors import ArtifactError, brief
from registry.records import leaves_base

_CHUNK = 1 << 20
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)\Z")
OP_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")  # what ONNX Runtime serves itself
# the files beside model.onnx that change what a model serves: its tokens, its geometry and
# special ids, its chat template; a record holds the digest of each that was there at promote
COMPANIONS = ("tokenizer.json", "config.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Artifact:
    """A checked artifact. ``rel_path`` is the ``.onnx`` file relative to the model root (posix),
    as given (a symlink inside the root stays a symlink: workers open ``model_root/rel_path``
    and ``tokenizer.json`` beside it); ``abs_path`` and ``tokenizer_path`` are
    ``model_root/rel_path`` and the tokenizer beside it; ``files`` the sha256 of each of the
    ``COMPANIONS`` beside it (those there) and of each external-data file the graph names, keyed
    by its path relative to the ``.onnx`` file's directory."""

    rel_path: str
    abs_path: Path
    tokenizer_path: Path
    sha256: str
    files: dict[str, str]


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def companion_digest(path: Path) -> str | None:
    """What a record's ``files`` would hold for the companion at ``path`` now: its sha256; None
    when it is not there; "" (which no digest matches) when it is not a regular file, which is
    not read (a FIFO or a device would never end). OSError when it cannot be read."""
    if not path.exists():
        return None
    return sha256_file(path) if path.is_file() else ""


def companion_digests(root: Path, model_path: Path, label: str) -> dict[str, str]:
    """The sha256 of each of the ``COMPANIONS`` beside ``model_path`` that is there. Each must
    resolve under ``root`` (as the artifact must) to a regular file, and the configs must hold
    a JSON object: ArtifactError otherwise."""
    digests = {}
    for name in COMPANIONS:
        path = model_path.parent / name
        if not os.path.lexists(path):
            continue
        resolved = _resolve(root, path, label)
        if not resolved.is_file():
            raise ArtifactError(f"artifact {brief(label)}: its {name} is not a regular file")
        if name != "tokenizer.json":
            _check_json_object(resolved, name, label)
        digests[name] = sha256_file(resolved)
    return digests


def _check_json_object(path: Path, name: str, label: str) -> None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"artifact {brief(label)}: its {name} is not readable JSON "
                            f"({exc})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"artifact {brief(label)}: its {name} must hold a JSON object")


def inspect_artifact(model_root: Path, path: str, kind: str) -> Artifact:
    """Check the artifact of a ``kind`` ("generate" or "embed") model and hash it.

    ``path`` is relative to ``model_root`` or absolute; a directory means its ``model.onnx``.
    It must stay under the model root (also after following symlinks), be a regular ``.onnx``
    file with ``tokenizer.json`` beside it, parse as ONNX and have the inputs and outputs the
    workers feed and read for ``kind``. Raise ArtifactError saying what is wrong.
    """
    root = _model_root(model_root)
    if not path:
        raise ArtifactError("path is required for the onnx backend: give the model's .onnx file "
                            f"or its directory, relative to the model root {root}")
    rel = _relative(root, model_root, path)
    target = root / rel
    if _resolve(root, target, path).is_dir():
        rel = f"{rel}/model.onnx" if rel else "model.onnx"
        target = root / rel
    resolved = _resolve(root, target, path)
    if not resolved.is_file():
        raise ArtifactError(f"artifact {brief(path)} ({resolved}) is not a regular file; "
                            f"give the model's .onnx file")
    if not target.name.endswith(".onnx"):
        raise ArtifactError(f"artifact {brief(path)} must be an .onnx file (or a directory holding "
                            f"model.onnx), got {target.name!r}")
    tokenizer = target.parent / "tokenizer.json"
    if not os.path.lexists(tokenizer) or not _resolve(root, tokenizer, path).is_file():
        raise ArtifactError(f"artifact {brief(path)} has no tokenizer.json beside it: put the "
                            f"model's tokenizer.json in {target.parent}")
    external = check_graph(resolved, kind, path, _resolve(root, tokenizer, path))
    files = companion_digests(root, target, path) | external_digests(root, target, external, path)
    return Artifact(rel_path=rel, abs_path=target, tokenizer_path=tokenizer,
                    sha256=sha256_file(resolved), files=files)


def external_digests(root: Path, model_path: Path, locations: list[str],
                     label: str) -> dict[str, str]:
    """The sha256 of each external-data file (``locations``, as the graph names them, relative
    to ``model_path``'s directory, where ONNX Runtime looks for them). Each must stay in that
    directory and resolve under ``root`` to a regular file: ArtifactError otherwise."""
    digests = {}
    for location in locations:
        name = PurePosixPath(location)
        if not location or leaves_base(location):
            raise ArtifactError(f"artifact {brief(label)}: its external data location "
                                f"{brief(location)} must be a path inside the model's directory")
        resolved = _resolve(root, model_path.parent / name, label)
        if not resolved.is_file():
            raise ArtifactError(f"artifact {brief(label)}: its external data {brief(location)} "
                                "is not a regular file")
        digests[name.as_posix()] = sha256_file(resolved)
    return digests


def check_graph(model_path: Path, kind: str, label: str, tokenizer_path: Path) -> list[str]:
    """Raise ArtifactError unless the ONNX file has the inputs/outputs of ``kind`` and an
    embedding table with a row for every id the tokenizer at ``tokenizer_path`` makes. Returns
    the external-data locations its tensors name (none for a graph saved in one file)."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ArtifactError(f"artifact {brief(label)} is not a valid ONNX model ({exc}); "
                            f"export it with torch.onnx / optimum") from None
    if model.ir_version < 1 or not model.HasField("graph"):
        raise ArtifactError(f"artifact {brief(label)} is not a valid ONNX model (no graph or "
                            f"ir_version); export it with torch.onnx / optimum")
    initializers = {init.name for init in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    outputs = {o.name for o in model.graph.output}
    if kind == "generate":
        _check_generate(inputs, outputs, label)
    elif kind == "embed":
        _check_embed(set(inputs), outputs, label)
    else:
        raise ArtifactError(f"unknown model kind {kind!r}: use generate or embed")
    _check_ops(model, label)
    _check_vocab(model.graph, tokenizer_path, label)
    return sorted({_location(tensor) for tensor in _tensors(model.graph)
                   if tensor.data_location == onnx.TensorProto.EXTERNAL})


def _tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: its initializers and its nodes' tensor attributes, subgraphs
    included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _location(tensor: onnx.TensorProto) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def _check_ops(model: onnx.ModelProto, label: str) -> None:
    """ArtifactError for what ONNX Runtime would refuse to load on every worker: an opset newer
    than ONNX defines, an operator domain ONNX Runtime does not serve (custom-op libraries are
    not loaded), or a standard-domain operator ONNX does not define. Operators of ONNX
    Runtime's own domain (contrib ops) are the workers' to check when they load the model."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ArtifactError(f"artifact {brief(label)} imports opset {opset.version}; the "
                                f"newest ONNX defines is {newest}: re-export it")
    domains = sorted({node.domain for node in model.graph.node} - set(OP_DOMAINS))
    if domains:
        raise ArtifactError(f"artifact {brief(label)} uses operators of domain "
                            f"{brief(domains[0])}, which ONNX Runtime does not serve here (only "
                            f"{', '.join(repr(d) for d in OP_DOMAINS[1:])} and the standard one)")
    unknown = sorted({node.op_type for node in model.graph.node
                      if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)})
    if unknown:
        raise ArtifactError(f"artifact {brief(label)} uses operators ONNX does not define: "
                            f"{', '.join(unknown[:5])}; re-export it with torch.onnx / optimum")


def _check_vocab(graph: onnx.GraphProto, tokenizer_path: Path, label: str) -> None:
    """ArtifactError when ``tokenizer.json`` does not load, or makes ids past the rows of the
    table that ``input_ids`` is looked up in (every such id would fail its pass)."""
    try:
        vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own exception type
        raise ArtifactError(f"artifact {brief(label)}: its tokenizer.json does not load ({exc})") from None
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[1:2] == ["input_ids"] and node.input[0] in shapes:
            rows = shapes[node.input[0]][0]
            if vocab > rows:
                raise ArtifactError(f"artifact {brief(label)}: its tokenizer has {vocab} tokens but the "
                                    f"model's embedding table {node.input[0]!r} has {rows} rows: "
                                    "they are not one model's (put the model's own "
                                    "tokenizer.json beside it)")
            return


def _check_generate(inputs: dict[str, onnx.ValueInfoProto], outputs: set[str],
                    label: str) -> None:
    layers = {int(m.group(1)) for m in map(_PAST.match, inputs) if m}
    n = max(layers) + 1 if layers else 1
    kv = [f"{i}.{part}" for i in range(n) for part in ("key", "value")]
    want_in = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{s}" for s in kv]
    want_out = ["logits"] + [f"present.{s}" for s in kv]
    hint = ("export it in the Optimum layout with a KV cache (input_ids, attention_mask, "
            "position_ids, past_key_values.{i}.key|value -> logits, present.{i}.key|value), "
            "e.g. optimum-cli export onnx --task text-generation-with-past")
    layered = f" ({n} layers)" if layers else ""
    _check_io(f"generate model {brief(label)}{layered}", set(inputs), outputs, want_in, want_out,
              allowed_in=want_in, hint=hint)
    dims = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value < 1 or dims[3].dim_value < 1:
        shape = [d.dim_value or d.dim_param or "?" for d in dims]
        raise ArtifactError(f"generate model {brief(label)}: past_key_values.0.key must be "
                            f"[batch, heads, past, head_dim] with static heads and head_dim, "
                            f"got {shape}; re-export it with fixed head counts")


def _check_embed(inputs: set[str], outputs: set[str], label: str) -> None:
    want_in = ["input_ids", "attention_mask"]
    _check_io(f"embed model {brief(label)}", inputs, outputs, want_in, ["last_hidden_state"],
              allowed_in=want_in + ["token_type_ids"],
              hint="export it as a feature-extraction encoder")


def _check_io(what: str, inputs: set[str], outputs: set[str], want_in: list[str],
              want_out: list[str], allowed_in: list[str], hint: str) -> None:
    """Raise ArtifactError listing missing inputs/outputs and inputs no worker feeds."""
    problems = []
    missing_in = [name for name in want_in if name not in inputs]
    if missing_in:
        problems.append(f"missing inputs {', '.join(missing_in)}")
    missing_out = [name for name in want_out if name not in outputs]
    if missing_out:
        problems.append(f"missing outputs {', '.join(missing_out)}")
    extra = sorted(inputs - set(allowed_in))
    if extra:
        problems.append(f"unexpected inputs {', '.join(extra)} (workers feed no others)")
    if problems:
        raise ArtifactError(f"{what}: {'; '.join(problems)} (the graph has inputs "
                            f"{', '.join(sorted(inputs)) or 'none'} and outputs "
                            f"{', '.join(sorted(outputs)) or 'none'}); {hint}")


def _model_root(model_root: Path) -> Path:
    try:
        root = Path(model_root).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ArtifactError(f"model root {model_root} does not exist: create it or set "
                            f"BANTER_MODEL_ROOT") from None
    if not root.is_dir():
        raise ArtifactError(f"model root {model_root} is not a directory: set BANTER_MODEL_ROOT")
    return root


def _relative(root: Path, model_root: Path, path: str) -> str:
    """``path`` (relative to the root, or absolute) as a normalized posix path relative to the
    root, without following symlinks. Raise ArtifactError when it points outside the root."""
    given = Path(path)
    if not given.is_absolute():
        given = root / given
    normal = Path(os.path.normpath(given))
    for base in (root, Path(os.path.abspath(model_root))):
        if normal == base or normal.is_relative_to(base):
            rel = normal.relative_to(base).as_posix()
            return "" if rel == "." else rel
    raise ArtifactError(f"artifact {brief(path)} is outside the model root {root}: copy or move it "
                        f"under the model root and give a path relative to it")


def _resolve(root: Path, target: Path, label: str) -> Path:
    """``target`` with symlinks followed; ArtifactError if it is missing or escapes the root."""
    try:
        resolved = target.resolve(strict=True)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {brief(label)} not found: {target} does not exist "
                            f"(paths are relative to the model root {root})") from None
    except (OSError, RuntimeError, ValueError) as exc:  # ValueError: an embedded NUL byte
        raise ArtifactError(f"artifact {brief(label)} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        raise ArtifactError(f"artifact {brief(label)} resolves to {resolved}, outside the model root "
                            f"{root} (a symlink escapes it): copy the file under the model root")
    return resolved
