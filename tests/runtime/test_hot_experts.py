"""Hot experts (--gpu-experts): the most-routed experts of each layer run from a float copy on the
model's device beside the CPU engine. Same logits as without them (within the engine's BF16 bound,
same argmax under the margin rule), exact when every expert is hot (then nothing is left to the
engine), the split of routing ids, the calibration counts, and the memory plan's budget fill."""

import pytest
import torch

from tandem.errors import TandemError
from tandem.layers.hot_experts import HotExperts
from tandem.placement.memory import GB
from tandem.placement.rules import PlacementOptions
from tandem.runtime.hot_experts import routing_counts
from tandem.runtime.llm import LLM
from tandem.testing.tiny import VARIANTS, write_tiny
from tandem.testing.tiny_gguf import write_tiny_gguf
from tests.conftest import margin_steps, rel_err

BF16_BOUND = 4e-3  # the engine's BF16 experts against float ones (tests/runtime/test_cpu_experts_backend.py)
Q8_BOUND = 2e-2  # int8 activations (ops/triton/moe_q8.py) against fp32 ones, of max |logit|
# The fused kernels on CPU tensors need Triton's interpreter, which is off where CUDA is (there
# tests/runtime/test_cuda_graphs.py runs the same paths on the GPU).
INTERPRETER_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter is off with CUDA")


def logits(llm: LLM, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return llm.engine.score(torch.randint(0, llm.tokenizer.vocab_size, (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("hot"), "deepseek_v3", seed=31)


def test_hot_experts_give_the_same_logits(tiny):
    none = LLM(tiny, dtype="float32", progress=False, max_batch=1)
    hot = LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=2)
    layers = [m.experts for m in hot.model.modules() if isinstance(getattr(m, "experts", None), HotExperts)]
    assert layers and len(layers) == len(hot.hot_experts) and all(len(h.hot_ids) == 2 for h in layers)
    a, b = logits(hot), logits(none)
    checked, bad = margin_steps(a, b, BF16_BOUND)
    assert rel_err(a, b) <= BF16_BOUND and checked >= 16 and not bad
    # Greedy generation agrees too.
    prompt = [5, 17, 42, 8]
    assert (hot.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids
            == none.generate(prompt, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids)


def test_all_experts_hot_equals_torch_experts(tiny):
    experts = VARIANTS["deepseek_v3"]["n_routed_experts"]
    hot = LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=experts)
    ref = LLM(tiny, dtype="float32", progress=False, max_batch=1, experts="torch")
    assert rel_err(logits(hot), logits(ref)) <= 1e-5


def test_gguf_hot_experts_come_from_the_blocks(tmp_path):
    _, gguf = write_tiny_gguf(tmp_path, "deepseek_v3_q", "Q8_0", seed=32)
    e = VARIANTS["deepseek_v3"]["n_routed_experts"]
    hot = LLM(gguf, dtype="float32", progress=False, max_batch=1, gpu_experts=e)
    ref = LLM(gguf, dtype="float32", progress=False, max_batch=1, experts="torch")
    assert rel_err(logits(hot), logits(ref)) <= 1e-5


def test_hot_ids_are_the_most_routed(tiny):
    llm = LLM(tiny, dtype="float32", progress=False, max_batch=1)
    tokens = list(range(3, 60))
    counts = routing_counts(llm, tokens)
    k = VARIANTS["deepseek_v3"]["num_experts_per_tok"]
    assert counts and all(int(c.sum()) == len(tokens) * k for c in counts.values())
    hot = LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=3)
    for key, ids in hot.hot_experts.items():
        assert len(ids) == 3


def test_split_masks_hot_and_cold():
    w = torch.zeros(2, 1, 1)
    h = HotExperts(None, 6, [1, 4], w, w, w)
    cold, local = h.split(torch.tensor([[1, 2, -1], [4, 0, 5]], dtype=torch.int32))
    assert cold.tolist() == [[-1, 2, -1], [-1, 0, 5]]
    assert local.tolist() == [[0, -1, -1], [1, -1, -1]]
    with pytest.raises(TandemError, match="distinct ids"):
        HotExperts(None, 6, [1, 1], w, w, w)


def test_bad_gpu_experts_value(tiny):
    with pytest.raises(TandemError, match="--gpu-experts"):
        LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=-1)


