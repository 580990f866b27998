"""Triton GPU kernels, stateless like the rest of `ops`.

quant.py: GGUF block formats (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) kept as raw blocks on the GPU and
dequantized inside the kernels: `quant_matmul` (x [M, K] @ W^T, a GEMV path for decode and a
tensor-core tiled path for prefill), `dequantize` and `embedding` (quantized token embeddings);
quant_blocks.py: the format table and the in-kernel decoding of one 256-weight step of each format.
attention.py: paged-KV decode attention, `mla_decode` (MLA in latent space) and `gqa_decode`
(grouped-query, optional sliding window), flash-decoding splits merged by a second kernel; the grids
depend only on shapes and `num_splits` (`default_splits`), so a decode step can be captured in a
CUDA graph. prefill.py: `attention_lse`, causal prefill attention over one chunk of a sequence's
keys that also returns the log-sum-exp, so MLA's long prompts attend their context chunk by chunk.
fused.py: the small ops of a decoder layer in one kernel each (RMSNorm with an optional
residual add, RoPE, MLA's norm + rope + cache write, SwiGLU's silu * up), so a decode step launches
fewer; route.py: MoE routing (scores, DeepSeek's group choice, top-k, weights) in one kernel. moe.py: `moe_decode`, a few routed experts held on the GPU (hot experts) for
decode-sized steps, graph-capturable; moe_quant.py: `moe_decode_blocks`, the same on experts kept as
the file's blocks (decoded in registers by quant_blocks.py); moe_q8.py: `moe_decode_split`, the same
on split rows (ops/split_rows.py) of any GPU block format (Q4_0 / Q5_0 / Q8_0 / Q4_K / Q5_K /
Q6_K) with int8 activations.

Only this package imports triton, and importing the package itself does no work: `quant` is imported
by whoever needs it. Under TRITON_INTERPRET=1 (set before `quant` is first imported) the same kernels
run on CPU tensors, which is how the tests run without a GPU.
"""
