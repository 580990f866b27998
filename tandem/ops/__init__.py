"""Stateless operators: `reference` (plain torch, the spec), `sdpa` (torch's fused attention for
GPU prefill), `triton/*` (GPU kernels: quantized matmul, paged decode attention, the fused small
ops of a layer, routing, hot experts' decode), `split_rows` (hot experts' blocks regrouped for
those kernels, plain torch), `cpu` (the sole
user of the C++ extension tandem._C; `cpu_topology`: its workers' cpus per NUMA node) and `cuda_host`
(host functions on a CUDA stream). Every fast
kernel is tested against `reference`.
"""
