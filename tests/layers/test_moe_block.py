"""The MoE block's order of work (layers/moe.py): a backend that can queue its routing sync's copy
first (prepare, dual_experts' long steps) gets the shared experts queued before submit, others
after it; the output is the same either way."""

import pytest
import torch

from tandem.layers.dual_experts import SHARED_FIRST_MIN_TOKENS, shared_first_enabled
from tandem.layers.moe import MoE, MoEConfig, TorchExperts

CFG = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2, shared_intermediate_size=24,
                shared_gate=True)


class Recording(TorchExperts):
    """Torch experts that log their calls; prepare answers `ready` (None: no prepare at all)."""

    def __init__(self, cfg, log, ready):
        super().__init__(cfg)
        self.log, self.ready = log, ready
        if ready is not None:
            self.prepare = self._prepare

    def _prepare(self, x, ids):
        self.log.append("prepare")
        return self.ready

    def submit(self, x, ids, weights):
        self.log.append("submit")
        return super().submit(x, ids, weights)


def block(ready, log):
    torch.manual_seed(0)
    moe = MoE(CFG)
    experts = Recording(CFG, log, ready)
    for p in list(moe.parameters()) + list(experts.parameters()):
        torch.nn.init.normal_(p, std=0.2)
    moe.experts = experts
    hook = moe.shared.register_forward_hook(lambda *_: log.append("shared"))
    return moe, hook


@pytest.mark.parametrize("ready, order", [(None, ["submit", "shared"]), (False, ["prepare", "submit", "shared"]),
                                          (True, ["prepare", "shared", "submit"])])
def test_shared_experts_go_first_only_when_the_backend_prepared(ready, order):
    x = torch.randn(6, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    log: list[str] = []
    moe, _ = block(ready, log)
    out = moe(x)
    assert log == order
    ref, _ = block(None, [])
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)  # the same sums in the same order


def test_shared_first_threshold_and_switch(monkeypatch):
    monkeypatch.delenv("TANDEM_SHARED_FIRST", raising=False)
    assert not shared_first_enabled(SHARED_FIRST_MIN_TOKENS - 1)
    assert shared_first_enabled(SHARED_FIRST_MIN_TOKENS)
    monkeypatch.setenv("TANDEM_SHARED_FIRST", "0")
    assert not shared_first_enabled(1 << 20)
    monkeypatch.setenv("TANDEM_SHARED_FIRST", "1")
    assert shared_first_enabled(512, min_tokens=128)
    assert not shared_first_enabled(64, min_tokens=128)  # never below the dual path's own threshold


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_dual_blocks_shared_experts_first_on_a_gpu(tmp_path, monkeypatch):
    """A tiny GGUF model's MoE block on the GPU with its experts in the engine and the dual path:
    the shared experts queued before the routing sync (TANDEM_SHARED_FIRST=1) give the block's
    output of the usual order (0), to fp32 summation order (the device share sums with atomics)."""
    from tandem.layers.dual_experts import DualExperts
    from tandem.runtime.llm import LLM
    from tandem.testing.tiny_gguf import write_tiny_gguf

    _, gguf = write_tiny_gguf(tmp_path, "deepseek_v3_q", "Q4_K_M", seed=6)
    llm = LLM(gguf, device="cuda", progress=False, max_batch=1, max_context=256)
    blocks = [m for m in llm.model.modules() if isinstance(m, MoE) and isinstance(m.experts, DualExperts)]
    if not blocks:
        pytest.skip("no dual layer here (the engine's kernels keep the file's rows)")
    moe = next(b for b in blocks if b.shared is not None)
    moe.experts.min_tokens = 1
    x = torch.randn(96, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(2)).to("cuda", llm.dtype)
    calls = []
    prepare = moe.experts.prepare
    monkeypatch.setattr(moe.experts, "prepare", lambda *a: calls.append(1) or prepare(*a))
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("TANDEM_SHARED_FIRST", switch)
        with torch.no_grad():
            outs[switch] = moe(x).float().cpu()
    assert len(calls) == 2
    err = float((outs["1"] - outs["0"]).abs().max() / outs["0"].abs().max())
    assert err < 1e-3, err
