"""Structured output's pieces: grammars from JSON schemas, token masks, constrained decoding."""

import json

import pytest
import torch

from tandem.errors import TandemError
from tandem.runtime.grammar import Grammars, apply_masks, bitmask_width, json_grammar, new_bitmask
from tandem.runtime.tokenizer import Tokenizer
from tandem.testing.tiny import write_tiny

# Bounded values: random weights would otherwise write digits until max_tokens.
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(write_tiny(tmp_path_factory.mktemp("grammar"), "qwen3_moe", seed=1))


def decode_constrained(tokenizer, grammar: str, vocab: int, seed: int, steps: int = 200) -> tuple[str, bool]:
    """Random logits, masked and sampled greedily until the grammar is complete."""
    constraint = Grammars(tokenizer, vocab).constraint(grammar)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(steps):
        if constraint.done:
            break
        logits = torch.randn(3, vocab, generator=g)
        mask = new_bitmask(1, vocab)
        constraint.fill(mask, 0)
        apply_masks(logits, [1], mask)
        token = int(logits[1].argmax())
        assert torch.isfinite(logits[1, token])
        out.append(token)
        assert constraint.advance(token)
    return tokenizer.decode([t for t in out if t not in tokenizer.eos_ids]), constraint.done


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_decode_to_text_that_follows_the_schema(tokenizer, seed):
    text, done = decode_constrained(tokenizer, json_grammar(SCHEMA), tokenizer.vocab_size, seed)
    value = json.loads(text)
    assert done and set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_any_json_object_without_a_schema(tokenizer):
    text, done = decode_constrained(tokenizer, json_grammar(None), tokenizer.vocab_size, seed=7, steps=400)
    assert done and isinstance(json.loads(text), dict)


def test_ids_past_the_tokenizer_are_never_allowed(tokenizer):
    vocab = tokenizer.vocab_size + 40  # models pad their vocabulary past the tokenizer's
    constraint = Grammars(tokenizer, vocab).constraint(json_grammar(SCHEMA))
    mask = new_bitmask(1, vocab)
    constraint.fill(mask, 0)
    logits = torch.zeros(1, vocab)
    apply_masks(logits, [0], mask)
    assert torch.isinf(logits[0, tokenizer.vocab_size:]).all()
    assert torch.isfinite(logits[0]).sum() > 0


def test_masks_apply_bit_by_bit_to_their_rows_only():
    vocab = 70
    bitmask = torch.zeros(2, bitmask_width(vocab), dtype=torch.int32)
    allowed = {0: [0, 31, 32, 69], 1: [5, 63, 64]}
    for i, ids in allowed.items():
        for t in ids:
            bitmask[i, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    logits = torch.randn(4, vocab)
    before = logits.clone()
    apply_masks(logits, [3, 1], bitmask)
    for row, ids in ((3, allowed[0]), (1, allowed[1])):
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert finite == ids and torch.equal(logits[row, ids], before[row, ids])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])


@pytest.mark.parametrize("schema, message", [
    ({"type": "bogus"}, "bogus"),
    ([1, 2], "JSON object"),
])
def test_bad_schemas_are_refused_when_the_request_is_made(schema, message):
    with pytest.raises(TandemError, match=message):
        json_grammar(schema)


def test_a_token_outside_the_mask_is_refused(tokenizer):
    constraint = Grammars(tokenizer, tokenizer.vocab_size).constraint(json_grammar(SCHEMA))
    bad = tokenizer.encode("hello", add_special_tokens=False)[0]
    assert not constraint.advance(bad) and constraint.error


# --- in the Engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tandem.runtime.llm import LLM

    return LLM(write_tiny(tmp_path_factory.mktemp("grammar-llm"), "qwen3_moe", seed=4), dtype="float32",
               progress=False, max_context=256, max_batch=4)


def run_all(engine, requests, texts=None):
    """(tokens, finish reason) of each request run together; `texts` (a dict) gets their emitted text."""
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    out = {i: ([], None) for i in ids}
    emitted = {i: "" for i in ids}
    while engine.has_work():
        for o in engine.step():
            tokens, _ = out[o.seq_id]
            out[o.seq_id] = (tokens + [o.token], o.finish_reason)
            emitted[o.seq_id] += o.text
    if texts is not None:
        texts.update((n, emitted[i]) for n, i in enumerate(ids))
    return [out[i] for i in ids]