def test_plan_counts_hot_experts_and_fills_a_budget():
    from tandem.models.deepseek import DeepseekConfig, DeepseekForCausalLM
    from tandem.placement.rules import build_placement
    from tandem.runtime.loader import meta_model
    from tandem.runtime.plan import StoredTensor, experts_modules, plan_model
    from tandem.testing.full_size import DEEPSEEK_V3, deepseek_gguf_tensors

    net = meta_model(DeepseekForCausalLM, DeepseekConfig.from_hf(DEEPSEEK_V3), torch.bfloat16)
    listing = deepseek_gguf_tensors(DEEPSEEK_V3, "Q4_K_M")
    tensors = [StoredTensor(n, q, b, q not in ("F32", "F16", "BF16")) for n, _, q, b in listing]
    placement = build_placement(PlacementOptions(device="cuda"), experts_modules(net))

    def plan(hot: int, vram: float = 24):
        return plan_model(net, tensors, net.gguf_renamer(), placement, max_context=8192, max_batch=1,
                          derived=net.gguf_derived({n: s for n, s, _, _ in listing}), hot_experts=hot,
                          vram_budget=int(vram * GB), ram_budget=int(512 * GB))

    none, two = plan(0), plan(2)
    # On a GPU hot experts keep the file's blocks: one expert's gate, up and down in each of the 58
    # MoE layers as stored (Q4_K gate/up, Q4_K or Q6_K down: ~0.3x their bf16 size).
    one_expert = sum(b // 256 for n, _, q, b in listing if "_exps" in n)
    assert one_expert < 0.35 * 58 * 3 * 7168 * 2048 * 2
    assert none.hot_expert_bytes == one_expert
    assert two.vram - none.vram == 2 * one_expert and two.ram == none.ram
    hot_rows = {r.format for r in two.rows if "hot" in r.format and r.on_gpu}
    assert hot_rows == {"Q4_K x 2 hot", "Q4_K+Q6_K x 2 hot"}
    n = none.hot_experts_that_fit()
    assert n > 0 and plan(n).vram <= 24 * GB < plan(n + 1).vram
    assert plan(0, vram=13.7).hot_experts_that_fit() == 0


def blocks_llm(path, monkeypatch, split: bool | None = None, **kw) -> LLM:
    """An LLM whose hot experts keep the file's blocks, as on a GPU, forced on the CPU device
    (split: as split rows; None: where the formats allow, as on a GPU)."""
    from functools import partial

    from tandem.runtime import hot_experts as runtime_hot
    from tandem.runtime import llm as runtime_llm

    place = partial(runtime_hot.place_hot_experts, blocks=True, split=split)
    monkeypatch.setattr(runtime_llm, "place_hot_experts", place)
    return LLM(path, dtype="float32", progress=False, max_batch=1, **kw)


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("hotq"), "deepseek_v3_q", "Q4_K_M", seed=33)[1]


@pytest.mark.parametrize("split", [True, False])
def test_hot_experts_held_as_blocks(tiny_q4, monkeypatch, split):
    """On a GPU, hot experts of a GGUF keep the file's blocks (runtime.hot_experts.expert_blocks),
    as split rows where the formats allow (Q4_K/Q6_K here): the eager path (routed blocks
    dequantized per call) equals the torch experts, and re-placing copies the new experts' bytes in
    place."""
    from tandem.layers.block_experts import Blocks
    from tandem.ops.split_rows import unsplit_rows
    from tandem.runtime.hot_experts import replace_hot_experts

    e = VARIANTS["deepseek_v3"]["n_routed_experts"]
    ref = LLM(tiny_q4, dtype="float32", progress=False, max_batch=1, experts="torch")
    floats = LLM(tiny_q4, dtype="float32", progress=False, max_batch=1, gpu_experts=e)
    hot = blocks_llm(tiny_q4, monkeypatch, split=None if split else False, gpu_experts=e)
    layers = [m for m in hot.model.modules() if isinstance(m, HotExperts)]
    assert layers and all(h.blocks and isinstance(h.w_gate, Blocks) and h.w_gate.format == "Q4_K" for h in layers)
    assert all(w.split == split for h in layers for w in (h.w_gate, h.w_up, h.w_down))
    float_bytes = sum(m.hot_bytes for m in floats.model.modules() if isinstance(m, HotExperts))
    assert sum(h.hot_bytes for h in layers) < 0.2 * float_bytes  # Q4_K/Q6_K against fp32 copies
    assert rel_err(logits(hot, 6), logits(ref, 6)) <= 1e-5

    some = blocks_llm(tiny_q4, monkeypatch, split=None if split else False, gpu_experts=2)
    name, ids = next(iter(some.hot_experts.items()))
    new = [i for i in range(e) if i not in ids][:2]
    layer = some.model.get_submodule(name)
    with some._checkpoint() as (ckpt, rename):
        replace_hot_experts(some.model, {name: new}, ckpt, rename, some.dtype)
        assert layer.hot_ids == new and layer.blocks
        gate = next(n for n in ckpt.names() if rename(n) == f"{name}.w_gate")
        assert layer.w_gate.split == split
        held = unsplit_rows(layer.w_gate.data, "Q4_K") if split else layer.w_gate.data
        assert torch.equal(held, ckpt.raw(gate)[new])
    with pytest.raises(TandemError, match="like the held ones"):
        w = torch.zeros(2, 1, 1)
        layer.replace([0, 1], w, w, w)
    other = Blocks(layer.w_gate.data, "Q4_K", layer.w_gate.dequantize, not split)  # same bytes, other layout
    with pytest.raises(TandemError, match="like the held ones"):
        layer.replace([0, 1], other, layer.w_up, layer.w_down)


