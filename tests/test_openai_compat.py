"""OpenAI compatibility: the official ``openai`` client and raw HTTP against the real stack
(producer over HTTP, Redis, a worker process, the demo models)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid

import pytest
import requests
from openai import APIError, APIStatusError, BadRequestError, NotFoundError, OpenAI
from tokenizers import Tokenizer

from banter import keys
from banter.demo import DEMO_GPT, DEMO_TEXT
from banter.errors import ArtifactError
from producer.chat import ChatTemplate, load_template, parse_messages
from tests.conftest import Api, unserved_producer

WORDS = [" " + w for w in DEMO_TEXT.split()]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
LONG_PROMPT = " ".join(f"zq{i}x" for i in range(2000))  # under the char limit, over 512 tokens


def expected(k: int) -> str:
    """Greedy demo output for ``max_tokens=k``."""
    return "".join(WORDS[:k])


@pytest.fixture(scope="module")
def client(api) -> OpenAI:
    return OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)


def data_lines(response: requests.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, checking it has no other fields."""
    payloads = []
    for line in response.iter_lines(decode_unicode=True):
        if not line or line.startswith(":"):
            continue
        assert line.startswith("data: "), line
        payloads.append(line[len("data: "):])
    return payloads


def stream_raw(api, path: str, body: dict) -> list[str]:
    with requests.post(api.url + path, json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return data_lines(response)


# ----------------------------------------------------------------------------- openai client
def test_a_sync_timeout_is_not_retried_into_a_second_job(settings, redis_client, demo_models):
    """504 leaves its job running: the client's own retries (two by default) must not send it
    again. A heartbeat and a queue no worker serves keep the job queued past the wait."""
    with unserved_producer(settings, redis_client, sync_timeout_s=0.3) as (server, queue):
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2)
        with pytest.raises(APIStatusError) as raised:
            client.completions.create(model="demo-gpt", prompt="waits", max_tokens=2)
        assert raised.value.status_code == 504
        headers = raised.value.response.headers
        assert headers["X-Should-Retry"] == "false" and headers["X-Job-ID"]
        assert "poll GET /v1/jobs/" in raised.value.message
        assert redis_client.llen(queue) == 1  # one job, not three


def test_client_completion_streamed_and_not(client):
    whole = client.completions.create(model="demo-gpt", prompt="Say something.", max_tokens=3,
                                      temperature=0)
    assert whole.choices[0].text == expected(3) == " banterhearts streams every"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 3
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 3
    chunks = list(client.completions.create(model="demo-gpt", prompt="Say something.",
                                            max_tokens=3, stream=True, temperature=0))
    assert "".join(c.choices[0].text for c in chunks) == expected(3)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")


def test_client_echo_puts_the_prompt_before_each_text_streamed_and_not(client):
    """``echo``: the prompt, as sent, then the text; streamed, the prompt is each choice's
    first chunk. The usage counts only generated tokens as completion tokens."""
    prompt = "Say something. "
    ask = {"model": "demo-gpt", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    plain = client.completions.create(**ask)
    whole = client.completions.create(**ask, echo=True)
    assert whole.choices[0].text == prompt + plain.choices[0].text
    assert whole.usage == plain.usage
    chunks = list(client.completions.create(**ask, echo=True, stream=True))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == prompt + plain.choices[0].text
    several = client.completions.create(**ask, echo=True, n=2)
    assert [c.text for c in several.choices] == [prompt + plain.choices[0].text] * 2
    streamed = list(client.completions.create(**ask, echo=True, n=2, stream=True))
    for index in (0, 1):
        mine = [c.choices[0].text for c in streamed if c.choices[0].index == index]
        assert mine[0] == prompt and "".join(mine) == prompt + plain.choices[0].text


def test_client_chat_streamed_and_not(client):
    whole = client.chat.completions.create(model="demo-gpt", messages=MESSAGES, max_tokens=5,
                                           temperature=0)
    message = whole.choices[0].message
    assert (message.role, message.content) == ("assistant", expected(5))
    assert whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="demo-gpt", messages=MESSAGES,
                                                 max_completion_tokens=5, stream=True,
                                                 temperature=0))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected(5)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_client_penalties_and_logit_bias_shape_the_text(client, api, demo_models):
    """OpenAI's logit adjustments reach the engine from both endpoints, streamed or not, as
    from ``/v1/inference``: a bias of 100 makes its token the only pick."""
    tokenizer = Tokenizer.from_file(str(demo_models[DEMO_GPT] / "tokenizer.json"))
    forced = tokenizer.decode([123] * 4)
    bias = {"logit_bias": {"123": 100}, "max_tokens": 4}
    assert client.completions.create(model=DEMO_GPT, prompt="Say something.",
                                     **bias).choices[0].text == forced
    chunks = client.chat.completions.create(model=DEMO_GPT, messages=MESSAGES, stream=True,
                                            **bias)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == forced
    adjusted = {"max_tokens": 24, "temperature": 0, "frequency_penalty": 1.5,
                "presence_penalty": 0.5, "logit_bias": {"7": 4, "670": -12}}
    native = api.post("/v1/inference", {"prompt": "tell me a story", **adjusted}).json()["text"]
    assert native != expected(24)  # the adjustments changed the text
    whole = client.completions.create(model=DEMO_GPT, prompt="tell me a story", **adjusted)
    assert whole.choices[0].text == native
    chunks = client.completions.create(model=DEMO_GPT, prompt="tell me a story", stream=True,
                                       **adjusted)
    assert "".join(c.choices[0].text for c in chunks) == native


