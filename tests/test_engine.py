import os
import shutil
import threading
import time
from collections import deque
from dataclasses import replace

import numpy as np
import pytest

from banter.demo import DEMO_TEXT, build_demo
from banter.errors import (
    ChecksumMismatch,
    InferenceError,
    InvalidRequest,
    ModelLoadError,
    PromptTooLong,
)
from banter.params import SamplingParams
from registry.artifacts import sha256_file
from workers import engine as engine_module
from workers import runner as runner_module
from workers.batching import collate, left_pad_prompts, merge_feeds, pack_rows
from workers.detokenizer import IncrementalDetokenizer, TokenText, find_stop, partial_stop_len
from workers.engine import MAX_BULK_STALL_S, Engine, EngineSettings, _Sequence
from workers.kvpacker import KVPacker
from workers.runner import ModelSpec, RunnerCache, select_providers, to_host

WORDS = [" " + w for w in DEMO_TEXT.split()]
PROMPTS = ["hi", "tell me a story", "a b c d e f g h i j k l m n o p",
           "Banterhearts is a small inference server.", "the cache keeps keys and values"]


def demo_words(n):
    return "".join(WORDS[i % len(WORDS)] for i in range(n))


class RecordingSink:
    def __init__(self):
        self.published = []  # one list of TokenEvent per publish_tokens call
        self.passes = []

    def publish_tokens(self, events):
        assert events
        self.published.append(list(events))

    def record_pass(self, kind, model, version, batch_size, seconds):
        self.passes.append((kind, model, version, batch_size))

    def streamed(self, job_id):
        return [e for step in self.published for e in step if e.job_id == job_id]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    dirs = build_demo(tmp_path_factory.mktemp("models"))

    def spec(name, kind):
        model = dirs[name] / "model.onnx"
        return ModelSpec(name, 1, kind, model, dirs[name] / "tokenizer.json", sha256_file(model))

    return {"gpt": spec("demo-gpt", "generate"), "embed": spec("demo-embed", "embed")}


@pytest.fixture(scope="module", params=["concat", "inplace"])
def cache(request):
    """Both KV cache layouts: the model's own graph, and its in-place twin."""
    cache = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, kv_layout=request.param)
    return cache


@pytest.fixture(scope="module")
def concat_cache():
    """The model's own graph only: for what only the concat layout has (left padding, re-packs)."""
    return RunnerCache(select_providers(use_gpu=False), intra_op_threads=1)


@pytest.fixture
def sink():
    return RecordingSink()


@pytest.fixture
def make_engine(cache, sink):
    def make(clock=time.monotonic, **settings):
        return Engine(cache, sink, EngineSettings(**settings), clock)
    return make


@pytest.fixture
def make_concat_engine(concat_cache, sink):
    def make(**settings):
        return Engine(concat_cache, sink, EngineSettings(**settings))
    return make


def drive(engine, futures, max_steps=1000):
    for _ in range(max_steps):
        if all(f.done() for f in futures):
            return [f.result() for f in futures]
        if not engine.step():
            engine.flush()  # with publish_ahead, finished jobs resolve once their tokens are out
    raise AssertionError("futures did not finish")


def generate_alone(make_engine, spec, prompt, params):
    engine = make_engine()
    return drive(engine, [engine.submit_generate("alone", spec, prompt, params)])[0]


# -- runner ----------------------------------------------------------------------------------

def test_runner_reads_decoder_geometry(cache, specs):
    runner = cache.get(specs["gpt"])
    assert runner.providers == ["CPUExecutionProvider"] == select_providers(False)
    assert (runner.n_layer, runner.n_head, runner.head_dim) == (2, 4, 32)
    assert runner.max_positions == 1024 and runner.eos_token_id == 0
    assert cache.get(specs["gpt"]) is runner


def test_checksum_mismatch_loads_nothing(specs):
    fresh = RunnerCache()
    bad = replace(specs["gpt"], sha256="0" * 64)
    with pytest.raises(ChecksumMismatch) as err:
        fresh.get(bad)
    assert str(bad.model_path) in err.value.message and "0" * 64 in err.value.message
    assert specs["gpt"].sha256 in err.value.message
    assert fresh.loaded() == []


def test_companion_files_changed_since_promote_load_nothing(specs, tmp_path):
    """A recorded companion edited or gone, or one there that was not at promote: refused
    (the tokenizer and config decide what the model's tokens mean) before any session."""
    source = specs["gpt"].model_path.parent
    directory = shutil.copytree(source, tmp_path / "gpt")
    files = tuple(sorted((name, sha256_file(directory / name))
                         for name in ("tokenizer.json", "config.json")))
    spec = replace(specs["gpt"], model_path=directory / "model.onnx",
                   tokenizer_path=directory / "tokenizer.json", files=files)
    edits = [("tokenizer.json", "changed", lambda p: p.write_text(p.read_text() + " ")),
             ("config.json", "is gone", lambda p: p.unlink()),
             ("tokenizer_config.json", "was not there", lambda p: p.write_text("{}")),
             ("config.json", "not a regular file", lambda p: (p.unlink(), os.mkfifo(p)))]
    for name, needle, edit in edits:
        original = (directory / name).read_bytes() if (directory / name).exists() else None
        edit(directory / name)
        fresh = RunnerCache()
        with pytest.raises(ChecksumMismatch, match=needle if needle != "changed" else "has sha256"):
            fresh.get(spec)
        assert fresh.loaded() == []
        (directory / name).unlink(missing_ok=True)
        if original is not None:
            (directory / name).write_bytes(original)
    assert RunnerCache().get(spec).spec == spec  # as promoted again: it loads


def test_a_model_whose_shapes_do_not_add_up_fails_at_load_saying_so(specs, tmp_path):
    """Heads that do not divide the width pass every static check (promote's too), but no
    pass can run: the load's one-token trial pass says so, instead of every job's pass
    failing with ONNX Runtime's reshape error."""
    from banter import demo

    tokenizer, cycle = demo.gpt_tokenizer()
    weights = demo._gpt_weights(tokenizer.get_vocab_size(), cycle)
    model = tmp_path / "bad-heads" / "model.onnx"
    model.parent.mkdir()
    model.write_bytes(demo.gpt_graph(weights, n_layer=1, n_head=3))  # 128 wide: 3 does not divide
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(specs["gpt"].model_path.parent / name, model.parent / name)
    spec = ModelSpec("bad-heads", 1, "generate", model, model.parent / "tokenizer.json",
                     sha256_file(model))
    fresh = RunnerCache(kv_layout="auto")
    with pytest.raises(ModelLoadError, match="bad-heads@1 fails a trial pass of one token"):
        fresh.get(spec)
    assert fresh.loaded() == []


def test_cache_loads_a_version_once_across_threads(specs, monkeypatch):
    loads = []

    class SlowRunner(runner_module.Runner):
        def __init__(self, *args):
            loads.append(1)
            time.sleep(0.05)
            super().__init__(*args)

    monkeypatch.setattr(runner_module, "Runner", SlowRunner)
    fresh = RunnerCache()
    got = []
    threads = [threading.Thread(target=lambda: got.append(fresh.get(specs["embed"])))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len({id(r) for r in got}) == 1
    assert fresh.loaded() == [("demo-embed", 1)]
    assert fresh.retire("demo-embed", 1) and fresh.loaded() == []


def test_a_version_whose_record_names_another_artifact_is_loaded_anew(specs, tmp_path):
    """``name@version`` names one artifact for good, but a history restored from elsewhere can
    give it another: the cache serves the artifact the record names (by its sha256), not the
    one it loaded first, and keeps one runner per version."""
    import onnx

    other_dir = tmp_path / "other"
    shutil.copytree(specs["embed"].model_path.parent, other_dir)
    model = onnx.load(str(other_dir / "model.onnx"))
    model.doc_string = "another artifact under the same name and version"
    onnx.save(model, str(other_dir / "model.onnx"))
    other = replace(specs["embed"], model_path=other_dir / "model.onnx",
                    tokenizer_path=other_dir / "tokenizer.json",
                    sha256=sha256_file(other_dir / "model.onnx"))
    fresh = RunnerCache()
    first = fresh.get(specs["embed"])
    second = fresh.get(other)
    assert second is not first and second.spec.sha256 == other.sha256
    assert fresh.get(other) is second and fresh.loaded() == [("demo-embed", 1)]


def test_a_retired_version_is_freed_once_its_last_job_is_done(specs):
    """The engine keeps per-model figures (embed cost, last arrival) without holding the
    model: a retired version's session goes with its last reference."""
    import gc
    import weakref

    fresh = RunnerCache()
    engine = Engine(fresh, RecordingSink(), EngineSettings(publish_ahead=0))
    drive(engine, [engine.submit_embed(specs["embed"], "one text")])
    held = weakref.ref(fresh.get(specs["embed"]))
    assert fresh.retire("demo-embed", 1)
    gc.collect()
    assert held() is None, "the engine still holds the retired version"


def test_wrong_graph_or_missing_file_is_a_load_error(specs):
    fresh = RunnerCache()
    with pytest.raises(ModelLoadError, match="not a embed graph"):
        fresh.get(replace(specs["gpt"], kind="embed"))
    with pytest.raises(ModelLoadError, match="cannot read model file"):
        missing = specs["gpt"].model_path.with_name("missing.onnx")
        fresh.get(replace(specs["gpt"], version=2, model_path=missing))
    assert fresh.loaded() == []


# -- batching and detokenizing ---------------------------------------------------------------

def test_collate_waits_until_full_or_deadline():
    waiting = deque(range(5))
    assert collate(waiting, 8, deadline=10.0, now=9.0) is None
    assert collate(waiting, 3, deadline=10.0, now=9.0) == [0, 1, 2]
    assert collate(waiting, 3, deadline=10.0, now=10.0) == [3, 4]
    assert collate(waiting, 3, deadline=10.0, now=11.0) is None


def test_detokenizer_never_splits_a_character(cache, specs):
    tokenizer = cache.get(specs["gpt"]).tokenizer
    text = "héllo 🌍 naïve — 日本"
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in tokenizer.encode(text).ids]
    assert "".join(pieces) == detok.text == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the emoji's bytes were held back until complete


def test_detokenizer_flush_gives_what_the_tokenizer_decodes(cache, specs):
    tokenizer = cache.get(specs["gpt"]).tokenizer
    ids = tokenizer.encode("ok 🌍").ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids[:-1]]  # the emoji's last byte never comes
    assert detok.text == "ok "
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text == tokenizer.decode(ids[:-1])
    assert detok.text.endswith("\ufffd") and detok.flush() == ""


@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_sequence_cut_inside_a_character_streams_its_held_bytes(cache, specs, end):
    runner = cache.get(specs["gpt"])
    ids = runner.tokenizer.encode("ok 🌍").ids[:-1]
    max_tokens = len(ids) if end == "length" else len(ids) + 1
    seq = _Sequence("j", runner, [1], SamplingParams(max_tokens=max_tokens), None)
    events = [seq.advance(t, 1) for t in ids]
    if end == "eos":
        events.append(seq.advance(runner.eos_token_id, 1))
    result = seq.result()
    assert (result.finish_reason, result.completion_tokens) == (
        "length" if end == "length" else "stop", len(events))
    assert "".join(e.text for e in events) == result.text == runner.tokenizer.decode(ids)
    assert result.text.endswith("\ufffd")


