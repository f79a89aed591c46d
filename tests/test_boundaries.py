"""The producer never loads ONNX Runtime; workers never load Flask; no pickle on the wire."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import celeryconfig
from banter.broker import make_celery
from banter.settings import Settings


def loaded_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_producer_does_not_import_onnxruntime():
    modules = loaded_modules("import producer.app, producer.server")
    assert "flask" in modules
    assert "onnxruntime" not in modules
    assert not any(m.startswith("workers") for m in modules)


def test_workers_do_not_import_flask():
    modules = loaded_modules("import workers.app, workers.main, workers.runtime")
    assert "onnxruntime" in modules
    assert "flask" not in modules
    assert not any(m.startswith("producer") for m in modules)


def test_celery_speaks_json_only():
    assert celeryconfig.accept_content == ["json"]
    assert celeryconfig.task_serializer == celeryconfig.result_serializer == "json"
    assert celeryconfig.task_acks_late and celeryconfig.task_reject_on_worker_lost


UNSAFE_DESERIALIZERS = re.compile(
    r"^\s*(import|from)\s+(pickle|_pickle|cPickle|dill|shelve|marshal|jsonpickle|cloudpickle)\b"
    r"|allow_pickle\s*=\s*True|serializer\s*=\s*['\"]pickle", re.MULTILINE)


def test_no_pickle_anywhere():
    """No module imports a pickle-like deserializer, and the Celery app both sides build takes
    JSON only (a pickled message from the broker is refused, never executed)."""
    root = Path(__file__).parent.parent
    sources = [root / "celeryconfig.py", *[path for package in
               ("banter", "producer", "workers", "registry", "bench", "tests")
               for path in (root / package).rglob("*.py")]]
    offenders = [str(path.relative_to(root)) for path in sources
                 if path != Path(__file__) and UNSAFE_DESERIALIZERS.search(path.read_text())]
    assert offenders == []
    conf = make_celery(Settings()).conf
    assert conf.accept_content == ["json"] and conf.event_serializer == "json"
    assert conf.task_serializer == conf.result_serializer == "json"
