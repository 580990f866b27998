"""The attention kernels' path of the runtime (ForwardMeta tensors -> ops/triton/attention.py)
against the plain-torch path, through whole tiny models: the same decode steps of several
sequences at once (one and several new tokens each), fp32 logits within 1e-4. Without a GPU the
kernels run in Triton's interpreter (tests/conftest.py), so CI checks the wiring; on a GPU
(marked) the same comparison runs on CUDA."""

import pytest
import torch

from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.llm import LLM
from tandem.runtime.runner import Runner
from tandem.runtime.scheduler import Batch, Sequence
from tandem.runtime.sampling import SamplingParams
from tandem.testing.tiny import write_tiny
from tests.conftest import rel_err

# MLA (absorbed), MLA without q low-rank, GQA with q/k norm, GQA with a window shorter than the context.
VARIANTS = ["deepseek_v3", "deepseek_v2_lite", "qwen3_moe", "mixtral_window"]
LENGTHS = [5, 37, 12]  # three sequences, prompts of different lengths


def run_steps(model, device: str, kernels: bool, prompts: list[list[int]], steps: list[list[int]],
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Prefill every prompt, then feed steps[i] (new tokens per sequence) as one batch each; logits per step.
    dtype: the cache's (uint8: an int8 MLA cache)."""
    cache = PagedKVCache(model.cache_widths(), 24, 8, dtype, device)
    runner = Runner(model, cache, device, kernels=kernels, max_context=96)
    seqs = [Sequence(i, p, SamplingParams()) for i, p in enumerate(prompts)]
    # Shuffled block ids: the kernels must follow the block tables, not assume contiguity.
    cache._free = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    for s in seqs:
        cache.grow(s.block_table, len(s.prompt))
        runner.run(Batch([s], [s.prompt], is_prefill=True))
        s.num_cached = len(s.prompt)
    out = []
    for fed in steps:
        for s, f in zip(seqs, fed):
            cache.grow(s.block_table, s.num_cached + len(f))
        out.append(runner.run(Batch(seqs, fed), all_logits=True).cpu())
        for s, f in zip(seqs, fed):
            s.num_cached += len(f)
    return out


def compare(tmp_path, variant: str, device: str):
    llm = LLM(write_tiny(tmp_path, variant, seed=5), dtype="float32", device=device, progress=False,
              max_batch=1, cuda_graph=False)
    vocab = llm.model.embed.num_embeddings
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    # One token per sequence (decode), then 3 / 1 / 4 at once (several queries of one sequence).
    steps = [[torch.randint(0, vocab, (n,), generator=g).tolist() for n in shape] for shape in ([1, 1, 1], [3, 1, 4], [1, 1, 1])]
    want = run_steps(llm.model, device, False, prompts, steps)
    got = run_steps(llm.model, device, True, prompts, steps)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4, rel_err(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs the kernels only where there is no GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_path_equals_torch_path(tmp_path, variant):
    compare(tmp_path, variant, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_path_equals_torch_path_on_gpu(tmp_path, variant):
    compare(tmp_path, variant, "cuda")
