"""The memory planner on tiny models: bytes per format, KV cache shapes, budgets, the table."""

import pytest
import torch

from tandem.errors import TandemError
from tandem.placement.advice import available_ram, budgets
from tandem.placement.memory import (
    ENGINE_FLOAT_FORMATS,
    GB,
    ROUTED,
    ParamInfo,
    StepShape,
    engine_float_bytes,
    format_plan,
    hot_bytes_per_expert,
    workspace_bytes,
)
from tandem.placement.rules import PlacementOptions, build_placement
from tandem.runtime.loader import checkpoint_view, meta_model, open_model_files
from tandem.runtime.plan import experts_modules, plan_model, stored_tensors
from tandem.runtime.plan import step_shape as plan_model_step
from tandem.testing.tiny import write_tiny
from tandem.testing.tiny_gguf import write_tiny_gguf


def plan_file(path, dtype=torch.float32, max_context=256, max_batch=2, experts_format="bf16", **options):
    with open_model_files(path) as files:
        net = meta_model(files.model_class(), files.config(), dtype)
        placement = build_placement(PlacementOptions(**options), experts_modules(net))
        ckpt, rename, _, derived = checkpoint_view(files, net)
        tensors = stored_tensors(files.gguf if files.gguf is not None else ckpt)
        plan = plan_model(net, tensors, rename, placement, max_context=max_context, max_batch=max_batch,
                          experts_format=experts_format, derived=derived)
        return net, plan


def test_engine_float_formats_match_the_cpp_blocks():
    cpu = pytest.importorskip("tandem.ops.cpu")
    declared = cpu.formats()
    for name, (per_block, block_bytes, header) in ENGINE_FLOAT_FORMATS.items():
        f = declared[name.upper()]
        assert (f["block_elems"], f["block_bytes"], f["row_header"]) == (per_block, block_bytes, header)
    assert engine_float_bytes((8, 32, 128), "bf16") == 8 * 32 * 128 * 2
    assert engine_float_bytes((8, 32, 128), "int8") == 8 * 32 * (128 + 4)
    assert engine_float_bytes((8, 32, 128), "int4") == 8 * 32 * 2 * 36  # ~0.56 B per weight


def test_gqa_and_mla_kv_cache(tmp_path):
    _, qwen = plan_file(write_tiny(tmp_path / "q", "qwen3_moe"), max_context=100, max_batch=3)
    # 2 layers x [K | V] of 4 KV heads x head_dim 16, fp32; 3 sequences of 100 tokens in 16-token blocks
    assert qwen.kv.bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert qwen.kv.tokens == 3 * 112
    _, mla = plan_file(write_tiny(tmp_path / "d", "deepseek_v3"), dtype=torch.bfloat16)
    assert mla.kv.bytes_per_token == 3 * (32 + 8) * 2  # kv_lora_rank + rope dim per layer


def test_prefill_workspace_counts_one_chunk_of_a_long_context(tmp_path):
    # MLA layers attend a prefill step's context kv_chunk tokens at a time; decode steps all at once.
    net, _ = plan_file(write_tiny(tmp_path / "v3", "deepseek_v3"))
    attn = net.layers[0].attn
    step = plan_model_step(net)
    assert step.kv_chunk == attn.kv_chunk == 8192
    assert step.chunk_state == attn.cfg.num_heads * (attn.cfg.v_head_dim + 1) * 4
    s = StepShape(hidden=64, vocab=100, heads=4, widest=64, act_bytes=4, kv_expand=1000, kv_chunk=100, chunk_state=80)
    for attention in ("reference", "fused"):
        short, at, long = (workspace_bytes(s, 10, n, 1, attention) for n in (50, 100, 10_000))
        assert short < at == long - 3 * 10 * 80  # past the chunk: only the running outputs are added
        # decode: the whole context at once
        assert workspace_bytes(s, 10, 10_000, 1, attention, prefill=False) - at >= (10_000 - 100) * 1000
    assert workspace_bytes(s, 10, 10_000, 1, "kernel") == workspace_bytes(s, 10, 1, 1, "kernel")
    gqa, _ = plan_file(write_tiny(tmp_path / "q3", "qwen3_moe"))
    assert plan_model_step(gqa).kv_chunk == 0  # GQA attends its gathered rows in one pass