@INTERPRETER_ONLY
@pytest.mark.parametrize("split", [False, True])
def test_hot_blocks_kernel_path_equals_torch_experts(tiny_q4, monkeypatch, split):
    # ops/triton/moe_quant.py (blocks as stored: fp32 activations) or moe_q8.py (split rows, int8
    # activations), with the other fused ops, in Triton's interpreter.
    from tandem.layers import norm
    from tandem.ops.triton import moe_q8, moe_quant

    e = VARIANTS["deepseek_v3"]["n_routed_experts"]
    want = logits(LLM(tiny_q4, dtype="float32", progress=False, max_batch=1, experts="torch"), 6)
    hot = blocks_llm(tiny_q4, monkeypatch, split=split, gpu_experts=e)
    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    calls = []
    module, name = (moe_q8, "moe_decode_split") if split else (moe_quant, "moe_decode_blocks")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    got = logits(hot, 6)
    print(f"rel_err {rel_err(got, want):.1e}")
    assert rel_err(got, want) <= (Q8_BOUND if split else 1e-5) and calls


def test_cli_gpu_experts_flags(tiny, tmp_path, capsys):
    from tandem.cli.main import main

    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x * 2\n" * 8)
    args = ["generate", str(tiny), "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0", "--dtype", "float32"]
    assert main(args + ["--gpu-experts", "2", "--calibrate", str(calib)]) == 0
    with_hot = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == with_hot
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--gpu-experts", "some"])
    assert exit_.value.code == 2 and "--gpu-experts" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    assert main(args + ["--gpu-experts", "1", "--calibrate", str(empty)]) == 2
    assert "calibration text" in capsys.readouterr().err


@INTERPRETER_ONLY
def test_hot_experts_kernel_path_equals_torch_experts(tiny, monkeypatch):
    # The GPU path's kernels (ops/triton/moe.py, with the other fused ops) in Triton's interpreter.
    from tandem.layers import norm

    experts = VARIANTS["deepseek_v3"]["n_routed_experts"]
    hot = LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=experts)
    ref = LLM(tiny, dtype="float32", progress=False, max_batch=1, experts="torch")
    want = logits(ref, 12)
    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    calls = []
    from tandem.ops.triton import moe

    real = moe.moe_decode
    monkeypatch.setattr(moe, "moe_decode", lambda *a: calls.append(1) or real(*a))
    assert rel_err(logits(hot, 12), want) <= 1e-5 and calls


def test_routing_is_counted_online_and_rebalance_follows_it(tiny):
    none = LLM(tiny, dtype="float32", progress=False, max_batch=1)
    hot = LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=2)
    layers = {n: m for n, m in hot.model.named_modules() if isinstance(m, HotExperts)}
    k = VARIANTS["deepseek_v3"]["num_experts_per_tok"]
    for m in layers.values():
        m.counts.zero_()
    hot.generate([5, 17, 42, 8], max_new_tokens=5, temperature=0, ignore_eos=True)
    # 4 prompt tokens + 4 fed back (the 5th is sampled, not fed): k slots each, hot and cold alike.
    assert all(int(m.counts.sum()) == 8 * k for m in layers.values())
    # Nothing moved enough over so few slots: nothing changes.
    assert hot.rebalance_hot_experts() == {}
    # Traffic moves to two cold experts of one layer: that layer follows it, the others do not.
    name, layer = next(iter(layers.items()))
    before = {n: list(m.hot_ids) for n, m in layers.items()}
    cold = [e for e in range(layer.num_experts) if e not in layer.hot_ids][:2]
    layer.counts.zero_()
    layer.counts[cold] = 1000
    assert hot.rebalance_hot_experts(min_count=100) == {name: sorted(cold)}
    assert layer.hot_ids == sorted(cold) and hot.hot_experts[name] == sorted(cold)
    assert all(m.hot_ids == before[n] for n, m in layers.items() if n != name)
    assert int(layer.counts.sum()) == 0
    # The re-placed experts compute what the engine computed for them.
    a, b = logits(hot), logits(none)
    checked, bad = margin_steps(a, b, BF16_BOUND)
    assert rel_err(a, b) <= BF16_BOUND and checked >= 16 and not bad


