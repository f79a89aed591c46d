"""The static-batching baseline of the engine (``admission="static"``) and a smoke run of the
``python -m bench generate`` benchmark (no timing assertions)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # "a" alone; "a" decodes while "b" prefills, in the step "b" joined; both; "a" alone
    assert [size for _, size in sink.passes] == [1, 1, 1, 2, 1]
    assert [len(step) for step in sink.published] == [1, 2, 2, 1]


def test_static_admission_still_caps_the_batch(cache, gpt):
    sink = RecordingSink()
    engine = Engine(cache, sink, EngineSettings(admission="static", max_running=2))
    futures = [engine.submit_generate(f"j{i}", gpt, "hi", SamplingParams(max_tokens=2))
               for i in range(3)]
    step_until(engine, futures)
    assert [size for _, size in sink.passes] == [2, 2, 1, 1]


@pytest.mark.parametrize("flags, code, message", [
    (["--worker-env", "NOPE"], 2, "expected NAME=VALUE, got 'NOPE'"),
    (["--worker-env", "BANTER_PREFILL_OVERLAP=yes"], 1,
     "BANTER_PREFILL_OVERLAP='yes': expected off, on or auto"),
    (["--variant", "BANTER_PREFILL_OVERLAP=on"], 2, "expected NAME:VAR=VALUE"),
    (["--variant", "Big:BANTER_PREFILL_OVERLAP=on"], 2, "expected NAME:VAR=VALUE"),
    (["--variant", "x:BANTER_PREFILL_OVERLAP=sometimes"], 1, "BANTER_PREFILL_OVERLAP='sometimes'"),
    (["--variant", "static:BANTER_PREFILL_OVERLAP=on"], 1, "the name of a phase already in")])
def test_generate_rejects_bad_worker_flags_before_starting_anything(flags, code, message):
    run = subprocess.run([sys.executable, "-m", "bench", "generate", *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == code and message in run.stderr, run.stderr[-2000:]
    assert run.stdout == "" and "raw onnxruntime loops" not in run.stderr


def test_flat_pass_model_counts_a_join_beside_a_decode_as_a_second_pass():
    """Client 0 wants 4 tokens; client 1 wants 1, then 1 more a pass-time after its first
    ends. Continuous: 1 prefill (both) + 1 decode + (decode + prefill of client 1's second
    request: 2) + 1 decode = 5; with the prefill beside the decode that step is 1: 4. Static:
    client 1's second request waits for client 0 to finish: 4 + 1 = 5."""
    from bench.generate import Request, flat_pass_model

    workload = [Request(0, 0, 0, "a", 4), Request(1, 1, 0, "b", 1), Request(2, 1, 1, "c", 1)]
    model = flat_pass_model(workload, clients=2, max_running=32)
    assert model["pass_times"] == {"continuous": 5.0, "continuous_prefill_beside": 4.0,
                                   "static": 5.0}
    assert model["ratios"] == {"static": 1.0, "static_prefill_beside": 1.25}
    # one at a time: 4 passes, client 1's two (1 each) with its think time between: 7
    capped = flat_pass_model(workload, clients=2, max_running=1)
    assert capped["pass_times"]["continuous"] == capped["pass_times"]["static"] == 7.0


def test_admission_setting_is_validated_and_reaches_the_engine():
    assert Settings().admission == "continuous"
    settings = Settings.from_env({"BANTER_ADMISSION": "static"})
    assert engine_settings(settings).admission == "static"
    with pytest.raises(SettingsError, match="BANTER_ADMISSION='batch'.*continuous or static"):
        Settings.from_env({"BANTER_ADMISSION": "batch"})
    with pytest.raises(ValueError, match="admission"):
        EngineSettings(admission="sometimes")


def test_engine_alone_splits_its_passes_into_prompt_and_decode_passes(gpt):
    """``diagnostics.engine_alone``'s split, in place: one prompt row per job, one decode row
    per token after each job's first, and the probe leaves the runner as it found it."""
    from bench.generate import make_workload, run_engine_alone

    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, kv_layout="inplace")
    workload = make_workload(3, 2, [4, 9, 2])
    result, outputs = run_engine_alone(runners, gpt, workload, 3, EngineSettings(max_running=8))
    jobs, tokens = len(workload), sum(len(t) for t in outputs)
    assert tokens == sum(r.max_tokens for r in workload)
    prompt, decode = result["prompt"], result["decode"]
    assert prompt["rows"] == jobs and prompt["positions"] >= jobs
    assert decode["rows"] == tokens - jobs
    assert sum(v["passes"] for v in decode["ms_by_rows"].values()) == decode["passes"]
    assert prompt["passes"] + decode["passes"] == result["passes"]
    assert result["merged"]["passes"] == 0  # never in place
    assert "run_decoder" not in vars(runners.get(gpt))


