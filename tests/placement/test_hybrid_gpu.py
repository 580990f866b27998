"""GPU (marked): the hybrid model (non-expert layers, KV cache and sampling on the GPU, routed
experts in the CPU engine) against the CPU-only path, on every tiny family; teacher-forced logits
within a bound and the same argmax under the margin rule (tests/conftest.py). Also mixed layers
(--n-cpu-moe-layers: torch experts on the GPU), seeded sampling on GPU logits, and the measured
peak VRAM of a mid-size model against its plan.

Run on a GPU machine: pytest -m gpu tests/placement
"""

import gc

import pytest
import torch

from tandem.layers.attention import MLAttention
from tandem.layers.cpu_experts import CpuExperts
from tandem.layers.linear import MLP
from tandem.layers.moe import TorchExperts
from tandem.layers.quant_linear import QuantEmbedding, QuantLinear
from tandem.placement.memory import GB
from tandem.runtime.kv_cache import PagedKVCache
from tandem.runtime.llm import LLM
from tandem.runtime.runner import Runner
from tandem.runtime.sampling import SamplingParams
from tandem.runtime.scheduler import Batch, Sequence
from tandem.testing.tiny import VARIANTS, write_tiny
from tandem.testing.tiny_gguf import write_tiny_gguf
from tests.conftest import margin_steps, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STEPS = 32
# The GGUF models' engine rounds activations to 8 bits, so their bounds are wide and few steps clear
# the margin rule's 10 x bound: on an H100 box (session 18) 16-19 steps of 192 cleared 2e-2.
GGUF_STEPS = 192


