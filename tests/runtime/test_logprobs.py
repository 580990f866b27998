"""Logprobs of generated tokens: the model's raw log_softmax at each step (checked against a
teacher-forced recompute), top lists, rows that do not ask pay nothing and keep their tokens,
one host transfer per step."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tandem.errors import TandemError
from tandem.runtime.llm import LLM
from tandem.runtime.logprobs import MAX_LOGPROBS
from tandem.runtime.sampling import NAN_LOGITS, SamplingParams, make_generator, sample
from tandem.testing.tiny import write_tiny
from tests.conftest import Stepper
from tests.runtime.test_sampling import _one_thread  # noqa: F401 - the same autouse fixture: one torch thread

# Device -> host transfers a function can cause (each one waits for the GPU on a real machine).
HOST_SYNCS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class _Calls(TorchFunctionMode):
    """Records the name of every torch function and Tensor method called inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> list[str]:
        return [n for n in self.names if n in HOST_SYNCS]


def _logits(rows: int = 6, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits, params, histories=None):
    gens = [make_generator(p) for p in params]
    return sample(logits, params, gens, histories or [[]] * len(params))


def test_params_check_the_logprobs_count():
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS
    for bad in (-1, MAX_LOGPROBS + 1, True, 2.0, "3"):
        with pytest.raises(TandemError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_values_are_the_raw_log_softmax_whatever_the_sampling_settings():
    logits = _logits()
    logits[3, 7] = logits[3].max() + 0.1  # row 3's raw favourite, which its penalties push down
    params = [
        SamplingParams(logprobs=5),  # greedy
        SamplingParams(logprobs=3, temperature=0.7, top_k=10, seed=1),
        SamplingParams(logprobs=0, temperature=1.3, top_p=0.8, min_p=0.05, seed=2),
        SamplingParams(logprobs=MAX_LOGPROBS, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0),
        SamplingParams(logprobs=1, temperature=0.5, repetition_penalty=0.8, seed=3),
        SamplingParams(logprobs=2),
    ]
    histories = [[], [], [], [7, 7, 7], [1, 2, 3], []]
    out = _sample(logits, params, histories=histories)
    ref = logits.log_softmax(-1)
    for row, (token, lp, p) in enumerate(zip(out.tokens, out.logprobs, params)):
        assert lp.token == token
        assert lp.logprob == pytest.approx(ref[row, token].item(), abs=1e-6)
        assert len(lp.top) == p.logprobs
        ids = [t for t, _ in lp.top]
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert ids == ref[row].topk(p.logprobs).indices.tolist()
        assert values == pytest.approx(ref[row, ids].tolist(), abs=1e-6)
    # Greedy without penalties: the chosen token is the most likely one, first in the list.
    assert out.logprobs[0].top[0][0] == out.tokens[0] == int(logits[0].argmax())
    assert out.logprobs[5].top[0] == (out.tokens[5], out.logprobs[5].logprob)
    # The penalized greedy row chose another token than the raw favourite, which still tops its list.
    assert out.tokens[3] != 7 and out.logprobs[3].top[0][0] == 7


def test_rows_that_do_not_ask_get_none_and_the_same_tokens():
    logits = _logits(rows=8, seed=1)
    plain = [SamplingParams(temperature=1.0, seed=10 + i) if i % 3 else SamplingParams() for i in range(8)]
    asking = [SamplingParams(temperature=p.temperature, seed=p.seed, logprobs=4) if i in (1, 3, 6) else p
              for i, p in enumerate(plain)]
    without = _sample(logits, plain)
    mixed = _sample(logits, asking)
    assert mixed.tokens == without.tokens
    assert without.logprobs == [None] * 8
    assert [i for i, lp in enumerate(mixed.logprobs) if lp is not None] == [1, 3, 6]


def test_unseeded_rows_draw_the_same_tokens_beside_rows_that_ask():
    """Rows without a seed draw from the global RNG: computing logprobs must not consume it."""
    logits = _logits(rows=4, seed=2)
    plain = [SamplingParams(temperature=1.0) for _ in range(4)]
    asking = [SamplingParams(temperature=1.0, logprobs=3) if i == 2 else p for i, p in enumerate(plain)]
    torch.manual_seed(7)
    without = [_sample(logits, plain).tokens for _ in range(5)]
    torch.manual_seed(7)
    mixed = [_sample(logits, asking).tokens for _ in range(5)]
    assert mixed == without


def test_nobody_asking_does_no_extra_work_and_one_transfer():
    logits = _logits()
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1)] * 3
    with _Calls() as calls:
        _sample(logits, params)
    assert calls.syncs == ["tolist"]
    assert not {"log_softmax", "topk", "cat", "double", "index_select"} & set(calls.names)


