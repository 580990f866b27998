"""Shape-true synthetic GGUF models: the tensor names, shapes, quant types and metadata of real
MoE models (DeepSeek-V3, DeepSeek-V2-Lite, Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral-8x7B), with
random but valid weights, at the real vocabulary size, truncated to any number of layers.

    plan(arch, layers, qtype)          -> SynthModel: every tensor, computed without writing (archs.py)
    write_synth(path, arch, layers, ...)  -> writes it at several GB/s (writer.py, blocks.py, vocab.py)

`tandem convert --synth ARCH` is the command-line front. These files are for benchmarks and
tests: their text output is noise, but every byte the engines read is where a real model's is.
"""

from tandem.testing.synth.archs import (
           ARCHS,
           QTYPES,
           SynthModel,
           SynthTensor,
           expert_bytes,
           plan,
           storage,
)
from tandem.testing.synth.writer import SYNTH_KEY, Written, write_synth

__all__ = ["ARCHS", "QTYPES", "SYNTH_KEY", "SynthModel", "SynthTensor", "Written", "expert_bytes", "plan",
           "storage", "write_synth"]
