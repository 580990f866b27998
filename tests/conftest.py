import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (tandem/ops/triton) run in Triton's interpreter on CPU tensors;
# it must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.runner import Runner
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.scheduler import Batch, Sequence


class Stepper:
    """Drives a model through prefill and one-token decode steps on its own paged cache."""

    def __init__(self, model, max_tokens: int = 256, block_size: int = 8, dtype=torch.float32):
        cache = PagedKVCache(model.cache_widths(), -(-max_tokens // block_size) * 2, block_size, dtype, "cpu")
        self.runner = Runner(model, cache, "cpu")
        self.cache = cache
        self.seq = Sequence(0, [], SamplingParams())

    def feed(self, tokens: list[int], all_logits: bool = True) -> torch.Tensor:
        """Feed tokens after what is cached; fp32 logits [len(tokens), V] (or [1, V])."""
        seq = self.seq
        self.cache.grow(seq.block_table, seq.num_cached + len(tokens))
        logits = self.runner.run(Batch([seq], [tokens], is_prefill=seq.num_cached == 0), all_logits=all_logits)
        seq.num_cached += len(tokens)
        return logits


@pytest.fixture
def stepper():
    return Stepper


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def margin_steps(ours: torch.Tensor, ref: torch.Tensor, bound: float) -> tuple[int, list[int]]:
    """Margin rule: compare argmax only where ref's top1 - top2 > 10 x bound x max|ref|.

    Returns (number of steps compared, steps where the argmax differs)."""
    top = ref.float().topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    scale = ref.float().abs().amax(dim=-1)
    checked = margin > 10 * bound * scale
    bad = (ours.argmax(-1) != ref.argmax(-1)) & checked
    return int(checked.sum()), bad.nonzero().flatten().tolist()


@contextmanager
def script_module(path: Path, name: str):
    """A benchmark script (benchmarks/*.py, not a package) imported as module `name` for its tests."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


def triton_device(request, interpreted: bool) -> str:
    """The `device` fixture's value for Triton kernel tests parametrized over "cpu" and "cuda": the
    interpreter runs them on CPU tensors, CUDA compiles them; a process does one or the other
    (TRITON_INTERPRET is read at import), so on a GPU machine run the tests twice."""
    if request.param == "cuda" and (interpreted or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)")
    if request.param == "cpu" and not interpreted:
        pytest.skip("kernels are compiled for CUDA in this process; run with TRITON_INTERPRET=1 for the CPU check")
    return request.param