def test_stop_helpers():
    assert find_stop("abc stop here", ["here", "stop"]) == 4
    assert find_stop("abc", ["x"]) == -1
    assert partial_stop_len("hello wor", ["world", "lo w"]) == 3
    assert partial_stop_len("hello", ["world"]) == 0


def prefill(runner, prompts):
    ids, mask, positions = left_pad_prompts(prompts)
    empty = np.zeros((len(prompts), runner.n_head, 0, runner.head_dim), dtype=np.float32)
    out = runner.run({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                      **{name: empty for name in runner.past_names}})
    return out["logits"][:, -1], [out[n] for n in runner.present_names], mask


def decode(runner, pasts, mask, tokens, positions):
    mask = np.concatenate((mask, np.ones((len(tokens), 1), dtype=np.int64)), axis=1)
    out = runner.run({"input_ids": np.array(tokens).reshape(-1, 1), "attention_mask": mask,
                      "position_ids": np.array(positions).reshape(-1, 1),
                      **dict(zip(runner.past_names, pasts))})
    return out["logits"][:, -1], [out[n] for n in runner.present_names], mask


def test_pack_rows_keeps_chosen_rows_of_several_batches_in_one_copy():
    rng = np.random.default_rng(0)
    first = [rng.standard_normal((3, 2, 5, 4)).astype(np.float32) for _ in range(2)]
    first_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    second = [rng.standard_normal((2, 2, 3, 4)).astype(np.float32) for _ in range(2)]
    second_mask = np.array([[1, 1, 1], [0, 1, 1]])
    pasts, mask = pack_rows([(first, first_mask, [0, 2]), (second, second_mask, [1])])
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1], [0, 1, 1]]  # row 1's two columns dropped
    for out, a, b in zip(pasts, first, second):
        assert out.shape == (3, 2, 3, 4) and out.flags.c_contiguous
        np.testing.assert_array_equal(out[0], a[0, :, 2:])
        np.testing.assert_array_equal(out[1, :, 1:], a[2, :, 3:])
        np.testing.assert_array_equal(out[2, :, 1:], b[1, :, 1:])
        assert not out[1:, :, 0].any()  # left padding is zeros, whatever the column held
    assert pack_rows([(first, first_mask, [])])[1].shape == (0, 0)


def test_left_padded_batch_matches_each_sequence_alone(concat_cache, specs):
    """Prefill a and b together, decode them one step, stack c's prefill on, cut a out: what
    is left must equal b's and c's unpadded runs, logits and caches."""
    runner = concat_cache.get(specs["gpt"])
    a, b, c = (np.array(runner.tokenizer.encode(p).ids) for p in PROMPTS[1:4])
    _, pasts, mask = prefill(runner, [a, b])
    logits, pasts, mask = decode(runner, pasts, mask, [a[0], b[0]], [len(a), len(b)])
    c_logits, c_pasts, c_mask = prefill(runner, [c])
    pasts, mask = pack_rows([(pasts, mask, [0, 1]), (c_pasts, c_mask, [0])])
    assert mask.shape == (3, max(len(a), len(b), len(c)) + 1)
    pasts, mask = pack_rows([(pasts, mask, [1, 2])])
    assert mask.shape[1] == max(len(b) + 1, len(c))  # columns only a used are gone
    for row, (got_logits, whole) in enumerate([(logits[1], np.r_[b, b[:1]]), (c_logits[0], c)]):
        want_logits, want, _ = prefill(runner, [whole])
        np.testing.assert_allclose(got_logits, want_logits[0], atol=1e-4)
        for g, w in zip(pasts, want):
            real = mask[row].astype(bool)
            assert real.sum() == len(whole)
            np.testing.assert_allclose(g[row][:, real], w[0], atol=1e-5)


# -- embed -----------------------------------------------------------------------------------

def test_embed_batches_and_matches_alone(make_engine, sink, specs):
    texts = [f"sentence number {i} " + "word " * i for i in range(16)]
    engine = make_engine()
    results = drive(engine, [engine.submit_embed(specs["embed"], t)
                             for i, t in enumerate(texts)])
    assert 0 < len(sink.passes) < 16
    assert {r.batch_size for r in results} == {8}
    for text, result in zip(texts, results):
        alone = make_engine(batch_window_s=0.0)
        single = drive(alone, [alone.submit_embed(specs["embed"], text)])[0]
        assert single.batch_size == 1 and single.prompt_tokens == result.prompt_tokens
        assert np.allclose(result.embeddings[0], single.embeddings[0], atol=1e-5)
        assert abs(np.linalg.norm(result.embeddings[0]) - 1.0) < 1e-6


def test_a_list_job_embeds_every_input_in_order_across_passes(make_engine, sink, specs):
    texts = [f"list input {i} " + "word " * (i % 5) for i in range(19)]
    engine = make_engine(max_batch_size=8)
    other = engine.submit_embed(specs["embed"], "another job's text")
    job = engine.submit_embed(specs["embed"], texts)
    result = drive(engine, [job, other])[0]
    assert [p[3] for p in sink.passes] == [8, 8, 4]  # the lone job shares the first pass
    assert len(result.embeddings) == 19 and result.batch_size == 8
    alone = make_engine(batch_window_s=0.0)
    singles = drive(alone, [alone.submit_embed(specs["embed"], t)
                            for i, t in enumerate(texts)])
    assert result.prompt_tokens == sum(s.prompt_tokens for s in singles)
    for got, single in zip(result.embeddings, singles):
        assert np.allclose(got, single.embeddings[0], atol=1e-5)


def test_a_list_job_is_checked_whole_before_any_input_runs(make_engine, sink, specs):
    engine = make_engine(max_prompt_tokens=8)
    with pytest.raises(PromptTooLong, match="input 1 is"):
        engine.submit_embed(specs["embed"], ["short", "word " * 50])
    for bad in ([], ["ok", 3], None):
        with pytest.raises(InvalidRequest):
            engine.submit_embed(specs["embed"], bad)
    assert engine.step() is False and sink.passes == []


def test_a_failed_pass_fails_the_whole_list_job(make_engine, specs, cache, monkeypatch):
    engine = make_engine(max_batch_size=2, batch_window_s=0.0)
    runner = cache.get(specs["embed"])
    real_run, calls = runner.run, []

    def second_fails(feeds, handle=None):
        calls.append(1)
        if len(calls) == 2:
            raise InferenceError("boom")
        return real_run(feeds, handle)

    monkeypatch.setattr(runner, "run", second_fails)
    job = engine.submit_embed(specs["embed"], ["a", "b", "c", "d", "e"])
    for _ in range(3):
        engine.step()
    with pytest.raises(InferenceError, match="boom"):
        job.result(timeout=0)
    assert len(calls) == 3  # the remaining inputs still ran; the job's first error stands


def test_an_embed_job_cancelled_or_past_its_deadline_runs_no_more_inputs(make_engine, sink,
                                                                          specs):
    """A list job stops at the next step: inputs that have not run never do, its future
    says why and holds no vectors (a result comes whole), and the other jobs go on."""
    clock = FakeClock()
    engine = make_engine(clock=clock, max_batch_size=2, batch_window_s=0.0)
    texts = [f"input {i}" for i in range(10)]
    cancelled = engine.submit_embed(specs["embed"], texts, job_id="c")
    expiring = engine.submit_embed(specs["embed"], texts, job_id="e", deadline=clock.now + 5)
    other = engine.submit_embed(specs["embed"], texts[:4], job_id="o")
    assert engine.submit_embed(specs["embed"], texts, job_id="c") is cancelled  # redelivered
    engine.step()  # one pass of two rows: c and e take turns
    assert engine.cancel("c") and not engine.cancel("nobody")
    clock.now += 5
    other_result = drive(engine, [other])[0]
    assert len(other_result.embeddings) == 4
    stopped = cancelled.result(timeout=0), expiring.result(timeout=0)
    assert [(r.finish_reason, r.embeddings) for r in stopped] == [("cancelled", []),
                                                                   ("expired", [])]
    assert sum(p[3] for p in sink.passes) == 1 + 1 + 4  # one input each, then o's four
    assert not engine.cancel("c") and engine.step() is False


def test_a_small_embed_job_does_not_wait_behind_a_large_one(make_engine, sink, specs):
    """Jobs of one lane take turns row by row: one input sent after a job of many goes into
    the next pass, not after all of them."""
    engine = make_engine(max_batch_size=4, batch_window_s=0.0)
    large = engine.submit_embed(specs["embed"], [f"large {i}" for i in range(40)])
    engine.step()
    small = engine.submit_embed(specs["embed"], "small")
    engine.step()
    assert small.done() and not large.done()
    alone = make_engine(batch_window_s=0.0)
    single = drive(alone, [alone.submit_embed(specs["embed"], "small")])[0]
    assert np.allclose(small.result().embeddings[0], single.embeddings[0], atol=1e-5)
    result = drive(engine, [large])[0]
    assert len(result.embeddings) == 40 and sum(p[3] for p in sink.passes) == 41 + 1


def test_embed_without_batching_runs_one_per_pass(make_engine, sink, specs):
    engine = make_engine(enable_batching=False)
    futures = [engine.submit_embed(specs["embed"], "text") for i in range(4)]
    results = drive(engine, futures)
    assert [r.batch_size for r in results] == [1, 1, 1, 1]
    assert [p[3] for p in sink.passes] == [1, 1, 1, 1]


def test_interactive_embeds_go_ahead_of_waiting_bulk_ones(make_engine, sink, specs):
    engine = make_engine(max_batch_size=2, batch_window_s=0.0)
    bulk = [engine.submit_embed(specs["embed"], "bulk", lane="bulk") for i in range(4)]
    urgent = [engine.submit_embed(specs["embed"], "urgent") for i in range(2)]
    engine.step()
    assert all(f.done() for f in urgent) and not any(f.done() for f in bulk)
    drive(engine, bulk)
    with pytest.raises(InvalidRequest):
        engine.submit_embed(specs["embed"], "text", lane="fast")


def test_bulk_embed_passes_stay_within_the_bulk_budget(make_engine, sink, specs):
    engine = make_engine(max_batch_size=4, batch_window_s=0.0, bulk_pass_s=1e-9)
    bulk = [engine.submit_embed(specs["embed"], "bulk", lane="bulk") for i in range(6)]
    engine.step()  # no cost per input measured yet: a full batch
    urgent = [engine.submit_embed(specs["embed"], "urgent") for i in range(3)]
    engine.step()  # every interactive input in one pass, no bulk one beside them
    assert all(f.done() for f in urgent) and sum(f.done() for f in bulk) == 4
    drive(engine, bulk)
    assert [p[3] for p in sink.passes] == [4, 3, 1, 1]
    roomy = make_engine(max_batch_size=4, batch_window_s=0.0, bulk_pass_s=60.0)
    more = [roomy.submit_embed(specs["embed"], "bulk", lane="bulk") for i in range(8)]
    drive(roomy, more)
    assert [p[3] for p in sink.passes[4:]] == [4, 4]


