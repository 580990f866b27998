import math

import pytest
import torch

from tandem.errors import TandemError
from tandem.runtime.evaluate import perplexity
from tandem.runtime.llm import LLM
from tandem.testing.tiny import write_tiny


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(write_tiny(tmp_path_factory.mktemp("m"), "deepseek_v2_lite", seed=3), progress=False, max_context=64)


def reference_nll(llm, ids):
    logits = llm.engine.score(ids)
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()


def test_one_window_equals_direct_cross_entropy(llm):
    ids = list(range(5, 45))
    r = perplexity(llm.engine, ids, window=64, progress=False)
    assert r.tokens == 39
    assert math.isclose(r.nll * r.tokens, reference_nll(llm, ids), rel_tol=1e-6)


def test_sliding_windows_score_every_token_once(llm):
    ids = [(i * 37) % 500 + 3 for i in range(150)]
    r = perplexity(llm.engine, ids, window=32, stride=16, progress=False)
    assert r.tokens == len(ids) - 1
    # Non-overlapping windows (stride == window) equal the sum of per-window cross entropies; the
    # first token of each window has no context there and is not scored.
    full = perplexity(llm.engine, ids, window=32, stride=32, progress=False)
    expected = sum(reference_nll(llm, ids[s : s + 32]) for s in range(0, 149, 32))
    assert math.isclose(full.nll * full.tokens, expected, rel_tol=1e-6)
    assert full.tokens == sum(len(ids[s : s + 32]) - 1 for s in range(0, 149, 32))


def test_bad_arguments(llm):
    with pytest.raises(TandemError, match="too short"):
        perplexity(llm.engine, [1], window=8, progress=False)
    with pytest.raises(TandemError, match="stride"):
        perplexity(llm.engine, [1, 2, 3], window=8, stride=9, progress=False)
    with pytest.raises(TandemError, match="can score"):
        llm.engine.score(list(range(100)))
