"""dequant_fp8_blocks against a slow block-by-block reference written here."""

import math

import numpy as np
import pytest
import torch

from tandem.errors import TandemError
from tandem.weights.fp8 import dequant_fp8_blocks


def reference_dequant(w, scale_inv, block):
    """One block at a time in numpy: the plain meaning of the format."""
    wf = w.to(torch.float32).numpy()
    s = scale_inv.numpy()
    out = np.empty_like(wf)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = wf[rows, cols] * s[i, j]
    return torch.from_numpy(out)


def make_fp8(shape, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
    scale_shape = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    # Distinct scales per block, so a block mapped to the wrong scale shows.
    scale = torch.rand(scale_shape, generator=g) * 0.01 + 0.001
    return w, scale


@pytest.mark.parametrize(
    "shape, block",
    [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((128, 129), (128, 128)),
     ((100, 50), (128, 128)), ((70, 45), (16, 32))],
)
def test_matches_block_reference(shape, block):
    w, scale = make_fp8(shape, block)
    got = dequant_fp8_blocks(w, scale, block)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got, reference_dequant(w, scale, block), rtol=0, atol=0)


def test_default_block_is_128():
    w, scale = make_fp8((300, 200), (128, 128))
    torch.testing.assert_close(dequant_fp8_blocks(w, scale), reference_dequant(w, scale, (128, 128)))


def test_output_dtype():
    w, scale = make_fp8((130, 260), (128, 128))
    got = dequant_fp8_blocks(w, scale, (128, 128), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference_dequant(w, scale, (128, 128)).to(torch.bfloat16))


def test_input_is_not_modified():
    w, scale = make_fp8((256, 256), (128, 128))
    before = w.clone()
    dequant_fp8_blocks(w, scale)
    assert torch.equal(w.view(torch.uint8), before.view(torch.uint8))


def test_wrong_scale_shape_is_an_error():
    w, _ = make_fp8((300, 200), (128, 128))
    with pytest.raises(TandemError, match=r"\(2, 2\).*\(3, 2\)"):
        dequant_fp8_blocks(w, torch.ones(2, 2))
