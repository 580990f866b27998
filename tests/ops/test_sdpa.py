"""ops.sdpa.attention (torch's fused attention, the GPU prefill path) against ops.reference.attention:
causal offsets, sliding windows, grouped-query heads, a value width unlike the key width (MLA)."""

import pytest
import torch

from tandem.ops import reference, sdpa

CASES = [(5, 9, 4, 2, 16, 12, None), (7, 7, 4, 4, 16, 16, 3), (3, 20, 6, 2, 24, 8, 5), (16, 40, 8, 8, 32, 32, None)]
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tq,tk,nh,nkv,d,dv,window", CASES)
def test_sdpa_equals_reference(device, tq, tk, nh, nkv, d, dv, window):
    g = torch.Generator().manual_seed(tq * tk)
    q, k, v = torch.randn(tq, nh, d, generator=g), torch.randn(tk, nkv, d, generator=g), torch.randn(tk, nkv, dv, generator=g)
    want = reference.attention(q, k, v, d**-0.5, tk - tq, window)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = sdpa.attention(*(t.to(device, dtype) for t in (q, k, v)), d**-0.5, tk - tq, window)
        assert got.shape == want.shape and got.dtype == dtype
        assert (got.float().cpu() - want).abs().max() <= bound * want.abs().max()
