"""Stateless operators: `reference` (plain torch, the spec), later `triton/*` and `cpu` (the sole
user of the C++ extension tandem._C). Every fast kernel is tested against `reference`.
"""
