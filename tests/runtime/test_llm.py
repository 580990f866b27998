"""The Python API and the Engine on a tiny model: generation, streaming, stops, batching, errors."""

from pathlib import Path

import pytest
import torch

from tandem.errors import TandemError
from tandem.placement.memory import GB
from tandem.runtime.llm import LLM
from tandem.testing.tiny import write_tiny


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("v3"), "deepseek_v3", seed=2)
    return LLM(path, dtype="float32", progress=False, max_context=256)


def test_generate_returns_text_and_ids(llm):
    out = llm.generate("The quick brown fox", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert out.prefill_tok_s > 0 and out.decode_tok_s > 0


def test_greedy_equals_argmax_of_full_recompute(llm):
    out = llm.generate("hello world", max_new_tokens=6, temperature=0, ignore_eos=True)
    ids = out.prompt_token_ids + out.token_ids
    from tests.conftest import Stepper

    logits = Stepper(llm.model).feed(ids)
    n = len(out.prompt_token_ids)
    assert logits[n - 1 : -1].argmax(-1).tolist() == out.token_ids


def test_stream_concatenates_to_generate(llm):
    stream = llm.stream("abc def", max_new_tokens=10, temperature=0, ignore_eos=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == llm.generate("abc def", max_new_tokens=10, temperature=0, ignore_eos=True).text


def test_seed_makes_sampling_deterministic(llm):
    a = llm.generate("x", max_new_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    b = llm.generate("x", max_new_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    c = llm.generate("x", max_new_tokens=10, temperature=1.0, seed=6, ignore_eos=True)
    assert a.token_ids == b.token_ids != c.token_ids


def test_stop_string_cuts_the_text(llm):
    full = llm.generate("once", max_new_tokens=16, temperature=0, ignore_eos=True)
    stop = full.text[5:8]
    assert stop and stop not in full.text[:5]
    cut = llm.generate("once", max_new_tokens=16, temperature=0, ignore_eos=True, stop=(stop,))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


def test_eos_stops_generation(llm):
    out = llm.generate("hi", max_new_tokens=8, temperature=0, ignore_eos=True)
    first = out.token_ids[2]
    stopped = llm.generate("hi", max_new_tokens=8, temperature=0, stop_token_ids=(first,))
    assert stopped.token_ids == out.token_ids[:3] and stopped.finish_reason == "stop"


def test_chat_messages_use_the_template(llm):
    msgs = [{"role": "user", "content": "hello"}]
    out = llm.generate(msgs, max_new_tokens=3, temperature=0, ignore_eos=True)
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(msgs)


def test_batched_requests_match_alone(llm):
    prompts = [llm.tokenizer.encode(p) for p in ("one two three", "a", "the model says")]
    params = llm.sampling_params(max_new_tokens=8, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids for p in prompts]
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while engine.has_work():
        for out in engine.step():
            got[out.seq_id].append(out.token)
    assert [got[i] for i in ids] == alone
    assert engine.cache.free_blocks == engine.cache.num_blocks  # every block came back


def test_context_limit_ends_generation_with_length(llm):
    prompt = list(range(3, 3 + 250))
    out = llm.generate(prompt, max_new_tokens=50, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == 256


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("", {}, "empty"),
        ([], {}, "empty"),
        (list(range(300)), {}, "context window is 256"),
        ([1, 99999], {}, "token ids must be in"),
        ("hi", {"temperature": -1}, "temperature"),
        ("hi", {"top_p": 0}, "top_p"),
        ("hi", {"bogus": 1}, "unknown sampling option"),
    ],
)
def test_bad_requests_raise_clear_errors(llm, prompt, kwargs, message):
    with pytest.raises(TandemError, match=message):
        llm.generate(prompt, **kwargs)
    assert not llm.engine.has_work()


def test_bf16_runs(tmp_path):
    path = write_tiny(tmp_path, "deepseek_v2_lite", seed=1, dtype=torch.bfloat16)
    llm = LLM(path, progress=False)
    assert llm.dtype == torch.bfloat16
    assert llm.model.layers[0].ffn.router.weight.dtype == torch.float32  # routers stay fp32
    assert len(llm.generate("hi", max_new_tokens=4, ignore_eos=True, temperature=0).token_ids) == 4


def test_max_step_tokens_auto_takes_the_largest_chunk_that_fits():
    from tandem.runtime.llm import _step_tokens

    assert _step_tokens("auto", 8192, lambda s: True) == 8192
    assert _step_tokens("auto", 8192, lambda s: s <= 2048) == 2048
    assert _step_tokens("auto", 5000, lambda s: True) == 4096  # no chunk longer than the context
    assert _step_tokens("auto", 8192, lambda s: s <= 1024) == 1024
    assert _step_tokens("auto", 8192, lambda s: False) == 512  # the plan's check then refuses with advice
    assert _step_tokens("auto", 1500, lambda s: True) == 1024  # no chunk longer than the context
    assert _step_tokens("auto", 256, lambda s: True) == 512
    assert _step_tokens(300, 8192, lambda s: False) == 300  # a given count is kept as is
    for bad in (0, -5, "lots", True):
        with pytest.raises(TandemError, match="--max-step-tokens"):
            _step_tokens(bad, 8192, lambda s: True)


def test_llm_chooses_its_chunk_from_the_budget(tmp_path):
    from tandem.layers.attention import MLAttention
    from tandem.placement.memory import format_plan
    from tandem.testing.tiny import write_tiny

    path = write_tiny(tmp_path, "deepseek_v3", seed=8)
    llm = LLM(path, dtype="float32", progress=False, max_context=2048, max_batch=1)
    assert llm.max_step_tokens == 2048 == llm.engine.scheduler.max_step_tokens
    # A RAM budget with room for a 1024-token step's workspace but not a 2048 one's.
    fits = {s: LLM(path, dtype="float32", progress=False, max_context=2048, max_batch=1, max_step_tokens=s).plan
            for s in (1024, 2048)}
    budget = (fits[1024].ram_peak + fits[2048].ram_peak) / 2 / GB
    small = LLM(path, dtype="float32", progress=False, max_context=2048, max_batch=1, ram_budget=budget,
                prefill_kv_chunk=8192)
    assert small.max_step_tokens == 1024 == small.engine.scheduler.max_step_tokens
    # With the context chunk of MLA prefill chosen too, the 2048-token step fits: its context is
    # attended 1024 tokens at a time (the reference's scores shrink with it).
    auto = LLM(path, dtype="float32", progress=False, max_context=2048, max_batch=1, ram_budget=budget)
    assert auto.max_step_tokens == 2048 and auto.prefill_kv_chunk == 1024 and auto.plan.step.kv_chunk == 1024
    assert {m.kv_chunk for m in auto.model.modules() if isinstance(m, MLAttention)} == {1024}
    assert "step <= 2048 tok, context by 1024" in format_plan(auto.plan)
    assert llm.prefill_kv_chunk == 8192 and "context by" not in format_plan(llm.plan)  # 2048 < 8192: one pass
    with pytest.raises(TandemError, match="prefill_kv_chunk"):
        LLM(path, dtype="float32", progress=False, max_context=2048, prefill_kv_chunk=0)
    assert LLM(path, dtype="float32", progress=False, max_context=2048, max_batch=1,
               max_step_tokens=64).engine.scheduler.max_step_tokens == 64


def test_layer_counts_the_weights_do_not_have_are_refused_before_building():
    """A corrupt block_count of 10**8 built layers until memory ran out (fuzzing)."""
    from types import SimpleNamespace as NS

    from tandem.runtime.loader import ModelFiles

    files = ModelFiles(path=Path("m.gguf"), hf=None, hf_dir=None,
                       gguf=NS(names=lambda: ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_up.weight"]))
    files.check_layer_count(2)
    with pytest.raises(TandemError, match="says 100000000 layers but the weights hold layers 0..1"):
        files.check_layer_count(10**8)
    with pytest.raises(TandemError, match="not a positive integer"):
        files.check_layer_count(0)


def test_prompts_longer_than_any_context_are_refused_before_tokenizing():
    from tandem.runtime.tokenizer import MAX_CHARS_PER_TOKEN, check_prompt_chars

    check_prompt_chars("x" * MAX_CHARS_PER_TOKEN * 16, 16)
    with pytest.raises(TandemError, match="characters but the context window is 16 tokens"):
        check_prompt_chars("x" * (MAX_CHARS_PER_TOKEN * 16 + 1), 16)


def test_a_request_whose_logits_go_nan_fails_alone(tmp_path):
    """Fuzzing: a model with NaN weights emitted token 0 forever. Now the request whose logits are
    NaN fails with NaNLogits and the others run on, with the tokens they get alone."""
    import asyncio

    from tandem.runtime.async_engine import AsyncEngine
    from tandem.errors import NaNLogits

    llm = LLM(write_tiny(tmp_path, "deepseek_v3", seed=5), dtype="float32", progress=False, max_context=64)
    params = llm.sampling_params(max_new_tokens=6, temperature=0, ignore_eos=True)
    good = [5, 6, 7]
    alone = llm.generate(good, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    with torch.no_grad():
        llm.model.embed.weight[9] = float("nan")  # any sequence holding token 9 goes NaN
    with pytest.raises(NaNLogits, match="logits for this request are NaN"):
        llm.generate([8, 9, 10], max_new_tokens=6, temperature=0.7)

    engine = llm.engine
    bad_id, good_id = engine.add_request([8, 9, 10], params), engine.add_request(good, params)
    got: dict[int, list] = {bad_id: [], good_id: []}
    while engine.has_work():
        for out in engine.step():
            got[out.seq_id].append((out.token, out.finish_reason))
    assert got[bad_id] == [(-1, "error")]
    assert [t for t, _ in got[good_id]] == alone and got[good_id][-1][1] == "length"
    assert engine.cache.free_blocks == engine.cache.num_blocks

    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def run(prompt):
        try:
            async with async_engine.request(prompt, params) as outputs:
                return [o.token async for o in outputs]
        except NaNLogits as e:
            return e

    async def main():
        return await asyncio.gather(run([8, 9, 10]), run(good))

    try:
        bad, ok = asyncio.run(main())
    finally:
        async_engine.close()
    assert isinstance(bad, NaNLogits) and ok == alone


def test_a_failing_prompt_fails_its_request_alone(tmp_path, caplog):
    """A step that raised used to fail every request in flight. Now a step that fed prompt tokens
    fails only the requests whose prompts it fed; requests already decoding run on, with the tokens
    they get alone. A decode-only step that raises fails all of its requests."""
    import asyncio
    import logging

    from tandem.runtime.async_engine import AsyncEngine
    from tandem.runtime.engine import StepFailed

    llm = LLM(write_tiny(tmp_path, "deepseek_v3", seed=6), dtype="float32", progress=False, max_context=64)
    params = llm.sampling_params(max_new_tokens=6, temperature=0, ignore_eos=True)
    good, poison = [5, 6, 7], [12, 13, 14]
    alone = llm.generate(good, max_new_tokens=6, temperature=0, ignore_eos=True).token_ids
    engine = llm.engine
    run = engine.runner.run

    def failing(batch, all_logits=False):
        if any(13 in fed for s, fed in zip(batch.seqs, batch.new_tokens) if not s.prefilled):
            raise RuntimeError("CUDA out of memory (simulated)")
        return run(batch, all_logits)

    engine.runner.run = failing
    a = engine.add_request(good, params)
    outs = {a: [tok.token for tok in engine.step()]}  # a's prompt, alone
    b = engine.add_request(poison, params)  # fed beside a's first decode
    outs[b], failures = [], []
    while engine.has_work():
        try:
            for out in engine.step():
                outs[out.seq_id].append(out.token)
        except StepFailed as e:
            assert "out of memory" in str(e.error)
            failures.append(e.failed)
    assert failures == [[b]] and outs[b] == [] and outs[a] == alone
    assert engine.cache.free_blocks == engine.cache.num_blocks
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate(poison, max_new_tokens=2)

    # The server's path: the poisoned request arrives while the good one decodes.
    long = llm.sampling_params(max_new_tokens=40, temperature=0, ignore_eos=True)
    alone_long = llm.generate(good, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def main():
        decoding = asyncio.Event()

        async def first():
            async with async_engine.request(good, long) as outputs:
                tokens = []
                async for out in outputs:
                    tokens.append(out.token)
                    decoding.set()
                return tokens

        task = asyncio.create_task(first())
        await decoding.wait()
        with pytest.raises(RuntimeError, match="simulated"):
            async with async_engine.request(poison, params) as outputs:
                [o async for o in outputs]
        return await task

    with caplog.at_level(logging.ERROR, logger="tandem.runtime.async_engine"):
        try:
            ok = asyncio.run(main())
        finally:
            async_engine.close()
    assert ok == alone_long
    assert any("aborting 1 request(s), 1 others continue" in r.getMessage() for r in caplog.records)

    def decode_fails(batch, all_logits=False):
        if all(s.prefilled for s in batch.seqs):
            raise RuntimeError("decode failed (simulated)")
        return run(batch, all_logits)

    engine.runner.run = decode_fails
    ids = [engine.add_request(p, params) for p in ([1, 2], [3, 4])]
    engine.step()  # both prompts
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert sorted(failed.value.failed) == sorted(ids) and not engine.has_work()
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_config_values_the_layers_refuse_name_the_model(tmp_path):
    # The layers check what the config checks cannot (fuzzing: they named no file).
    import json

    from tandem.testing.tiny import write_tiny

    path = write_tiny(tmp_path, "deepseek_v3", seed=1)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 100}))
    with pytest.raises(TandemError, match=rf"^{path}: experts per token \(100\) must be in 1\.\.16"):
        LLM(path, progress=False)