def test_bulk_inputs_ride_with_interactive_ones_only_within_their_share(make_engine, sink,
                                                                        specs):
    """A pass with an interactive input takes bulk inputs beside it only while they add at most
    ``bulk_ride_share`` of the bulk budget; bulk-only passes still fill to the budget."""
    passes = {}
    for share in (0.0, 1.0):
        engine = make_engine(max_batch_size=4, batch_window_s=0.0, bulk_pass_s=60.0,
                             bulk_ride_share=share)
        drive(engine, [engine.submit_embed(specs["embed"], "cost per input measured")])
        sink.passes.clear()
        bulk = [engine.submit_embed(specs["embed"], "bulk", lane="bulk") for i in range(6)]
        urgent = engine.submit_embed(specs["embed"], "urgent")
        engine.step()
        assert urgent.done()
        drive(engine, bulk)
        passes[share] = [p[3] for p in sink.passes]
    assert passes == {0.0: [1, 4, 2], 1.0: [4, 3]}


def test_bulk_embeds_run_after_the_steps_interactive_work(make_engine, sink, specs):
    engine = make_engine(batch_window_s=0.0, bulk_pass_s=1e-9)
    drive(engine, [engine.submit_embed(specs["embed"], "cost per input measured")])
    sink.passes.clear()
    bulk = engine.submit_embed(specs["embed"], "bulk", lane="bulk")
    gen = engine.submit_generate("g", specs["gpt"], "hi", SamplingParams(max_tokens=1))
    urgent = engine.submit_embed(specs["embed"], "urgent")
    engine.step()  # the interactive embed alone, first; then the generate pass
    assert urgent.done() and gen.done() and not bulk.done()
    later = engine.submit_generate("g2", specs["gpt"], "hi", SamplingParams(max_tokens=1))
    engine.step()  # a bulk-only embed pass comes after the step's generate pass
    assert bulk.done() and later.done()
    assert [(p[0], p[3]) for p in sink.passes] == [("embed", 1), ("generate", 1),
                                                   ("generate", 1), ("embed", 1)]


def test_an_interactive_job_stops_the_bulk_pass_in_progress(make_engine, sink, specs, cache,
                                                            monkeypatch):
    """The bulk-only pass is stopped through ORT's terminate flag (here raised before it
    starts: the interactive job arrives "during" it); its jobs go back to the head of the bulk
    lane. Once bulk passes have been stopped for MAX_BULK_STALL_S with none finishing, the next
    runs to the end: bulk work cannot starve even when an interactive job arrives during every
    bulk pass."""
    clock = FakeClock()
    engine = make_engine(clock=clock, batch_window_s=0.0, bulk_pass_s=1e-9)
    alone = drive(engine, [engine.submit_embed(specs["embed"], "bulk 0")])[0]
    runner = cache.get(specs["embed"])
    real_run, handles, urgent, arrivals = runner.run, [], [], [True]

    def run(feeds, handle=None):
        handles.append(handle is not None)
        if handle is not None and arrivals[0]:
            urgent.append(engine.submit_embed(specs["embed"], "urgent"))
        return real_run(feeds, handle)

    monkeypatch.setattr(runner, "run", run)
    sink.passes.clear()
    bulk = [engine.submit_embed(specs["embed"], f"bulk {i}", lane="bulk")
            for i in range(2)]
    engine.step()  # b0's pass is stopped: nothing finished, nothing recorded
    assert not any(f.done() for f in bulk) and sink.passes == [] and len(urgent) == 1
    engine.step()  # the interactive job first
    assert urgent[0].done() and not bulk[0].done()
    for _ in range(2):  # stopped again while the stall is young; each time the new job first
        clock.now += MAX_BULK_STALL_S / 3
        engine.step()
        engine.step()
    assert not bulk[0].done() and len(urgent) == 3 and all(f.done() for f in urgent)
    clock.now += MAX_BULK_STALL_S / 3
    engine.step()  # stalled long enough: this pass runs to the end
    assert bulk[0].done() and len(urgent) == 3
    arrivals[0] = False
    drive(engine, bulk)  # the stall is over: b1's pass may be stopped again
    assert handles == [True, False] * 3 + [False, True]
    assert len(sink.passes) == len(urgent) + 2  # the stopped passes are not counted
    assert np.allclose(bulk[0].result().embeddings, alone.embeddings, atol=1e-6)


@pytest.mark.parametrize("stops", [24, 1100])
def test_stopped_bulk_passes_shrink_and_finished_ones_grow_back(make_engine, sink, specs, cache,
                                                               monkeypatch, stops):
    """Each stopped bulk pass halves the bulk budget, so bulk passes come to fit between
    interactive arrivals instead of being stopped and redone whole; each bulk pass that runs to
    the end doubles it again, up to ``bulk_pass_s``. Halving stops at a floor: after 1100 stops
    (past where a float halved from 1 s reaches 0) the budget still grows back."""
    engine = make_engine(clock=FakeClock(), max_batch_size=8, batch_window_s=0.0,
                         bulk_pass_s=1.0, bulk_ride_share=0.0)
    drive(engine, [engine.submit_embed(specs["embed"], "cost per input measured")])
    runner = cache.get(specs["embed"])
    real_run, bulk_rows, arrivals = runner.run, [], [True]

    def run(feeds, handle=None):
        if handle is not None:
            bulk_rows.append(len(feeds["input_ids"]))
            if arrivals[0]:
                engine.submit_embed(specs["embed"], "urgent")
        return real_run(feeds, handle)

    monkeypatch.setattr(runner, "run", run)
    bulk = [engine.submit_embed(specs["embed"], f"bulk {i}", lane="bulk") for i in range(80)]
    for _ in range(3 * stops):
        if len(bulk_rows) == stops:  # that many bulk passes stopped in a row
            break
        engine.step()
    assert bulk_rows[0] == 8 and bulk_rows[-1] == 1 and not any(f.done() for f in bulk)
    arrivals[0] = False
    stopped = len(bulk_rows)
    drive(engine, bulk)
    grown = bulk_rows[stopped:]
    assert grown[0] == 1 and max(grown) == 8  # from one input back to full passes
    assert sum(grown) == 80


def test_a_lone_embed_waits_for_the_window_only_when_company_is_likely(make_engine, sink, specs):
    clock = FakeClock()
    engine = make_engine(clock=clock, batch_window_s=0.01)
    first = engine.submit_embed(specs["embed"], "text")  # at idle: runs at once
    assert engine.step() is True and first.result().batch_size == 1
    clock.now += 0.004
    second = engine.submit_embed(specs["embed"], "text")  # 4 ms after e0: waits
    assert engine.step() is False and not second.done()
    clock.now += 0.006
    third = engine.submit_embed(specs["embed"], "text")  # joins e1's batch
    assert engine.step() is False and not second.done()
    clock.now += 0.004
    assert engine.step() is True and second.result().batch_size == 2 and third.done()
    clock.now += 0.05
    fourth = engine.submit_embed(specs["embed"], "text")  # a quiet spell: at once
    assert engine.step() is True and fourth.done()


# -- generate --------------------------------------------------------------------------------

def test_greedy_generate_writes_demo_text(make_engine, sink, specs, cache):
    engine = make_engine()
    future = engine.submit_generate("g", specs["gpt"], "hello there", SamplingParams(max_tokens=7))
    assert engine.submit_generate("g", specs["gpt"], "other", SamplingParams()) is future
    assert engine.running_jobs() == []
    engine.step()
    assert engine.running_jobs() == ["g"]
    result = drive(engine, [future])[0]
    assert result.text == demo_words(7) and result.finish_reason == "length"
    assert result.completion_tokens == len(result.token_ids) == 7
    assert result.prompt_tokens == len(cache.get(specs["gpt"]).tokenizer.encode("hello there").ids)
    events = sink.streamed("g")
    assert [e.seq for e in events] == list(range(7)) and len(sink.published) == 7
    assert "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events] == result.token_ids
    assert engine.running_jobs() == [] and sink.passes[0] == ("generate", "demo-gpt", 1, 1)


def test_empty_prompt_starts_from_bos(make_engine, specs):
    result = generate_alone(make_engine, specs["gpt"], "", SamplingParams(max_tokens=3))
    assert result.prompt_tokens == 1 and result.text == demo_words(3)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12),
    SamplingParams(max_tokens=12, temperature=0.8, seed=1234),
    SamplingParams(max_tokens=12, temperature=2.0, top_p=0.9, seed=99),  # far from greedy
    SamplingParams(max_tokens=12, frequency_penalty=1.5, presence_penalty=0.5,
                   logit_bias=((7, 4.0), (670, -12.0))),
    SamplingParams(max_tokens=12, temperature=0.9, seed=11, logprobs=3),
])
def test_joining_mid_flight_gives_the_same_tokens_as_alone(make_engine, sink, specs, params):
    alone = [generate_alone(make_engine, specs["gpt"], p, replace(params, max_tokens=9 + i))
             for i, p in enumerate(PROMPTS)]
    sink.passes.clear()
    sink.published.clear()
    engine = make_engine()
    futures = []
    for i, prompt in enumerate(PROMPTS):
        futures.append(engine.submit_generate(f"j{i}", specs["gpt"], prompt,
                                              replace(params, max_tokens=9 + i)))
        engine.step()
    crowd = drive(engine, futures)
    for a, c in zip(alone, crowd):
        assert c.token_ids == a.token_ids and c.text == a.text and c.finish_reason == "length"
        assert (c.logprobs is None) == (a.logprobs is None) == (params.logprobs is None)
        for x, y in zip(c.logprobs or [], a.logprobs or [], strict=True):
            assert x["token_id"] == y["token_id"] and x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
            assert [t["token_id"] for t in x["top_logprobs"]] == [t["token_id"] for t in y["top_logprobs"]]
    assert max(c.batch_size for c in crowd) == len(PROMPTS)
    # every step published all its tokens at once: one decode pass over every running row
    # (plus, at a step where a job joined, its prefill pass); none after the last join
    passes = [p[3] for p in sink.passes if p[0] == "generate"]
    assert passes[:2 * len(PROMPTS) - 1] == [1] + [n for i in range(1, len(PROMPTS))
                                                    for n in (i, 1)]
    assert [len(step) for step in sink.published] == [1, 2, 3, 4, 5] + passes[2 * len(PROMPTS) - 1:]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, seed=7)])
def test_finished_rows_stay_until_a_join_or_a_quarter_of_the_batch(make_concat_engine, specs,
                                                                     concat_cache, params):
    """A finished sequence's row rides along (no copy of the cache) until sequences join (one
    re-pack for both) or dead rows are a quarter of the batch; nobody's tokens change."""
    make_engine = make_concat_engine
    lengths = [2, 3, 12, 12, 12, 12, 12, 12]
    alone = [generate_alone(make_engine, specs["gpt"], p, replace(params, max_tokens=n))
             for p, n in zip(PROMPTS * 2, lengths)]
    engine = make_engine()
    runner = concat_cache.get(specs["gpt"])
    futures = [engine.submit_generate(f"d{i}", specs["gpt"], p, replace(params, max_tokens=n))
               for i, (p, n) in enumerate(zip(PROMPTS * 2, lengths))]
    engine.step()  # prefill: 8 rows
    engine.step()  # d0 finishes: 1 dead row of 8 stays
    batch = engine._batches[runner]
    assert len(batch.seqs) == 8 and futures[0].done() and len(batch.live()) == 7
    engine.step()  # d1 finishes too: 2 of 8 dead, a quarter: re-packed
    assert len(engine._batches[runner].seqs) == 6
    engine.step()
    engine.step()
    late = engine.submit_generate("late", specs["gpt"], "hi", replace(params, max_tokens=3))
    engine.step()  # the late prompt joins: one re-pack
    assert len(engine._batches[runner].seqs) == 7
    crowd = drive(engine, futures + [late])
    for a, c in zip(alone, crowd):
        assert c.token_ids == a.token_ids
    assert crowd[-1].token_ids == generate_alone(make_engine, specs["gpt"], "hi",
                                                 replace(params, max_tokens=3)).token_ids