def test_client_logprobs_completions_streamed_and_not(client, api):
    """``logprobs: N`` on completions: OpenAI's legacy object, one entry per token, each token's
    alternatives with the token itself; the stream's chunks carry the same, token by token."""
    whole = client.completions.create(model=DEMO_GPT, prompt="Say something.", max_tokens=5,
                                      temperature=0, logprobs=2)
    choice = whole.choices[0]
    assert choice.text == expected(5)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 5
    assert all(x < 0 for x in lp.token_logprobs)
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and len(top) == 2  # greedy: the token is the best one
        assert logprob == max(top.values())
    chunks = list(client.completions.create(model=DEMO_GPT, prompt="Say something.",
                                            max_tokens=5, temperature=0, logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == offsets
    assert [x for s in streamed for x in s.token_logprobs] == pytest.approx(lp.token_logprobs)
    native = api.post("/v1/inference", {"prompt": "Say something.", "max_tokens": 5,
                                        "logprobs": 1}).json()
    assert [e["token"] for e in native["logprobs"]] == lp.tokens
    assert [len(e["top_logprobs"]) for e in native["logprobs"]] == [1] * 5
    plain = client.completions.create(model=DEMO_GPT, prompt="x", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_legacy_text_offsets_count_characters_of_the_text_not_spelled_bytes(client):
    """A character made of two byte tokens (0xC3, 0xA9: "\u00e9"): both start where the
    character does, and the next token after it, so each offset indexes the text."""
    ask = {"model": DEMO_GPT, "prompt": "hi", "max_tokens": 3, "temperature": 0, "logprobs": 0,
           "logit_bias": {"128": 100, "103": 99}, "frequency_penalty": 2,
           "presence_penalty": 2}
    whole = client.completions.create(**ask).choices[0]
    assert whole.logprobs.tokens[:2] == ["bytes:\\xc3", "bytes:\\xa9"]
    assert whole.text.startswith("\u00e9") and whole.logprobs.text_offset == [0, 0, 1]
    chunks = client.completions.create(**ask, stream=True)
    assert [o for c in chunks if c.choices[0].logprobs
            for o in c.choices[0].logprobs.text_offset] == [0, 0, 1]


def test_client_logprobs_chat_streamed_and_not(client, api):
    whole = client.chat.completions.create(model=DEMO_GPT, messages=MESSAGES, max_tokens=4,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content == expected(4)
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob < 0
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
    chunks = client.chat.completions.create(model=DEMO_GPT, messages=MESSAGES, max_tokens=4,
                                            temperature=0, logprobs=True, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])
    assert all(t.top_logprobs == [] for t in streamed)  # top_logprobs 0: none
    no = client.chat.completions.create(model=DEMO_GPT, messages=MESSAGES, max_tokens=2,
                                        temperature=0, logprobs=False)
    assert no.choices[0].logprobs is None
    # a job's token events carry them too, replayed as they were sent
    job = api.post("/v1/jobs", {"kind": "generate", "input": "hi",
                                "params": {"max_tokens": 3, "logprobs": 0}}).json()
    api.wait_job(job["id"])
    replay = api.get(f"/v1/jobs/{job['id']}/events").text
    tokens = [json.loads(line[len("data: "):]) for line in replay.splitlines()
              if line.startswith("data: ") and '"seq"' in line]
    assert [t["logprobs"]["token_id"] for t in tokens] == [t["token_id"] for t in tokens]
    assert len(tokens) == 3


def test_client_n_choices_streamed_and_not(client, api):
    """``n`` choices, one job each: with a seed, choice i is what one request with seed + i
    answers, so they differ and come again alike; the prompt counts once in the usage."""
    ask = {"model": DEMO_GPT, "prompt": "tell me a story", "max_tokens": 6, "temperature": 2.0}
    singles = [client.completions.create(**ask, seed=40 + i) for i in range(3)]
    texts = [single.choices[0].text for single in singles]
    assert len(set(texts)) > 1
    whole = client.completions.create(**ask, seed=40, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == texts
    assert whole.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert whole.usage.completion_tokens == 18
    chunks = list(client.completions.create(**ask, seed=40, n=3, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert {c.id for c in chunks} == {chunks[0].id}
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    chat = {"model": DEMO_GPT, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    answer = client.chat.completions.create(**chat, n=2)
    assert [c.message.content for c in answer.choices] == [expected(4)] * 2  # greedy: alike
    deltas = client.chat.completions.create(**chat, n=2, stream=True)
    by_index: dict[int, list] = {0: [], 1: []}
    for chunk in deltas:
        by_index[chunk.choices[0].index].append(chunk.choices[0].delta)
    for index in (0, 1):
        assert by_index[index][0].role == "assistant"
        assert "".join(d.content or "" for d in by_index[index]) == expected(4)
    raw = api.post("/v1/completions", {**ask, "n": 2, "seed": 1})
    ids = raw.headers["X-Job-IDs"].split(",")
    assert len(ids) == 2 and raw.headers["X-Job-ID"] == ids[0]
    assert [api.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["succeeded"] * 2


def test_every_answer_with_several_choices_names_their_jobs(api, settings, redis_client):
    """X-Job-IDs on an error too: a 504's jobs go on, and a client finds them by id."""
    failed = api.post("/v1/completions", {"prompt": "x", "n": 3, "logit_bias": {"685": 1}})
    assert failed.status_code == 400, failed.text
    ids = failed.headers["X-Job-IDs"].split(",")
    statuses = [api.get(f"/v1/jobs/{i}").json()["status"] for i in ids]
    # a failed choice cancels the others: one that had not failed yet ends cancelled
    assert len(ids) == 3 and "failed" in statuses and set(statuses) <= {"failed", "cancelled"}
    with unserved_producer(settings, redis_client, sync_timeout_s=0.3) as (server, _queue):
        late = requests.post(server.url + "/v1/completions", json={"prompt": "x", "n": 2},
                             timeout=30)
        assert late.status_code == 504, late.text
        ids = late.headers["X-Job-IDs"].split(",")
        assert len(ids) == 2 and late.headers["X-Job-ID"] == ids[0]
        assert [api.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["queued"] * 2


def test_a_client_that_leaves_cancels_every_choice(api):
    with requests.post(api.url + "/v1/completions", json={
            "prompt": "bye", "max_tokens": 1000, "temperature": 0, "n": 3, "stream": True},
            stream=True, timeout=30) as response:
        assert response.status_code == 200, response.text
        next(line for line in response.iter_lines(decode_unicode=True)
             if line.startswith("data: "))
        ids = response.headers["X-Job-IDs"].split(",")
    jobs = [api.wait_job(i) for i in ids]
    assert [job["status"] for job in jobs] == ["cancelled"] * 3, jobs


def test_a_logit_bias_outside_the_vocabulary_is_a_400_naming_it(api, client):
    for stream in (True, False):
        response = api.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": stream,
                                                "logit_bias": {"685": 1}})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"].startswith("logit_bias: token id 685 is not in the vocabulary")
        assert error["param"] == "logit_bias"
    with pytest.raises(BadRequestError, match="not in the vocabulary"):
        client.chat.completions.create(model=DEMO_GPT, messages=MESSAGES, max_tokens=2,
                                       logit_bias={"99999": -5})
    native = api.post("/v1/inference", {"prompt": "x", "logit_bias": {"685": 1}})
    assert native.status_code == 422 and native.json()["error"]["type"] == "invalid_request"
    assert native.json()["error"]["param"] == "logit_bias"


def test_client_stream_usage_chunk(client):
    chunks = list(client.chat.completions.create(
        model="demo-gpt", messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1])
    text_chunks = list(client.completions.create(
        model="demo-gpt", prompt="p", max_tokens=2, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert text_chunks[-1].choices == [] and text_chunks[-1].usage.completion_tokens == 2


def test_client_embeddings_match_the_float_encoding(client, api):
    result = client.embeddings.create(model="demo-embed", input="a sentence")
    vector = result.data[0].embedding
    floats = api.post("/v1/embeddings", {"input": "a sentence", "encoding_format": "float"})
    assert len(vector) == 128
    assert vector == pytest.approx(floats.json()["data"][0]["embedding"], abs=1e-6)


def test_client_models_list(client):
    assert "demo-gpt" in {m.id for m in client.models.list()}


def test_client_models_retrieve(client, api):
    model = client.models.retrieve("demo-embed")
    assert (model.id, model.object, model.owned_by) == ("demo-embed", "model", "banterhearts")
    assert model.model_extra["kind"] == "embed" and model.model_extra["version"] >= 1
    missing = api.get("/v1/models/no-such-model")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "model_not_found"
    assert api.get("/v1/models/history").json()["object"] == "list"  # still the registry list


def test_client_sees_a_job_error_in_the_stream(client):
    with pytest.raises(APIError, match="tokens"):
        list(client.completions.create(model="demo-gpt", prompt=LONG_PROMPT, max_tokens=2,
                                       stream=True))


# ----------------------------------------------------------------------------- raw HTTP
def test_completion_shape_and_headers(api):
    response = api.post("/v1/completions", {"prompt": ["One prompt."], "max_tokens": 2,
                                            "temperature": 0, "user": "ignored"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == f"cmpl-{response.headers['X-Job-ID']}"
    assert body["object"] == "text_completion" and body["model"] == "demo-gpt"
    assert abs(body["created"] - time.time()) < 60
    assert body["choices"] == [{"index": 0, "text": expected(2), "finish_reason": "length",
                                "logprobs": None}]
    usage = body["usage"]
    assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2
    assert response.headers["X-Backend"] == "onnx"
    assert int(response.headers["X-Batch-Size"]) >= 1
    assert float(response.headers["X-Latency-MS"]) > 0


def test_chat_shape_with_text_parts(api):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "Go on."}]
    response = api.post("/v1/chat/completions", {"messages": messages, "max_tokens": 3,
                                                 "temperature": 0,
                                                 "stop": ["nothing matches this"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == f"chatcmpl-{response.headers['X-Job-ID']}"
    assert body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected(3)},
                                "finish_reason": "length", "logprobs": None}]
    assert body["usage"]["completion_tokens"] == 3
    assert response.headers["X-Backend"] == "onnx"


def test_a_developer_message_is_a_system_message_and_text_format_is_the_default(api):
    """Current OpenAI clients send the system prompt as role ``developer``; it is rendered as
    ``system``. ``response_format: {"type": "text"}`` is what this server does anyway."""
    def answer(messages, **extra):
        response = api.post("/v1/chat/completions", {"messages": messages, "max_tokens": 3,
                                                     "temperature": 0, **extra})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"], response.json()["choices"]

    developer = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
    assert answer(developer, response_format={"type": "text"}) == answer(MESSAGES)


def test_stop_string_ends_with_finish_reason_stop(api):
    body = api.post("/v1/completions", {"prompt": "x", "max_tokens": 10, "stop": " every",
                                        "temperature": 0}).json()
    assert body["choices"][0]["text"] == expected(2)
    assert body["choices"][0]["finish_reason"] == "stop"


def test_streamed_completion_lines(api):
    payloads = stream_raw(api, "/v1/completions", {"prompt": "x", "max_tokens": 3,
                                                   "temperature": 0,
                                                   "stream_options": {"include_usage": True}})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == WORDS[:3]
    assert chunks[3]["choices"] == [{"index": 0, "text": "", "finish_reason": "length",
                                     "logprobs": None}]
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 3
    assert len(chunks) == 5 and all(c["object"] == "text_completion" for c in chunks)


def test_streamed_chat_lines(api):
    payloads = stream_raw(api, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                        "temperature": 0})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": WORDS[0]}, {"content": WORDS[1]}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all("usage" not in c for c in chunks)


def test_a_job_that_fails_at_once_is_answered_with_its_status_streamed_or_not(api, client):
    """A prompt over the model's context fails as its job is admitted: a streamed call waits
    for that (sse.FIRST_EVENT_WAIT_S) and answers like an unstreamed one, as OpenAI does."""
    for stream in (True, False):
        response = api.post("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 2,
                                                "stream": stream})
        assert response.status_code == 400, response.text  # OpenAI's status; the rest: 422
        error = response.json()["error"]
        assert error["type"] == "prompt_too_long" and "tokens" in error["message"]
        assert error["code"] == "context_length_exceeded"
        job = api.get(f"/v1/jobs/{response.headers['X-Job-ID']}").json()
        assert job["status"] == "failed" and job["error"]["type"] == "prompt_too_long"
    with pytest.raises(BadRequestError, match="tokens"):
        client.chat.completions.create(model=DEMO_GPT, stream=True, max_tokens=2,
                                       messages=[{"role": "user", "content": LONG_PROMPT}])
    streamed = api.post("/v1/inference?stream=true", {"prompt": LONG_PROMPT, "max_tokens": 2})
    assert streamed.status_code == 422 and streamed.json()["error"]["type"] == "prompt_too_long"
    assert streamed.headers["X-Job-ID"]


def test_a_job_error_after_the_stream_went_out_is_a_data_line_then_done(api, settings,
                                                                        redis_client):
    """Past the first wait the stream goes out (200) and an error ends it as a data line: the
    job waits on a queue no worker serves, then is moved to the worker's."""
    with unserved_producer(settings, redis_client) as (server, queue):
        with requests.post(server.url + "/v1/completions", stream=True, timeout=60,
                           json={"prompt": LONG_PROMPT, "max_tokens": 2, "stream": True}) as response:
            assert response.status_code == 200, response.text
            assert redis_client.lmove(queue, settings.queue_interactive)
            payloads = data_lines(response)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "prompt_too_long" and error["code"] == "context_length_exceeded"


def test_a_choice_that_fails_after_the_stream_went_out_ends_it_and_stops_the_others(
        api, settings, redis_client):
    """n choices: one error line, for the choice that failed, then ``[DONE]``; the other
    choices are cancelled (a failure of any fails the request), not streamed on with their
    own error lines."""
    with unserved_producer(settings, redis_client) as (server, queue):
        with requests.post(server.url + "/v1/completions", stream=True, timeout=60, json={
                "prompt": LONG_PROMPT, "max_tokens": 2, "stream": True, "n": 3}) as response:
            assert response.status_code == 200, response.text
            ids = response.headers["X-Job-IDs"].split(",")
            assert redis_client.lmove(queue, settings.queue_interactive)  # one choice runs
            payloads = data_lines(response)
    assert payloads[-1] == "[DONE]" and len(payloads) == 2, payloads
    assert json.loads(payloads[0])["error"]["type"] == "prompt_too_long"
    statuses = sorted(redis_client.hget(keys.job(i), "status") for i in ids)
    assert statuses == ["cancelled", "cancelled", "failed"]


def test_the_prompt_counts_in_the_usage_when_the_first_choice_never_ran(api, settings,
                                                                        redis_client):
    """The first choice cancelled while queued (it counted no prompt tokens): the usage
    counts the prompt as the choice that ran did."""
    with unserved_producer(settings, redis_client) as (server, queue):
        with requests.post(server.url + "/v1/completions", stream=True, timeout=60, json={
                "prompt": "Say something.", "max_tokens": 2, "temperature": 0, "n": 2,
                "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200, response.text
            first, second = response.headers["X-Job-IDs"].split(",")
            assert Api(server.url).delete(f"/v1/jobs/{first}").status_code == 200
            for _ in (first, second):  # the cancelled job's message is dropped there
                assert redis_client.lmove(queue, settings.queue_interactive)
            payloads = data_lines(response)
    usage = json.loads(payloads[-2])["usage"]
    ran = redis_client.hget(keys.job(second), "usage")
    assert usage["prompt_tokens"] == json.loads(ran)["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 2


BAD_INPUTS = [
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "token-id"),
    ("/v1/completions", {"prompt": [[1, 2]]}, 400, "token-id"),
    ("/v1/completions", {"prompt": ["a", 1]}, 400, "'prompt[1]' must be a string"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "exactly one"),
    ("/v1/completions", {"prompt": []}, 400, "exactly one"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "'n' must be between 1 and 16"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "n": True}, 400, "'n'"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "'best_of' must equal 'n' (1)"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 1}, 400,
     "'best_of' must equal 'n' (3)"),
    ("/v1/completions", {"prompt": "x", "best_of": 0}, 400, "'best_of' must be between"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 0}, 400,
     "'echo' with 'logprobs' is not supported"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, 400, "'echo' must be true or false"),
    ("/v1/chat/completions", {"messages": MESSAGES, "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 2}, 400,
     "'logprobs' must be true or false"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400,
     "'top_logprobs' needs 'logprobs': true"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400,
     "'top_logprobs' must be between 0 and 20"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": []}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
     400, "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}}, 400,
     "'stream_options' is only allowed when 'stream' is true"),
    ("/v1/embeddings", {"input": "x", "user": {"a": 1}}, 400, "'user' must be a string"),
    ("/v1/completions", {"prompt": "x", "stream": True, "keep_running": "no"}, 400,
     "keep_running"),
    ("/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404, "no-such-model"),
    ("/v1/completions", {"prompt": "x", "stream": True, "model": "no-such-model"}, 404,
     "no-such-model"),
    ("/v1/completions", {"prompt": "x", "model": "demo-embed"}, 400, "embed"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [MESSAGES[0], {"role": "user", "content": 7}]}, 400,
     "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2.5}, 400, "'n'"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": 1}, 400, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 2,
                              "max_tokens": 3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "no-such-model"}, 404,
     "no-such-model"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "model": "no-such-model"},
     404, "no-such-model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 20000}]}, 400,
     "limit"),
    # unknown fields are refused, as OpenAI refuses them: a misspelt option must not run as
    # its default, nor a field that would change the output
    ("/v1/completions", {"prompt": "x", "max_token": 3}, 400, "'max_token'"),
    ("/v1/completions", {"prompt": "x", "max_completion_tokens": 3}, 400,
     "'max_completion_tokens'"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1.2}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temprature": 0.5}, 400, "temprature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "min_tokens": 4}, 400, "min_tokens"),
    ("/v1/embeddings", {"input": "x", "encoding": "float"}, 400, "'encoding'"),
    # OpenAI fields that would change the output, set to anything but their no-op value
    ("/v1/completions", {"prompt": "x", "logprobs": False}, 400,  # a count on completions
     "logprobs must be an integer from 0 to 20"),
    # OpenAI fields that do not change the output still have OpenAI's types
    ("/v1/chat/completions", {"messages": MESSAGES, "metadata": "x"}, 400,
     "'metadata' must be an object"),
    ("/v1/chat/completions", {"messages": MESSAGES, "store": "yes"}, 400,
     "'store' must be true or false"),
    ("/v1/chat/completions", {"messages": MESSAGES, "parallel_tool_calls": "x"}, 400,
     "'parallel_tool_calls' must be true or false"),
    ("/v1/completions", {"prompt": "x", "prompt_cache_key": 5}, 400,
     "'prompt_cache_key' must be a string"),
    ("/v1/chat/completions", {"messages": MESSAGES, "service_tier": ["auto"]}, 400,
     "'service_tier' must be a string"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": MESSAGES, "frequency_penalty": "1"}, 400,
     "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10**400}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 10**400}, 400,
     "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "temperature": -(10**400)}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"1": -101}}, 400,
     "logit_bias"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tool_choice": "required"}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": MESSAGES, "modalities": ["text", "audio"]}, 400,
     "modalities"),
    ("/v1/chat/completions", {"messages": MESSAGES, "web_search_options": {}}, 400,
     "web_search_options"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     400, "tool calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "extra": 1}]},
     400, "'extra'"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None,
                                            "function_call": {"name": "f", "arguments": "{}"}}]},
     400, "'messages[0].function_call': tool calls are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "extra": 1}]}]}, 400,
     "'messages[0].content[0]' has a field OpenAI does not define for a text part: 'extra'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "prompt_cache_breakpoint": 5}]}]}, 400,
     "'messages[0].content[0].prompt_cache_breakpoint' must be an object"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {
        "include_usage": True, "foo": 1}}, 400,
     "'stream_options' has a field OpenAI does not define for stream_options: 'foo'"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {
        "include_obfuscation": "no"}}, 400,
     "'stream_options.include_obfuscation' must be true or false"),
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "token ids"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, 400, "token ids"),
    ("/v1/embeddings", {"input": [["a"]]}, 400, "'input[0]' must be a non-empty string"),
    ("/v1/embeddings", {"input": ["a", 1]}, 400, "'input[1]' must be a non-empty string"),
    ("/v1/embeddings", {"input": "x", "dimensions": 64}, 400, "dimensions"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD_INPUTS)
