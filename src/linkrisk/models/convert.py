"""Exact conversion of a model's projection layers into ``nn.Linear`` heads that Opacus can train.

Vision-language models store their projections in several forms: a bare
``nn.Parameter`` used as ``features @ projection`` (OpenAI CLIP and
open_clip), an ``nn.Linear``, a chain of linear layers and activations
(BiomedCLIP's MLP text projection), or a linear layer or 1x1 convolution
followed by an eval-mode ``BatchNorm`` (BioViL's image projector). Each
converts to ``nn.Linear`` modules, with activations between them where the
model has them, computing the same map, so a DP head starts from the
model's own weights and Opacus receives only layers it supports.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from linkrisk.errors import InputError


def projection_to_linear(projection: torch.Tensor) -> nn.Linear:
    """Turn a ``[in, out]`` projection used as ``x @ projection`` into ``nn.Linear(in, out, bias=False)``."""
    if projection.ndim != 2:
        raise InputError(f"a projection must be a 2-D [in, out] matrix, got shape {tuple(projection.shape)}")
    linear = nn.Linear(projection.shape[0], projection.shape[1], bias=False)
    with torch.no_grad():
        linear.weight.copy_(projection.detach().T.to(linear.weight.dtype))
    return linear


# Parameter-free activations a head may keep between its linear layers. linkrisk.models.head_io can save all three.
_HEAD_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.Tanh)


def copy_linear(layer: nn.Linear) -> nn.Linear:
    """Copy ``layer`` into a new trainable ``nn.Linear`` with the same weight, and a bias only where it has one."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


def chain_to_head(layers: Iterable[nn.Module]) -> nn.Module:
    """Copy a chain of linear layers and activations, applied in the given order, into a trainable head.

    ``nn.Dropout`` and ``nn.Identity`` are dropped, because they change
    nothing in eval mode, the mode used for embedding. A chain that reduces
    to one ``nn.Linear`` is returned as that layer. A longer chain becomes
    an ``nn.Sequential`` of ``nn.Linear`` and activation modules.

    Raises:
        InputError: a layer is neither ``nn.Linear`` nor GELU, ReLU or Tanh,
            or the chain has no linear layer.
    """
    head_layers: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Dropout | nn.Identity):
            continue
        if isinstance(layer, nn.Linear):
            head_layers.append(copy_linear(layer))
        elif type(layer) in _HEAD_ACTIVATIONS:
            head_layers.append(copy.deepcopy(layer))
        else:
            raise InputError(f"cannot copy a {type(layer).__name__} layer into a projection head, because a head "
                             f"may contain only nn.Linear and {', '.join(cls.__name__ for cls in _HEAD_ACTIVATIONS)}")
    if not any(isinstance(layer, nn.Linear) for layer in head_layers):
        raise InputError("a projection head needs at least one nn.Linear layer, but the chain has none")
    if len(head_layers) == 1:
        return head_layers[0]
    return nn.Sequential(*head_layers)


def as_linear(layer: nn.Module) -> nn.Linear:
    """Copy ``layer`` into an ``nn.Linear``; a 1x1 convolution is a linear map over channels."""
    if isinstance(layer, nn.Linear):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=True)
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            linear.bias.copy_(layer.bias if layer.bias is not None else torch.zeros(layer.out_features))
        return linear
    if isinstance(layer, nn.Conv2d | nn.Conv1d):
        if any(k != 1 for k in layer.kernel_size) or layer.groups != 1:
            raise InputError(f"only 1x1 convolutions without groups are linear maps over channels; got kernel "
                             f"{layer.kernel_size} and {layer.groups} groups")
        linear = nn.Linear(layer.in_channels, layer.out_channels, bias=True)
        with torch.no_grad():
            linear.weight.copy_(layer.weight.reshape(layer.out_channels, layer.in_channels))
            linear.bias.copy_(layer.bias if layer.bias is not None else torch.zeros(layer.out_channels))
        return linear
    raise InputError(f"cannot convert {type(layer).__name__} to a linear layer; expected nn.Linear or a 1x1 convolution")


def fold_batchnorm(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> nn.Linear:
    """Fold an eval-mode batch norm that follows ``layer`` (linear or 1x1 convolution) into one ``nn.Linear``.

    With running mean ``m``, variance ``v``, scale ``g``, shift ``b`` and
    ``s = g / sqrt(v + eps)``, the folded layer has weight ``s * W`` and
    bias ``s * (bias - m) + b``. The fold uses the running statistics, so
    it equals the model in eval mode, the mode used for embedding.
    """
    linear = as_linear(layer)
    if norm.num_features != linear.out_features:
        raise InputError(f"batch norm over {norm.num_features} features cannot follow a layer with "
                         f"{linear.out_features} outputs")
    if norm.running_mean is None or norm.running_var is None:
        raise InputError("the batch norm keeps no running statistics (track_running_stats=False), so it cannot be "
                         "folded into a fixed linear layer")
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = norm.bias if norm.bias is not None else torch.zeros_like(scale)
        linear.weight.mul_(scale.view(-1, 1))
        linear.bias.copy_((linear.bias - norm.running_mean) * scale + shift)
    return linear
