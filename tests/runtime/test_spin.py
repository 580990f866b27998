"""How long idle engine workers spin: long with a GPU (a job waits for every worker, and waking
sleeping ones is slow), short on a CPU-only run; TANDEM_SPIN_US overrides both."""

import pytest

from tandem.errors import TandemError
from tandem.runtime.experts import GPU_SPIN_US, SPIN_US, spin_us


def test_spin_defaults_and_override(monkeypatch):
    monkeypatch.delenv("TANDEM_SPIN_US", raising=False)
    assert spin_us(gpu=True) == GPU_SPIN_US > SPIN_US == spin_us(gpu=False)
    monkeypatch.setenv("TANDEM_SPIN_US", "250")
    assert spin_us(gpu=True) == spin_us(gpu=False) == 250
    monkeypatch.setenv("TANDEM_SPIN_US", "-1")
    with pytest.raises(TandemError, match="TANDEM_SPIN_US"):
        spin_us(gpu=False)
