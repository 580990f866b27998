"""Reading model weights: HF safetensors directories (sharded, mmap, FP8 block-scaled), the quant
format table, and `load_state`, which streams checkpoint tensors into a model's parameters through
the model's rename table. Never imports `models`.
"""
