"""The runtime: load a model (loader), tokenize (tokenizer), and run requests through the one Engine.

Engine.step(): Scheduler.schedule() -> Batch -> Runner.run() builds ForwardMeta -> model ->
logits -> sample -> Scheduler.update(). KV cache is paged. `LLM` is the Python API over it.
"""
