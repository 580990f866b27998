"""Acceptance (issue 8): the memory plan of a full-size DeepSeek-V3 Q4_K_M at 8K context, computed
from its tensor list (no file: tandem.testing.full_size), with routed experts in CPU RAM (--cpu-moe).

What the plan says, one 8K sequence (max_batch 1), 14 GB budget: the GPU keeps the non-expert
weights in the file's Q4_K / Q6_K blocks (the fused dequant-matmul kernels read them), DeepSeek's
kv_b (derived from attn_k_b + attn_v_b) in bf16, fp32 routers, the 0.58 GB MLA cache and 1.17 GB
of workspace (a 512-token prefill chunk over 8K of context) = 13.66 GB VRAM, inside 14 GB (all
dequantized to bf16 it would be 36.2 GB).
Routed experts: 393.98 GB of Q4_K / Q6_K blocks in CPU RAM.
"""

import math

import pytest
import torch

from tandem.models.deepseek import DeepseekConfig, DeepseekForCausalLM
from tandem.placement.advice import DoesNotFit, check_fits
from tandem.placement.memory import GB, GPU_BLOCK_FORMATS, format_plan
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


def plan_of(v3, options: PlacementOptions, max_context=8192, max_batch=1, vram=14, ram=512, **kw):
    net, tensors, derived, _ = v3
    placement = build_placement(options, experts_modules(net))
    return plan_model(net, tensors, net.gguf_renamer(), placement, max_context=max_context, max_batch=max_batch,
                      derived=derived, vram_budget=int(vram * GB), ram_budget=int(ram * GB),
                      budget_sources=("given by --vram-budget", "given by --ram-budget"), **kw)


def group_bytes(plan, group: str, gpu: bool | None = None) -> int:
    return sum(r.bytes for r in plan.rows if r.group == group and (gpu is None or r.on_gpu == gpu))


def held_on_gpu(listing) -> dict[str, int]:
    """What each group should hold on the GPU: GGUF blocks where a GPU kernel reads the format,
    the model dtype (bf16) for the rest, fp32 routers, and DeepSeek's kv_b derived from attn_k_b +
    attn_v_b in bf16 (the absorbed attention multiplies by it per head)."""
    groups = {"attn": "attention", "token_embd": "embeddings", "output": "output head", "ffn_gate_inp": "routers",
              "exp_probs_b": "routers", "shexp": "shared experts"}
    out: dict[str, int] = {}
    for name, shape, qtype, nbytes in listing:
        if "_exps." in name:
            continue
        key = name.split(".")[0] if not name.startswith("blk.") else name.split(".")[2]
        group = next((g for k, g in groups.items() if k in key), "dense FFN" if key.startswith("ffn_") else "attention")
        if key in ("attn_norm", "ffn_norm"):
            group = "attention"  # a decoder layer's norms sit with its attention
        numel = math.prod(shape)
        if group == "routers":
            held = numel * FP32
        elif key in ("attn_k_b", "attn_v_b"):
            held = numel * BF16  # both become kv_b [nh * (dn + dv), c]: same element count
        elif qtype in GPU_BLOCK_FORMATS:
            held = nbytes
        else:
            held = numel * BF16
        out[group] = out.get(group, 0) + held
    return out


def test_v3_q4_k_m_plan_lists_the_expected_bytes(v3):
    plan = plan_of(v3, PlacementOptions(device="cuda"))
    print(format_plan(plan))
    expected = held_on_gpu(v3[3])
    assert expected["embeddings"] == 521256960 and expected["output head"] == 760166400 + H * BF16
    assert expected["routers"] == MOE * (E * H + E) * FP32
    for group, nbytes in expected.items():
        assert group_bytes(plan, group, gpu=True) == nbytes, group
    # Routed experts stay in the file's blocks in CPU RAM, nothing of them on the GPU.
    experts = sum(b for n, _, _, b in v3[3] if "_exps." in n)
    assert group_bytes(plan, "routed experts", gpu=False) == experts and not group_bytes(plan, "routed experts", True)
    assert {r.format for r in plan.rows if r.group == "routed experts"} == {"Q4_K", "Q4_K+Q6_K"}
    assert 390 * GB < experts < 400 * GB
    assert plan.kv.bytes == (512 + 64) * LAYERS * 8192 * BF16  # MLA: latent + rope key per layer and token
    # Beside them, the engine's buffers for a 512-token step (the input, h and, for prefill, each
    # (token, expert) pair's down output: 8 experts per token at H 7168, I 2048).
    assert plan.engine_workspace == 512 * (8 * H + 8 * (6 * H + 6 * 2048))
    assert plan.ram == experts + plan.engine_workspace
    assert "engine workspace (estimate)" in format_plan(plan)

    # GPU weights in their blocks (Q4_K / Q6_K kernels), kv_b in bf16, a 512-token prefill chunk at
    # 8K of context (MLA expands keys and values: 1.17 GB of workspace): 13.66 GB, inside 14 GB.
    weights = sum(expected.values())
    assert plan.weights(True) == weights
    assert plan.vram == weights + plan.kv.bytes + plan.workspace
    assert 13.5 * GB < plan.vram < 13.7 * GB <= 14 * GB
    assert {r.format for r in plan.rows if r.on_gpu and r.backend == "blocks"} == {"Q4_K", "Q6_K"}
    table = format_plan(plan)
    assert "VRAM  13.66 GB of 14.00 GB given by --vram-budget" in table
    check_fits(plan)


