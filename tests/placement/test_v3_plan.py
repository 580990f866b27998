"""Acceptance (issue 8): the memory plan of a full-size DeepSeek-V3 Q4_K_M at 8K context, computed
from its tensor list (no file: tandem.testing.full_size), with routed experts in CPU RAM (--cpu-moe).

What the plan says, one 8K sequence (max_batch 1), 14 GB budget:
- today's runtime dequantizes non-expert GGUF weights to bf16 on the GPU: 34.0 GB of weights
  (attention 22.83, shared experts 5.11, dense FFN 2.38, embeddings 1.85, output head 1.85) plus
  0.43 GB of fp32 routers, the 0.58 GB MLA cache and ~0.58 GB of workspace = 35.61 GB VRAM, so the
  14 GB budget refuses it and says why;
- with the GPU weights kept in the file's blocks (quantized GPU weights, issue 8 item 3, not built
  yet) the same plan is 11.73 GB, inside 14 GB.
Routed experts: 393.98 GB of Q4_K / Q6_K blocks in CPU RAM.
"""

import pytest
import torch

from tandem.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from tandem.placement.advice import DoesNotFit, check_fits
from tandem.placement.memory import GB, format_plan
from tandem.placement.rules import PlacementOptions, build_placement
from tandem.runtime.loader import meta_model
from tandem.runtime.plan import StoredTensor, experts_modules, plan_model
from tandem.testing.full_size import DEEPSEEK_V3, deepseek_gguf_tensors

H, V, LAYERS, DENSE, E, MOE_I, DENSE_I = 7168, 129280, 61, 3, 256, 2048, 18432
MOE = LAYERS - DENSE
BF16, FP32 = 2, 4


@pytest.fixture(scope="module")
def v3():
    net = meta_model(DeepseekForCausalLM, DeepseekConfig.from_hf(DEEPSEEK_V3), torch.bfloat16)
    listing = deepseek_gguf_tensors(DEEPSEEK_V3, "Q4_K_M")
    tensors = [StoredTensor(n, q, b, q not in ("F32", "F16", "BF16")) for n, _, q, b in listing]
    derived = net.gguf_derived({n: s for n, s, _, _ in listing})
    return net, tensors, derived, listing


def plan_of(v3, options: PlacementOptions, max_context=8192, max_batch=1, vram=14, ram=512):
    net, tensors, derived, _ = v3
    placement = build_placement(options, experts_modules(net))
    return plan_model(net, tensors, net.gguf_renamer(), placement, max_context=max_context, max_batch=max_batch,
                      derived=derived, vram_budget=int(vram * GB), ram_budget=int(ram * GB),
                      budget_sources=("given by --vram-budget", "given by --ram-budget"))


def group_bytes(plan, group: str, gpu: bool | None = None) -> int:
    return sum(r.bytes for r in plan.rows if r.group == group and (gpu is None or r.on_gpu == gpu))


def test_v3_q4_k_m_plan_lists_the_expected_bytes(v3):
    plan = plan_of(v3, PlacementOptions(device="cuda"))
    print(format_plan(plan))
    attn = 1536 * H + 1536 + 128 * 192 * 1536 + 576 * H + 512 + 128 * 256 * 512 + H * 128 * 128 + 2 * H
    expected = {
        "embeddings": V * H * BF16,
        "attention": LAYERS * attn * BF16,
        "dense FFN": DENSE * 3 * DENSE_I * H * BF16,
        "shared experts": MOE * 3 * MOE_I * H * BF16,
        "routers": MOE * (E * H + E) * FP32,
        "output head": (V * H + H) * BF16,
    }
    for group, nbytes in expected.items():
        assert group_bytes(plan, group, gpu=True) == nbytes, group
    # Routed experts stay in the file's blocks in CPU RAM, nothing of them on the GPU.
    experts = sum(b for n, _, _, b in v3[3] if "_exps." in n)
    assert group_bytes(plan, "routed experts", gpu=False) == experts and not group_bytes(plan, "routed experts", True)
    assert {r.format for r in plan.rows if r.group == "routed experts"} == {"Q4_K", "Q4_K+Q6_K"}
    assert 390 * GB < experts < 400 * GB
    assert plan.kv.bytes == (512 + 64) * LAYERS * 8192 * BF16  # MLA: latent + rope key per layer and token
    assert plan.ram == experts

    # Today (GGUF weights dequantized to bf16 on the GPU): 35.61 GB, over the 14 GB target.
    weights = sum(expected.values())
    assert plan.weights(True) == weights
    assert plan.vram == weights + plan.kv.bytes + plan.workspace
    assert 35.5 * GB < plan.vram < 35.7 * GB
    # Quantized GPU weights (issue 8 item 3) would make it 11.73 GB: the 14 GB target holds then.
    assert 11.6 * GB < plan.vram_if_quantized < 11.8 * GB <= 14 * GB
    table = format_plan(plan)
    assert "VRAM  35.61 GB of 14.00 GB given by --vram-budget" in table
    assert "kept quantized (not implemented yet) the VRAM total would be 11.73 GB" in table


def test_v3_at_14_gb_is_refused_with_advice(v3):
    plan = plan_of(v3, PlacementOptions(device="cuda"))
    with pytest.raises(DoesNotFit, match=r"needs 35.61 GB of VRAM but 14.00 GB is given by --vram-budget: .*"
                       r"non-expert weights alone take 34.45 GB .*quantized GPU weights are not implemented yet.*"
                       r"--device cpu"):
        check_fits(plan)
    # Eight 8K sequences (the default --max-batch) add 4.03 GB of cache: the advice names the knobs.
    eight = plan_of(v3, PlacementOptions(device="cuda"), max_batch=8, vram=38)
    with pytest.raises(DoesNotFit, match=r"lower --max-context to \d+ or less .*; lower --max-batch"):
        check_fits(eight)
    check_fits(plan_of(v3, PlacementOptions(device="cuda"), vram=36.5))  # fits a 40 GB card today


def test_impossible_budgets_are_refused_with_advice(v3):
    gpu_experts = plan_of(v3, PlacementOptions(device="cuda", n_cpu_moe_layers=50), vram=80)
    assert group_bytes(gpu_experts, "routed experts", gpu=True) == 8 * 3 * E * MOE_I * H * BF16
    with pytest.raises(DoesNotFit, match=r"raise --n-cpu-moe-layers by 7 or more \(routed experts take 22.55 GB"):
        check_fits(gpu_experts)
    with pytest.raises(DoesNotFit, match=r"RAM .* use a smaller quant of the model \(its routed experts take 393.98 GB\)"):
        check_fits(plan_of(v3, PlacementOptions(device="cuda"), vram=80, ram=256))
    on_cpu = plan_of(v3, PlacementOptions(device="cpu"), ram=256)
    assert on_cpu.vram == 0 and on_cpu.ram > 429 * GB
    with pytest.raises(DoesNotFit, match=r"smaller quant.*a GPU \(--device cuda\) takes the non-expert weights"):
        check_fits(on_cpu)