def teacher_forced(llm: LLM, tokens: list[int], n_prompt: int, device: str) -> torch.Tensor:
    """fp32 logits [len(tokens) - n_prompt, V] on the CPU: the prompt's last row, then one decode step per token."""
    cache = PagedKVCache(llm.model.cache_widths(), 2 * -(-len(tokens) // 8), 8, llm.dtype, device)
    runner, seq, rows = Runner(llm.model, cache, device), Sequence(0, [], SamplingParams()), []
    for chunk in [tokens[:n_prompt]] + [[t] for t in tokens[n_prompt:-1]]:
        cache.grow(seq.block_table, seq.num_cached + len(chunk))
        rows.append(runner.run(Batch([seq], [chunk], is_prefill=seq.num_cached == 0)).cpu())
        seq.num_cached += len(chunk)
    return torch.cat(rows)


def compare(path, bound: float, dtype: str = "float32", min_checked: int = 8, steps: int = STEPS, **gpu_kw) -> LLM:
    cpu = LLM(path, dtype=dtype, device="cpu", progress=False, max_batch=1)
    # The dual path off: these compare the placement's backends (tests/layers/test_dual_experts.py covers it).
    gpu = LLM(path, dtype=dtype, device="cuda", progress=False, max_batch=1, dual_prefill=False, **gpu_kw)
    prompt = cpu.tokenizer.encode("def parse(text):\n    return")
    tokens = prompt + cpu.generate(prompt, max_new_tokens=steps, temperature=0, ignore_eos=True).token_ids
    want = teacher_forced(cpu, tokens, len(prompt), "cpu")
    got = teacher_forced(gpu, tokens, len(prompt), "cuda")
    err = rel_err(got, want)
    checked, bad = margin_steps(got, want, bound)
    print(f"{path.name}: rel_err {err:.2e} (bound {bound:.0e}), {checked} steps checked")
    assert err <= bound
    assert checked >= min_checked and not bad, (checked, bad)
    return gpu


def on_cuda(llm: LLM) -> set[str]:
    return {p.device.type for n, p in llm.model.named_parameters() if ".experts." not in n}


def cuda_bytes(llm: LLM) -> int:
    """Bytes of the model's tensors on the GPU: parameters and the quantized layers' block buffers."""
    tensors = list(llm.model.parameters()) + list(llm.model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hybrid_matches_cpu_only(tmp_path, variant):
    # Both paths run the same engine (experts repacked to BF16); the engine rounds activations to
    # bf16, so the GPU's fp32 rounding of x can reach the logits at bf16's scale (measured on an
    # H200 box: 2e-7 .. 5e-7 for most variants, up to 1.2e-3 for mixtral_odd).
    gpu = compare(write_tiny(tmp_path, variant, seed=11), 4e-3)
    assert on_cuda(gpu) == {"cuda"}
    assert all(isinstance(m.experts, CpuExperts) for m in gpu.model.modules() if hasattr(m, "experts"))
    assert {t.device.type for t in gpu.engine.cache.kv} == {"cuda"}
    assert gpu.plan.vram > 0 and gpu.plan.weights(True) == cuda_bytes(gpu)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_hybrid_gguf_and_mixed_layers(tmp_path, qtype):
    _, gguf = write_tiny_gguf(tmp_path, "deepseek_v3_q", qtype, seed=12)
    # The engine quantizes activations to 8 bits for K-quant blocks, so the GPU's rounding of x
    # can show at that scale (measured on an H200 box: 3.7e-7 for Q8_0, 2.6e-3 for Q4_K_M; on an
    # H100 box, session 18, over 192 steps: 6.0e-3 and 9.0e-3, the prompt's experts of < 16
    # tokens then running the VNNI kernels, int8 activations, instead of bf16 tiles).
    gpu = compare(gguf, 1e-2, steps=GGUF_STEPS, min_checked=16)
    # The GPU keeps the file's blocks of its linears and embedding (fused dequant-matmul kernels),
    # exactly as the plan counted them.
    quant = [m for m in gpu.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert quant and all(m.blocks.device.type == "cuda" for m in quant)
    assert isinstance(gpu.model.embed, QuantEmbedding)
    assert gpu.plan.weights(True) == cuda_bytes(gpu)
    assert {r.format for r in gpu.plan.rows if r.on_gpu and r.backend == "blocks"} == {m.weight_format for m in quant}
    # MLPs (dense layers, shared experts) whose gate and up share a format run them as one GEMV.
    mlps = [m for m in gpu.model.modules() if isinstance(m, MLP)]
    assert mlps and all(isinstance(m.gate_up, QuantLinear) for m in mlps if m.gate_up is not None)
    assert any(m.gate_up is not None for m in mlps)
    # So do the MLA layers' two projections of x (q_a and kv_a): the same blocks, side by side.
    attns = [m for m in gpu.model.modules() if isinstance(m, MLAttention)]
    assert attns and all(isinstance(m.q_kv_a, QuantLinear) for m in attns)
    # Layer 1's experts in the engine (blocks), layer 2's dequantized to fp32 torch on the GPU,
    # exact where the engine rounds activations to 8 bits (measured 5.5e-3 Q8_0, 9.0e-3 Q4_K_M).
    mixed = compare(gguf, 2e-2, steps=GGUF_STEPS, min_checked=16, n_cpu_moe_layers=1)
    experts = [m.experts for m in mixed.model.modules() if hasattr(m, "experts")]
    assert isinstance(experts[0], CpuExperts) and isinstance(experts[1], TorchExperts)
    assert experts[1].w_gate.device.type == "cuda"


def test_hybrid_bf16(tmp_path):
    # bf16 activations on both sides, rounded in a different order (measured 6.9e-3).
    compare(write_tiny(tmp_path, "deepseek_v3", seed=13), 2e-2, dtype="bfloat16", min_checked=4)


def test_seeded_sampling_on_gpu_logits(tmp_path):
    llm = LLM(write_tiny(tmp_path, "qwen3_moe", seed=14), device="cuda", progress=False, max_batch=2)
    runs = [llm.generate("def f", max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True).token_ids for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_peak_vram_within_10_percent_of_the_plan(tmp_path):
    # Wide enough that weights, not the workspace estimate, dominate: 1.38 GB of bf16 weights on the
    # GPU. The prompt fills one whole step (max_step_tokens, chosen by "auto"), so the step workspace the
    # plan holds is used. Measured on an H200 box with a 500-token prompt under a 2048-token plan: plan
    # 1.641 GB, peak 1.426 GB (-13%: a quarter of the workspace was used) — hence the full-step prompt.
    variant = dict(VARIANTS["deepseek_v3"], vocab_size=65536, hidden_size=4096, intermediate_size=8192,
                   moe_intermediate_size=512, num_hidden_layers=4, num_attention_heads=16, q_lora_rank=512,
                   kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    path = write_tiny(tmp_path, variant, seed=15, dtype=torch.bfloat16)
    gc.collect()  # earlier tests' models
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    # The dual path's buffer is reserved for prompts this short run does not have: leave it out.
    llm = LLM(path, device="cuda", progress=False, max_batch=1, max_context=2048, dual_prefill=False)
    prompt = [3 + i % 500 for i in range(min(llm.max_step_tokens, llm.max_context - 8))]  # the tokenizer has 512
    llm.generate(prompt, max_new_tokens=4, temperature=0, ignore_eos=True)
    peak = torch.cuda.max_memory_allocated() - start
    plan = llm.plan.vram
    print(f"plan {plan / GB:.3f} GB (weights {llm.plan.weights(True) / GB:.3f}, KV {llm.plan.kv.bytes / GB:.3f}, "
          f"workspace {llm.plan.workspace / GB:.3f}), measured peak {peak / GB:.3f} GB")
    assert abs(peak - plan) <= 0.1 * plan