def test_bad_input_gets_a_json_4xx_naming_the_field(api, path, body, status, needle):
    response = api.post(path, body)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"type", "message", "param", "code"}
    assert needle.lower() in error["message"].lower(), error


def test_an_error_names_its_field_and_openai_code(api, client):
    """Errors carry OpenAI's ``param`` and ``code``; the client raises ``BadRequestError`` for a
    request OpenAI would refuse, as code written for OpenAI expects."""
    error = api.post("/v1/completions", {"prompt": "x", "temperature": 3}).json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request", "temperature", None)
    error = api.post("/v1/completions", {"prompt": "x", "max_token": 3}).json()["error"]
    assert error["param"] == "max_token"
    with pytest.raises(BadRequestError) as raised:
        client.chat.completions.create(model="demo-gpt", messages=MESSAGES, n=20)
    assert raised.value.param == "n"
    with pytest.raises(BadRequestError) as raised:
        client.completions.create(model="demo-gpt", prompt=LONG_PROMPT, max_tokens=2)
    assert raised.value.code == "context_length_exceeded"
    with pytest.raises(NotFoundError) as raised:
        client.completions.create(model="no-such-model", prompt="x")
    assert (raised.value.code, raised.value.param) == ("model_not_found", "model")
    for path, body in (("/v1/inference", {"prompt": "x"}), ("/v1/jobs", {"kind": "generate",
                                                                         "input": "x"})):
        for model, status in (("no-such-model", 404), ("demo-embed", 422), ("demo-gpt@x", 422)):
            error = api.post(path, {**body, "model": model})
            assert error.status_code == status and error.json()["error"]["param"] == "model"
    wrong_kind = api.post("/v1/chat/completions", {"model": "demo-embed", "messages": MESSAGES})
    assert wrong_kind.status_code == 400 and wrong_kind.json()["error"]["param"] == "model"
    # the native API keeps its 422
    native = api.post("/v1/inference", {"prompt": "x", "temperature": 3})
    assert native.status_code == 422 and native.json()["error"]["param"] == "temperature"


