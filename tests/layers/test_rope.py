"""RopeConfig's checks of YaRN's numbers (fuzzing: a factor of -1 passed and gave negative
frequencies; the loader also computes them once, naming config.json)."""

import pytest

from tandem.errors import TandemError
from tandem.layers.rope import RopeConfig, rope_frequencies


@pytest.mark.parametrize("key, value", [("factor", -1.0), ("factor", 0), ("beta_fast", -1), ("beta_slow", 0),
                                        ("original_max_position_embeddings", 0), ("mscale", float("inf")),
                                        ("attention_factor", "x"), ("factor", True)])
def test_yarn_values_out_of_range_are_refused(key, value):
    scaling = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, key: value}
    with pytest.raises(TandemError, match=f"rope_scaling {key} = .* must be a finite number"):
        RopeConfig(dim=64, scaling=tuple(scaling.items()))


def test_deepseek_yarn_values_pass():
    scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    inv_freq, scale = rope_frequencies(RopeConfig(dim=64, scaling=tuple(scaling.items()), max_position_embeddings=163840))
    assert inv_freq.isfinite().all() and (inv_freq > 0).all() and scale == 1.0
