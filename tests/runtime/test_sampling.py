"""Sampler: greedy, seeding, top-k/top-p/min-p sets, penalties vs transformers, parameter checks."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from tandem.errors import TandemError
from tandem.runtime.sampling import (
    SamplingParams,
    _presence_frequency_penalty,
    _repetition_penalty,
    load_generation_defaults,
    make_generator,
    sample,
)

logits_process = pytest.importorskip("transformers.generation.logits_process")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: torch's thread pool only adds overhead, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _draw(logits_row: torch.Tensor, params: SamplingParams, n: int = 400) -> list[int]:
    """n draws for one request, continuing one seeded generator."""
    gen = make_generator(params)
    return [sample(logits_row[None], [params], [gen], [[]]).tokens[0] for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams()] * 5
    assert sample(logits, params, [None] * 5, [[]] * 5).tokens == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=1.5, seed=7)

    def run(batch_params, row):
        gens = [make_generator(q) for q in batch_params]
        rows = logits[: len(batch_params)].clone()
        rows[row] = logits[0]
        return [sample(rows, batch_params, gens, [[]] * len(batch_params)).tokens[row] for _ in range(30)]

    alone = run([p], 0)
    assert alone == run([p], 0)
    assert alone == run([other, p, other], 1)  # neighbours in the batch do not disturb the stream
    assert alone != run([SamplingParams(temperature=1.0, seed=4321)], 0)
    assert make_generator(SamplingParams()) is None


def test_top_k_1_is_greedy():
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(4)]
    gens = [make_generator(p) for p in params]
    for _ in range(5):
        assert sample(logits, params, gens, [[]] * 4).tokens == logits.argmax(-1).tolist()


def test_top_p_and_min_p_keep_only_the_allowed_set():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log()
    # top_p=0.75: the tail 0.04+0.06+0.1 stays within 1-0.75, so it goes; {0, 1} remain.
    assert set(_draw(logits, SamplingParams(temperature=1.0, top_p=0.75, seed=0))) == {0, 1}
    # min_p=0.3: threshold 0.3*0.5 = 0.15 keeps {0, 1}; min_p=0.15 -> 0.075 also keeps 2.
    assert set(_draw(logits, SamplingParams(temperature=1.0, min_p=0.3, seed=0))) == {0, 1}
    assert set(_draw(logits, SamplingParams(temperature=1.0, min_p=0.15, seed=0))) == {0, 1, 2}
    assert set(_draw(logits, SamplingParams(temperature=1.0, top_k=3, seed=0))) == {0, 1, 2}
    assert set(_draw(logits, SamplingParams(temperature=1.0, seed=0))) == {0, 1, 2, 3, 4}
    # Temperature comes first: at T=4 the distribution is flat enough that top_p=0.75 keeps 4 tokens.
    assert set(_draw(logits, SamplingParams(temperature=4.0, top_p=0.75, seed=0))) == {0, 1, 2, 3}


def test_batched_filters_match_transformers_per_row():
    # Rows with different settings in one call; each must sample only from the set HF's warpers keep.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, generator=gen) * 2
    params = [
        SamplingParams(temperature=0.7, top_k=4, seed=1),
        SamplingParams(temperature=1.0, top_p=0.6, seed=2),
        SamplingParams(temperature=1.5, min_p=0.2, seed=3),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.8, min_p=0.05, seed=4),
    ]
    allowed = []
    for row, p in zip(logits, params):
        procs = [logits_process.TemperatureLogitsWarper(p.temperature)]
        if p.top_k:
            procs.append(logits_process.TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            procs.append(logits_process.TopPLogitsWarper(p.top_p))
        if p.min_p:
            procs.append(logits_process.MinPLogitsWarper(p.min_p))
        scores = logits_process.LogitsProcessorList(procs)(torch.zeros(1, 1, dtype=torch.long), row[None].clone())
        allowed.append((scores[0].isfinite().nonzero().flatten().tolist(), scores[0].softmax(-1)))
    gens = [make_generator(p) for p in params]
    seen = [set() for _ in params]
    for _ in range(300):
        for i, token in enumerate(sample(logits, params, gens, [[]] * 4).tokens):
            seen[i].add(token)
    for i, (keep, probs) in enumerate(allowed):
        assert seen[i] <= set(keep), f"row {i} sampled outside HF's kept set"
        assert {t for t in keep if probs[t] > 0.03} <= seen[i], f"row {i} never drew a likely token"


def test_repetition_penalty_matches_transformers():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 64, generator=gen) * 3
    histories = [[1, 5, 5, 9, 63, 0], [2, 3, 40, 41, 40], [7]]
    for penalty in (1.3, 0.7):
        hf = logits_process.RepetitionPenaltyLogitsProcessor(penalty)
        for row, hist in zip(logits, histories):
            expected = hf(torch.tensor([hist]), row[None].clone())[0]
            torch.testing.assert_close(_repetition_penalty(row, hist, penalty), expected)


def test_repetition_penalty_changes_greedy_choice_like_transformers():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 32, generator=gen)
    histories = [logits[i].topk(3).indices.tolist() + [0] for i in range(8)]  # the favourites were seen
    hf = logits_process.RepetitionPenaltyLogitsProcessor(2.0)
    expected = [hf(torch.tensor([h]), logits[i : i + 1].clone()).argmax().item() for i, h in enumerate(histories)]
    params = [SamplingParams(repetition_penalty=2.0)] * 8
    got = sample(logits, params, [None] * 8, histories).tokens
    assert got == expected
    assert got != logits.argmax(-1).tolist()
    assert torch.equal(logits, torch.randn(8, 32, generator=torch.Generator().manual_seed(5)))  # input untouched


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    row = torch.zeros(6)
    out = _presence_frequency_penalty(row, [2, 2, 2, 4], presence=0.5, frequency=0.25)
    assert out.tolist() == [0, 0, -1.25, 0, -0.75, 0]
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0]])
    history = [0, 0, 1]  # prompt [0, 0], generated [1]
    p = SamplingParams(presence_penalty=0.5)
    assert sample(logits, [p], [None], [history], prompt_lens=[2]).tokens == [0]  # prompt tokens are not penalized
    assert sample(logits, [p], [None], [history], prompt_lens=[0]).tokens == [2]
    # Frequency scales with the count (token 0 seen twice), presence does not.
    assert sample(logits, [SamplingParams(frequency_penalty=0.12)], [None], [history], prompt_lens=[0]).tokens == [2]
    assert sample(logits, [SamplingParams(presence_penalty=0.12)], [None], [history], prompt_lens=[0]).tokens == [0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.1},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"seed": -1},
        {"stop": ("ok", "")},
        {"stop_token_ids": (-1,)},
        {"ignore_eos": "yes"},
    ],
)
def test_bad_params_raise_tandem_error(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(TandemError, match=name):
        SamplingParams(**kwargs)


def test_params_accept_lists_and_a_single_stop_string():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4])
    assert p.stop == ("a", "b") and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


def test_load_generation_defaults(tmp_path, caplog):
    assert load_generation_defaults(tmp_path) == {}
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                "repetition_penalty": 1.05, "eos_token_id": [1, 2], "max_length": 100}))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                  "repetition_penalty": 1.05}
    path.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_p": 0.95}))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.95}
    SamplingParams(**load_generation_defaults(tmp_path))
    path.write_text(json.dumps({"top_p": 1.5, "temperature": 0.7}))  # one bad value: left out, named
    with caplog.at_level(logging.WARNING, logger="tandem.runtime.sampling"):
        assert load_generation_defaults(tmp_path) == {"temperature": 0.7}
    assert "generation_config.json" in caplog.text and "top_p = 1.5" in caplog.text
    path.write_text("{oops")
    with pytest.raises(TandemError, match="generation_config.json"):
        load_generation_defaults(tmp_path)


def test_tiny_temperatures_are_greedy_and_extreme_penalties_are_refused():
    """A temperature that would overflow float32 logits (1e-300: inf, then NaN probabilities)
    samples greedily; repetition penalties that would overflow them are refused; a row whose
    probabilities still come out non-finite draws its argmax and leaves the batch's other rows alone."""
    from tandem.runtime.sampling import MIN_TEMPERATURE

    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=MIN_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy
    for bad in (1e-300, 1e-3, 1e3):
        with pytest.raises(TandemError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)
    logits = torch.randn(3, 50)
    logits[1, 7] = float("inf")  # an overflowed row
    params = [SamplingParams(temperature=1.0, seed=1)] * 3
    gens = [torch.Generator().manual_seed(1) for _ in params]
    got = sample(logits, params, gens, [[]] * 3).tokens
    assert got[1] == 7 and all(0 <= t < 50 for t in got)
    with pytest.raises(TandemError, match="at most 16"):
        SamplingParams(stop=tuple(f"s{i}" for i in range(17)))
    with pytest.raises(TandemError, match="at most 1024 characters"):
        SamplingParams(stop=("x" * 1025,))


