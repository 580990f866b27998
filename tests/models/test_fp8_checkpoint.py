"""A DeepSeek-V3-style FP8 checkpoint (e4m3 weights + 128x128 block scales) loads to the same model
as its dequantized weights."""

import json

import torch

from tandem.runtime.loader import load_model
from tandem.testing.tiny import write_safetensors, write_tiny
from tests.conftest import Stepper

BLOCK = 16  # small blocks so the tiny weights span several, including partial edge blocks


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize block-wise; returns (fp8 weight, scale_inv, the dequantized weight), by slow loops."""
    rows, cols = w.shape
    sr, sc = -(-rows // BLOCK), -(-cols // BLOCK)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(sr, sc)
    deq = torch.empty(rows, cols)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = qb
            scale[i, j] = s
            deq[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = qb.float() * s
    return q, scale, deq


def test_fp8_checkpoint_equals_its_dequantized_weights(tmp_path):
    src = write_tiny(tmp_path / "src", "deepseek_v3", seed=9)
    from safetensors.torch import load_file

    tensors = load_file(src / "model.safetensors")
    fp8, plain = {}, {}
    for name, t in tensors.items():
        # As in the release: layer projections are fp8; embeddings, norms, router and lm_head are not.
        if t.dim() == 2 and ".layers." in name and "norm" not in name and not name.endswith("mlp.gate.weight"):
            q, s, deq = to_fp8(t)
            fp8[name], fp8[name + "_scale_inv"], plain[name] = q, s, deq
        else:
            fp8[name] = plain[name] = t
    for d, tensors_out, extra in ((tmp_path / "fp8", fp8, True), (tmp_path / "plain", plain, False)):
        d.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes((src / f).read_bytes())
        if extra:
            cfg = json.loads((d / "config.json").read_text())
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]}
            (d / "config.json").write_text(json.dumps(cfg))
        write_safetensors(d, tensors_out, shards=2)
    a = load_model(tmp_path / "fp8", torch.float32, progress=False)
    b = load_model(tmp_path / "plain", torch.float32, progress=False)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    tokens = list(range(1, 40))
    assert torch.equal(Stepper(a).feed(tokens), Stepper(b).feed(tokens))