def test_replace_checks_its_input(tiny):
    hot = LLM(tiny, dtype="float32", progress=False, max_batch=1, gpu_experts=2)
    layer = next(m for m in hot.model.modules() if isinstance(m, HotExperts))
    w = (layer.w_gate.clone(), layer.w_up.clone(), layer.w_down.clone())
    with pytest.raises(TandemError, match="distinct expert ids"):
        layer.replace([0, 0], *w)
    with pytest.raises(TandemError, match="must be"):
        layer.replace([0, 1], w[0][:1], *w[1:])


@INTERPRETER_ONLY
def test_hot_split_kernel_equals_the_torch_split(monkeypatch):
    # The GPU path's one-launch split (Triton interpreter) against the torch ops it replaces.
    from tandem.layers import norm

    w = torch.zeros(3, 4, 4)
    torch_side, kernel_side = HotExperts(None, 6, [1, 4, 5], w, w, w), HotExperts(None, 6, [1, 4, 5], w, w, w)
    ids = torch.tensor([[1, 0, -1], [4, 4, 2], [5, 3, -1], [0, 1, 5]], dtype=torch.int32)
    want = torch_side.split(ids)
    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    got = kernel_side.split(ids)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and torch.equal(a, b)
    assert torch.equal(kernel_side._tally, torch_side._tally)
    assert kernel_side.counts.tolist() == [2, 2, 1, 1, 2, 2] and int(kernel_side._tally[6]) == 2


def test_all_hot_layer_never_calls_its_backend():
    class Refuses:
        def submit(self, *a):
            raise AssertionError("the wrapped backend was called")

    g = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down = (torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, 16, generator=g),
                            torch.randn(4, 16, 8, generator=g))
    layer = HotExperts(Refuses(), 4, [0, 1, 2, 3], w_gate, w_up, w_down)
    x = torch.randn(3, 16, generator=g)
    ids = torch.tensor([[0, 2], [3, 1], [2, -1]], dtype=torch.int32)
    weights = torch.rand(3, 2, generator=g)
    from tandem.ops import reference

    out = layer.wait(layer.submit(x, ids, weights))
    assert torch.allclose(out, reference.moe_experts(x, ids, weights, w_gate, w_up, w_down), atol=1e-6)
    partial = HotExperts(Refuses(), 5, [0, 1, 2, 3], w_gate, w_up, w_down)
    with pytest.raises(AssertionError, match="wrapped backend"):
        partial.submit(x, ids, weights)


@INTERPRETER_ONLY
def test_all_hot_split_rows_skip_the_split_and_still_count(monkeypatch):
    """Every expert hot, in id order, on split rows: the ids go to the kernels as they are (no
    split launch) and the kernels count them; same output and tally as through the split."""
    import numpy as np

    from tandem.layers import norm
    from tandem.layers.block_experts import Blocks
    from tandem.ops.split_rows import split_rows
    from tandem.ops.triton import moe
    from tests.ops.test_triton_moe_quant import quantized

    monkeypatch.setattr(norm, "FUSED_ON_CPU", True)
    rng = np.random.default_rng(7)
    w = [Blocks(split_rows(quantized(4, rows, k, fmt, rng)[0], fmt), fmt, None, True)
         for rows, k, fmt in ((256, 256, "Q4_K"), (256, 256, "Q4_K"), (256, 256, "Q8_0"))]
    direct, through = HotExperts(None, 4, [0, 1, 2, 3], *w), HotExperts(None, 4, [0, 1, 2, 3], *w)
    through._identity = False
    splits = []
    real = moe.hot_split
    monkeypatch.setattr(moe, "hot_split", lambda *a: splits.append(1) or real(*a))
    x = torch.randn(3, 256)
    ids = torch.tensor([[0, 2], [3, -1], [2, 1]], dtype=torch.int32)
    weights = torch.rand(3, 2)
    want = through.wait(through.submit(x, ids, weights))
    assert splits == [1]
    got = direct.wait(direct.submit(x, ids, weights))
    assert splits == [1] and torch.equal(got, want) and want.abs().max() > 0
    assert direct._tally.tolist() == through._tally.tolist() == [1, 1, 2, 1, 1]
    with pytest.raises(TandemError, match="id order"):  # a captured graph takes the ids as they are
        direct.replace([1, 0, 2, 3], *w)