def test_a_dead_row_never_widens_the_cache_past_the_positions(make_concat_engine, specs,
                                                              concat_cache, monkeypatch):
    make_engine = make_concat_engine
    runner = concat_cache.get(specs["gpt"])
    long_prompt = PROMPTS[2]
    p = len(runner.tokenizer.encode(long_prompt).ids)
    monkeypatch.setattr(runner, "max_positions", p + 6)
    engine = make_engine()
    futures = [engine.submit_generate("x", specs["gpt"], long_prompt, SamplingParams(max_tokens=6))]
    futures += [engine.submit_generate(f"y{i}", specs["gpt"], "hi", SamplingParams(max_tokens=9))
                for i in range(4)]
    for _ in range(6):
        engine.step()
    assert futures[0].done()  # x used every position; its row goes at once (1 dead of 5)
    assert len(engine._batches[runner].seqs) == 4
    assert engine._batches[runner].mask.shape[1] < runner.max_positions
    assert all(r.text == demo_words(9) for r in drive(engine, futures[1:]))


@pytest.mark.parametrize("stop, expected", [((" every",), demo_words(2)),
                                            (("streams ev", "zzz"), demo_words(1) + " ")])
def test_stop_string_ends_early_and_is_never_streamed(make_engine, sink, specs, stop, expected):
    engine = make_engine()
    params = SamplingParams(max_tokens=20, stop=stop)
    future = engine.submit_generate("s", specs["gpt"], "x", params)
    result = drive(engine, [future])[0]
    assert result.finish_reason == "stop" and result.text == expected
    assert result.completion_tokens == 3
    assert "".join(e.text for e in sink.streamed("s")) == expected


def test_cancel_mid_generation(make_engine, specs):
    engine = make_engine()
    params = SamplingParams(max_tokens=10)
    futures = [engine.submit_generate(f"c{i}", specs["gpt"], p, params)
               for i, p in enumerate(PROMPTS[:3])]
    for _ in range(3):
        engine.step()
    assert engine.cancel("c1") and not engine.cancel("nope")
    engine.step()
    cancelled = futures[1].result()
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 3
    assert cancelled.text == demo_words(3)
    assert sorted(engine.running_jobs()) == ["c0", "c2"]
    assert [r.finish_reason for r in drive(engine, [futures[0], futures[2]])] == ["length"] * 2
    assert not engine.cancel("c0")


def test_cancelled_waiting_job_never_starts(make_engine, sink, specs):
    engine = make_engine()
    future = engine.submit_generate("w", specs["gpt"], "hi", SamplingParams())
    assert engine.cancel("w")
    engine.step()
    result = future.result()
    assert result.finish_reason == "cancelled" and result.token_ids == [] and sink.passes == []


def test_deadline_expires(make_engine, specs):
    clock = FakeClock()
    engine = make_engine(clock=clock)
    future = engine.submit_generate("d", specs["gpt"], "hi", SamplingParams(max_tokens=50),
                                    deadline=clock.now + 1.0)
    engine.step()
    engine.step()
    clock.now += 1.0
    engine.step()
    result = future.result()
    assert result.finish_reason == "expired" and result.completion_tokens == 2


def test_interactive_is_admitted_before_bulk(make_engine, sink, specs):
    engine = make_engine(max_running=1)
    params = SamplingParams(max_tokens=3)
    bulk = engine.submit_generate("bulk", specs["gpt"], "hi", params, lane="bulk")
    fast = engine.submit_generate("fast", specs["gpt"], "hi", params, lane="interactive")
    engine.step()
    assert engine.running_jobs() == ["fast"]
    drive(engine, [bulk, fast])
    order = [e.job_id for step in sink.published for e in step]
    assert order == ["fast"] * 3 + ["bulk"] * 3


def test_bulk_generations_beside_interactive_ones_are_few(make_engine, specs):
    """While an interactive generation runs (and for INTERACTIVE_HOLD_S after), at most
    bulk_max_running bulk ones start; once it has been quiet that long, they fill the batch.
    The bulk rows already running are not stopped."""
    clock = FakeClock()
    engine = make_engine(clock=clock, max_running=16, bulk_max_running=2)
    running = lambda: set(engine.running_jobs())  # noqa: E731
    early = [engine.submit_generate(f"early{i}", specs["gpt"], "hi",
                                    SamplingParams(max_tokens=40), lane="bulk") for i in range(3)]
    engine.step()
    assert running() == {"early0", "early1", "early2"}  # nothing interactive about: all start
    live = engine.submit_generate("live", specs["gpt"], "hi", SamplingParams(max_tokens=4))
    late = [engine.submit_generate(f"late{i}", specs["gpt"], "hi",
                                   SamplingParams(max_tokens=4), lane="bulk") for i in range(6)]
    for _ in range(6):  # the early three hold the bulk share: no late one starts
        engine.step()
        assert not running() & {f"late{i}" for i in range(6)}
    assert live.result(timeout=10).finish_reason == "length"
    clock.now += engine_module.INTERACTIVE_HOLD_S / 2  # quiet, but not for long enough
    engine.step()
    assert not running() & {f"late{i}" for i in range(6)}
    clock.now += engine_module.INTERACTIVE_HOLD_S
    engine.step()
    assert {f"late{i}" for i in range(6)} <= running()
    drive(engine, early + late)


def test_a_prompt_joins_beside_a_long_run_whatever_the_position_limit(
        make_engine, sink, specs, cache, monkeypatch):
    """Prefill runs apart from decode and the cache is left-padded per row, so a joining prompt
    never pads the running rows: it joins even where padding them together would pass the
    model's positions."""
    runner = cache.get(specs["gpt"])
    first, second = "hi", PROMPTS[2]
    a, b = (len(runner.tokenizer.encode(p).ids) for p in (first, second))
    monkeypatch.setattr(runner, "max_positions", a + 30)
    engine = make_engine()
    long_run = engine.submit_generate("long", specs["gpt"], first, SamplingParams(max_tokens=30))
    for _ in range(21):
        engine.step()
    assert a + 20 + b > runner.max_positions >= b + 2  # fits alone, not padded beside "long"
    late = engine.submit_generate("late", specs["gpt"], second, SamplingParams(max_tokens=2))
    engine.step()
    assert sorted(engine.running_jobs()) == ["late", "long"]
    assert sink.passes[-2:] == [("generate", "demo-gpt", 1, 1)] * 2  # decode "long", prefill "late"
    long_result, late_result = drive(engine, [long_run, late])
    assert late_result.text == demo_words(2) and long_result.text == demo_words(30)


# the bias moves the demo model off its text at the fourth token (its margin is about 10),
# after which the penalties change what it picks when it comes round again
ADJUSTED = SamplingParams(max_tokens=24, frequency_penalty=1.5, presence_penalty=0.5,
                          logit_bias=((7, 4.0), (670, -12.0)))


def test_penalties_and_logit_bias_pick_what_a_plain_loop_picks(make_engine, specs, concat_cache):
    """OpenAI's formula, applied by hand in a loop over the model's own graph: bias added,
    each generated token's logit lowered by count * frequency + presence (the prompt's tokens
    are not counted)."""
    runner = concat_cache.get(specs["gpt"])
    prompt = runner.tokenizer.encode("tell me a story").ids
    logits, pasts, mask = prefill(runner, [prompt])
    counts, tokens = {}, []
    for _ in range(ADJUSTED.max_tokens):
        scores = logits[0].astype(np.float64)
        for token, bias in ADJUSTED.logit_bias:
            scores[token] += bias
        for token, times in counts.items():
            scores[token] -= times * ADJUSTED.frequency_penalty + ADJUSTED.presence_penalty
        token = int(np.argmax(scores))
        tokens.append(token)
        counts[token] = counts.get(token, 0) + 1
        logits, pasts, mask = decode(runner, pasts, mask, [token], [len(prompt) + len(tokens) - 1])
    adjusted = generate_alone(make_engine, specs["gpt"], "tell me a story", ADJUSTED)
    plain = generate_alone(make_engine, specs["gpt"], "tell me a story",
                           SamplingParams(max_tokens=ADJUSTED.max_tokens))
    bias_only = generate_alone(make_engine, specs["gpt"], "tell me a story",
                               replace(ADJUSTED, frequency_penalty=0.0, presence_penalty=0.0))
    assert adjusted.token_ids == tokens
    # each adjustment changed what was picked
    assert len({tuple(tokens), tuple(plain.token_ids), tuple(bias_only.token_ids)}) == 3


@pytest.mark.parametrize("top", [0, 4])
def test_logprobs_are_the_models_own_distribution(make_engine, sink, specs, concat_cache, top):
    """Each generated token's log probability and its ``top`` alternatives, from the raw
    logits (before bias, penalties and temperature), in the result and on its token event."""
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=5, logprobs=top,
                            logit_bias=((670, -12.0),), frequency_penalty=1.0)
    result = generate_alone(make_engine, specs["gpt"], "tell me a story", params)
    runner = concat_cache.get(specs["gpt"])
    prompt = runner.tokenizer.encode("tell me a story").ids
    logits, pasts, mask = prefill(runner, [prompt])
    assert len(result.logprobs) == len(result.token_ids) == 8
    for step, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        row = logits[0].astype(np.float64)
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert entry["token_id"] == token
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == \
            runner.tokenizer.decode([token], skip_special_tokens=False)
        assert entry["logprob"] == pytest.approx(logp[token], abs=1e-4)
        best = [t["token_id"] for t in entry["top_logprobs"]]
        assert best == [int(i) for i in np.argsort(-logp, kind="stable")[:top]]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            [logp[i] for i in best], abs=1e-4)
        logits, pasts, mask = decode(runner, pasts, mask, [token], [len(prompt) + step])
    assert [e.logprobs for e in sink.streamed("alone")] == result.logprobs
    assert generate_alone(make_engine, specs["gpt"], "hi", SamplingParams()).logprobs is None


def test_a_character_split_over_tokens_has_each_tokens_own_bytes(make_engine, specs):
    """"\u00e9" made of two byte-level tokens (0xC3, then 0xA9): each entry carries its own
    byte, spelled as OpenAI spells bytes that are not a whole character, and the bytes joined
    are the text."""
    params = SamplingParams(max_tokens=2, logprobs=1, logit_bias=((128, 100.0), (103, 99.0)),
                            frequency_penalty=2.0, presence_penalty=2.0)
    result = generate_alone(make_engine, specs["gpt"], "hi", params)
    assert result.token_ids == [128, 103] and result.text == "\u00e9"
    assert [e["bytes"] for e in result.logprobs] == [[0xC3], [0xA9]]
    assert [e["token"] for e in result.logprobs] == ["bytes:\\xc3", "bytes:\\xa9"]
    assert b"".join(bytes(e["bytes"]) for e in result.logprobs).decode() == result.text


