"""`tandem bench`: engine speed beside this machine's own limits, measured in one run.

Data path: machine.py (DRAM read, pinned H2D, both at once, AMX peak) -> bounds.py (expert
bytes from the file's real tensor types -> decode roofline, U-user bound, CPU and dual-path
prefill bounds) -> measure.py (the runtime's LLM: warm-up, prefill / TTFT / decode / users,
medians, peak RAM and VRAM; dual_split.py: each timed prefill's CPU / GPU split per chunk)
[-> profile.py: time per layer by part] [-> extrapolate.py: two truncations -> a full-depth
estimate] [-> peer.py: llama.cpp the same way] -> report.py (table, JSON, plot). suite.py runs
it all, and probes DRAM once more after the engines: the bounds take the best reading of the run.
Uses only the runtime's public API; never on the inference path.
"""
