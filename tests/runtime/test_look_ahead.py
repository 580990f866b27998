"""The engine's look-ahead: a decode step queued before the previous step's tokens reach the host
(Runner.run_next) gives the tokens the engine gives without it, whatever joins, stops or aborts
meanwhile; the queued step is the one used (not run again); the cache ends empty. On the CPU the
queued step runs eagerly (the bookkeeping is what is tested); with CUDA graphs (marked) it is a
replay queued behind the running one."""

import pytest
import torch

from tandem.runtime.llm import LLM
from tandem.runtime.sampling import SamplingParams
from tandem.testing.tiny import write_tiny


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("ahead"), "deepseek_v3", seed=5)
    return LLM(path, dtype="float32", progress=False, max_context=256, max_batch=8)


def _prompts(vocab: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (int(length),), generator=g).tolist()
            for length in torch.randint(1, 40, (n,), generator=g)]


def _count_calls(engine, monkeypatch) -> dict[str, int]:
    calls = {"run": 0, "run_next": 0}
    for name in calls:
        real = getattr(engine.runner, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(engine.runner, name, counted)
    return calls


def _serve(engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], abort_at: dict[int, int] = {}):
    """Step the engine; requests join at the steps `arrivals` names, and the request added n-th is
    aborted at step abort_at[n]. Returns per request (tokens, finish reason) in the order added."""
    ids, out, reasons, step = [], {}, {}, 0
    while engine.has_work() or step <= max(arrivals):
        for prompt, params in arrivals.get(step, []):
            ids.append(engine.add_request(prompt, params))
            out[ids[-1]] = []
        for n, at in abort_at.items():
            if at == step:
                engine.abort(ids[n])
                reasons[ids[n]] = "abort"
        for o in engine.step():
            out[o.seq_id].append(o.token)
            if o.finish_reason:
                reasons[o.seq_id] = o.finish_reason
        step += 1
    assert engine.cache.free_blocks == engine.cache.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    return [(out[i], reasons.get(i)) for i in ids]


def _both(engine, arrivals, abort_at={}):
    results = []
    for look_ahead in (False, True):
        engine.look_ahead = look_ahead
        results.append(_serve(engine, arrivals, abort_at))
    engine.look_ahead = False
    return results


def test_a_lone_request_decodes_from_the_queued_steps(llm, monkeypatch):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    prompt = _prompts(llm.tokenizer.vocab_size, 1)[0]
    engine.look_ahead = False
    want = _serve(engine, {0: [(prompt, params)]})
    calls = _count_calls(engine, monkeypatch)
    engine.look_ahead = True
    try:
        got = _serve(engine, {0: [(prompt, params)]})
    finally:
        engine.look_ahead = False
    assert got == want and len(got[0][0]) == 20
    # the prompt's step and the first decode run; each later step was queued by the one before it
    # (none after the last: it ends by length)
    assert calls == {"run": 2, "run_next": 18}


def test_joins_stops_and_lengths_give_the_same_tokens(llm):
    engine = llm.engine
    vocab = llm.tokenizer.vocab_size
    prompts = _prompts(vocab, 10)
    greedy = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (12, 3, 25, 8, 17)]
    # stop tokens that the requests meet midway (their 5th token alone): a stop the host sees one
    # step late, after the next step was queued
    alone = [_serve(engine, {0: [(p, greedy[2])]})[0][0] for p in prompts[5:]]
    stopping = [SamplingParams(temperature=0, max_new_tokens=25, stop_token_ids=(a[4],)) for a in alone]
    arrivals = {0: [(prompts[0], greedy[0]), (prompts[1], greedy[1])], 2: [(prompts[2], greedy[2])],
                3: [(prompts[5], stopping[0]), (prompts[6], stopping[1])], 7: [(prompts[3], greedy[3])],
                8: [(prompts[7], stopping[2])], 15: [(prompts[4], greedy[4]), (prompts[8], stopping[3])],
                16: [(prompts[9], stopping[4])]}
    without, with_ = _both(engine, arrivals)
    assert with_ == without
    assert sum(r == "stop" for _, r in with_) == 5 and sum(r == "length" for _, r in with_) == 5


def test_aborts_with_a_step_queued(llm):
    engine = llm.engine
    prompts = _prompts(llm.tokenizer.vocab_size, 4)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    arrivals = {0: [(p, params) for p in prompts]}
    without, with_ = _both(engine, arrivals, abort_at={1: 4, 3: 9})
    assert with_ == without
    assert [r for _, r in with_] == ["length", "abort", "length", "abort"]


def test_sampled_and_logprob_requests(llm):
    engine = llm.engine
    prompts = _prompts(llm.tokenizer.vocab_size, 3)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, repetition_penalty=1.3)]
    without, with_ = _both(engine, {0: list(zip(prompts, params))})
    assert with_ == without


def test_no_look_ahead_without_a_free_cache_slot(llm, monkeypatch):
    engine = llm.engine
    calls = _count_calls(engine, monkeypatch)
    monkeypatch.setattr(type(engine.cache), "free_blocks", property(lambda self: 0))
    engine.look_ahead = True
    try:
        # 7 + 12 tokens: the 17th needs a second block, so the step that feeds it is not queued
        out = engine.add_request(list(range(3, 10)), SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
    finally:
        engine.look_ahead = False
        monkeypatch.undo()
    assert out is not None and steps == 12
    # queued by decode steps 2-9 and 11 (step 10's next needs the new block: step 11 runs itself)
    assert calls == {"run": 3, "run_next": 9}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replays_queued_ahead(tmp_path, monkeypatch):
    path = write_tiny(tmp_path, "deepseek_v3", seed=6)
    gpu = LLM(path, dtype="float32", device="cuda", progress=False, max_context=256, max_batch=8, cuda_graph=True)
    engine = gpu.engine
    assert engine.runner.cuda_graphs
    prompts = _prompts(gpu.tokenizer.vocab_size, 6)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    alone = _serve(engine, {0: [(prompts[0], greedy)]})[0][0]
    stop = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(alone[6],))
    arrivals = {0: [(prompts[0], stop), (prompts[1], greedy), (prompts[2], greedy)], 5: [(prompts[3], greedy)],
                9: [(prompts[4], greedy), (prompts[5], stop)]}
    without, with_ = _both(engine, arrivals, abort_at={2: 12})
    assert with_ == without
    calls = _count_calls(engine, monkeypatch)
    engine.look_ahead = True
    _serve(engine, {0: [(prompts[1], greedy)]})
    engine.look_ahead = False
    assert calls == {"run": 2, "run_next": 18}