def test_token_text_maps_pieces_to_their_bytes(cache, specs, tmp_path):
    from tokenizers import Tokenizer, models

    text = cache.get(specs["gpt"]).token_text  # byte-level BPE
    assert text.bytes(0) == b"<|endoftext|>" and text.text(b"<|endoftext|>") == "<|endoftext|>"
    assert text.bytes(128) == b"\xc3" and text.text(b"\xc3\xa9") == "\u00e9"
    fallback = Tokenizer(models.WordLevel({"<0xE2>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other = TokenText(fallback)  # no byte-level decoder: byte-fallback pieces, else decoded
    assert other.bytes(0) == b"\xe2" and other.text(b"\xe2") == "bytes:\\xe2"
    assert other.bytes(1) == b"hi"


def test_a_large_logit_bias_picks_its_token_every_time(make_engine, specs):
    result = generate_alone(make_engine, specs["gpt"], "hi",
                            SamplingParams(max_tokens=6, temperature=0.7, seed=3,
                                           logit_bias=((123, 100.0),)))
    assert result.token_ids == [123] * 6
    banned = generate_alone(make_engine, specs["gpt"], "hi",
                            SamplingParams(max_tokens=6, logit_bias=((123, -100.0),)))
    assert 123 not in banned.token_ids


def test_a_logit_bias_outside_the_vocabulary_is_refused_at_submit(make_engine, specs, cache):
    vocab = cache.get(specs["gpt"]).vocab_size
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=f"token id {vocab} is not in the vocabulary"):
        engine.submit_generate("v", specs["gpt"], "hi",
                               SamplingParams(logit_bias=((1, 1.0), (vocab, 1.0))))
    assert engine.running_jobs() == [] and not engine.step()


def test_prompt_too_long(make_engine, specs):
    engine = make_engine(max_prompt_tokens=8)
    with pytest.raises(PromptTooLong):
        engine.submit_generate("p", specs["gpt"], "word " * 50, SamplingParams())
    with pytest.raises(PromptTooLong):
        engine.submit_embed(specs["embed"], "word " * 50)
    with pytest.raises(PromptTooLong):
        engine.submit_generate("p", specs["gpt"], "hi", SamplingParams(max_tokens=1024))


def test_ort_failure_fails_the_pass_and_the_engine_keeps_serving(make_engine, specs, cache,
                                                                 monkeypatch):
    engine = make_engine()
    runner = cache.get(specs["gpt"])

    class BrokenSession:  # what ONNX Runtime does when a pass fails: raise its own error
        def __getattr__(self, name):
            raise RuntimeError("boom")

    monkeypatch.setattr(runner, "session", BrokenSession())
    failed = [engine.submit_generate(f"f{i}", specs["gpt"], "hi", SamplingParams())
              for i in range(2)]
    engine.step()
    for future in failed:
        with pytest.raises(InferenceError):
            future.result()
    monkeypatch.undo()
    ok = engine.submit_generate("ok", specs["gpt"], "hi", SamplingParams(max_tokens=2))
    assert drive(engine, [ok])[0].text == demo_words(2)


def test_run_loop_serves_from_a_thread(make_engine, specs):
    engine = make_engine()
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    try:
        gen = engine.submit_generate("t", specs["gpt"], "hi", SamplingParams(max_tokens=4))
        emb = engine.submit_embed(specs["embed"], "hi")
        assert gen.result(timeout=10).text == demo_words(4)
        assert len(emb.result(timeout=10).embeddings[0]) == 128
    finally:
        stop.set()
        loop.join(timeout=5)
    assert not loop.is_alive()


def test_a_cache_bound_on_the_device_gives_the_same_tokens(concat_cache, specs):
    """``bind_kv``: the path a CUDA worker takes (I/O binding keeps the cache where ORT computed
    it), here on the CPU device. The cache is an OrtValue between passes and stays one when
    sequences join and leave (re-packed on the device, ``KVPacker``), holds the same values at
    every step as the numpy cache, and every job samples the same tokens."""
    import onnxruntime as ort

    bound = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=True)
    assert bound.get(specs["gpt"]).kv_device == "cpu" and bound.get(specs["embed"]).kv_device is None
    cache = concat_cache
    assert cache.get(specs["gpt"]).kv_device is None  # the CPU provider's default: numpy

    def crowd(runners: RunnerCache):
        engine = Engine(runners, RecordingSink(), EngineSettings())
        sampled = SamplingParams(temperature=0.9, seed=7)
        futures, kinds, snapshots = [], [], []
        for i, prompt in enumerate(PROMPTS * 2):  # one joins at every step, mixed lengths
            futures.append(engine.submit_generate(f"k{i}", specs["gpt"], prompt,
                                                  replace(sampled, max_tokens=3 + 2 * i)))
            engine.step()
            for batch in engine._batches.values():
                kinds.append(type(batch.pasts[0]))
                snapshots.append([a.copy() for a in to_host(batch.pasts)])
        return [r.token_ids for r in drive(engine, futures)], kinds, snapshots

    bound_tokens, bound_kinds, bound_caches = crowd(bound)
    host_tokens, host_kinds, host_caches = crowd(cache)
    assert bound_tokens == host_tokens
    assert set(host_kinds) == {np.ndarray}
    assert set(bound_kinds) == {ort.OrtValue}  # never back on the host, re-packs included
    assert len(bound_caches) == len(host_caches) == len(PROMPTS) * 2
    for got, want in zip(bound_caches, host_caches):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.allclose(g, w, atol=1e-5)


class SlowSink(RecordingSink):
    """Publishes from whatever thread calls it, slowly, noting which jobs had already resolved
    (they must not have: a job resolves only after its tokens are out)."""

    def __init__(self, futures, delay_s=0.002, fail_first=False):
        super().__init__()
        self.futures, self.delay_s, self.fail_first = futures, delay_s, fail_first
        self.threads, self.resolved_early = set(), []

    def publish_tokens(self, events):
        self.threads.add(threading.current_thread().name)
        self.resolved_early += [e.job_id for e in events if self.futures[e.job_id].done()]
        time.sleep(self.delay_s)
        if self.fail_first:
            self.fail_first = False
            raise ConnectionError("redis went away")
        super().publish_tokens(events)


def test_published_ahead_the_same_tokens_in_order_and_jobs_resolve_after_their_last(specs):
    """``publish_ahead``: a publisher thread sends each step's tokens while the engine runs on;
    every job gets the tokens it gets with in-step publishing, in order, and resolves only
    after its last token went out."""
    def crowd(ahead):
        futures = {}
        sink = SlowSink(futures)
        engine = Engine(RunnerCache(select_providers(use_gpu=False), intra_op_threads=1), sink,
                        EngineSettings(publish_ahead=ahead))
        for i, prompt in enumerate(PROMPTS * 2):
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=4 + 3 * i)
            futures[f"p{i}"] = engine.submit_generate(f"p{i}", specs["gpt"], prompt, params)
            engine.step()
        results = drive(engine, list(futures.values()))
        return results, sink

    ahead_results, ahead_sink = crowd(2)
    inline_results, inline_sink = crowd(0)
    assert [r.token_ids for r in ahead_results] == [r.token_ids for r in inline_results]
    assert ahead_sink.threads == {"engine-publisher"} and "engine-publisher" not in inline_sink.threads
    assert ahead_sink.resolved_early == [] == inline_sink.resolved_early
    for i, result in enumerate(ahead_results):
        streamed = ahead_sink.streamed(f"p{i}")
        assert [e.seq for e in streamed] == list(range(len(result.token_ids)))
        assert [e.token_id for e in streamed] == result.token_ids


def test_the_engine_runs_at_most_publish_ahead_steps_ahead_of_its_publisher(specs):
    release = threading.Event()
    published = []

    class BlockedSink(RecordingSink):
        def publish_tokens(self, events):
            release.wait()
            published.append(len(events))

    engine = Engine(RunnerCache(select_providers(use_gpu=False), intra_op_threads=1),
                    BlockedSink(), EngineSettings(publish_ahead=2))
    future = engine.submit_generate("b", specs["gpt"], "hi", SamplingParams(max_tokens=20))
    steps = []
    stepper = threading.Thread(target=lambda: [steps.append(engine.step()) for _ in range(6)],
                               daemon=True)
    stepper.start()
    deadline = time.monotonic() + 10
    while len(steps) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stepper.join(timeout=0.3)
    # the first step's tokens blocked in the sink, two steps' waiting behind them: the third
    # step returned, the fourth waits for room
    assert len(steps) == 3 and stepper.is_alive() and not future.done()
    release.set()
    stepper.join(timeout=10)
    assert len(steps) == 6
    assert drive(engine, [future])[0].completion_tokens == 20 and sum(published) == 20


def test_a_failed_publish_still_resolves_the_jobs_and_the_next_steps_go_out(specs, caplog):
    futures = {}
    sink = SlowSink(futures, fail_first=True)
    engine = Engine(RunnerCache(select_providers(use_gpu=False), intra_op_threads=1), sink,
                    EngineSettings(publish_ahead=1))
    futures["f"] = engine.submit_generate("f", specs["gpt"], "hi", SamplingParams(max_tokens=5))
    result = drive(engine, [futures["f"]])[0]
    assert result.completion_tokens == 5
    assert [e.seq for e in sink.streamed("f")] == [1, 2, 3, 4]  # the first step's token was lost
    assert "engine publish failed" in caplog.text


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("as_ortvalues", [False, True])
def test_kv_packer_cuts_the_same_rows_as_the_host_pack(dtype, as_ortvalues):
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    first = [rng.standard_normal((3, 2, 5, 4)).astype(dtype) for _ in range(4)]
    first_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    second = [rng.standard_normal((2, 2, 3, 4)).astype(dtype) for _ in range(4)]
    second_mask = np.array([[1, 1, 1], [0, 1, 1]])
    packer = KVPacker(4, dtype, ["CPUExecutionProvider"], "cpu")
    wrap = ort.OrtValue.ortvalue_from_numpy if as_ortvalues else (lambda a: a)
    cases = ([(first, first_mask, [0, 2]), (second, second_mask, [1])],
             [(first, first_mask, [2, 1, 0])],
             [(first, first_mask, []), (second, second_mask, [1, 0])],
             [(first, first_mask, [])],
             [(first, np.array([[1, 0, 0, 1, 1], [1, 1, 0, 1, 1], [0, 0, 1, 0, 1]]), [2, 0, 1]),
              (second, second_mask, [0])])  # masked columns inside rows (a merged pass's pads)
    for parts in cases:
        for blank in (0, 2):  # blank rows: what a merged pass's joining prompts start from
            if blank == 0 and not any(rows for _, _, rows in parts):
                continue  # nothing to pack (the engine never asks)
            want, want_mask = pack_rows(parts, blank)
            got, got_mask = packer.pack([([wrap(a) for a in pasts], mask, rows)
                                         for pasts, mask, rows in parts], blank)
            np.testing.assert_array_equal(got_mask, want_mask)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert isinstance(g, ort.OrtValue)
                np.testing.assert_array_equal(g.numpy(), w)


