"""Continuous batching on the CPU path: mixed decode + chunked-prefill steps give each request the
tokens it gets alone, chunked prefill equals one-shot prefill, admission waits for KV blocks."""

import pytest
import torch

from tandem.layers.attention import MLAttention
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.llm import LLM
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.scheduler import Batch, Scheduler, Sequence
from tandem.testing.tiny import write_tiny
from tests.conftest import margin_steps, rel_err

CHUNK = 24  # max_step_tokens in the batched runs: prompts longer than this are prefilled in chunks


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("v3b"), "deepseek_v3", seed=3)
    return LLM(path, dtype="float32", progress=False, max_context=256, max_batch=8)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 70, 9, 25, 1, 48, 17, 90, 5, 31, 60, 12, 24, 2, 77, 40]  # 16, several > CHUNK
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    out = {i: [] for i in ids}
    firsts = {}
    while engine.has_work():
        for o in engine.step():
            if not out[o.seq_id]:
                firsts[o.seq_id] = o.is_prefill
            else:
                assert not o.is_prefill
            out[o.seq_id].append(o.token)
    assert all(firsts.values())
    return [out[i] for i in ids]


def test_sixteen_concurrent_greedy_requests_match_each_alone(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    prompts = _prompts(llm.tokenizer.vocab_size)
    engine.scheduler.max_step_tokens = 512  # alone: one-shot prefill
    alone = [_run(engine, [p], params)[0] for p in prompts]
    engine.scheduler.max_step_tokens = CHUNK
    try:
        together = _run(engine, prompts, params)
    finally:
        engine.scheduler.max_step_tokens = 512
    assert together == alone
    assert all(len(t) == 10 for t in together)
    assert engine.cache.free_blocks == engine.cache.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_requests_join_and_leave_at_every_step(llm):
    engine = llm.engine
    engine.scheduler.max_step_tokens = CHUNK
    try:
        short = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
        long = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
        a = engine.add_request(list(range(5, 15)), long)
        engine.step()  # a prefilled, first token
        b = engine.add_request(list(range(20, 80)), short)  # 60 tokens: 3 chunks
        seen = []
        while engine.has_work():
            batch_ids = {o.seq_id for o in engine.step()}
            seen.append(batch_ids)
        # a decodes in every step while b's prompt is fed in chunks; b's first token comes in step 3
        assert seen[0] == {a} and seen[1] == {a} and seen[2] == {a, b}
        assert engine.cache.free_blocks == engine.cache.num_blocks
    finally:
        engine.scheduler.max_step_tokens = 512


def test_chunked_prefill_equals_one_shot(llm):
    check_chunked_prefill(llm, 1e-5)


@pytest.fixture(scope="module")
def llm_fp32_experts(tmp_path_factory):
    # Routed experts in plain torch at fp32: the engine's bf16 experts round their activations, so
    # a 1e-7 difference in attention would jump a logit by a bf16 ulp (~4e-3 measured) where one
    # rounding tips.
    path = write_tiny(tmp_path_factory.mktemp("v3f"), "deepseek_v3", seed=3)
    return LLM(path, dtype="float32", progress=False, max_context=256, max_batch=2, experts="torch")


@pytest.mark.parametrize("kv_chunk", [16, 40])
def test_context_chunked_prefill_equals_one_shot(llm_fp32_experts, kv_chunk):
    # Prompt chunks of 17 whose context is attended kv_chunk tokens at a time (16: every chunk of
    # keys ends inside a prompt chunk; 40: some prompt chunks see one key chunk, others three).
    check_chunked_prefill(llm_fp32_experts, 1e-5, kv_chunk)


def test_context_chunked_prefill_through_the_triton_kernel(llm_fp32_experts, monkeypatch):
    # The GPU's chunk path (ops/triton/prefill.py) inside the model, run by Triton's interpreter on
    # the CPU: the layer's views, strides and offsets reach the kernel as a GPU run would pass them.
    from triton.runtime.interpreter import InterpretedFunction

    from tandem.layers import attention
    from tandem.ops.triton import prefill

    if not isinstance(prefill._prefill_kernel, InterpretedFunction):
        pytest.skip("kernels are compiled for CUDA in this process (test_chunked_prefill_equals_one_shot_on_gpu covers it)")
    calls = []

    def kernel(x):
        calls.append(x.shape)
        return prefill.attention_lse

    monkeypatch.setattr(attention, "prefill_attention_lse", kernel)
    check_chunked_prefill(llm_fp32_experts, 1e-5, kv_chunk=40)
    assert calls  # the prompt chunks past 40 tokens of context went through the kernel


def _set_kv_chunk(model, kv_chunk: int | None) -> None:
    attns = [m for m in model.modules() if isinstance(m, MLAttention)]
    assert attns, "the model has no MLA layer"
    for m in attns:
        if kv_chunk is None:
            m.__dict__.pop("kv_chunk", None)
        else:
            m.kv_chunk = kv_chunk


def check_chunked_prefill(llm, bound: float, kv_chunk: int | None = None) -> None:
    """Logits of a 90-token prompt fed in chunks of 17 tokens against one pass over all of it.
    kv_chunk: the MLA layers attend their context that many tokens at a time in the chunked run."""
    engine = llm.engine
    tokens = _prompts(llm.tokenizer.vocab_size)[7]  # 90 tokens
    whole = engine.score(tokens)
    seq = Sequence(-1, list(tokens), SamplingParams())
    engine.cache.grow(seq.block_table, len(tokens))
    rows = []
    if kv_chunk is not None:
        _set_kv_chunk(engine.runner.model, kv_chunk)
    try:
        for start in range(0, len(tokens), 17):
            chunk = tokens[start : start + 17]
            rows.append(engine.runner.run(Batch([seq], [chunk], is_prefill=True), all_logits=True))
            seq.num_cached += len(chunk)
    finally:
        engine.cache.release(seq.block_table)
        if kv_chunk is not None:
            _set_kv_chunk(engine.runner.model, None)
    chunked = torch.cat(rows)
    assert chunked.dtype == torch.float32 and chunked.shape == whole.shape
    assert ((chunked - whole).abs().max() / whole.abs().max()).item() <= bound
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_only_sampling_sequences_get_logits(llm):
    engine = llm.engine
    a = Sequence(-1, list(range(1, 11)), SamplingParams())
    b = Sequence(-2, list(range(1, 11)), SamplingParams())
    for s in (a, b):
        engine.cache.grow(s.block_table, 10)
    try:
        batch = Batch([a, b], [a.prompt[:4], b.prompt], is_prefill=True, sample=[False, True])
        logits = engine.runner.run(batch)
        assert logits.shape[0] == 1
        alone = engine.runner.run(Batch([b], [b.prompt], is_prefill=True))
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    finally:
        engine.cache.release(a.block_table)
        engine.cache.release(b.block_table)


def test_admission_waits_for_kv_blocks():
    cache = PagedKVCache([4], num_blocks=12, block_size=4, dtype=torch.float32, device="cpu")
    sched = Scheduler(cache, max_batch=8, max_step_tokens=8)
    a, b = (Sequence(i, list(range(30)), SamplingParams()) for i in range(2))  # 8 blocks + 1 reserve each
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.new_tokens == [list(range(8))] and batch.sample == [False]
    assert list(sched.waiting) == [b] and cache.free_blocks == 12 - 8
    sched.update(batch, [])
    for _ in range(3):  # 8 + 8 + 8 + 6 tokens: the last chunk samples
        batch = sched.schedule()
        sched.update(batch, [7] if batch.sample[0] else [])
    assert a.num_cached == 30 and a.output == [7] and batch.sample == [True]
    assert list(sched.waiting) == [b]  # still no room
    sched.finish(a, "stop")
    batch = sched.schedule()
    assert batch.seqs == [b] and not sched.waiting and cache.free_blocks == 12 - 8
    sched.finish(b, "abort")
    assert cache.free_blocks == 12


def test_a_lone_long_prompt_steps_without_logits_until_its_last_chunk(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    prompt = _prompts(llm.tokenizer.vocab_size)[7]  # 90 tokens: 4 chunks of <= CHUNK
    one_shot = _run(engine, [prompt], params)[0]
    engine.scheduler.max_step_tokens = CHUNK
    try:
        engine.add_request(prompt, params)
        per_step = [len(engine.step()) for _ in range(7)]
    finally:
        engine.scheduler.max_step_tokens = 512
    assert per_step == [0, 0, 0, 1, 1, 1, 1] and not engine.has_work()
    assert _run(engine, [prompt], params)[0] == one_shot
    assert engine.cache.free_blocks == engine.cache.num_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["deepseek_v3", "qwen3_moe", "mixtral_window"])
def test_chunked_prefill_equals_one_shot_on_gpu(tmp_path, variant):
    # Chunks attend through torch SDPA over the cached context; the one-shot pass sees it all at once.
    # dual_prefill off: a long step would split experts with the GPU (exact fp32) where a chunk keeps
    # the engine (its activation rounding), a difference of paths, not of chunking (test_dual_experts).
    llm = LLM(write_tiny(tmp_path, variant, seed=4), dtype="float32", device="cuda", progress=False,
              max_context=256, max_batch=2, dual_prefill=False)
    check_chunked_prefill(llm, 1e-4)  # issue 10's bound (fp32, other kernels than the one-shot pass)
    if variant == "deepseek_v3":  # the context in chunks of 16 keys: the Triton prefill kernel
        llm = LLM(write_tiny(tmp_path / "fp32", variant, seed=4), dtype="float32", device="cuda", progress=False,
                  max_context=256, max_batch=2, experts="torch")  # fp32 experts: see llm_fp32_experts
        check_chunked_prefill(llm, 1e-4, kv_chunk=16)


def _run_recording(engine, prompts, params):
    """Like _run, also recording each sequence's fp32 logits row of every step it sampled in."""
    rows: dict[int, list[torch.Tensor]] = {}
    run = engine.runner.run

    def recording(batch, all_logits=False):
        out = run(batch, all_logits)
        for seq, row in zip(batch.sampling, out):
            rows.setdefault(seq.seq_id, []).append(row.float().cpu())
        return out

    add, ids = engine.add_request, []

    def adding(prompt, p):
        ids.append(add(prompt, p))
        return ids[-1]

    engine.runner.run, engine.add_request = recording, adding
    try:
        tokens = _run(engine, prompts, params)
    finally:
        engine.runner.run, engine.add_request = run, add
    return tokens, [torch.stack(rows[i]) for i in ids]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sixteen_concurrent_greedy_requests_match_each_alone_on_gpu(tmp_path):
    # Batched steps replay other CUDA graphs (other kernel splits and matmul tilings) than lone ones,
    # so fp32 logits agree within a bound, not bit for bit: compare logits up to each sequence's first
    # differing token, and tokens where the lone run's margin is wide (the margin rule). Measured on
    # an H200 box: 13 of the 16 sequences within 6e-7, three at 0.8e-4 .. 2.3e-4 -- a near-tied
    # expert (or group) choice of the tiny router flipping under another summation order, a discrete
    # step the bound must admit; a wrong cache block or batch row moves logits by far more.
    bound = 1e-3
    llm = LLM(write_tiny(tmp_path, "deepseek_v3", seed=3), dtype="float32", device="cuda", progress=False,
              max_context=256, max_batch=16, dual_prefill=False)  # see the chunked test: paths, not batching
    engine = llm.engine
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    prompts = _prompts(llm.tokenizer.vocab_size)
    alone = [_run_recording(engine, [p], params) for p in prompts]
    engine.scheduler.max_step_tokens = CHUNK
    try:
        together_tokens, together_rows = _run_recording(engine, prompts, params)
    finally:
        engine.scheduler.max_step_tokens = 512
    checked, errors = 0, []
    for (tokens, rows), got_tokens, got in zip(alone, together_tokens, together_rows):
        tokens, want = tokens[0], rows[0]
        same = next((i for i, (a, b) in enumerate(zip(tokens, got_tokens)) if a != b), len(tokens))
        n = min(same + 1, len(want), len(got))  # rows up to and including the first differing token
        errors.append(rel_err(got[:n], want[:n]))
        c, bad = margin_steps(got[:n], want[:n], bound)
        assert not bad
        checked += c
    print("relative logit errors, 16 users vs alone:", " ".join(f"{e:.1e}" for e in errors))
    assert max(errors) <= bound, errors
    assert checked >= 16
    assert engine.cache.free_blocks == engine.cache.num_blocks
