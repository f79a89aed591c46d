"""Benchmarks for banterhearts: ``python -m bench SCENARIO [flags]``.

Each scenario is a sibling module (``bench/generate.py``, later ``embed``, ``latency``,
``sse``) with ``add_arguments(parser)`` and ``run(args) -> dict``; ``bench/__main__.py``
dispatches and prints the scenario's result as one JSON object on stdout (logs go to stderr).
``bench/stack.py`` starts and stops the processes a scenario needs; ``bench/machine.py``
describes the machine the numbers came from. See docs/benchmarks.md.
"""
