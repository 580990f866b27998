"""Building blocks shared by every model: attention (MLA), the one MoE block, linear/MLP, norm,
rope, and ForwardMeta (the batch description a step carries). Layers call `ops` for the math.
"""