@pytest.mark.parametrize("who", [[0, 1, 2, 3, 4, 5], [1, 4]])
def test_logprobs_come_back_in_the_same_transfer_as_the_tokens(who):
    logits = _logits()
    params = [SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, logprobs=3 if i in who else None)
              for i in range(6)]
    with _Calls() as calls:
        out = _sample(logits, params)
    assert calls.syncs == ["tolist"]
    assert [i for i, lp in enumerate(out.logprobs) if lp is not None] == who


def test_a_nan_row_gets_no_logprobs_and_spares_the_others():
    logits = _logits(rows=3)
    logits[1, 5] = float("nan")
    out = _sample(logits, [SamplingParams(logprobs=2)] * 3)
    assert out.tokens[1] == NAN_LOGITS and out.logprobs[1] is None
    assert out.logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1).max().item(), abs=1e-6)
    assert out.logprobs[2].top[0][0] == out.tokens[2]


def test_top_list_is_capped_by_the_vocabulary():
    logits = _logits(rows=2, vocab=5)
    out = _sample(logits, [SamplingParams(logprobs=MAX_LOGPROBS), SamplingParams(logprobs=3)])
    assert len(out.logprobs[0].top) == 5 and len(out.logprobs[1].top) == 3
    assert sum(torch.tensor([v for _, v in out.logprobs[0].top]).exp().tolist()) == pytest.approx(1.0, abs=1e-5)


# --- end to end on a tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    # Plain-torch experts keep the whole forward in fp32 (the CPU engine's BF16 experts round
    # differently at T=1 and T=14), so the recompute agrees to fp32 rounding.
    path = write_tiny(tmp_path_factory.mktemp("v3lp"), "deepseek_v3", seed=5)
    return LLM(path, dtype="float32", progress=False, max_context=256, max_batch=4, experts="torch")


def _teacher_forced(llm, prompt_ids, token_ids) -> torch.Tensor:
    """log_softmax of the logits that predicted each generated token, from one full recompute."""
    logits = Stepper(llm.model).feed(prompt_ids + token_ids)
    n = len(prompt_ids)
    return logits[n - 1 : n - 1 + len(token_ids)].log_softmax(-1)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.2, top_k=40, seed=3)])
def test_generated_logprobs_equal_log_softmax_of_the_models_logits(llm, sampling):
    out = llm.generate("The quick brown fox", max_new_tokens=10, ignore_eos=True, logprobs=5, **sampling)
    assert len(out.logprobs) == len(out.token_ids) == 10
    ref = _teacher_forced(llm, out.prompt_token_ids, out.token_ids)
    for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token == token
        assert lp.logprob == pytest.approx(ref[step, token].item(), abs=1e-5)
        ids = [t for t, _ in lp.top]
        assert len(ids) == 5 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert [v for _, v in lp.top] == pytest.approx(ref[step, ids].tolist(), abs=1e-5)
        assert ref[step, ids[-1]] >= ref[step].topk(6).values[-1] - 1e-5  # really the 5 most likely
        if sampling["temperature"] == 0:
            assert ids[0] == token
    # Same tokens as a request that does not ask.
    assert llm.generate("The quick brown fox", max_new_tokens=10, ignore_eos=True, **sampling).token_ids == \
        out.token_ids


def test_generation_without_logprobs_reports_none(llm):
    out = llm.generate("hello", max_new_tokens=3, temperature=0)
    assert out.logprobs is None


def test_engine_batch_mixing_requests_with_and_without_logprobs(llm):
    """Concurrent requests (chunked prefill and decodes in shared steps): the ones that do not ask
    get the tokens of a run where nobody asks, and no logprobs; the ones that ask get theirs."""
    engine = llm.engine
    prompts = [llm.tokenizer.encode(t) for t in ("The quick brown fox", "hello world", "def fibonacci(n):", "Paris")]

    def run(asking: set[int]):
        ids = []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=0.9 if i % 2 else 0, seed=i, max_new_tokens=6, ignore_eos=True,
                                    logprobs=2 if i in asking else None)
            ids.append(engine.add_request(prompt, params))
        out = {i: [] for i in ids}
        while engine.has_work():
            for o in engine.step():
                out[o.seq_id].append(o)
        return [out[i] for i in ids]

    plain = run(set())
    mixed = run({1, 2})
    for i, (a, b) in enumerate(zip(plain, mixed)):
        assert [o.token for o in a] == [o.token for o in b]
        assert all(o.logprobs is None for o in a)
        assert all((o.logprobs is not None) == (i in (1, 2)) for o in b)
    for i in (1, 2):
        ref = _teacher_forced(llm, prompts[i], [o.token for o in mixed[i]])
        got = torch.tensor([o.logprobs.logprob for o in mixed[i]])
        want = ref.gather(1, torch.tensor([[o.token] for o in mixed[i]]))[:, 0]
        assert torch.allclose(got, want, atol=1e-5)
