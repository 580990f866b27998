"""Building blocks shared by every model: attention (MLA, GQA), the one MoE block and its experts
backends (TorchExperts, BlockExperts, CpuExperts, HotExperts), linear/MLP and the quantized GPU
linear/embedding, norm, rope, and ForwardMeta (the batch description a step carries). Layers call
`ops` for the math.
"""