def test_a_device_that_cannot_pack_falls_back_to_the_host(specs, monkeypatch, caplog):
    bound = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=True)
    runner = bound.get(specs["gpt"])

    def refuse(*args, **kwargs):
        raise RuntimeError("no device memory")

    monkeypatch.setattr(runner._packer, "pack", refuse)
    engine = Engine(bound, RecordingSink(), EngineSettings())
    params = SamplingParams(max_tokens=6)
    futures = [engine.submit_generate(f"p{i}", specs["gpt"], prompt, params)
               for i, prompt in enumerate(PROMPTS[:3])]
    engine.step()  # the first three are a batch; the next one joins it: a re-pack
    futures.append(engine.submit_generate("p3", specs["gpt"], PROMPTS[3], params))
    results = drive(engine, futures)
    alone = [drive(engine, [engine.submit_generate(f"a{i}", specs["gpt"], prompt, params)])[0]
             for i, prompt in enumerate(PROMPTS[:4])]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert "kv_pack_on_host" in caplog.text and runner._packer is None
    assert runner.kv_device == "cpu"  # passes stay bound; only re-packs moved to the host


def test_a_bound_pass_of_several_columns_brings_only_the_last_one_s_logits_to_the_host(
        specs, concat_cache, monkeypatch):
    """A prompt or merged pass makes logits for every new column; bound, they are cut to each
    row's last position on the device (``LastLogits``), and they equal the host pass's."""
    bound = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=True)
    runner, host = bound.get(specs["gpt"]), concat_cache.get(specs["gpt"])
    cuts = []
    take = runner._last.take
    monkeypatch.setattr(runner._last, "take", lambda logits: cuts.append(logits.shape()) or take(logits))
    prompts = [np.array(runner.tokenizer.encode(p).ids) for p in PROMPTS[1:4]]
    feeds = left_pad_prompts(prompts)
    inputs = {"input_ids": feeds[0], "attention_mask": feeds[1], "position_ids": feeds[2]}
    logits, _ = runner.run_decoder(inputs, runner.empty_pasts(3))
    want, _ = host.run_decoder(inputs, host.empty_pasts(3))
    assert cuts == [[3, feeds[0].shape[1], logits.shape[2]]]  # the whole pass's, on the device
    assert logits.shape == want.shape == (3, 1, want.shape[2])
    np.testing.assert_allclose(logits, want, atol=1e-5)
    full = host.run(inputs | dict(zip(host.past_names, host.empty_pasts(3))))["logits"]
    np.testing.assert_array_equal(want[:, 0], full[:, -1])


def test_a_device_that_cannot_cut_logits_brings_them_whole(specs, monkeypatch, caplog):
    bound = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=True)
    runner = bound.get(specs["gpt"])

    def refuse(logits):
        raise RuntimeError("no device memory")

    monkeypatch.setattr(runner._last, "take", refuse)
    engine = Engine(bound, RecordingSink(), EngineSettings())
    params = SamplingParams(max_tokens=5)
    results = drive(engine, [engine.submit_generate(f"c{i}", specs["gpt"], prompt, params)
                             for i, prompt in enumerate(PROMPTS[:3])])
    alone = [drive(engine, [engine.submit_generate(f"l{i}", specs["gpt"], prompt, params)])[0]
             for i, prompt in enumerate(PROMPTS[:3])]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert "last_logits_on_host" in caplog.text and runner._last is None
    assert runner.kv_device == "cpu"  # passes stay bound


def test_a_device_that_cannot_bind_falls_back_to_host_arrays(specs, monkeypatch, caplog):
    bound = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=True)
    runner = bound.get(specs["gpt"])

    def refuse(*args, **kwargs):
        raise RuntimeError("no device memory")

    monkeypatch.setattr(runner, "_bound_pass", refuse)
    engine = Engine(bound, RecordingSink(), EngineSettings())
    result = drive(engine, [engine.submit_generate("f", specs["gpt"], "hi",
                                                   SamplingParams(max_tokens=4))])[0]
    assert result.completion_tokens == 4 and runner.kv_device is None and runner._packer is None
    assert "kv_binding_off" in caplog.text


def test_publish_ahead_setting_is_validated_and_reaches_the_engine():
    from banter.settings import Settings, SettingsError
    from workers.runtime import engine_settings

    assert engine_settings(Settings()).publish_ahead == 2
    assert engine_settings(Settings.from_env({"BANTER_PUBLISH_AHEAD_STEPS": "0"})).publish_ahead == 0
    with pytest.raises(SettingsError, match="BANTER_PUBLISH_AHEAD_STEPS='-1': must be at least 0"):
        Settings.from_env({"BANTER_PUBLISH_AHEAD_STEPS": "-1"})
    with pytest.raises(ValueError, match="publish_ahead"):
        EngineSettings(publish_ahead=-1)


class Meeting:
    """Wraps a runner's ``run_decoder``: once ``due`` is set, the next two passes (the decode
    pass and the joining prompts' prefill pass) each wait at a barrier for the other, so the
    step completes only if they are in flight at once (else the barrier breaks the step)."""

    def __init__(self):
        self.barrier, self.due, self.met = threading.Barrier(2, timeout=10), False, False
        self.threads = set()

    def wrap(self, runner, monkeypatch):
        run = runner.run_decoder

        def meeting(inputs, pasts):
            self.threads.add(threading.current_thread().name)
            if self.due and not self.met:
                self.barrier.wait()
                self.met = True
            return run(inputs, pasts)

        monkeypatch.setattr(runner, "run_decoder", meeting)


@pytest.mark.parametrize("bind_kv", [False, True])
def test_overlapped_prefill_runs_beside_the_decode_pass_with_the_same_tokens(specs, monkeypatch,
                                                                             bind_kv):
    """``prefill_overlap="on"``: at a step where prompts join a running batch, their prefill
    pass and the decode pass are in flight at once (each waits for the other at a barrier);
    every job samples the tokens it samples with one pass after the other, and each step
    still publishes all its tokens at once. ``bind_kv``: both passes on one session with I/O
    binding, as on a GPU."""
    def crowd(overlap, meeting=None):
        runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1,
                              bind_kv=bind_kv)
        if meeting is not None:
            meeting.wrap(runners.get(specs["gpt"]), monkeypatch)
        sink = RecordingSink()
        engine = Engine(runners, sink, EngineSettings(prefill_overlap=overlap))
        futures = []
        for i, prompt in enumerate(PROMPTS * 2):  # one joins at every step, mixed lengths
            if meeting is not None:
                meeting.due = i == 1  # the first step with a running batch to decode
            params = SamplingParams(temperature=0.9, seed=i, max_tokens=3 + 2 * i)
            futures.append(engine.submit_generate(f"o{i}", specs["gpt"], prompt, params))
            engine.step()
        return [r.token_ids for r in drive(engine, futures)], sink

    meeting = Meeting()
    overlapped, overlapped_sink = crowd("on", meeting)
    serial, serial_sink = crowd("off")
    assert meeting.met and "MainThread" in meeting.threads
    assert any(name.startswith("engine-prefill") for name in meeting.threads)
    assert overlapped == serial
    assert [len(step) for step in overlapped_sink.published] == [
        len(step) for step in serial_sink.published]
    assert sorted(p[3] for p in overlapped_sink.passes) == sorted(p[3] for p in serial_sink.passes)


def test_serial_prefill_never_leaves_the_engine_thread(specs, monkeypatch):
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1)
    runner = runners.get(specs["gpt"])
    threads = set()
    run = runner.run_decoder

    def recording(inputs, pasts):
        threads.add(threading.current_thread().name)
        return run(inputs, pasts)

    monkeypatch.setattr(runner, "run_decoder", recording)
    engine = Engine(runners, RecordingSink(), EngineSettings(prefill_overlap="auto"))
    futures = []
    for i, prompt in enumerate(PROMPTS):
        futures.append(engine.submit_generate(f"s{i}", specs["gpt"], prompt,
                                              SamplingParams(max_tokens=4)))
        engine.step()
    drive(engine, futures)
    assert threads == {"MainThread"}  # auto on the CPU provider: one pass after the other
    assert engine._prefiller is None


@pytest.mark.parametrize("mode, kv_device, overlaps", [
    ("off", "cuda", False), ("on", None, True), ("auto", "cuda", True), ("auto", "cpu", False),
    ("auto", None, False)])
def test_prefill_overlap_auto_overlaps_where_the_cache_is_on_a_gpu(cache, mode, kv_device,
                                                                     overlaps):
    class Placed:
        def __init__(self, device):
            self.kv_device = device

    engine = Engine(cache, RecordingSink(), EngineSettings(prefill_overlap=mode))
    assert engine._overlaps(Placed(kv_device)) is overlaps


def test_a_failed_decode_pass_still_waits_for_the_overlapped_prefill(specs, monkeypatch):
    """A decode pass that raises (a bug, not an ORT failure) leaves the step only once the
    joining sequences' prefill is done: they are never left half-started."""
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1)
    engine = Engine(runners, RecordingSink(), EngineSettings(prefill_overlap="on"))
    first = engine.submit_generate("d0", specs["gpt"], PROMPTS[0], SamplingParams(max_tokens=8))
    engine.step()
    prefill_done = []
    real_prefill = engine._prefill

    def slow_prefill(runner, seqs, events, first):
        time.sleep(0.05)
        result = real_prefill(runner, seqs, events, first)
        prefill_done.append(True)
        return result

    def broken_decode(runner, batch, events):
        raise RuntimeError("decode bug")

    monkeypatch.setattr(engine, "_prefill", slow_prefill)
    monkeypatch.setattr(engine, "_decode", broken_decode)
    engine.submit_generate("d1", specs["gpt"], PROMPTS[1], SamplingParams(max_tokens=8))
    with pytest.raises(RuntimeError, match="decode bug"):
        engine.step()
    assert prefill_done == [True]
    assert not first.done()


def merged_crowd(specs, merge, bind_kv, monkeypatch=None, max_positions=None):
    """A prompt joins the running batch at every step (mixed lengths and sampling): each
    job's result, the sink, and each pass's (cache width, longest row's cached positions,
    widest prompt among its new columns). ``max_positions`` lowers the model's limit."""
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=bind_kv)
    runner = runners.get(specs["gpt"])
    widths = []
    if monkeypatch is not None:
        run = runner.run_decoder

        def measuring(inputs, pasts):
            mask, new = inputs["attention_mask"], inputs["input_ids"].shape[1]
            cached = mask[:, :-new]
            widths.append((cached.shape[1], int(cached.sum(axis=1).max()), new))
            return run(inputs, pasts)

        monkeypatch.setattr(runner, "run_decoder", measuring)
        if max_positions is not None:
            monkeypatch.setattr(runner, "max_positions", max_positions)
    sink = RecordingSink()
    engine = Engine(runners, sink, EngineSettings(prefill_merge=merge))
    futures = []
    for i, prompt in enumerate(PROMPTS * 2):
        params = SamplingParams(temperature=0.9, seed=i, max_tokens=3 + 2 * i)
        futures.append(engine.submit_generate(f"m{i}", specs["gpt"], prompt, params))
        engine.step()
    return drive(engine, futures), sink, widths


