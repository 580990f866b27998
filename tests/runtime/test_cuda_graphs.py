"""GPU (marked): decode steps replayed from CUDA graphs (one per batch size, the CPU experts as
host functions inside) against the same steps run eagerly, on every tiny family: fp32 logits
within 1e-5 and the same argmax under the margin rule; then the LLM API end to end with graphs
on and off."""

import pytest
import torch

from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.llm import LLM
from tandem.runtime.runner import Runner
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.scheduler import Batch, Sequence
from tandem.testing.tiny import VARIANTS, write_tiny
from tests.conftest import margin_steps, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BOUND = 1e-5
Q8_BOUND = 2e-2  # int8 activations (hot experts on split rows) against fp32 ones, of max |logit|


def decode_logits(llm: LLM, graphs: bool, prompts: list[list[int]], steps: int, feed: list[list[int]]) -> torch.Tensor:
    """Prefill the prompts, then `steps` decode steps of all sequences together (teacher-forced on
    `feed`), and 4 more of the first sequence alone (another graph size); logits [steps*B + 4, V]."""
    cache = PagedKVCache(llm.model.cache_widths(), 64, 16, llm.dtype, "cuda")
    runner = Runner(llm.model, cache, "cuda", cuda_graphs=graphs, max_context=512)
    seqs = [Sequence(i, p, SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        cache.grow(s.block_table, len(s.prompt))
        runner.run(Batch([s], [s.prompt], is_prefill=True))
        s.num_cached = len(s.prompt)
    rows = []
    for step in range(steps + 4):
        batch = seqs if step < steps else seqs[:1]
        for s in batch:
            cache.grow(s.block_table, s.num_cached + 1)
        rows.append(runner.run(Batch(batch, [[feed[s.seq_id][step]] for s in batch])).clone().cpu())
        for s in batch:
            s.num_cached += 1
    assert runner.cuda_graphs == graphs and bool(runner._graphs) == graphs
    return torch.cat(rows)


def graph_vs_eager(llm: LLM, seed: int, lengths=(7, 30, 19)) -> tuple[list, list, torch.Tensor]:
    """Prompts, their teacher-forced feed and the graph run's logits, checked against the eager run's."""
    assert llm.engine.runner.cuda_graphs
    vocab = llm.model.embed.num_embeddings
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    feed = [torch.randint(0, vocab, (40,), generator=g).tolist() for _ in prompts]
    want = decode_logits(llm, False, prompts, 24, feed)
    got = decode_logits(llm, True, prompts, 24, feed)
    checked, bad = margin_steps(got, want, BOUND)
    print(f"rel_err {rel_err(got, want):.1e}, {checked} steps checked")
    assert rel_err(got, want) <= BOUND
    assert checked >= 16 and not bad
    return prompts, feed, got


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_graph_decode_equals_eager(tmp_path, variant):
    llm = LLM(write_tiny(tmp_path, variant, seed=21), dtype="float32", device="cuda", progress=False,
              max_batch=3, cuda_graph=True)
    graph_vs_eager(llm, 2)


def test_llm_generates_the_same_with_and_without_graphs(tmp_path):
    path = write_tiny(tmp_path, "deepseek_v3", seed=22)
    outs = []
    for graph in (False, True):
        llm = LLM(path, dtype="float32", device="cuda", progress=False, max_batch=4, cuda_graph=graph)
        outs.append([llm.generate(p, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids
                     for p in ("def f(x):", "hello world", "1 2 3")])
        assert bool(llm.engine.runner._graphs) == graph
    assert outs[0] == outs[1]


@pytest.mark.parametrize("variant", ["deepseek_v3", "qwen3_moe"])
def test_graph_decode_with_hot_experts(tmp_path, variant):
    # Hot experts' decode path (ops/triton/moe.py) is captured with the engine's host functions.
    path = write_tiny(tmp_path, variant, seed=23)
    llm = LLM(path, dtype="float32", device="cuda", progress=False, max_batch=3, gpu_experts=2)
    assert llm.hot_experts
    prompts, feed, got = graph_vs_eager(llm, 5, (9, 21, 14))
    # And against no hot experts at all: the engine's BF16 experts vs the hot float ones.
    none = LLM(path, dtype="float32", device="cuda", progress=False, max_batch=3)
    base = decode_logits(none, True, prompts, 24, feed)
    checked, bad = margin_steps(got, base, 4e-3)
    assert rel_err(got, base) <= 4e-3 and checked >= 16 and not bad


@pytest.mark.parametrize("split", [True, False])
def test_graph_decode_with_hot_experts_held_as_blocks(tmp_path, monkeypatch, split):
    # A GGUF's hot experts stay Q4_K/Q6_K blocks on the GPU, captured too: split rows with int8
    # activations (ops/triton/moe_q8.py; within Q8_BOUND of the engine) or the blocks as stored
    # (moe_quant.py): the engine's generic kernels compute from the same blocks in fp32, so only
    # summation order differs.
    monkeypatch.setenv("TANDEM_ISA", "generic")
    from functools import partial

    from tandem.layers.hot_experts import HotExperts
    from tandem.runtime import hot_experts as runtime_hot
    from tandem.runtime import llm as runtime_llm
    from tandem.testing.tiny_gguf import write_tiny_gguf

    monkeypatch.setattr(runtime_llm, "place_hot_experts", partial(runtime_hot.place_hot_experts, split=split))
    _, gguf = write_tiny_gguf(tmp_path, "deepseek_v3_q", "Q4_K_M", seed=25)
    llm = LLM(gguf, dtype="float32", device="cuda", progress=False, max_batch=3, gpu_experts=2)
    layers = [m for m in llm.model.modules() if isinstance(m, HotExperts)]
    assert layers and all(h.blocks and h.w_down.split == split for h in layers)
    # The 70-token prompt's 280 slots (top-4) exceed HOT_KERNEL_MAX_SLOTS: its prefill takes the
    # eager path, the routed hot blocks dequantized on the GPU (block_experts.block_moe).
    prompts, feed, got = graph_vs_eager(llm, 6, (9, 70, 14))
    none = LLM(gguf, dtype="float32", device="cuda", progress=False, max_batch=3)
    base = decode_logits(none, True, prompts, 24, feed)
    print(f"hot vs none: rel_err {rel_err(got, base):.1e}")
    if split:
        # int8 activations move x by ~1%: now and then a later router's near-tie flips one expert,
        # and that step's logits jump (one step of 76 here, 0.34 of max |logit|, in Triton's
        # interpreter as on the GPU). Every other step stays within the bound.
        rows = (got - base).abs().amax(-1) / base.abs().max()
        assert (rows <= Q8_BOUND).float().mean() >= 0.95
        return
    checked, bad = margin_steps(got, base, BOUND)
    assert rel_err(got, base) <= BOUND and checked >= 16 and not bad


def test_stream_split_accounts_for_the_step(tmp_path):
    # tandem bench --profile's overlapped split, from the host functions' and the engine's stamps.
    from tandem.bench.profile import stream_split

    llm = LLM(write_tiny(tmp_path, "deepseek_v3", seed=24), dtype="float32", device="cuda", progress=False)
    split = stream_split(llm, list(range(5, 25)), 12)
    ms, jobs = split["ms_per_step"], split["engine_job_us"]
    assert split["steps"] == 12 and split["graphs"]
    cpu_side = ms["cpu experts overlapped by gpu"] + ms["gpu stalled on cpu experts"]
    # Each job runs inside its submit .. wait-left window, and the windows and the gaps between them
    # lie inside the step.
    assert 0 < ms["engine jobs"] <= cpu_side + 1e-6
    assert cpu_side + ms["gpu between expert calls"] <= split["wall_ms_per_step"] + 1e-6
    assert 0 < jobs["median"] <= jobs["p90"]