def test_v3_long_prompts_prefill_in_bounded_vram(v3):
    # Issue 10: MLA prefill expands keys and values for 8192 context tokens at a time (the rest of a
    # longer context merges through the log-sum-exp), so the workspace stops growing at 8K: 1.27 GB
    # at 32K and at 128K (it was 4.01 and 15.51 GB with the whole context expanded at once). VRAM at
    # 128K: 11.90 GB of weights + 9.21 GB of bf16 latent cache + 1.27 GB = 22.39 GB (was 36.63 GB).
    options = PlacementOptions(device="cuda")
    plans = {ctx: plan_of(v3, options, max_context=ctx, vram=40) for ctx in (8192, 32768, 131072)}
    assert plans[32768].workspace == plans[131072].workspace < 1.28 * GB
    assert plans[8192].workspace < plans[32768].workspace  # 8K: one chunk, no running output to merge
    assert plans[131072].kv.bytes == (512 + 64) * LAYERS * 131072 * BF16
    assert 22.3 * GB < plans[131072].vram < 22.4 * GB
    assert plans[131072].longest_prompt() == 131072
    # On a 24 GB card (22 GB budget) 128K fits with the context in chunks of 4096 (21.91 GB), not 8192;
    # LLM's prefill_kv_chunk="auto" takes the largest prompt chunk, then the largest context chunk
    # that fit: without the dual path's buffer, 1024-token prompt chunks, context by 2048 (21.92 GB).
    with pytest.raises(DoesNotFit, match="needs 22.39 GB of VRAM"):
        check_fits(plan_of(v3, options, max_context=131072, vram=22))
    check_fits(plan_of(v3, options, max_context=131072, vram=22, kv_chunk=4096))
    check_fits(plan_of(v3, options, max_context=131072, vram=22, kv_chunk=2048, step_tokens=1024))
    with pytest.raises(DoesNotFit):
        check_fits(plan_of(v3, options, max_context=131072, vram=22, kv_chunk=4096, step_tokens=1024))


def test_v3_dual_path_prefill_buffer_on_a_24_gb_card(v3):
    # One routed expert as the dual path holds it on the GPU: its Q4_K gate/up and Q6_K down blocks
    # (2 x 2048 rows x 4032 B + 7168 rows x 1680 B) twice (this run's and the next run's copies)
    # and its weights decoded into bf16 (3 x 7168 x 2048).
    numel = 7168 * 2048
    base = plan_of(v3, PlacementOptions(device="cuda"), vram=22)
    assert base.dual_expert_bytes == 2 * (2 * 2048 * 4032 + 7168 * 1680) + 3 * numel * BF16
    assert base.dual_layer_bytes == 256 * base.dual_expert_bytes
    assert plan_of(v3, PlacementOptions(device="cpu")).dual_expert_bytes == 0
    dual = plan_of(v3, PlacementOptions(device="cuda"), vram=22, dual_buffer=GB)
    # The buffer, and a step's sums beside it (512 tokens x H: padded input, run part and total in
    # bf16, the fp32 sum).
    assert dual.dual_step == 512 * 7168 * (4 + 3 * BF16)
    assert dual.vram == base.vram + GB + dual.dual_step <= 22 * GB  # the bound with prefill streaming buffers
    assert "dual-path prefill" in format_plan(dual) and "dual-path prefill" not in format_plan(base)
    check_fits(dual)


def test_v3_int8_kv_cache_halves_the_cache(v3):
    # --kv-cache int8: 612-byte rows (int8 latent + rope key, 9 fp32 scales) instead of 1152 bf16 bytes.
    # The model's whole 160K context in 19.30 GB, four 32K sequences in 18.08 GB: a 24 GB card (was
    # 24.66 and 22.36 GB with the bf16 cache).
    net = v3[0]
    try:
        net.set_kv_int8()
        long = plan_of(v3, PlacementOptions(device="cuda"), max_context=163840, vram=22)
        four = plan_of(v3, PlacementOptions(device="cuda"), max_context=32768, max_batch=4, vram=22)
    finally:
        for layer in net.layers:
            layer.attn.kv_int8 = False
    assert long.kv.bytes == 612 * LAYERS * 163840
    assert 19.25 * GB < long.vram < 19.35 * GB and 18.0 * GB < four.vram < 18.1 * GB
    check_fits(long)
    check_fits(four)


