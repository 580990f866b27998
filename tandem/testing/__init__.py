"""Helpers that build models of real architectures with random weights: tiny HF directories and
their GGUF files for tests and docs, shape-true synthetic GGUFs for benchmarks (`tandem convert
--synth`), and the tokenizer writer `scripts/train_demo_model.py` uses. `tandem eval compare` also
borrows the tiny GGUF converter. Never used on the inference path.
"""
