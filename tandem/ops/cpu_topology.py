"""The CPU engine's topology: which cpus its workers may use, grouped by NUMA node (sysfs), and how
many workers each node gets. Pure Python; ops/cpu.py validates and passes the result to the engine."""

from __future__ import annotations

import glob


def parse_cpulist(text: str) -> list[int]:
    cpus = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus += range(int(lo), int(hi) + 1)
        elif part:
            cpus.append(int(part))
    return cpus


def default_nodes(allowed: list[int]) -> list[list[int]]:
    """The machine's NUMA nodes (sysfs), restricted to the cpus this process may use."""
    nodes, seen = [], set()
    paths = glob.glob("/sys/devices/system/node/node[0-9]*/cpulist")
    for path in sorted(paths, key=lambda p: int(p.split("/node")[-1].split("/")[0])):
        with open(path) as f:
            cpus = [c for c in parse_cpulist(f.read()) if c in allowed]
        if cpus:
            nodes.append(cpus)
            seen.update(cpus)
    rest = [c for c in allowed if c not in seen]
    if not nodes:
        return [allowed]
    nodes[0] += rest  # cpus sysfs does not place (unusual): keep them usable
    return nodes


def check_nodes(numa_nodes, allowed: list[int]) -> list[list[int]]:
    if not isinstance(numa_nodes, (list, tuple)) or not numa_nodes:
        raise ValueError("numa_nodes must be a non-empty list of cpu-id lists, one per node")
    seen: set[int] = set()
    nodes = []
    for i, node in enumerate(numa_nodes):
        cpus = list(node) if isinstance(node, (list, tuple)) else None
        if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
            raise ValueError(f"numa_nodes[{i}] must be a non-empty list of cpu ids; got {node!r}")
        for c in cpus:
            if c in seen:
                raise ValueError(f"numa_nodes: cpu {c} appears in more than one node")
            if c not in allowed:
                raise ValueError(f"numa_nodes: cpu {c} is not available to this process (allowed: {allowed})")
            seen.add(c)
        nodes.append(cpus)
    return nodes


def split_threads(n: int, sizes: list[int]) -> list[int]:
    """n threads over nodes in proportion to their cpu counts, at least one each."""
    shares = [1] * len(sizes)
    for _ in range(n - len(sizes)):
        i = max(range(len(sizes)), key=lambda j: (sizes[j] / shares[j], -j))
        shares[i] += 1
    return shares
