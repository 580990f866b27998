"""Placement: where each weight lives and what memory a model will need, decided before loading.

rules.py   ordered (name regex -> target) rules, first match wins; the presets behind --cpu-moe,
           --n-cpu-moe-layers, --experts torch and --device; a rules file (--placement FILE)
memory.py  the memory planner: per-parameter bytes in the format each target holds them, grouped
           into a table (module group, device, backend, format, bytes), the KV cache and a
           workspace estimate, totals against the VRAM / RAM budgets
advice.py  budgets (detected free VRAM and available RAM, or --vram-budget / --ram-budget) and the
           refusal that names which flag to change

Data path: the runtime builds the model on the meta device and hands this package a name table
(`ParamInfo` per parameter: tandem name, group, shape, dtype, how the file stores it); nothing here
imports `models`. Placement.resolve(name) -> Target; plan_memory(params, placement, ...) -> MemoryPlan,
printed as a table and checked before any weight is read.
"""