def test_constrained_requests_give_schema_json_and_leave_their_batch_alone(llm):
    from tandem.runtime.sampling import SamplingParams

    engine, tok = llm.engine, llm.tokenizer
    prompts = [tok.encode(text) for text in ("Give me JSON", "Tell a story", "Another one please")]
    free = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    constrained = [SamplingParams(temperature=0, max_new_tokens=200, grammar=json_grammar(SCHEMA)),
                   SamplingParams(temperature=0.9, seed=5, max_new_tokens=200, grammar=json_grammar(SCHEMA))]
    alone = run_all(engine, [(prompts[1], free)])
    together = run_all(engine, [(prompts[0], constrained[0]), (prompts[1], free), (prompts[2], constrained[1])])
    assert together[1] == alone[0]  # the unconstrained row picks exactly what it picks alone
    for tokens, reason in (together[0], together[2]):
        value = json.loads(tok.decode(tokens))
        assert reason == "stop" and set(value) == {"n", "ok"} and 0 <= value["n"] <= 999
        assert isinstance(value["ok"], bool)
    assert engine.cache.free_blocks == engine.cache.num_blocks and not engine._constraints


def test_constrained_requests_with_look_ahead(llm):
    """With the next step queued before the tokens reach the host (runtime/engine.py's look-ahead;
    on the CPU it runs eagerly), each step's masks still come from the grammar state after the last
    token: the same tokens as without, and grammar-ended requests drop out of a queued step."""
    from tandem.runtime.sampling import SamplingParams

    engine, tok = llm.engine, llm.tokenizer
    requests = [(tok.encode("Give me JSON"),
                 SamplingParams(temperature=0, max_new_tokens=200, grammar=json_grammar(SCHEMA))),
                (tok.encode("Tell a story"), SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)),
                (tok.encode("More JSON"), SamplingParams(temperature=0.9, seed=3, max_new_tokens=200,
                                                         grammar=json_grammar(SCHEMA)))]
    without = run_all(engine, requests)
    engine.look_ahead = True
    try:
        with_ = run_all(engine, requests)
    finally:
        engine.look_ahead = False
    assert with_ == without
    assert [r for _, r in with_] == ["stop", "length", "stop"]
    assert engine.cache.free_blocks == engine.cache.num_blocks and not engine._constraints


def test_a_grammar_that_does_not_compile_is_refused_with_the_request(llm):
    from tandem.runtime.sampling import SamplingParams

    with pytest.raises(TandemError, match="output format"):
        SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: ("}]}')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_structured_output_and_logprobs_on_gpu(tmp_path):
    """The sampler's extra paths on CUDA tensors, under CUDA-graph decode: masks from pinned host
    bitmasks, logprobs read from the graph's logits; they agree with a teacher-forced recompute."""
    from tandem.runtime.llm import LLM

    llm = LLM(write_tiny(tmp_path, "qwen3_moe", seed=4), dtype="float32", device="cuda", progress=False,
              max_context=256, max_batch=2, experts="torch")
    prompt = llm.tokenizer.encode("Give me JSON")
    out = llm.generate(prompt, temperature=0, max_new_tokens=60, logprobs=3, grammar=json_grammar(SCHEMA))
    value = json.loads(out.text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 999
    tokens = [lp.token for lp in out.logprobs]
    logits = llm.engine.score(prompt + tokens)[len(prompt) - 1: -1].float().log_softmax(-1)
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    want = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].cpu()
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()


def test_a_constrained_sequence_ends_at_eos_even_with_ignore_eos(llm):
    """Its grammar allowed the end: the eos must not be appended as text (that broke the JSON)."""
    from tandem.runtime.sampling import SamplingParams

    engine, tok = llm.engine, llm.tokenizer
    eos = min(tok.eos_ids)
    number = json_grammar({"type": "integer", "minimum": 0, "maximum": 99})
    for ignore_eos in (False, True):
        params = SamplingParams(temperature=0, max_new_tokens=20, grammar=number, ignore_eos=ignore_eos,
                                logit_bias={eos: 100.0})
        texts: dict[int, str] = {}
        ((tokens, reason),) = run_all(engine, [(tok.encode("n="), params)], texts)
        assert reason == "stop" and tokens[-1] == eos
        assert texts[0].isdigit() and 0 <= json.loads(texts[0]) <= 99, texts[0]


def test_the_engine_marks_the_token_that_ended_a_sequence(llm):
    """StepOutput.ended_by_token: the eos / stop token that ended it (the APIs give it no logprob)."""
    from tandem.runtime.sampling import SamplingParams

    engine, tok = llm.engine, llm.tokenizer
    eos = min(tok.eos_ids)
    for ignore_eos, ended in ((False, True), (True, False)):
        engine.add_request(tok.encode("x"), SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=ignore_eos,
                                                           logit_bias={eos: 100.0}))
        outs = [o for _ in range(8) if engine.has_work() for o in engine.step()]
        assert [(o.token, o.ended_by_token) for o in outs] == [(eos, ended)]