def test_v3_over_budget_is_refused_with_advice(v3):
    plan = plan_of(v3, PlacementOptions(device="cuda"), vram=12)
    with pytest.raises(DoesNotFit, match=r"needs 13.66 GB of VRAM but 12.00 GB is given by --vram-budget"):
        check_fits(plan)
    # Eight 8K sequences (the default --max-batch) add 4.03 GB of cache: the advice names the knobs.
    eight = plan_of(v3, PlacementOptions(device="cuda"), max_batch=8, vram=14)
    with pytest.raises(DoesNotFit, match=r"lower --max-context to \d+ or less .*; lower --max-batch"):
        check_fits(eight)
    check_fits(plan_of(v3, PlacementOptions(device="cuda"), max_batch=8, vram=18))


def test_impossible_budgets_are_refused_with_advice(v3):
    gpu_experts = plan_of(v3, PlacementOptions(device="cuda", n_cpu_moe_layers=50), vram=80)
    assert group_bytes(gpu_experts, "routed experts", gpu=True) == 8 * 3 * E * MOE_I * H * BF16
    with pytest.raises(DoesNotFit, match=r"raise --n-cpu-moe-layers by 6 or more \(routed experts take 22.55 GB"):
        check_fits(gpu_experts)
    with pytest.raises(DoesNotFit, match=r"RAM .* use a smaller quant of the model \(its routed experts take 393.98 GB\)"):
        check_fits(plan_of(v3, PlacementOptions(device="cuda"), vram=80, ram=256))
    on_cpu = plan_of(v3, PlacementOptions(device="cpu"), ram=256)
    assert on_cpu.vram == 0 and on_cpu.ram > 429 * GB
    with pytest.raises(DoesNotFit, match=r"smaller quant.*a GPU \(--device cuda\) takes the non-expert weights"):
        check_fits(on_cpu)


def test_v3_auto_steps_leave_room_for_the_dual_paths_buffer(v3):
    # --max-step-tokens auto, 8K context, a 16 GB budget: an 8192-token step fits alone (15.83 GB)
    # but not beside the dual path's 1 GiB buffer (17.49 GB); LLM takes the largest step (and context
    # chunk) that fits with the buffer, so long prompts keep both paths instead of prefilling on the
    # CPU engine alone.
    from tandem.runtime.llm import KV_CHUNK_CHOICES, STEP_TOKEN_CHOICES, _choose_chunks, _dual_want

    def plan(hot, step, kv_chunk, dual=0):
        return plan_of(v3, PlacementOptions(device="cuda"), vram=16, step_tokens=step, kv_chunk=kv_chunk,
                       dual_buffer=dual, hot_experts=hot)

    probe = plan(0, 512, 1024)
    want = _dual_want(probe, True, "cpu")
    assert want == 1 << 30  # DUAL_BUFFER_BYTES: less than a layer's experts, more than one expert
    assert _dual_want(probe, False, "cpu") == _dual_want(probe, True, "torch") == 0
    assert _choose_chunks("auto", KV_CHUNK_CHOICES, 8192, plan, 0)[0] == 8192  # the step alone
    step, chunk = _choose_chunks("auto", KV_CHUNK_CHOICES, 8192, plan, want)
    print(f"step {step}, context chunk {chunk}: {plan(0, step, chunk, want).vram / GB:.2f} GB")
    assert step < 8192
    check_fits(plan(0, step, chunk, want))
    larger = [s for s in STEP_TOKEN_CHOICES if s > step]
    with pytest.raises(DoesNotFit):  # the next larger step does not fit beside the buffer at any context chunk
        check_fits(plan(0, min(larger), 1024, want))
    assert _choose_chunks(4096, KV_CHUNK_CHOICES, 8192, plan, want)[0] == 4096  # a given count is kept


def test_the_dual_buffer_size_can_be_asked_for(v3, monkeypatch):
    # TANDEM_DUAL_BUFFER_MB asks for another buffer (bigger runs, fewer a layer), within a layer's
    # experts and at least one expert's; a bad value is refused with the variable's name.
    from tandem.errors import TandemError
    from tandem.runtime.llm import _dual_want

    probe = plan_of(v3, PlacementOptions(device="cuda"), vram=24, step_tokens=512, kv_chunk=1024)
    monkeypatch.setenv("TANDEM_DUAL_BUFFER_MB", "3072")
    assert _dual_want(probe, True, "cpu") == 3 << 30
    monkeypatch.setenv("TANDEM_DUAL_BUFFER_MB", "1")
    assert _dual_want(probe, True, "cpu") == probe.dual_expert_bytes  # one expert's at least
    monkeypatch.setenv("TANDEM_DUAL_BUFFER_MB", str(10**7))
    assert _dual_want(probe, True, "cpu") == probe.dual_layer_bytes  # a whole layer's at most
    for bad in ("0", "1.5", "big", "-4"):
        monkeypatch.setenv("TANDEM_DUAL_BUFFER_MB", bad)
        with pytest.raises(TandemError, match="TANDEM_DUAL_BUFFER_MB"):
            _dual_want(probe, True, "cpu")
