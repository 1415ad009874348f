"""Projection heads convert exactly to nn.Linear; unsafe checkpoints are rejected without running."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from linkrisk.errors import InputError
from linkrisk.models.checkpoints import load_state_dict
from linkrisk.models.convert import fold_batchnorm, projection_to_linear


def _trained_norm(features: int, kind=nn.BatchNorm1d) -> nn.modules.batchnorm._BatchNorm:
    """A batch norm with non-trivial running statistics, scale and shift, in eval mode."""
    torch.manual_seed(1)
    norm = kind(features)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(features))
        norm.running_var.copy_(torch.rand(features) + 0.5)
        norm.weight.copy_(torch.randn(features))
        norm.bias.copy_(torch.randn(features))
    return norm.eval()


def test_projection_parameter_becomes_linear():
    torch.manual_seed(0)
    projection = nn.Parameter(torch.randn(12, 5))
    x = torch.randn(7, 12)
    linear = projection_to_linear(projection)
    torch.testing.assert_close(linear(x), x @ projection, rtol=0, atol=1e-6)
    assert linear.bias is None
    with pytest.raises(InputError, match="2-D"):
        projection_to_linear(torch.randn(3))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_then_batchnorm_folds(bias):
    torch.manual_seed(0)
    layer = nn.Linear(10, 6, bias=bias)
    norm = _trained_norm(6)
    x = torch.randn(9, 10)
    folded = fold_batchnorm(layer, norm)
    torch.testing.assert_close(folded(x), norm(layer(x)), rtol=1e-5, atol=1e-5)


def test_pointwise_conv_then_batchnorm_folds():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, kernel_size=1)
    norm = _trained_norm(4, nn.BatchNorm2d)
    x = torch.randn(3, 8, 1, 1)  # pooled image features, the input of an image projector
    folded = fold_batchnorm(conv, norm)
    torch.testing.assert_close(folded(x.flatten(1)), norm(conv(x)).flatten(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="only 1x1 convolutions"):
        fold_batchnorm(nn.Conv2d(8, 4, kernel_size=3), norm)
    with pytest.raises(InputError, match="batch norm over 4 features cannot follow a layer with 5 outputs"):
        fold_batchnorm(nn.Linear(8, 5), norm)


def test_converted_heads_pass_opacus_validation():
    from opacus.validators import ModuleValidator

    head = nn.Sequential(fold_batchnorm(nn.Linear(10, 6), _trained_norm(6)), nn.ReLU(),
                         projection_to_linear(torch.randn(6, 4)))
    assert ModuleValidator.validate(head, strict=False) == []


def test_state_dict_from_safetensors_and_nested_checkpoint(tmp_path):
    weights = {"proj": torch.randn(3, 2), "bias": torch.zeros(2)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == {"proj", "bias"}
        torch.testing.assert_close(loaded["proj"], weights["proj"])


class _Payload:
    """Unpickling this would create a marker file, the way a malicious checkpoint runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_rejected_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"proj": torch.zeros(2), "extra": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="evil.pt: rejected, because the checkpoint is a pickle"):
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unreadable_weights_are_named(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="broken.safetensors: not a readable safetensors file"):
        load_state_dict(tmp_path / "broken.safetensors")
    with pytest.raises(InputError, match="broken.pt: not a readable torch checkpoint"):
        load_state_dict(tmp_path / "broken.pt")
    with pytest.raises(InputError, match="missing.pt: weights file not found"):
        load_state_dict(tmp_path / "missing.pt")
