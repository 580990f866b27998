"""Helpers that build tiny random models of real architectures (HF directories, GGUF files) for
tests, docs, benchmarks and the built-in demo model. Never used on the inference path.
"""
