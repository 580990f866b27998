"""load_state: streaming a checkpoint into preallocated parameters, and every way it can go wrong."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tandem.errors import TandemError
from tandem.weights.checkpoint import Checkpoint
from tandem.weights.loader import load_state

N_EXPERTS = 4
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight")


def checkpoint_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.gate.weight": torch.randn(N_EXPERTS, 4, generator=g),
        # Multi-token-prediction layer: in the file, not in our model.
        "model.layers.2.mtp.weight": torch.randn(3, generator=g),
    }
    for e in range(N_EXPERTS):
        tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] = torch.randn(6, 4, generator=g)
    return tensors


def rename(name):
    if m := EXPERT.fullmatch(name):
        return f"layers.{m[1]}.experts.w_gate[{m[2]}]"
    return {
        "model.embed_tokens.weight": "embed",
        "model.norm.weight": "norm",
        "model.layers.1.mlp.gate.weight": "layers.1.router",
    }.get(name)


def make_params(n_experts=N_EXPERTS, embed_shape=(10, 4)):
    return {
        "embed": torch.zeros(embed_shape, dtype=torch.bfloat16),  # stored fp32: converted on copy
        "norm": torch.zeros(4),  # stored bf16
        "layers.1.router": torch.nn.Parameter(torch.zeros(N_EXPERTS, 4)),  # requires grad: copy must still work
        "layers.1.experts.w_gate": torch.zeros(n_experts, 6, 4),
    }


IGNORE = [r"model\.layers\.\d+\.mtp\..*"]


@pytest.fixture
def ckpt(tmp_path):
    tensors = checkpoint_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ck:
        yield ck, tensors


def load_error(ck, params, rename=rename, ignore=IGNORE):
    with pytest.raises(TandemError) as e:
        load_state(ck, params, rename, ignore, progress=False)
    return str(e.value)


def test_loads_every_tensor(ckpt):
    ck, tensors = ckpt
    params = make_params()
    load_state(ck, params, rename, IGNORE, progress=False)
    assert params["embed"].dtype == torch.bfloat16
    assert torch.equal(params["embed"], tensors["model.embed_tokens.weight"].to(torch.bfloat16))
    assert params["norm"].dtype == torch.float32
    assert torch.equal(params["norm"], tensors["model.norm.weight"].float())
    assert torch.equal(params["layers.1.router"].detach(), tensors["model.layers.1.mlp.gate.weight"])
    for e in range(N_EXPERTS):
        want = tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]
        assert torch.equal(params["layers.1.experts.w_gate"][e], want), e


def test_streams_in_checkpoint_order(ckpt, monkeypatch):
    ck, _ = ckpt
    reads = []
    real_get = ck.get

    def spy(name, dtype=None):
        reads.append(name)
        return real_get(name, dtype)

    monkeypatch.setattr(ck, "get", spy)
    load_state(ck, make_params(), rename, IGNORE, progress=False)
    assert reads == [n for n in ck.names() if "mtp" not in n]  # once each, in file order, ignored never read


def test_progress_bar(ckpt, capsys):
    ck, _ = ckpt
    load_state(ck, make_params(), rename, IGNORE, progress=True)
    assert "loading weights" in capsys.readouterr().err
    load_state(ck, make_params(), rename, IGNORE, progress=False)
    assert capsys.readouterr().err == ""


def test_fp8_checkpoint_into_bf16(tmp_path):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(130, 140, generator=g) * 30).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 2, generator=g) + 0.5
    save_file({"proj.weight": w, "proj.weight_scale_inv": scale}, str(tmp_path / "model.safetensors"))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    params = {"proj": torch.zeros(130, 140, dtype=torch.bfloat16)}
    with Checkpoint.open(tmp_path) as ck:
        load_state(ck, params, {"proj.weight": "proj"}.get, progress=False)
    rows = torch.arange(130)[:, None] // 128
    cols = torch.arange(140)[None, :] // 128
    assert torch.equal(params["proj"], (w.float() * scale[rows, cols]).to(torch.bfloat16))


def test_shape_mismatch(ckpt):
    ck, _ = ckpt
    message = load_error(ck, make_params(embed_shape=(12, 4)))
    assert "config/weights mismatch" in message
    assert "'model.embed_tokens.weight' has shape (10, 4) but the model expects (12, 4) for 'embed'" in message


def test_unexpected_tensor(ckpt):
    ck, _ = ckpt
    message = load_error(ck, make_params(), ignore=())
    assert "unexpected tensors" in message and "'model.layers.2.mtp.weight'" in message


def test_missing_tensor(ckpt):
    ck, _ = ckpt
    params = make_params()
    params["lm_head"] = torch.zeros(10, 4)
    message = load_error(ck, params)
    assert "missing tensors (1): 'lm_head'" in message


def test_missing_expert_slot(ckpt):
    ck, _ = ckpt
    message = load_error(ck, make_params(n_experts=N_EXPERTS + 2))
    assert "missing tensors (2): 'layers.1.experts.w_gate[4]', 'layers.1.experts.w_gate[5]'" in message


def test_expert_index_out_of_range(ckpt):
    ck, _ = ckpt
    message = load_error(ck, make_params(n_experts=N_EXPERTS - 1))
    assert "'model.layers.1.mlp.experts.3.gate_proj.weight' goes to 'layers.1.experts.w_gate[3]'" in message
    assert "holds only 3 slots" in message


def test_duplicate_write(ckpt):
    ck, _ = ckpt

    def twice(name):
        return "embed" if name == "model.layers.1.mlp.gate.weight" else rename(name)

    params = make_params()
    message = load_error(ck, params, rename=twice)
    assert "'model.embed_tokens.weight' and 'model.layers.1.mlp.gate.weight' both write into 'embed'" in message


def test_whole_and_slot_writes_collide(ckpt):
    ck, _ = ckpt

    def clash(name):
        return "layers.1.experts.w_gate" if name == "model.layers.1.mlp.gate.weight" else rename(name)

    message = load_error(ck, make_params(), rename=clash)
    assert "both write into 'layers.1.experts.w_gate'" in message


def test_target_the_model_does_not_have(ckpt):
    ck, _ = ckpt

    def stray(name):
        return "layers.9.router" if name == "model.layers.1.mlp.gate.weight" else rename(name)

    message = load_error(ck, make_params(), rename=stray)
    assert "'model.layers.1.mlp.gate.weight' -> 'layers.9.router'" in message


def test_all_problems_at_once_and_nothing_written(ckpt):
    ck, _ = ckpt
    params = make_params(embed_shape=(12, 4), n_experts=N_EXPERTS + 1)
    params["lm_head"] = torch.zeros(3)
    message = load_error(ck, params, ignore=())
    for part in ("config/weights mismatch", "unexpected tensors", "missing tensors (2)"):
        assert part in message, part
    # The mapping is checked from headers before any data is read: a failed load leaves params alone.
    assert all(not p.detach().any() for p in params.values())


def test_long_lists_are_capped(tmp_path):
    save_file({f"extra.{i}": torch.ones(1) for i in range(12)}, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ck:
        message = load_error(ck, {}, rename=lambda name: None, ignore=())
    assert "unexpected tensors in the checkpoint (12)" in message and "and 7 more" in message
    assert message.count("'extra.") == 5


def test_integer_tensors_do_not_fill_float_weights(tmp_path):
    """An int32 / bool / uint8 tensor where the model holds floats was cast silently (fuzzing)."""
    for dtype in (torch.int32, torch.bool, torch.uint8):
        save_file({"proj.weight": torch.ones(4, 4, dtype=dtype)}, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text("{}")
        with Checkpoint.open(tmp_path) as ck, pytest.raises(TandemError, match="stored as .* floating-point"):
            load_state(ck, {"proj": torch.zeros(4, 4)}, {"proj.weight": "proj"}.get, progress=False)