def test_engine_alone_counts_merged_passes_apart(gpt):
    """With ``prefill_merge`` on, the passes in which prompts joined running rows are neither
    decode nor prompt passes."""
    from bench.generate import make_workload, run_engine_alone

    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, kv_layout="concat")
    workload = make_workload(3, 2, [4, 9, 2])
    split = {}
    for merge in ("on", "off"):
        split[merge], _ = run_engine_alone(runners, gpt, workload, 3,
                                           EngineSettings(max_running=8, prefill_merge=merge))
    merged, separate = split["on"], split["off"]
    assert merged["merged"]["passes"] > 0 and separate["merged"]["passes"] == 0
    assert merged["prompt"]["passes"] + merged["merged"]["passes"] == separate["prompt"]["passes"]
    assert sum(merged[kind]["passes"] for kind in ("prompt", "decode", "merged")) == merged["passes"]


@pytest.mark.parametrize("layout", ["inplace", "concat"])
def test_a_one_token_prompt_pass_is_a_prompt_pass(layout):
    from bench.generate import _PassProbe
    from workers.batching import left_pad_prompts
    from workers.inplace import decode_inputs, prompt_inputs

    one = [np.array([7], dtype=np.int64)] * 2
    if layout == "inplace":
        assert _PassProbe.kind(prompt_inputs(one)) == "prompt"
        assert _PassProbe.kind(decode_inputs(np.array([3, 4]), np.array([1, 5]))) == "decode"
    else:
        ids, mask, positions = left_pad_prompts(one)
        assert _PassProbe.kind({"input_ids": ids, "attention_mask": mask}) == "prompt"
        assert _PassProbe.kind({"input_ids": ids, "attention_mask": np.c_[mask, mask]}) == "decode"
        wide = np.c_[ids, ids]  # two new columns after cached ones: a merged pass
        assert _PassProbe.kind({"input_ids": wide, "attention_mask": np.c_[mask, mask, mask]}) == "merged"


