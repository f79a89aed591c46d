import math
from dataclasses import replace

import numpy as np
import pytest

from banter.errors import InvalidRequest
from banter.params import SamplingParams
from workers.sampling import adjust, logprobs, sample

LIMIT = 256


def test_defaults_and_unknown_keys_refused():
    params = SamplingParams.from_dict({"temperature": None}, LIMIT)
    assert params == SamplingParams()
    assert SamplingParams.from_dict({}, 8).max_tokens == 8
    with pytest.raises(InvalidRequest, match="unknown sampling parameter 'max_token': the "
                                             "parameters are max_tokens, temperature"):
        SamplingParams.from_dict({"max_token": 100}, LIMIT)


def test_valid_values_are_normalised():
    params = SamplingParams.from_dict(
        {"max_tokens": LIMIT, "temperature": 1, "top_p": 0.5, "top_k": 40, "seed": 2**63 - 1,
         "stop": "\n"}, LIMIT)
    assert params == SamplingParams(LIMIT, 1.0, 0.5, 40, 2**63 - 1, ("\n",))
    assert isinstance(params.temperature, float)
    assert SamplingParams.from_dict({"stop": ["a", "b" * 64]}, LIMIT).stop == ("a", "b" * 64)
    # any int64 seed, as OpenAI takes; top_k -1 is vLLM's "off", the same as 0
    assert SamplingParams.from_dict({"seed": -(2**63), "top_k": -1}, LIMIT) == SamplingParams(
        seed=-(2**63), top_k=0)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", 0), ("max_tokens", LIMIT + 1), ("max_tokens", 2.0),
    ("max_tokens", "8"),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.1),
    ("temperature", 2.01), ("temperature", True), ("temperature", "0.5"),
    ("top_p", 0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", False), ("top_p", [0.5]),
    ("top_k", -2), ("top_k", 2.0), ("top_k", False), ("top_k", "3"), ("top_k", 2**31),
    ("top_k", 10**30),
    ("seed", -(2**63) - 1), ("seed", 2**63), ("seed", True), ("seed", 1.0),
    ("stop", ""), ("stop", [""]), ("stop", ["a"] * 5), ("stop", "x" * 65), ("stop", [1]),
    ("stop", 5), ("stop", {"a": 1}),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", True),
    ("presence_penalty", "1"), ("frequency_penalty", math.nan), ("frequency_penalty", 3),
    ("logit_bias", [[1, 2]]), ("logit_bias", "x"), ("logit_bias", {"a": 1}),
    ("logit_bias", {"-1": 1}), ("logit_bias", {"1.5": 1}), ("logit_bias", {" 1": 1}),
    ("logit_bias", {"2147483648": 1}), ("logit_bias", {"1": 100.5}), ("logit_bias", {"1": True}),
    ("logit_bias", {"1": "5"}), ("logit_bias", {"1": math.inf}), ("logit_bias", {"1": 1, "01": 2}),
    ("logit_bias", {str(i): 1 for i in range(1025)}),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", 2.0),
    ("temperature", 10**400), ("presence_penalty", -(10**400)), ("logit_bias", {"1": 10**400}),
])
def test_bad_field_is_rejected_by_name(field, value):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams.from_dict({field: value}, LIMIT)
    assert field in err.value.message


def test_logit_adjustments_are_read_and_written_as_openai_spells_them():
    wire = {"presence_penalty": -2, "frequency_penalty": 0.25,
            "logit_bias": {"50256": -100, "7": 2.5, "9": 0, "0": 100}, "logprobs": 20}
    params = SamplingParams.from_dict(wire, LIMIT)
    assert params.presence_penalty == -2.0 and params.frequency_penalty == 0.25
    assert params.logit_bias == ((0, 100.0), (7, 2.5), (50256, -100.0))  # sorted; 0 dropped
    assert params.adjusts and not SamplingParams().adjusts and params.logprobs == 20
    assert SamplingParams.from_dict({"logprobs": 0}, LIMIT).logprobs == 0  # on, no alternatives
    assert SamplingParams.from_dict(params.wire(), LIMIT) == params
    # unset, they are left out of a job's parameters, which a worker that predates them reads
    assert set(SamplingParams(max_tokens=3, seed=1).wire()) == {
        "max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
    assert SamplingParams.from_dict({"logit_bias": {}}, LIMIT) == SamplingParams()
    assert SamplingParams.from_dict({"logit_bias": {str(i): 1 for i in range(1024)}},
                                    LIMIT).adjusts


def test_adjust_adds_the_bias_and_penalises_generated_tokens():
    logits = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert adjust(logits, SamplingParams(), {3: 5}) is logits  # nothing to change
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias=((0, 10.0), (2, -1.0)))
    scores = adjust(logits, params, {3: 2, 1: 1})
    assert scores.tolist() == [11.0, 2.0 - 0.75, 2.0, 4.0 - 1.25]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # the pass's row is not written to
    assert sample(scores, replace(params, temperature=0.0), np.random.default_rng(0)) == 0


def test_logprobs_are_a_log_softmax_and_its_best():
    logits = np.array([2.0, 0.5, 2.0, -1.0, 1.0], dtype=np.float32)
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    chosen, best = logprobs(logits, 3, 3)
    assert chosen == pytest.approx(logp[3])
    assert [i for i, _ in best] == [0, 2, 4]  # a tie goes to the lower id
    assert [lp for _, lp in best] == pytest.approx([logp[0], logp[2], logp[4]])
    assert logprobs(logits, 1, 0)[1] == [] and len(logprobs(logits, 1, 99)[1]) == 5
    flat = np.zeros(1000, dtype=np.float32)  # ties across the cut: the lowest ids win them
    flat[500] = 1.0
    assert [i for i, _ in logprobs(flat, 0, 5)[1]] == [500, 0, 1, 2, 3]


def test_not_an_object_is_rejected():
    with pytest.raises(InvalidRequest):
        SamplingParams.from_dict(["max_tokens", 3], LIMIT)


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0)) == 1


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    params = SamplingParams(temperature=1.5, top_p=0.95, top_k=100, seed=7)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample(logits, params, rng) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_temperature_follows_the_softmax():
    logits = np.array([0.0, math.log(3.0)])
    rng = np.random.default_rng(0)
    picks = [sample(logits, SamplingParams(temperature=1.0), rng) for _ in range(4000)]
    assert abs(np.mean(picks) - 0.75) < 0.03


def test_top_k_and_top_p_filter():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    top2 = {sample(logits, SamplingParams(temperature=2.0, top_k=2), rng) for _ in range(300)}
    assert top2 == {0, 1}
    # softmax(logits) ~ [.64, .24, .09, ...]: top_p 0.7 keeps the first two
    nucleus = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert nucleus == {0, 1}
    tiny = {sample(logits, SamplingParams(temperature=1.0, top_p=1e-9), rng) for _ in range(50)}
    assert tiny == {0}


def test_sampling_is_numerically_stable():
    logits = np.array([1e30, -1e30, 1e30 - 1e24, 0.0], dtype=np.float32)
    picks = {sample(logits, SamplingParams(temperature=0.01), np.random.default_rng(i))
             for i in range(20)}
    assert picks <= {0, 2}


@pytest.mark.parametrize("temperature", [1e-308, 5e-324])
def test_a_tiny_temperature_is_as_good_as_greedy(temperature):
    """Scores divided by a temperature near zero overflow; the top token must still win."""
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=temperature, seed=1)
    assert {sample(logits, params, np.random.default_rng(i)) for i in range(20)} == {1}