def test_fields_that_do_not_change_the_output_are_accepted(api):
    base = {"prompt": "x", "max_tokens": 2, "temperature": 0}
    plain = api.post("/v1/completions", base).json()["choices"]
    harmless = {"user": "u1", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                "logprobs": None, "n": 1, "best_of": 1, "echo": False, "suffix": None,
                "top_k": -1, "seed": -1, "keep_running": None, "metadata": None}
    response = api.post("/v1/completions", {**base, **harmless})
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == plain
    chat = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    chat_plain = api.post("/v1/chat/completions", chat).json()["choices"]
    chat_harmless = {"metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                     "parallel_tool_calls": True, "tools": [], "tool_choice": "auto",
                     "modalities": ["text"], "logprobs": False, "top_logprobs": 0,
                     "reasoning_effort": "low", "prompt_cache_key": "k",
                     "safety_identifier": "s"}
    response = api.post("/v1/chat/completions", {**chat, **chat_harmless})
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == chat_plain
    spelled_out = [{"role": "system", "content": "Be brief.", "name": None},
                   {"role": "user", "content": [{"type": "text", "text": "Hello?",
                                                 "prompt_cache_breakpoint": {"mode": "explicit"}}],
                    "function_call": None, "tool_calls": None}]
    response = api.post("/v1/chat/completions", {**chat, "messages": spelled_out})
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == chat_plain
    floats = api.post("/v1/embeddings", {"input": "x", "encoding_format": None, "user": "u"})
    assert floats.status_code == 200 and isinstance(floats.json()["data"][0]["embedding"], list)