@pytest.mark.slow
def test_generate_benchmark_smoke_run():
    run = subprocess.run([sys.executable, "-m", "bench", "generate", "--clients", "2",
                          "--max-tokens", "4,8", "--rounds", "1", "--repeats", "1",
                          "--warm-up-rounds", "1", "--worker-env", "BANTER_PUBLISH_AHEAD_STEPS=1",
                          "--variant", "prefill_overlap:BANTER_PREFILL_OVERLAP=on"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    for key in ("scenario", "unit", "served", "baselines", "ratios", "ttft_ms", "latency_ms",
                "settings", "machine", "duration_s", "correct", "phases"):
        assert key in result, key
    assert result["scenario"] == "generate" and result["unit"] == "tokens/s"
    assert result["correct"] is True, result["correctness"]
    assert set(result["baselines"]) == {"static", "batch1", "raw_ort", "raw_ort_inplace",
                                        "raw_ort_batch1"}
    assert result["correctness"]["raw_ort_inplace"] is True and result["skipped_baselines"] == {}
    assert set(result["ratios"]) == set(result["baselines"])
    assert set(result["ttft_ms"]) == {"served", "static"}
    assert set(result["ttft_ms"]["served"]) == {"p50", "p99"}
    parts = result["phases"]["served"]["ttft_parts_ms"]  # every request's first token, by hop
    assert list(parts) == ["to_record", "to_worker", "to_first_token", "to_client"]
    assert all(part["p50"] is not None for part in parts.values()), parts
    assert result["settings"]["clients"] == 2 and result["settings"]["max_tokens"] == [4, 8]
    assert result["settings"]["worker_env"] == {"BANTER_PUBLISH_AHEAD_STEPS": "1"}
    variant = result["variants"]["prefill_overlap"]  # a served phase of its own, same baselines
    assert variant["worker_env"] == {"BANTER_PREFILL_OVERLAP": "on"} and variant["tokens_per_s"] > 0
    assert set(variant["ratios"]) == {"served", *result["baselines"]}
    assert result["correctness"]["variant_prefill_overlap"] is True
    assert result["phases"]["variant_prefill_overlap"]["tokens_per_run"] == 12
    assert result["phases"]["served"]["tokens_per_run"] == 12  # the warm-up round not counted
    assert result["settings"]["warm_up_rounds"] == 1
    by_repeat = result["static_ratios_by_repeat"]
    assert set(by_repeat) == {"served", "batch1", "variant_prefill_overlap"}
    static_runs = result["phases"]["static"]["runs_tokens_per_s"]
    for phase, ratios in by_repeat.items():
        runs = result["phases"][phase]["runs_tokens_per_s"]
        assert ratios["runs"] == [round(a / b, 3) for a, b in zip(runs, static_runs)]
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["onnxruntime"]


# -- embed, latency, sse, lanes, kvcache, prefill: smoke runs with tiny flags, and the pure checks -----

# each smoke run starts its own stack (kvcache, prefill: none); they run side by side. A name
# is the scenario's, or "scenario:label" for a second run of one with other flags
SMOKE_RUNS = {
    "embed": ["--sentences", "24", "--clients", "4", "--repeats", "1", "--inputs-per-request", "2"],
    "latency": ["--requests", "5", "--warmup", "1", "--no-window-diagnostic"],
    "sse": ["--subscribers", "6", "--followers", "3", "--max-tokens", "4"],
    "lanes": ["--bulk", "40", "--requests", "2", "--submitters", "4"],
    "lanes:generate": ["--bulk", "12", "--requests", "2", "--submitters", "4", "--bulk-kind",
                       "generate", "--bulk-max-tokens", "30", "--max-tokens", "3",
                       "--kinds", "inference"],
    "kvcache": ["--rows", "3", "--past", "5", "--steps", "4", "--repeats", "2", "--profile-ops",
                "--inplace"],
    "prefill": ["--rows", "3", "--prompt-tokens", "6", "--repeats", "2"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """``python -m bench NAME FLAGS`` for every SMOKE_RUNS entry, concurrently; name -> the
    finished process (``returncode``, and ``out``/``err``: the text of its stdout/stderr)."""
    directory = tmp_path_factory.mktemp("bench-smoke")
    runs = {}
    for name, flags in SMOKE_RUNS.items():
        out, err = directory / f"{name}.json", directory / f"{name}.log"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            scenario = name.partition(":")[0]
            runs[name] = (subprocess.Popen([sys.executable, "-m", "bench", scenario, *flags],
                                           cwd=ROOT, stdout=stdout, stderr=stderr, text=True),
                          out, err)
    finished = {}
    for name, (process, out, err) in runs.items():
        try:
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.out, process.err = out.read_text(), err.read_text()
        finished[name] = process
    return finished


def smoke_result(smoke_runs, name):
    process = smoke_runs[name]
    assert process.returncode == 0, process.err[-3000:]
    result = json.loads(process.out)
    for key in ("scenario", "unit", "served", "baselines", "ratios", "settings", "machine",
                "duration_s"):
        assert key in result, key
    assert result["scenario"] == name.partition(":")[0]
    return result


def test_sse_check_counts_lost_duplicated_and_unfinished_streams():
    from bench.sse import Subscriber, _parse, check

    assert _parse("id: 1700000000000-0\nevent: token\ndata: {\"seq\": 0}") == (
        "1700000000000-0", "token", {"seq": 0})
    assert _parse(": keep-alive") is None
    truth = [("1000-0", "token", {"seq": 0, "text": "a", "token_id": 1}),
             ("1001-0", "token", {"seq": 1, "text": "b", "token_id": 2}),
             ("1002-0", "done", {"finish_reason": "length", "usage": {}})]
    whole = Subscriber("j", events=[(i, k, d, 1.003) for i, k, d in truth])
    missing = Subscriber("j", events=[(i, k, d, 1.003) for i, k, d in truth[1:2]])
    doubled = Subscriber("j", events=[(i, k, d, 1.003) for i, k, d in truth[:1] * 2 + truth[1:]])
    result = check([whole, missing, doubled], {"j": truth})
    assert result["expected"] == 6 and result["delivered"] == 1 + 2 + 3
    assert result["lost"] == 2 + 1  # `missing` lacks seq 0 and shifts seq 1; `doubled` shifts
    assert result["duplicates"] == 1 and result["subscribers_mismatched"] == 2
    assert result["subscribers_without_final_event"] == 1
    assert result["latency_ms"]["max"] == pytest.approx(3.0, abs=0.01)


def test_bench_sentences_have_the_requested_token_count(tmp_path):
    from bench.common import RawEncoder, make_sentences

    encoder = RawEncoder(build_demo(tmp_path)["demo-embed"], threads=1)
    texts = make_sentences(20, encoder.tokenizer, 32)
    lengths = [len(ids) for ids in encoder.encode(texts)]
    assert len(set(texts)) == 20 and max(lengths) <= 32 and min(lengths) >= 24
    single = encoder.embed(texts[:3])
    batched, _ = encoder.loop(texts[:3], batch_size=8)
    assert np.allclose(single, batched, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0)


@pytest.mark.slow
def test_embed_benchmark_smoke_run(smoke_runs):
    result = smoke_result(smoke_runs, "embed")
    assert result["unit"] == "sentences/s"
    assert set(result["baselines"]) == {"raw_ort", "naive_celery"} == set(result["ratios"])
    assert result["correct"] is True, result["correctness"]
    assert result["phases"]["served"]["max_abs_diff"] <= 1e-4
    assert result["phases"]["naive_celery"]["correct"] is True
    assert result["settings"]["tokens_per_sentence"]["max"] <= 32


@pytest.mark.slow
def test_latency_benchmark_smoke_run(smoke_runs):
    result = smoke_result(smoke_runs, "latency")
    assert set(result["baselines"]) == {"raw_ort", "redis_ping"}
    assert set(result["served_minus_raw_ms"]) == {"inference", "embeddings"}
    assert result["served_ms"]["inference"]["n"] == 5
    assert set(result["inference_stages_p50_ms"]) == {"client_to_queued", "queue_wait", "run",
                                                       "finished_to_client"}


@pytest.mark.slow
def test_sse_benchmark_smoke_run(smoke_runs):
    result = smoke_result(smoke_runs, "sse")
    assert result["correct"] is True, (result["tokens"], result["errors"])
    assert result["lost"] == 0 and result["tokens"]["expected"] == 6 * 4
    assert result["tokens"]["delivered"] == 6 * 4 and result["jobs"]["count"] == 2
    assert result["publish_to_client_ms"]["n"] == 24 and "redis_xread" in result["baselines"]


@pytest.mark.slow
def test_lanes_benchmark_smoke_run(smoke_runs):
    result = smoke_result(smoke_runs, "lanes")
    assert result["correct"] is True, result["bulk"]
    assert result["bulk"]["lost"] == 0 and result["bulk"]["statuses"] == {"succeeded": 40}
    assert set(result["idle"]) == {"embeddings", "inference"}
    assert result["idle"]["inference"]["latency_ms"]["n"] == 2
    assert set(result["ratios"]) == {"embeddings_p50", "embeddings_p99", "inference_p50",
                                     "inference_p99"}
    idle = result["idle"]["inference"]
    slowest = idle["slowest_ms"]
    assert len(slowest) == 2 and slowest[0]["latency"] >= slowest[1]["latency"]
    assert slowest[0]["latency"] == pytest.approx(idle["latency_ms"]["max"], abs=0.01)
    assert set(slowest[0]) == {"latency", *idle["stages_p50_ms"]}


@pytest.mark.slow
def test_lanes_benchmark_with_a_generate_backlog(smoke_runs):
    result = smoke_result(smoke_runs, "lanes:generate")
    assert result["correct"] is True, result["bulk"]
    assert result["bulk"]["kind"] == "generate" and result["bulk"]["lost"] == 0
    assert set(result["idle"]) == {"inference"}
    assert result["bulk"]["statuses"] == {"succeeded": 12}
    assert result["settings"]["interactive"]["inference"]["max_tokens"] == 3


def test_kvcache_benchmark_smoke_run(smoke_runs):
    """Both decode loops (cache as numpy arrays, cache bound with I/O binding) ran from the same
    cache and chose the same tokens at every step."""
    result = smoke_result(smoke_runs, "kvcache")
    assert result["correct"] is True and result["device"] == "cpu"
    assert result["providers"] == ["CPUExecutionProvider"]
    assert len(result["runs_ms_per_step"]["host"]) == 2
    assert result["served"] > 0 and result["baselines"]["device_bound"] > 0
    # --inplace: the cache-in-place twin chose the same tokens (``correct`` covers it)
    assert result["baselines"]["inplace_cache"] > 0 and len(result["runs_ms_per_step"]["inplace_cache"]) == 2
    ops = result["ops"]["by_type"]  # --profile-ops: demo-gpt's present.* come from Concat
    assert "Concat" in ops and "MatMul" in ops and ops["Concat"]["ms_per_step"] > 0
    assert sum(op["share"] for op in ops.values()) == pytest.approx(1.0, abs=0.01)
    assert result["ops"]["kernel_ms_per_step"] == pytest.approx(
        sum(op["ms_per_step"] for op in ops.values()), rel=0.01)
    # the demo model it built is gone with its scratch directory (none left in /tmp per run)
    assert not Path(result["settings"]["model_dir"]).parent.exists()


def test_the_inplace_twin_computes_what_the_decoder_computes(tmp_path):
    """``bench.inplace``: demo-gpt rebuilt with GroupQueryAttention and one cache buffer per
    past input gives the original's logits at each row's last position for a prompt (prefill,
    no past) and for the decode steps after it, each step writing its position into the buffer
    in place."""
    import onnxruntime as ort

    from banter.demo import DEMO_GPT, build_demo
    from bench.inplace import Inplace

    model = build_demo(tmp_path)[DEMO_GPT] / "model.onnx"
    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in original.get_inputs() if i.name.startswith("past_key_values.")]
    head = original.get_inputs()[3].shape  # past_key_values.0.key [B, H, P, D]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    rows, prompt = 2, np.array([[5, 9, 11, 4], [7, 3, 3, 8]], dtype=np.int64)
    twin = Inplace(model, rows, capacity=12)
    pasts = [np.zeros((rows, head[1], 0, head[3]), np.float32) for _ in past_names]
    ids, cached = prompt, 0
    for _ in range(4):
        width = ids.shape[1]
        positions = np.tile(np.arange(cached, cached + width), (rows, 1))
        feeds = {"input_ids": ids, "attention_mask": np.ones((rows, cached + width), np.int64),
                 "position_ids": positions, **dict(zip(past_names, pasts))}
        want, *pasts = original.run(["logits", *present_names], feeds)
        got = twin.step(ids, positions, cached)
        assert got.shape == (rows, 1, want.shape[2]) and np.abs(got - want[:, -1:]).max() < 1e-4
        cached += width
        ids = want[:, -1].argmax(-1)[:, None]
    with pytest.raises(ValueError, match="13 positions exceed the capacity 12"):
        twin.step(np.ones((rows, 6), np.int64), np.zeros((rows, 6), np.int64), cached)


def test_the_raw_inplace_loop_decodes_what_the_raw_loop_decodes(tmp_path):
    """``bench generate``'s raw_ort_inplace: a round of ragged prompts with mixed max_tokens,
    rows leaving at different steps, gives the raw_ort loop's tokens row for row."""
    from banter.demo import DEMO_GPT, build_demo
    from bench.generate import RawDecoder, raw_inplace

    model_dir = build_demo(tmp_path)[DEMO_GPT]
    raw = RawDecoder(model_dir, threads=1)
    inplace = raw_inplace(model_dir, ["CPUExecutionProvider"], rows=5, threads=1)
    prompts = [raw.encode(p) for p in ("hi", "tell me a story", "a b c d e f g h", "x", "the cache")]
    limits = [3, 9, 1, 6, 4]
    want, _, want_passes = raw.generate(prompts, limits)
    got, seconds, passes = inplace.generate(prompts, limits, raw.eos)
    assert got == want and [len(t) for t in got] == limits
    assert passes == want_passes == 9 and seconds > 0
    with pytest.raises(ValueError, match="6 prompts exceed the 5 rows"):
        inplace.generate(prompts + prompts[:1], limits + [2], raw.eos)
    with pytest.raises(ValueError, match="CPU provider only"):
        raw_inplace(model_dir, ["CUDAExecutionProvider"], rows=5, threads=1)


def test_the_inplace_twin_needs_a_gpt_graph_decoder(tmp_path):
    from banter.demo import DEMO_EMBED, build_demo
    from workers.inplace import NotInplaceable, inplace_model

    with pytest.raises(NotInplaceable, match="not a banterhearts gpt_graph decoder"):
        inplace_model(build_demo(tmp_path)[DEMO_EMBED] / "model.onnx")


def test_prefill_benchmark_smoke_run(smoke_runs):
    """demo-gpt's prompt pass on its in-place twin and on its own graph: same next tokens."""
    result = smoke_result(smoke_runs, "prefill")
    assert result["correct"] is True
    assert result["served"] > 0 and result["baselines"]["own_graph"] > 0
    assert all(len(runs) == 2 for runs in result["runs_ms"].values())
    assert result["settings"]["prompt_tokens_total"] == 6 + 5 + 4


def test_prefill_loops_agree_on_a_random_decoder_with_its_own_vocabulary(tmp_path):
    """``--random-gpt2-small``'s decoder (here a small shape with 1000 vocabulary rows, more
    than the tokenizer's): the twin projects only each prompt's last position and picks what
    the model's own graph picks there, row for row, for ragged prompts."""
    from bench.prefill import OwnGraph, Twin, make_prompts, write_random_decoder
    from workers.inplace import prompt_inputs

    dims = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 32}
    model = write_random_decoder(tmp_path / "m", 1000, dims)
    own, twin = OwnGraph(model, threads=1), Twin(model, rows=5, capacity=9, threads=1)
    assert own.raw.session.get_outputs()[0].shape[2] == 1000
    prompts = make_prompts(5, 9, 1000, seed=4)
    assert [len(p) for p in prompts] == [9, 8, 7, 6, 9]
    logits = twin.inplace.run(prompt_inputs(prompts))
    assert logits.shape == (5, 1, 1000)
    assert twin.next_tokens(prompts).tolist() == own.next_tokens(prompts).tolist()


def test_kvcache_kernel_time_leaves_out_the_warm_up_runs():
    from bench.kvcache import kernel_ms_by_op

    def node(op, ts, dur):
        return {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op}}

    trace = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
             node("Concat", 10, 90),
             {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
             node("Concat", 210, 3000), node("MatMul", 220, 1000),
             {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
             node("Concat", 410, 1000), node("MatMul", 420, 3000),
             {"cat": "Node", "name": "n_fence_before", "ts": 430, "dur": 50}]
    assert kernel_ms_by_op(trace, 2, skip_runs=1) == {
        "kernel_ms_per_step": 4.0,
        "by_type": {"Concat": {"ms_per_step": 2.0, "share": 0.5},
                    "MatMul": {"ms_per_step": 2.0, "share": 0.5}}}
    assert kernel_ms_by_op(trace, 3)["by_type"]["Concat"]["ms_per_step"] == pytest.approx(1.363,
                                                                                           abs=0.001)


def test_kvcache_loops_agree_token_for_token(tmp_path):
    """The device-bound loop is a real decode loop: each step's token is fed back (demo-gpt
    walks its text, so every step chooses another token) and it follows the host loop's
    tokens step for step."""
    from banter.demo import DEMO_GPT, build_demo
    from bench.kvcache import Decoder

    decoder = Decoder(build_demo(tmp_path)[DEMO_GPT], None)
    cache = decoder.start(rows=4, past=6)
    host, _ = decoder.host_loop(cache, 5)
    device, _ = decoder.device_loop(cache, 5)
    assert host == device and len(host) == 5 and len(host[0]) == 4
    assert len({tuple(step) for step in host}) == 5


@pytest.mark.parametrize("args, said", [
    (["generate", "--baselines", "foo"], "argument --baselines: 'foo': choose from static,"),
    (["embed", "--baselines", "raw_ort,foo"], "argument --baselines: 'foo': choose from raw_ort"),
    (["embed", "--raw-threads", "x"], "argument --raw-threads: 'x' is not a number"),
    (["lanes", "--kinds", "foo"], "argument --kinds: 'foo': choose from embeddings, inference"),
    (["--log-level", "loud", "kvcache"], "argument --log-level: invalid choice: 'LOUD'"),
])
def test_a_bad_argument_is_exit_2_before_anything_runs(args, said):
    """As documented (1: it could not run; 2: bad arguments): a value the scenario cannot
    take is refused by its parser, never a traceback after a stack started."""
    run = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert said in run.stderr and "Traceback" not in run.stderr and run.stdout == ""


@pytest.mark.parametrize("level", ["critical", "WARN", "debug"])
def test_every_logging_level_name_is_a_log_level(level):
    run = subprocess.run([sys.executable, "-m", "bench", "--log-level", level, "kvcache",
                          "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_kvcache_inplace_takes_a_single_step():
    """The in-place cache has room for the warm-up's two steps whatever --steps is."""
    run = subprocess.run([sys.executable, "-m", "bench", "kvcache", "--rows", "1", "--past", "8",
                          "--steps", "1", "--repeats", "1", "--inplace"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["correct"] and "inplace_cache" in result["baselines"]


def test_lanes_slowest_keeps_each_requests_own_stages():
    from bench.lanes import slowest

    stages = [{"run": 0.001 * i} for i in range(5)]
    top = slowest([0.010, 0.050, 0.020, 0.040, 0.030], stages, count=2)
    assert top == [{"latency": 50.0, "run": 1.0}, {"latency": 40.0, "run": 3.0}]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_check_fails_clearly_without_a_gpu():
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 3
    assert "nvidia-smi not found" in run.stderr and "nothing was run" in run.stderr
    assert run.stdout == ""


def test_gpu_check_refuses_an_unknown_scenario_before_anything_runs():
    env = {**os.environ, "GPU_CHECK_SCENARIOS": "generate kvcach"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "unknown scenario 'kvcach'" in run.stderr and run.stdout == ""


@pytest.mark.parametrize("variable, value", [("GENERATE_ROUNDS", "0"), ("GENERATE_ROUNDS", "8x"),
                                             ("GENERATE_REPEATS", "-1")])
def test_gpu_check_refuses_a_count_that_is_not_one_before_anything_runs(variable, value):
    env = {**os.environ, variable: value}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert f"{variable} must be a positive integer" in run.stderr and run.stdout == ""


def test_gpu_check_with_a_prepared_interpreter_installs_nothing_and_says_cuda_is_missing(tmp_path):
    """``BENCH_PYTHON``: the script uses that interpreter as it is; one whose onnxruntime has no
    CUDA provider ends the check (exit 4) instead of a pip install into it."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: a test stand-in'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
           "BENCH_PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 4, run.stderr
    assert "CPUExecutionProvider" in run.stdout and "CUDAExecutionProvider" not in run.stdout
    assert "still has no CUDAExecutionProvider" in run.stderr
    assert "installing onnxruntime-gpu" not in run.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_the_naive_baseline_waits_for_a_reply_longer_than_a_default_socket_timeout(settings):
    """``bench embed``'s naive client blocks on each reply; a reply that comes after redis-py's
    default socket timeout (5 s in redis-py 8) must still arrive, not fail the run."""
    import threading

    import redis

    from bench.embed import naive_call

    class App:  # the Celery app's send_task: here the "worker" answers 6 s later
        def send_task(self, name, args, queue):
            text, key = args
            threading.Timer(6.0, lambda: redis.Redis.from_url(settings.redis_url).rpush(
                key, json.dumps([len(text)]))).start()

    call = naive_call(App(), settings.redis_url, timeout_s=20.0)
    assert call({}, ["late"]) == [[4]]


def test_the_reference_text_is_what_the_server_streams_for_a_cut_character(tmp_path):
    """A generation cut inside a character streams its held bytes as U+FFFD: the bench's
    reference text must say the same, or every such request reads as a mismatch."""
    from banter.demo import DEMO_GPT, build_demo
    from bench.generate import RawDecoder
    from workers.detokenizer import IncrementalDetokenizer

    raw = RawDecoder(build_demo(tmp_path)[DEMO_GPT], threads=1)
    ids = raw.tokenizer.encode("ok 🌍").ids[:-1]
    detok = IncrementalDetokenizer(raw.tokenizer)
    streamed = "".join(detok.push(t) for t in ids) + detok.flush()
    assert raw.text(ids) == raw.text([*ids, raw.eos]) == streamed and streamed.endswith("\ufffd")


def test_static_ratios_by_repeat_pair_each_phase_with_the_static_run_beside_it():
    from bench.generate import static_ratios_by_repeat

    phases = {"served": {"runs_tokens_per_s": [200.0, 150.0, 330.0]},
              "static": {"runs_tokens_per_s": [100.0, 150.0, 110.0]},
              "variant_x": {"runs_tokens_per_s": [100.0, 300.0, 220.0]}}
    assert static_ratios_by_repeat(phases) == {
        "served": {"runs": [2.0, 1.0, 3.0], "median": 2.0},
        "variant_x": {"runs": [1.0, 2.0, 2.0], "median": 2.0}}
    assert static_ratios_by_repeat({"served": phases["served"]}) == {}
