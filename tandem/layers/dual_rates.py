"""How a dual-path prefill step splits a layer's experts between the CPU engine and the device
(layers/dual_experts.py), and the rates it splits by, learned from measured times.

The split: an expert costs the engine max(its bytes / cpu_bw, its tokens' FLOPs / cpu_flops) and
the device its bytes / h2d_bw (the device's compute is small beside the copy). Experts go to the
device most-tokens first (they save the engine the most per byte copied) while each one taken
shortens the layer, i.e. the later of the two finishes. Rates: `DualRates` (defaults near the lent
test machine's), then learned at run time: after each long step each side's measured time (the
engine job's own timestamps; CUDA events around the device's share) against what the split
predicted moves that side's rates halfway (in log scale) toward what it achieved, kept per
power-of-two step length, so the split follows the machine, the format and the chunk length.
A model's dual layers share what they learn (SharedRates): each layer's step is learned from as
the next layer starts (its tokens-per-expert sync has run the stream past it), so a prompt's
first step already splits its later layers at the rates its first layers measured. The first
step of a length and format pays for first uses (Triton compiling the decoder) and teaches
nothing; a length not yet seen starts from the nearest one learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.layers.dual_experts import DualExperts


@dataclass(frozen=True)
class DualRates:
    cpu_bw: float = 100e9  # bytes/s the engine streams expert weights
    cpu_flops: float = 10e12  # FLOP/s the engine computes at prefill (matrix units)
    h2d_bw: float = 50e9  # bytes/s host -> device from the engine's (registered) memory


def cpu_seconds(counts: list[int], expert_bytes: int, flops_per_token: float, rates: DualRates) -> list[float]:
    """What each expert costs the engine at `rates`: streaming its bytes or computing its tokens."""
    return [max(expert_bytes / rates.cpu_bw, c * flops_per_token / rates.cpu_flops) if c else 0.0 for c in counts]


def split(counts: list[int], expert_bytes: int, flops_per_token: float, rates: DualRates,
          on_device: Sequence[int] = (), busy_s: float = 0.0) -> list[int]:
    """The experts the device takes (ids), given tokens per expert: those copied to it ahead
    (`on_device`, first and in their order, whatever their tokens), then most tokens first while
    each one taken shortens the layer (the later of the engine's and the device's finish). The
    device starts `busy_s` seconds late: the part of the copies made ahead still under way."""
    cpu = cpu_seconds(counts, expert_bytes, flops_per_token, rates)
    copy = expert_bytes / rates.h2d_bw
    taken = list(on_device)
    left = sum(cpu) - sum(cpu[e] for e in taken)
    copies = 0  # the device's own copies so far (those made ahead count in busy_s)
    ahead = set(taken)
    order = sorted((e for e, c in enumerate(counts) if c and e not in ahead), key=lambda e: -counts[e])
    for e in order:
        if max(busy_s + copy * (copies + 1), left - cpu[e]) >= max(busy_s + copy * copies, left):
            break
        taken.append(e)
        copies += 1
        left -= cpu[e]
    return taken


LEARN_MIN_SECONDS = 1e-4  # shares measured shorter than this teach nothing (timer and launch noise)


def learned(rates: DualRates, cpu: tuple[float, float] | None, device: tuple[float, float] | None,
            now: DualRates | None = None) -> DualRates:
    """The rates moved halfway (geometric mean) toward what each side achieved in a step predicted
    at `rates`: cpu / device = (predicted seconds, measured seconds) of that side's share, or None
    when it had none or was not measured. They move from `now` (the rates as they stand, where
    other steps taught them since; default `rates`). A side measured under LEARN_MIN_SECONDS
    keeps its rates; one step moves a rate by at most sqrt(10)x."""
    now = now or rates

    def factor(side, was, stands):
        if side is None or not side[0] > 0 or not side[1] >= LEARN_MIN_SECONDS:
            return 1.0
        achieved = was * side[0] / side[1]
        return min(10.0, max(0.1, achieved / stands)) ** 0.5

    fc, fd = factor(cpu, rates.cpu_bw, now.cpu_bw), factor(device, rates.h2d_bw, now.h2d_bw)
    return replace(now, cpu_bw=now.cpu_bw * fc, cpu_flops=now.cpu_flops * fc, h2d_bw=now.h2d_bw * fd)


class SharedRates:
    """Rates learned per step length (a power-of-two bucket of tokens), shared by a model's dual
    layers (enable_dual_prefill hands them one; a layer built alone has its own). The engine's
    speed depends on tokens per expert, so 512-token chunks do not teach 8192-token ones; a
    bucket not yet learned starts from the nearest one that is (the same machine and link; the
    defaults when none is).

    Each long step waits in `pending` until the stream has run past it: the next long step of
    any layer learns from every pending one (its tokens-per-expert sync ran the stream past them),
    so layer L's split uses what layers 1..L-1 measured in the same prompt. The first step of a
    (bucket, formats) pays for first uses (Triton compiling the decoder for those formats, the
    engine's first job of that length), which would teach a machine many times slower than it
    is: it is recorded, not learned from."""

    def __init__(self):
        self.by_bucket: dict[int, DualRates] = {}
        self.seen: set[tuple] = set()  # (bucket, formats) whose first step was recorded
        self.pending: list["DualExperts"] = []  # layers holding a step not yet learned from

    def rates_for(self, tokens: int, default: DualRates) -> DualRates:
        bucket = tokens.bit_length()
        if bucket in self.by_bucket:
            return self.by_bucket[bucket]
        if not self.by_bucket:
            return default
        return self.by_bucket[min(self.by_bucket, key=lambda b: (abs(b - bucket), b))]

    def learn_pending(self) -> None:
        """Learn from every pending step, in the order they ran (see DualExperts.learn)."""
        pending, self.pending = self.pending, []
        for layer in pending:
            layer.learn()