def tokens(results):
    return [r.token_ids for r in results]


@pytest.mark.parametrize("bind_kv", [False, True])
def test_merged_prefill_rides_in_the_decode_pass_with_the_same_tokens(specs, bind_kv):
    """``prefill_merge="on"``: at a step where prompts join a running batch, one pass runs both
    the running rows and the joining prompts; every job samples the tokens it samples with a
    prefill pass and a decode pass, and each step still publishes all its tokens at once.
    ``bind_kv``: the cache bound between passes and re-packed with ``KVPacker``, as on a GPU."""
    merged, merged_sink, _ = merged_crowd(specs, "on", bind_kv)
    serial, serial_sink, _ = merged_crowd(specs, "off", bind_kv)
    assert tokens(merged) == tokens(serial)
    assert [len(step) for step in merged_sink.published] == [
        len(step) for step in serial_sink.published]
    joins = len(PROMPTS) * 2 - 1  # every prompt but the first joins a running batch
    assert len(merged_sink.passes) == len(serial_sink.passes) - joins


@pytest.mark.parametrize("bind_kv", [False, True])
def test_a_merged_pass_pads_stay_in_the_cache_only_until_the_next_re_pack(specs, monkeypatch,
                                                                          bind_kv):
    """The masked columns a merged pass leaves in the running rows are dropped by the next
    re-pack (the next join's): a pass's cache is never wider than its longest row's cached
    positions plus one merged pass's pads. With the model's positions lowered to what the
    longest job needs, the cache still fits (re-packed when it would not) and no job's
    tokens change."""
    serial, _, _ = merged_crowd(specs, "off", bind_kv)
    merged, _, widths = merged_crowd(specs, "on", bind_kv, monkeypatch)
    assert tokens(merged) == tokens(serial)
    assert any(width > longest for width, longest, _ in widths)  # pads were in the cache
    pads = max(new for _, _, new in widths) - 1
    assert all(width <= longest + pads for width, longest, _ in widths)
    limit = max(r.prompt_tokens + len(r.token_ids) for r in merged)  # the longest job's need
    assert limit < max(width + new for width, _, new in widths)  # the pads went past it
    tight, _, tight_widths = merged_crowd(specs, "on", bind_kv, monkeypatch, max_positions=limit)
    assert tokens(tight) == tokens(serial)
    assert all(width + new <= limit for width, _, new in tight_widths)


@pytest.mark.parametrize("fails", ["the merged pass once", "every prompt pass"])
def test_a_failed_merged_pass_runs_apart_so_only_the_jobs_whose_pass_fails_fail(
        specs, monkeypatch, caplog, fails):
    """A merged pass that fails is run again as a decode pass and a prefill pass: a failure
    of the merged pass alone costs nobody anything; a prompt that cannot be run fails its own
    job only, and the running one goes on, as without merging."""
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, bind_kv=True)
    runner = runners.get(specs["gpt"])
    run, failed = runner.run_decoder, []

    def failing(inputs, pasts):
        width, cached = inputs["input_ids"].shape[1], inputs["attention_mask"].shape[1]
        merged = width > 1 and cached > width
        if (merged and not failed) if fails == "the merged pass once" else width > 1:
            failed.append(width)
            raise InferenceError("no device memory")
        return run(inputs, pasts)

    engine = Engine(runners, RecordingSink(), EngineSettings(prefill_merge="on"))
    params = SamplingParams(max_tokens=6)
    running = engine.submit_generate("r", specs["gpt"], PROMPTS[0], params)
    engine.step()
    monkeypatch.setattr(runner, "run_decoder", failing)
    joining = engine.submit_generate("j", specs["gpt"], PROMPTS[1], params)
    drive(engine, [running] if fails == "every prompt pass" else [running, joining])
    assert joining.done()  # finished, or ended by its own failed prompt pass
    monkeypatch.undo()
    alone = [generate_alone(lambda: Engine(runners, RecordingSink(), EngineSettings()),
                            specs["gpt"], prompt, params) for prompt in PROMPTS[:2]]
    assert running.result().token_ids == alone[0].token_ids
    assert "merged_pass_failed" in caplog.text
    if fails == "the merged pass once":
        assert joining.result().token_ids == alone[1].token_ids
    else:
        with pytest.raises(InferenceError, match="no device memory"):
            joining.result()


def test_pack_rows_drops_masked_columns_inside_rows():
    rng = np.random.default_rng(1)
    pasts = [rng.standard_normal((2, 2, 5, 3)).astype(np.float32) for _ in range(2)]
    mask = np.array([[1, 1, 0, 0, 1], [0, 0, 1, 1, 1]])
    out, out_mask = pack_rows([(pasts, mask, [0, 1])], blank=1)
    assert out_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    for new, old in zip(out, pasts):
        np.testing.assert_array_equal(new[0], old[0][:, [0, 1, 4]])
        np.testing.assert_array_equal(new[1], old[1][:, 2:])
        assert not new[2].any()


def test_merge_feeds_right_aligns_running_tokens_after_the_joining_prompts_width():
    mask = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 0]])  # two running rows, one blank
    feeds = merge_feeds(np.array([7, 8]), np.array([2, 3]), mask, [np.array([4, 5, 6])])
    assert feeds["input_ids"].tolist() == [[0, 0, 7], [0, 0, 8], [4, 5, 6]]
    assert feeds["position_ids"].tolist() == [[0, 0, 2], [0, 0, 3], [0, 1, 2]]
    assert feeds["attention_mask"].tolist() == [[0, 1, 1, 0, 0, 1], [1, 1, 1, 0, 0, 1],
                                                [0, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize("mode, kv_device, layout, merges", [
    ("off", "cuda", "concat", False), ("on", None, "concat", True),
    ("auto", "cuda", "concat", True), ("auto", "cpu", "concat", False),
    ("auto", None, "concat", False), ("on", None, "inplace", False)])
def test_prefill_merge_auto_merges_where_the_cache_is_on_a_gpu(cache, specs, mode, kv_device,
                                                                 layout, merges):
    from workers.engine import _Batch, _Sequence, _SlotBatch

    class Placed:
        def __init__(self, device):
            self.kv_device, self.max_positions = device, 1024

    runner = cache.get(specs["gpt"])
    seq = _Sequence("j", runner, [1, 2, 3], SamplingParams(), None)
    batch = (_Batch([_Sequence("r", runner, [1], SamplingParams(), None)], [],
                    np.ones((1, 4), dtype=np.int64))
             if layout == "concat" else _SlotBatch([seq], []))
    engine = Engine(cache, RecordingSink(), EngineSettings(prefill_merge=mode))
    assert engine._merges(Placed(kv_device), batch, [seq]) is merges
    assert not engine._merges(Placed("cuda"), _Batch(batch.seqs, [], np.ones((1, 1022), dtype=np.int64)),
                              [seq])  # 1022 cached + 3 new would not fit in 1024 positions
    if mode == "on" and layout == "concat":  # what fits is counted after the re-pack
        dead = _Sequence("d", runner, [1], SamplingParams(), None)
        dead.finish_reason = "length"
        rows = [batch.seqs[0], batch.seqs[0], dead]
        mask = np.zeros((3, 1030), dtype=np.int64)
        mask[0, -4:] = 1  # a live row: 4 cached
        mask[1, -999:] = 1  # a live row: 999 cached
        mask[2, :] = 1  # a dead row, 1030 wide: the re-pack drops it
        assert engine._merges(Placed("cuda"), _Batch(rows, [], mask), [seq])  # 999 + 3 fit
        mask[1, -1022:] = 1
        assert not engine._merges(Placed("cuda"), _Batch(rows, [], mask), [seq])  # 1022 + 3 do not


def test_a_prompt_too_long_to_pad_every_running_row_to_gets_a_pass_of_its_own(specs, monkeypatch):
    """A merged pass pads each running row to the longest joining prompt: past
    ``MERGE_MAX_POSITIONS`` (rows x that length) the prompt is prefilled in a pass of its own."""
    from workers import engine as engine_module

    monkeypatch.setattr(engine_module, "MERGE_MAX_POSITIONS", 2 * 10)
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1)
    sink = RecordingSink()
    engine = Engine(runners, sink, EngineSettings(prefill_merge="on"))
    first = engine.submit_generate("a", specs["gpt"], PROMPTS[0], SamplingParams(max_tokens=6))
    engine.step()
    short = engine.submit_generate("b", specs["gpt"], PROMPTS[0], SamplingParams(max_tokens=4))
    engine.step()  # 2 rows x 2 tokens: merged
    long = engine.submit_generate("c", specs["gpt"], PROMPTS[2], SamplingParams(max_tokens=2))
    engine.step()  # 3 rows x 19 tokens: a prefill pass and a decode pass
    drive(engine, [first, short, long])
    assert [p[3] for p in sink.passes[:4]] == [1, 2, 2, 1]  # prompt, merged, decode, prompt


def test_prefill_merge_setting_is_validated_and_reaches_the_engine():
    from banter.settings import Settings, SettingsError
    from workers.runtime import engine_settings

    assert engine_settings(Settings()).prefill_merge == "auto"
    assert engine_settings(Settings.from_env({"BANTER_PREFILL_MERGE": "off"})).prefill_merge == "off"
    with pytest.raises(SettingsError, match="BANTER_PREFILL_MERGE='yes': expected off, on or auto"):
        Settings.from_env({"BANTER_PREFILL_MERGE": "yes"})
    with pytest.raises(ValueError, match="prefill_merge"):
        EngineSettings(prefill_merge="always")


def test_prefill_overlap_setting_is_validated_and_reaches_the_engine():
    from banter.settings import Settings, SettingsError
    from workers.runtime import engine_settings

    assert engine_settings(Settings()).prefill_overlap == "off"
    assert engine_settings(Settings.from_env({"BANTER_PREFILL_OVERLAP": "auto"})
                           ).prefill_overlap == "auto"
    with pytest.raises(SettingsError, match="BANTER_PREFILL_OVERLAP='yes': expected off, on or auto"):
        Settings.from_env({"BANTER_PREFILL_OVERLAP": "yes"})
    with pytest.raises(ValueError, match="prefill_overlap"):
        EngineSettings(prefill_overlap="always")


@pytest.mark.parametrize("env, use_tf32", [({}, "0"), ({"BANTER_CUDA_TF32": "on"}, "1"),
                                           ({"BANTER_CUDA_TF32": "false"}, "0")])
def test_a_gpu_worker_asks_the_cuda_provider_for_float32_products_unless_tf32_is_on(
        monkeypatch, env, use_tf32):
    """``BANTER_CUDA_TF32`` (default off) reaches the CUDA provider's ``use_tf32``: off, a row's
    logits are float32 products whatever its batch (as on the CPU); a CPU worker gets the CPU
    provider alone either way."""
    import onnxruntime as ort

    from banter.settings import Settings, SettingsError
    from workers.main import worker_providers

    settings = Settings.from_env(env)
    assert worker_providers(settings, gpu=None) == ["CPUExecutionProvider"]
    assert worker_providers(settings, gpu=0) == ["CPUExecutionProvider"]  # no CUDA in this build
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert worker_providers(settings, gpu=0) == [
        ("CUDAExecutionProvider", {"use_tf32": use_tf32}), "CPUExecutionProvider"]
    assert worker_providers(settings, gpu=None) == ["CPUExecutionProvider"]
    with pytest.raises(SettingsError, match="BANTER_CUDA_TF32='fast': expected true or false"):
        Settings.from_env({"BANTER_CUDA_TF32": "fast"})


# -- the in-place layout -----------------------------------------------------------------------

def test_ort_threads_setting_is_validated_and_sets_each_session_s_intra_op_threads(specs):
    from banter.settings import Settings, SettingsError

    assert Settings().ort_threads == 0  # ONNX Runtime's default
    assert Settings.from_env({"BANTER_ORT_THREADS": "0"}).ort_threads == 0
    assert Settings.from_env({"BANTER_ORT_THREADS": "2"}).ort_threads == 2
    for bad, said in (("-1", "BANTER_ORT_THREADS"), ("1025", "must be at most 1024")):
        with pytest.raises(SettingsError, match=said):
            Settings.from_env({"BANTER_ORT_THREADS": bad})
    runner = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1).get(specs["gpt"])
    assert runner.intra_op_threads == 1
    assert runner.session.get_session_options().intra_op_num_threads == 1