def test_rows_with_nan_logits_are_flagged():
    from tandem.runtime.sampling import NAN_LOGITS

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    logits[1, 7] = float("nan")
    logits[2, 9:12] = float("nan")
    logits[3, :40] = float("-inf")  # masked entries are fine
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1)
    for params in ([greedy] * 5, [hot] * 5):
        got = sample(logits, params, [None] * 5, [[]] * 5).tokens
        assert got[1] == got[2] == NAN_LOGITS
        assert all(0 <= got[i] < 50 for i in (0, 3, 4)) and got[3] >= 40
    assert sample(logits, [greedy] * 5, [None] * 5, [[]] * 5).tokens[0] == int(logits[0].argmax())


def test_logit_bias_forces_bans_and_leaves_other_rows_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    top = int(logits[0].argmax())
    plain = SamplingParams()
    forced = SamplingParams(logit_bias={7: 100.0})
    banned = SamplingParams(logit_bias=((top, -100.0),))
    tokens = sample(logits, [banned, forced, plain], [None] * 3, [[1], [1], [1]]).tokens
    assert tokens[0] != top and tokens[0] == int(logits[0].topk(2).indices[1])
    assert tokens[1] == 7 and tokens[2] == int(logits[2].argmax())
    assert forced.logit_bias == ((7, 100.0),)
    for bad in ({1: 101.0}, {-1: 1.0}, {1.5: 1.0}, {i: 1.0 for i in range(301)}, {1: float("nan")}, {1: 10**400}):
        with pytest.raises(TandemError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
