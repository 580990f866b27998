"""Model architectures, one file each (config dataclass, module tree from `layers`, checkpoint
rename table), and the registry that picks one from an HF config. Models import `layers` and
torch only; they see batching through `layers.meta.ForwardMeta`.
"""