def test_without_temperature_it_samples_at_one_as_openai_does(api):
    """OpenAI's default temperature is 1: a request that sends none is sampled (its seed makes
    it reproducible), not greedy as the native API is."""
    def text(**extra):
        body = {"prompt": "zq xv", "max_tokens": 30, **extra}
        response = api.post("/v1/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    sampled = {seed: text(seed=seed) for seed in range(8)}
    assert sampled == {seed: text(seed=seed, temperature=1.0) for seed in range(8)}
    assert set(sampled.values()) != {greedy}
    assert text(seed=-(2**63)) == text(seed=-(2**63))  # any int64 seed, as OpenAI takes


def test_models_retrieve_takes_a_pinned_version(client, api):
    model = client.models.retrieve("demo-gpt@1")
    assert (model.id, model.model_extra["version"]) == ("demo-gpt@1", 1)
    assert api.get("/v1/models/demo-gpt@99").status_code == 404
    assert api.get("/v1/models/bad%20name").status_code == 404
    listed = api.get("/v1/models").json()["data"]
    assert all("path" not in m and "actor" not in m and "sha256" not in m for m in listed)


# ----------------------------------------------------------------------------- disconnects
def stream_then_disconnect(api, body: dict) -> str:
    """Open a streamed completion, read its first chunk, hang up; return the job id."""
    response = requests.post(api.url + "/v1/completions", json={**body, "stream": True},
                             stream=True, timeout=30)
    assert response.status_code == 200, response.text
    first = next(line for line in response.iter_lines(decode_unicode=True)
                 if line.startswith("data: "))
    response.close()
    job_id = response.headers["X-Job-ID"]
    assert json.loads(first[len("data: "):])["id"] == f"cmpl-{job_id}"
    return job_id


# greedy: sampled at OpenAI's default temperature (1.0) the demo model ends about one
# generation in 30 with its end-of-text token within 1,000 tokens, and such a job ends on its
# own, whatever the test is after
def test_disconnect_cancels_the_job(api):
    job_id = stream_then_disconnect(api, {"prompt": "bye", "max_tokens": 1000,  # the limit:
                                          "temperature": 0})  # the longest a job can run
    job = api.wait_job(job_id)  # so that it is still running at the disconnect
    assert job["status"] == "cancelled" and job["result"]["finish_reason"] == "cancelled", job
    assert job["usage"]["completion_tokens"] < 1000


def test_keep_running_survives_a_disconnect(api):
    job_id = stream_then_disconnect(api, {"prompt": "stay", "max_tokens": 100,
                                          "temperature": 0, "keep_running": True})
    job = api.wait_job(job_id)
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 100


# ----------------------------------------------------------------------------- chat template
def test_default_template_renders_role_lines():
    messages = parse_messages({"messages": MESSAGES})
    assert ChatTemplate().render(messages) == "system: Be brief.\nuser: Hello?\nassistant:"


def test_model_template_from_tokenizer_config(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    assert load_template(path) == ChatTemplate()
    path.write_text(json.dumps({"chat_template": "{% for m in messages %}...{% endfor %}"}))
    assert load_template(path) == ChatTemplate()
    path.write_text(json.dumps({"banter_chat_template": {"message": "<|{role}|>{content}\n",
                                                         "generation": "<|assistant|>"}}))
    rendered = load_template(path).render([("user", "a {role} b")])
    assert rendered == "<|user|>a {role} b\n<|assistant|>"


@pytest.mark.parametrize("text", ["{not json", json.dumps({"banter_chat_template": "x"}),
                                  json.dumps({"banter_chat_template": {"message": "{role}",
                                                                       "generation": ""}})])
def test_malformed_model_template_is_an_artifact_error(tmp_path, text):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(text)
    with pytest.raises(ArtifactError, match="tokenizer_config.json"):
        load_template(path)


def test_a_template_file_that_is_not_a_regular_file_is_an_artifact_error(tmp_path):
    """Not read (a FIFO's read would never end): refused at once."""
    path = tmp_path / "tokenizer_config.json"
    os.mkfifo(path)
    outcome: list[BaseException | ChatTemplate] = []

    def load() -> None:
        try:
            outcome.append(load_template(path))
        except ArtifactError as exc:
            outcome.append(exc)

    threading.Thread(target=load, daemon=True).start()
    deadline = time.monotonic() + 10
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcome and isinstance(outcome[0], ArtifactError), "load_template read the FIFO"
    assert "not a regular file" in str(outcome[0])


def test_a_chat_template_changed_or_broken_on_the_server_is_a_503_naming_no_path(
        api, settings, demo_models):
    """The template file is the server's: one edited after promote is a checksum_mismatch,
    one that holds no template a model_load_error; neither tells the caller where it lies."""
    name = f"templated-{uuid.uuid4().hex[:8]}"
    directory = settings.model_root / name
    shutil.copytree(demo_models[DEMO_GPT], directory)
    config = directory / "tokenizer_config.json"
    config.write_text(json.dumps({"banter_chat_template": {"message": "{content}\n",
                                                           "generation": ">"}}))
    body = {"model": name, "messages": MESSAGES, "max_tokens": 2}
    for step, (text, error_type) in enumerate([
            (None, None),
            (json.dumps({"banter_chat_template": {"message": "{role}: {content}\n",
                                                  "generation": ">"}}), "checksum_mismatch"),
            (json.dumps({"banter_chat_template": "x"}), "model_load_error")]):
        if text is not None:
            config.write_text(text)
        if step != 1:  # promoted as it is now (step 2: a shape only the producer checks)
            promoted = api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                                       "path": name})
            assert promoted.status_code == 201, promoted.text
        response = api.post("/v1/chat/completions", body)
        if error_type is None:
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == error_type and str(settings.model_root) not in error["message"]
