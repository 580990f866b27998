"""Write a synthetic GGUF: the metadata llama.cpp's converter writes, then the tensors, streamed.

Header, key/values and tensor infos go through gguf's GGUFWriter; the data section is written
here chunk by chunk (never a whole tensor in memory), chunks drawn on a thread pool, in order.
The file appears under its name only when complete (written as NAME.part, then renamed).
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)
from tqdm import tqdm

from tandem.errors import TandemError
from tandem.testing.synth import archs, blocks
from tandem.testing.synth.vocab import add_tokenizer
from tandem.weights.quant import format_of

FILE_TYPES = {"Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M, "Q8_0": LlamaFileType.MOSTLY_Q8_0, "BF16": LlamaFileType.MOSTLY_BF16}
SYNTH_KEY = "tandem.synth."  # our own keys: what the file is a truncation of (llama.cpp ignores them)


@dataclass(frozen=True)
class Written:
    path: Path
    nbytes: int
    seconds: float
    model: archs.SynthModel

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds else 0.0


def write_synth(
    path: str | Path,
    arch: str,
    layers: int | None = None,
    qtype: str = "Q4_K_M",
    *,
    seed: int = 0,
    router_skew: float = 0.0,
    scale: int = 1,
    mix_depth: str = "full",
    threads: int | None = None,
    progress: bool = True,
) -> Written:
    """Write `arch` truncated to `layers` as `qtype` to `path`; see testing.synth."""
    if router_skew < 0:
        raise TandemError(f"--router-skew must be >= 0, got {router_skew}")
    model = archs.plan(arch, layers, qtype, scale, mix_depth)
    path = Path(path)
    if path.suffix != ".gguf":
        raise TandemError(f"the output file must end in .gguf, got {path.name}")
    if not path.parent.is_dir():
        raise TandemError(f"the output folder {path.parent} does not exist")
    part = path.with_name(path.name + ".part")
    start = time.perf_counter()
    writer = GGUFWriter(part, model.config["family"])
    try:
        _add_metadata(writer, model, seed, router_skew, mix_depth)
        for t in model.tensors:
            ggml = GGMLQuantizationType(format_of(t.format).ggml_type)
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_data(writer, model, seed, router_skew, threads or len(os.sched_getaffinity(0)), progress)
        writer.close()
        part.replace(path)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return Written(path, path.stat().st_size, time.perf_counter() - start, model)


def _write_data(w: GGUFWriter, model: archs.SynthModel, seed: int, skew: float, threads: int, progress: bool) -> None:
    fout = w.fout[0]
    bar = tqdm(total=model.total_bytes, unit="B", unit_scale=True, desc="writing", disable=not progress)
    with ThreadPoolExecutor(threads) as pool, bar:
        for index, t in enumerate(model.tensors):
            w.write_padding(fout, fout.tell())
            for chunk in _chunks(pool, threads, t, (seed, index), skew):
                fout.write(memoryview(chunk))
                bar.update(chunk.nbytes)
            w.write_padding(fout, t.nbytes)


def _chunks(pool: ThreadPoolExecutor, threads: int, t: archs.SynthTensor, seed: tuple[int, int], skew: float):
    """The tensor's bytes in order, in chunks of ~32 MiB drawn ahead on the pool (bounded window)."""
    if t.format == "F32":
        yield blocks.small_f32(t.role, t.shape, seed, skew).view(np.uint8).reshape(-1)
        return
    k = t.shape[-1]
    rows = int(np.prod(t.shape[:-1]))
    step = blocks.chunk_rows(t.nbytes // rows)
    pending: deque = deque()
    for c, first in enumerate(range(0, rows, step)):
        pending.append(pool.submit(blocks.weight_chunk, t.format, k, min(step, rows - first), (*seed, c)))
        if len(pending) >= 2 * threads:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _add_metadata(w: GGUFWriter, m: archs.SynthModel, seed: int, skew: float, mix_depth: str) -> None:
    c = m.config
    scaled = f", debug scale 1/{c['scale']}: NOT the real shapes" if c.get("scale", 1) > 1 else ""
    w.add_name(f"{c['name']} (synthetic random weights, {m.layers} of {m.full_layers} layers{scaled})")
    w.add_block_count(m.layers)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    (_deepseek_keys if c["family"] == "deepseek2" else _gqa_keys)(w, c)
    w.add_file_type(FILE_TYPES[m.qtype])
    if m.qtype != "BF16":
        w.add_quantization_version(2)
    add_tokenizer(w, c)
    full = archs.full_model(m)
    w.add_string(SYNTH_KEY + "arch", m.arch)
    w.add_uint32(SYNTH_KEY + "full_block_count", full.layers)
    w.add_uint32(SYNTH_KEY + "full_moe_block_count", full.moe_layers)
    w.add_uint64(SYNTH_KEY + "full_routed_expert_bytes", archs.expert_bytes(full))
    w.add_uint32(SYNTH_KEY + "seed", seed)
    w.add_float32(SYNTH_KEY + "router_skew", skew)
    w.add_uint32(SYNTH_KEY + "scale", c.get("scale", 1))
    w.add_string(SYNTH_KEY + "mix_depth", mix_depth)


def _deepseek_keys(w: GGUFWriter, c: dict) -> None:
    """DeepseekV2Model.set_gguf_parameters (MLA written as MQA with the *_mla keys, split kv_b)."""
    rank, nope, rope, v = c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    w.add_head_count_kv(1)
    w.add_vocab_size(c["vocab_size"])
    w.add_leading_dense_block_count(c["first_k_dense_replace"])
    if c.get("q_lora_rank"):
        w.add_q_lora_rank(c["q_lora_rank"])
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(v)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    w.add_expert_weights_norm(c["norm_topk_prob"])
    sigmoid = c["scoring_func"] == "sigmoid"
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX)
    if c["n_group"] > 1:
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c["topk_group"])
    w.add_rope_dimension_count(rope)
    y = c["rope_scaling"]
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(y["factor"])
    w.add_rope_scaling_orig_ctx_len(y["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(y["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(y["beta_slow"])
    w.add_rope_scaling_yarn_log_mul(0.1 * y["mscale_all_dim"])


def _gqa_keys(w: GGUFWriter, c: dict) -> None:
    """Qwen3MoeModel's / LlamaModel's keys (Mixtral: llama arch, experts from feed_forward_length)."""
    w.add_head_count_kv(c["num_key_value_heads"])
    if c["family"] == "llama":
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(c["head_dim"])
    else:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
