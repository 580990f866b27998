"""Reading model weights: HF safetensors directories (sharded, mmap, FP8 block-scaled), GGUF files
(single or split, mmap, quantized blocks), the quant format table, a derived view (tensors a model
builds from others), and `load_state`, which streams checkpoint tensors into a model's parameters
through the model's rename table. Never imports `models`.
"""
