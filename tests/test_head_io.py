"""Heads saved as a layer list plus safetensors: exact round trips and clear rejections."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from linkrisk.errors import InputError
from linkrisk.models.head_io import PatchMean, as_sequential, build_head, describe_head, load_heads, save_heads


class _FunctionalGelu(nn.Module):
    """A head whose activation is a function call, invisible among its children."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.dense(x)))


def _randomise(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    return module


def test_round_trip_mlp_head(tmp_path):
    image_head = _randomise(nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.LayerNorm(5), nn.Dropout(0.1),
                                          nn.Linear(5, 3, bias=False)))
    text_head = _randomise(nn.Linear(4, 3))
    save_heads(tmp_path, image_head, text_head, {"model": {"name": "tiny"}})
    image_copy, text_copy, metadata = load_heads(tmp_path)
    x, t = torch.randn(7, 6), torch.randn(7, 4)
    image_head.eval()
    with torch.no_grad():
        torch.testing.assert_close(image_copy(x), image_head(x))
        torch.testing.assert_close(text_copy(t), text_head(t))
    assert metadata == {"model": {"name": "tiny"}}
    layers = json.loads((tmp_path / "heads.json").read_text())["image_head"]
    assert [layer["type"] for layer in layers] == ["linear", "gelu", "layer_norm", "identity", "linear"]


def test_patch_mean_head():
    head = _randomise(nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3), PatchMean()))
    copy = as_sequential(head)
    patches = torch.randn(2, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(patches), head(patches))
    assert copy(patches).shape == (2, 3)
    assert describe_head(head)[-1] == {"type": "patch_mean"}


def test_hidden_functional_step_is_rejected():
    with pytest.raises(InputError, match="not a plain chain of its layers"):
        as_sequential(_randomise(_FunctionalGelu()))


def test_unsupported_layer_is_rejected():
    with pytest.raises(InputError, match="cannot save a head layer of type Conv1d"):
        describe_head(nn.Sequential(nn.Conv1d(3, 3, 1)))
    with pytest.raises(InputError, match="unknown head layer type 'softmax'"):
        build_head([{"type": "softmax"}])


def test_load_rejects_damaged_files(tmp_path):
    save_heads(tmp_path, nn.Linear(4, 3), nn.Linear(5, 3))
    spec = json.loads((tmp_path / "heads.json").read_text())
    spec["text_head"][0]["in"] = 6
    (tmp_path / "heads.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="weights do not fit the text_head"):
        load_heads(tmp_path)
    (tmp_path / "heads.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_heads(tmp_path)
    (tmp_path / "heads.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="format 'other' is not"):
        load_heads(tmp_path)
    with pytest.raises(InputError, match="heads.json: not found"):
        load_heads(tmp_path / "nowhere")


def test_malformed_layer_lists_are_rejected(tmp_path):
    for layers, message in (([], "non-empty list"), ([{"type": "linear"}], "malformed head layer list"),
                            ([{"type": "linear", "in": -3, "out": 2, "bias": True}], "below 1"),
                            ([5], "a layer must be an object")):
        with pytest.raises(InputError, match=message):
            build_head(layers)
    save_heads(tmp_path, nn.Linear(4, 3), nn.Linear(5, 3))
    spec = json.loads((tmp_path / "heads.json").read_text())
    del spec["image_head"]
    (tmp_path / "heads.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="no image_head entry"):
        load_heads(tmp_path)
    (tmp_path / "heads.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="format 'list' is not"):
        load_heads(tmp_path)


def test_nan_weights_are_named():
    head = nn.Linear(4, 3)
    with torch.no_grad():
        head.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="weights contain NaN or infinity"):
        as_sequential(head)
