"""The static-batching baseline of the engine (``admission="static"``) and a smoke run of the
``python -m bench generate`` benchmark (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from banter.demo import DEMO_TEXT, build_demo
from banter.params import SamplingParams
from banter.settings import Settings, SettingsError
from registry.artifacts import sha256_file
from workers.engine import Engine, EngineSettings
from workers.runner import ModelSpec, RunnerCache, select_providers
from workers.runtime import engine_settings

ROOT = Path(__file__).resolve().parent.parent
WORDS = [" " + w for w in DEMO_TEXT.split()]


def demo_words(n):
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


class RecordingSink:
    def __init__(self):
        self.published = []
        self.passes = []

    def publish_tokens(self, events):
        assert events
        self.published.append(list(events))

    def record_pass(self, kind, model, version, batch_size, seconds):
        self.passes.append((kind, batch_size))


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    directory = build_demo(tmp_path_factory.mktemp("models"))["demo-gpt"]
    model = directory / "model.onnx"
    return ModelSpec("demo-gpt", 1, "generate", model, directory / "tokenizer.json",
                     sha256_file(model))


@pytest.fixture(scope="module")
def cache():
    return RunnerCache(select_providers(use_gpu=False), intra_op_threads=1)


def step_until(engine, futures, max_steps=200):
    for _ in range(max_steps):
        if all(f.done() for f in futures):
            return [f.result() for f in futures]
        engine.step()
    raise AssertionError("futures did not finish")


def test_static_admission_waits_for_the_running_batch_to_finish(cache, gpt):
    sink = RecordingSink()
    engine = Engine(cache, sink, EngineSettings(admission="static"))
    first = engine.submit_generate("a", gpt, "hello there", SamplingParams(max_tokens=4))
    engine.step()
    assert engine.running_jobs() == ["a"]
    late = [engine.submit_generate(job, gpt, "tell me a story", SamplingParams(max_tokens=2))
            for job in ("b", "c")]
    for _ in range(3):  # "a" emits its tokens 2, 3 and 4 alone; "b" and "c" wait
        assert engine.running_jobs() == ["a"]
        engine.step()
    assert first.done() and first.result().text == demo_words(4)
    assert not any(f.done() for f in late) and engine.running_jobs() == []
    engine.step()  # the batch drained: the next one forms from everything waiting
    assert sorted(engine.running_jobs()) == ["b", "c"]
    results = step_until(engine, late)
    assert [r.text for r in results] == [demo_words(2)] * 2
    assert [r.batch_size for r in results] == [2, 2] and first.result().batch_size == 1
    assert [size for _, size in sink.passes] == [1, 1, 1, 1, 2, 2]


def test_continuous_admission_joins_at_the_next_step(cache, gpt):
    sink = RecordingSink()
    engine = Engine(cache, sink, EngineSettings())
    first = engine.submit_generate("a", gpt, "hello there", SamplingParams(max_tokens=4))
    engine.step()
    late = engine.submit_generate("b", gpt, "tell me a story", SamplingParams(max_tokens=2))
    engine.step()
    assert sorted(engine.running_jobs()) == ["a", "b"]
    results = step_until(engine, [first, late])
    assert [r.text for r in results] == [demo_words(4), demo_words(2)]
    assert [size for _, size in sink.passes] == [1, 2, 2, 1]


def test_static_admission_still_caps_the_batch(cache, gpt):
    sink = RecordingSink()
    engine = Engine(cache, sink, EngineSettings(admission="static", max_running=2))
    futures = [engine.submit_generate(f"j{i}", gpt, "hi", SamplingParams(max_tokens=2))
               for i in range(3)]
    step_until(engine, futures)
    assert [size for _, size in sink.passes] == [2, 2, 1, 1]


def test_admission_setting_is_validated_and_reaches_the_engine():
    assert Settings().admission == "continuous"
    settings = Settings.from_env({"BANTER_ADMISSION": "static"})
    assert engine_settings(settings).admission == "static"
    with pytest.raises(SettingsError, match="BANTER_ADMISSION='batch'.*continuous or static"):
        Settings.from_env({"BANTER_ADMISSION": "batch"})
    with pytest.raises(ValueError, match="admission"):
        EngineSettings(admission="sometimes")


@pytest.mark.slow
def test_generate_benchmark_smoke_run():
    run = subprocess.run([sys.executable, "-m", "bench", "generate", "--clients", "2",
                          "--max-tokens", "4,8", "--rounds", "1", "--repeats", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    for key in ("scenario", "unit", "served", "baselines", "ratios", "ttft_ms", "latency_ms",
                "settings", "machine", "duration_s", "correct", "phases"):
        assert key in result, key
    assert result["scenario"] == "generate" and result["unit"] == "tokens/s"
    assert result["correct"] is True, result["correctness"]
    assert set(result["baselines"]) == {"static", "batch1", "raw_ort", "raw_ort_batch1"}
    assert set(result["ratios"]) == set(result["baselines"])
    assert set(result["ttft_ms"]) == {"served", "static"}
    assert set(result["ttft_ms"]["served"]) == {"p50", "p99"}
    assert result["settings"]["clients"] == 2 and result["settings"]["max_tokens"] == [4, 8]
    assert result["phases"]["served"]["tokens_per_run"] == 12
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["onnxruntime"]