def test_long_gpu_prefill_steps_hold_one_dequantized_weight_chunk():
    """GPU prefill steps of >= DEQUANT_MIN_TOKENS tokens decode a block-format linear's weights
    (ops/triton/quant.py's "dequant" path): the largest weight, at most DEQUANT_CHUNK_BYTES."""
    from tandem.placement.memory import DEQUANT_CHUNK_BYTES, DEQUANT_MIN_TOKENS

    small = StepShape(hidden=64, vocab=100, heads=4, widest=64, act_bytes=2, widest_weight=64 * 96)
    big = StepShape(hidden=64, vocab=100, heads=4, widest=64, act_bytes=2, widest_weight=18432 * 7168)
    t = DEQUANT_MIN_TOKENS
    for s, held in ((small, 64 * 96 * 2), (big, DEQUANT_CHUNK_BYTES)):
        plain = StepShape(**{**s.__dict__, "widest_weight": 0})
        assert workspace_bytes(s, t, t, 1, "fused") - workspace_bytes(plain, t, t, 1, "fused") == held
        for args in ((t - 1, t, 1, "fused"), (t, t, 1, "reference"), (t, t, 1, "kernel")):
            assert workspace_bytes(s, *args) == workspace_bytes(plain, *args)  # short steps, CPU, decode: none
        assert workspace_bytes(s, t, t, 1, "fused", prefill=False) == workspace_bytes(plain, t, t, 1, "fused", prefill=False)


def test_float_experts_in_the_engine_and_the_load_peak(tmp_path):
    net, plan = plan_file(write_tiny(tmp_path, "deepseek_v2_lite"))  # fp32 checkpoint, experts -> bf16
    experts = [p for n, p in net.named_parameters() if ".experts." in n]
    numel = sum(p.numel() for p in experts)
    engine = [r for r in plan.rows if r.backend == "engine"]
    assert [(r.format, r.bytes, r.stored_bytes) for r in engine] == [("bf16", 2 * numel, 4 * numel)]
    assert plan.float_experts_torch == 4 * numel  # held as fp32 torch tensors until the repack
    assert plan.ram_peak > plan.ram + 2 * numel
    dense = sum(r.bytes for r in plan.rows if r.backend == "torch")
    assert dense == sum(p.numel() * 4 for n, p in net.named_parameters() if ".experts." not in n)


def test_gguf_experts_plan_at_their_block_bytes(tmp_path):
    _, gguf = write_tiny_gguf(tmp_path, "deepseek_v3_q", "Q4_K_M")
    _, plan = plan_file(gguf)
    engine = [r for r in plan.rows if r.group == "routed experts"]
    assert engine and all(r.backend == "engine" and r.bytes == r.stored_bytes for r in engine)
    _, torch_on_cpu = plan_file(gguf, experts="torch")  # BlockExperts: the same blocks, dequantized per call
    assert {r.backend for r in torch_on_cpu.rows if r.group == "routed experts"} == {"blocks"}
    table = format_plan(plan)
    assert "routed experts" in table and "KV cache" in table and "RAM " in table


def test_budgets(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemAvailable:   2048 kB\n")
    assert available_ram(meminfo) == 2048 * 1024
    assert available_ram(tmp_path / "missing") is None
    assert budgets("cpu", None, 1.5)[1:] == (int(1.5 * GB), ("free", "given by --ram-budget"))
    assert budgets("cuda", 12, 64)[:2] == (12 * GB, 64 * GB)  # given budgets probe nothing
    with pytest.raises(TandemError, match="--vram-budget must be a positive number"):
        budgets("cuda", 0, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_device_without_cuda_is_one_line():
    with pytest.raises(TandemError, match="needs a CUDA GPU, and torch sees none; pass --device cpu"):
        budgets("cuda", None, None)


def test_hot_copies_count_split_rows_padding():
    # V2-Lite's Q4_K_M experts: gate/up Q4_K rows of 2048 (1152 bytes, 16-aligned), down Q8_0 rows of
    # 1408 (1496 bytes): held as split rows padded to 1504 (ops/split_rows.py's split_bytes).
    from tandem.ops.split_rows import split_bytes

    def routed(name, shape, fmt, row_bytes):
        return ParamInfo(name, ROUTED, shape, "bfloat16", 2, layer=1, stored=fmt,
                         stored_bytes=shape[0] * shape[1] * row_bytes, blocks=True)

    gate = routed("w_gate", (64, 1408, 2048), "Q4_K", 1152)
    down = routed("w_down", (64, 2048, 1408), "Q8_0", 1496)
    assert hot_bytes_per_expert(gate, "Q4_K+Q8_0") == 1408 * split_bytes("Q4_K", 2048) == 1408 * 1152
    assert hot_bytes_per_expert(down, "Q4_K+Q8_0") == 2048 * split_bytes("Q8_0", 1408) == 2048 * 1504
    assert hot_bytes_per_expert(down, "Q5_0+Q8_0") == 2048 * 1504  # V2-Lite's other layers: split too
    assert hot_bytes_per_expert(down, "Q3_K+Q8_0") == 2048 * 1496  # a format without split rows: as stored
    assert hot_bytes_per_expert(down, None) == 2048 * 1408 * 2  # a bf16 copy
