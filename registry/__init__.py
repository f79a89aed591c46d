"""The model registry: versions of each model name, promoted and rolled back by the producer,
read by workers from a Redis mirror.

- ``records``: ``Record`` (one line of history.jsonl), name and ``name@version`` rules.
- ``history``: ``HistoryFile``, the locked append-only file, the source of truth.
- ``state``: ``replay(records) -> RegistryState``.
- ``artifacts``: ``inspect_artifact``, checks an ONNX artifact before promotion.
- ``mirror``: ``Mirror`` (Redis, what workers read) and ``resolve_from_mirror``.
- ``service``: ``Registry``, what the producer uses.

Import the submodules directly; this package imports nothing so workers do not pull in the
producer's side.
"""