def test_kv_layout_setting_is_validated():
    from banter.settings import Settings, SettingsError

    assert Settings().kv_layout == "auto"
    assert Settings.from_env({"BANTER_KV_LAYOUT": "concat"}).kv_layout == "concat"
    with pytest.raises(SettingsError, match="BANTER_KV_LAYOUT='paged': expected auto, inplace or concat"):
        Settings.from_env({"BANTER_KV_LAYOUT": "paged"})
    with pytest.raises(ValueError, match="kv_layout must be one of auto, inplace, concat"):
        RunnerCache(kv_layout="paged")


def test_the_inplace_layout_serves_the_twin_of_a_gpt_graph_decoder(specs, concat_cache):
    for layout in ("inplace", "auto"):
        runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, kv_layout=layout)
        gpt = runners.get(specs["gpt"])
        assert gpt.kv_layout == "inplace" and "seqlens_k" in gpt.input_names
        assert gpt.past_names[:2] == ["past_key.0", "past_value.0"] and gpt.kv_device is None
        assert runners.get(specs["embed"]).kv_layout == "concat"
    assert concat_cache.get(specs["gpt"]).kv_layout == "concat"


def test_an_inplace_prompt_pass_returns_each_prompt_last_position_only(specs, concat_cache):
    """Right-padded prompts of three lengths in one twin pass: one row of logits per prompt,
    equal to the model's own graph's at that prompt's last token (not at the padding)."""
    from workers import inplace

    runner = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1,
                         kv_layout="inplace").get(specs["gpt"])
    own = concat_cache.get(specs["gpt"])
    prompts = [np.array(own.tokenizer.encode(p).ids, dtype=np.int64) for p in PROMPTS[:3]]
    assert len({len(p) for p in prompts}) == 3
    slots = runner.kv_slots(3)
    logits, _ = runner.run_decoder(inplace.prompt_inputs(prompts), slots)
    assert logits.shape == (3, 1, own.tokenizer.get_vocab_size())
    for row, prompt in enumerate(prompts):
        want, _, _ = prefill(own, [prompt])
        np.testing.assert_allclose(logits[row, 0], want[0], atol=1e-4)


def test_a_twin_that_disagrees_with_its_model_is_not_served(specs, tmp_path, monkeypatch, caplog):
    """The load-time check: a twin whose logits differ (here: built from other weights) is
    dropped with a warning and the model's own graph serves."""
    import onnx
    from onnx import numpy_helper

    from workers import inplace

    model = onnx.load(str(specs["gpt"].model_path))
    for init in model.graph.initializer:
        if init.name == "h.0.fc.w":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    real = inplace.inplace_model
    monkeypatch.setattr(inplace, "inplace_model", lambda path: real(other))
    runner = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1,
                         kv_layout="auto").get(specs["gpt"])
    assert runner.kv_layout == "concat" and "seqlens_k" not in runner.input_names
    warning = next(r for r in caplog.records if r.getMessage() == "kv_layout_concat")
    assert "differ from the model's own" in warning.reason
    engine = Engine(RunnerCache(select_providers(use_gpu=False), intra_op_threads=1), RecordingSink())
    future = engine.submit_generate("t", specs["gpt"], "hi", SamplingParams(max_tokens=3))
    assert drive(engine, [future])[0].text == demo_words(3)


@pytest.mark.parametrize("layout, warned", [("auto", False), ("inplace", True)])
def test_a_model_without_a_twin_keeps_its_graph(specs, monkeypatch, caplog, layout, warned):
    from workers import inplace

    def refuse(path):
        raise inplace.NotInplaceable(f"{path} is not a banterhearts gpt_graph decoder")

    monkeypatch.setattr(inplace, "inplace_model", refuse)
    runner = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1,
                         kv_layout=layout).get(specs["gpt"])
    assert runner.kv_layout == "concat"
    assert ("kv_layout_concat" in caplog.text) is warned


def test_inplace_rows_hold_each_sequence_cache_as_sequences_join_and_leave(concat_cache,
                                                                            specs):
    """Sequences of mixed lengths join at every step and leave at different ones; after every
    step row b of the slots holds exactly the cache of ``seqs[b]`` (what the model's own graph
    computes for that sequence's tokens alone), no finished row is left in the batch, and
    finished rows were filled from the end (rows moved)."""
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, kv_layout="inplace")
    runner, own = runners.get(specs["gpt"]), concat_cache.get(specs["gpt"])
    engine = Engine(runners, RecordingSink(), EngineSettings(max_running=6))
    sampled = SamplingParams(temperature=0.9, seed=3)
    futures, moved, checked = [], 0, 0
    rows_of: dict[str, int] = {}
    for step in range(40):
        if step < 12:
            prompt = PROMPTS[step % len(PROMPTS)]
            futures.append(engine.submit_generate(f"j{step}", specs["gpt"], prompt,
                                                  replace(sampled, max_tokens=2 + (5 * step) % 9)))
        engine.step()
        batch = engine._batches.get(runner)
        if batch is None:
            continue
        assert len(batch.seqs) == len(batch.live())
        for b, seq in enumerate(batch.seqs):
            moved += rows_of.setdefault(seq.job_id, b) != b
            rows_of[seq.job_id] = b
            history = np.r_[runner.tokenizer.encode(PROMPTS[int(seq.job_id[1:]) % len(PROMPTS)]).ids,
                            seq.token_ids[:-1]]
            assert seq.past_len == len(history)
            _, want, _ = prefill(own, [history])
            for buffer, w in zip(batch.slots, want):
                np.testing.assert_allclose(buffer[b, :, :seq.past_len], w[0], atol=1e-4)
            checked += 1
    assert all(f.done() for f in futures) and moved > 0 and checked > 20


def test_an_inplace_cache_that_cannot_be_reserved_fails_its_jobs_and_the_engine_goes_on(
        specs, monkeypatch):
    runners = RunnerCache(select_providers(use_gpu=False), intra_op_threads=1, kv_layout="inplace")
    runner = runners.get(specs["gpt"])
    monkeypatch.setattr(runner, "max_positions", 2 ** 36)  # petabytes of cache
    engine = Engine(runners, RecordingSink())
    failed = engine.submit_generate("big", specs["gpt"], "hi", SamplingParams(max_tokens=2))
    engine.step()
    with pytest.raises(InferenceError, match="cannot reserve its in-place KV cache.*BANTER_KV_LAYOUT=concat"):
        failed.result(timeout=1)
    monkeypatch.undo()
    ok = engine.submit_generate("ok", specs["gpt"], "hi", SamplingParams(max_tokens=2))
    assert drive(engine, [ok])[0].text == demo_words(2)


def test_a_cuda_session_keeps_the_model_graph(specs, caplog):
    """CUDA's GroupQueryAttention takes float16 only: a runner on the CUDA provider keeps the
    model's own graph, quietly under auto, with a warning under inplace."""
    runner = runner_module.Runner(specs["gpt"], select_providers(use_gpu=False), 1)
    runner.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # as ORT would report
    runner._take_inplace("auto", 1)
    assert runner.kv_layout == "concat" and "kv_layout_concat" not in caplog.text
    runner._take_inplace("inplace", 1)
    warning = next(r for r in caplog.records if r.getMessage() == "kv_layout_concat")
    assert runner.kv_layout == "concat" and "CPU provider only" in warning.reason


def test_a_redis_that_refuses_writes_for_a_while_loses_no_token(specs, tmp_path):
    """Redis out of memory (``noeviction``) for a few steps: the engine holds that step's tokens
    and publishes them once Redis takes writes again (``is_outage``), so the stream has every
    seq and the text of the result, not a gap where the refused step was."""
    from banter.redisconn import connect
    from banter.redisserver import RedisServer
    from banter.streams import EventType, StreamWriter, read_events
    from workers.runtime import RedisSink

    server = RedisServer(tmp_path / "redis", persist=False)
    client = connect(server.start())
    try:
        sink = RedisSink(client, StreamWriter(client, 100, 60), "w@test")
        engine = Engine(RunnerCache(select_providers(use_gpu=False), intra_op_threads=1), sink,
                        EngineSettings(publish_ahead=0))
        future = engine.submit_generate("oom", specs["gpt"], "hello", SamplingParams(max_tokens=8))
        for _ in range(3):
            engine.step()
        client.config_set("maxmemory", "1")  # every write refused: OOM
        blocked = threading.Thread(target=engine.step)  # its publish waits for Redis
        blocked.start()
        blocked.join(timeout=1.0)
        assert blocked.is_alive(), "the step gave up on its tokens instead of holding them"
        client.config_set("maxmemory", "0")
        blocked.join(timeout=30)
        result = drive(engine, [future])[0]
        tokens = [data for _id, kind, data in read_events(client, "oom")
                  if kind is EventType.TOKEN]
        assert [t["seq"] for t in tokens] == list(range(8))
        assert "".join(t["text"] for t in tokens) == result.text
    finally:
        server.stop()


def test_bulk_embeds_taken_for_a_step_run_even_when_its_publish_fails(specs):
    """A step whose token publish raises (a sink that is not Redis being out: a bug) must still
    run the bulk embed rows it took off their queue: they are nowhere else, and their job would
    wait for ever."""
    class FailingOnce(RecordingSink):
        failed = False

        def publish_tokens(self, events):
            if not self.failed:
                self.failed = True
                raise RuntimeError("the sink broke")
            super().publish_tokens(events)

    engine = Engine(RunnerCache(select_providers(use_gpu=False), intra_op_threads=1),
                    FailingOnce(), EngineSettings(publish_ahead=0))
    engine.submit_generate("g", specs["gpt"], "hello", SamplingParams(max_tokens=4))
    embedded = engine.submit_embed(specs["embed"], "a bulk text", lane="bulk", job_id="e")
    with pytest.raises(RuntimeError):
        engine.step()
    assert embedded.done() and len(embedded.result().embeddings[0]) > 0
