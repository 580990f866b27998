"""bench.profile.layer_split: one step's MoE layers split by their stream calls' own stamps (what
`tandem bench --profile` and benchmarks/decode_split.py report), on made-up stamps."""

from types import SimpleNamespace

from tandem.bench.profile import layer_split


def call(submit, wait_begin, wait_end, launch, done):
    return SimpleNamespace(times_ns=(submit, wait_begin, wait_end), engine_ns=(launch, done))


def test_layer_split():
    # Layer 1: the job ends (150) before the stream waits (160): the answer comes 5 after the wait.
    # Layer 2: the stream waits first (300), the job ends at 340, the answer 10 later.
    split = layer_split([call(100, 160, 165, 104, 150), call(200, 300, 350, 203, 340)])
    assert split == {
        "submit -> wait": [60, 100],
        "wait": [5, 50],
        "submit -> launch": [4, 3],
        "engine job": [46, 137],
        "done -> answered": [5, 10],
        "gpu between": [35],
    }
    assert layer_split([]) == {k: [] for k in split}
