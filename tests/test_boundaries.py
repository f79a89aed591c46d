"""The producer never loads ONNX Runtime; workers never load Flask; no pickle on the wire."""

from __future__ import annotations

import subprocess
import sys

import celeryconfig


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
