"""Every tiny model family (DeepSeek V2/V3, Qwen2/3-MoE, Mixtral) against HF transformers (the
reference) on tiny random models, fp32: prefill logits, cached decode vs recompute, greedy tokens
under the margin rule."""

import pytest
import torch

from tandem.runtime.loader import load_model
from tandem.testing.tiny import VARIANTS, write_tiny
from tests.conftest import Stepper, margin_steps, rel_err

transformers = pytest.importorskip("transformers")
BOUND = 1e-4  # fp32 logits, max|diff| / max|ref|


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp(request.param), request.param, seed=7)
    ours = load_model(path, torch.float32, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    return ours, ref


def prompt(n: int, vocab: int = 512, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_prefill_logits_match_hf(pair):
    ours, ref = pair
    tokens = prompt(64)
    expected = ref(torch.tensor([tokens])).logits[0]
    got = Stepper(ours).feed(tokens)
    assert rel_err(got, expected) <= BOUND


@torch.inference_mode()
def test_cached_decode_equals_recompute(pair):
    ours, _ = pair
    tokens = prompt(64, seed=5)
    full = Stepper(ours).feed(tokens)
    step = Stepper(ours)
    parts = [step.feed(tokens[:40])] + [step.feed([t]) for t in tokens[40:]]
    assert rel_err(torch.cat(parts), full) <= BOUND


@torch.inference_mode()
def test_greedy_tokens_match_hf_under_margin_rule(pair):
    ours, ref = pair
    start = prompt(8, seed=11)
    out = ref.generate(torch.tensor([start]), max_new_tokens=48, do_sample=False, min_new_tokens=48)
    seq = out[0].tolist()
    ref_logits = ref(out).logits[0, len(start) - 1 : -1]  # teacher-forced on HF's own tokens
    step = Stepper(ours)
    first = step.feed(start, all_logits=False)
    ours_logits = torch.cat([first] + [step.feed([t]) for t in seq[len(start) : -1]])
    assert rel_err(ours_logits, ref_logits) <= BOUND
    checked, bad = margin_steps(ours_logits, ref_logits, BOUND)
    assert checked >= 32 and not bad, (checked, bad)
