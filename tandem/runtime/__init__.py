"""The runtime: load a model (loader), tokenize (tokenizer), and run requests through the one Engine.

Engine.step(): Scheduler.schedule() -> Batch -> Runner.run() builds ForwardMeta (or replays the
decode batch size's CUDA graph) -> model -> logits -> sample -> Scheduler.update(). KV cache is
paged. `LLM` is the Python API over it; at load it binds the backends (experts.py, gpu_weights.py,
hot_experts.py).
"""
