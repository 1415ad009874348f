"""Projection heads saved without pickles: a JSON layer list plus safetensors weights.

A head is a chain of layers that Opacus can train: ``nn.Linear``,
``nn.LayerNorm``, ``ReLU``, ``GELU``, ``Tanh``, ``Identity`` and
:class:`PatchMean` (mean over the patch axis of ``[B, P, C]`` inputs).
Dropout is saved as ``Identity``, because heads only embed in eval
mode. :func:`describe_head` turns a module into a layer list,
:func:`build_head` turns the list back into an ``nn.Sequential``, and
:func:`save_heads` / :func:`load_heads` store an image and a text head
as ``heads.json`` + ``heads.safetensors``, so embeddings made elsewhere
travel with the heads that made them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from linkrisk._io import atomic_write, write_json
from linkrisk.errors import InputError

HEADS_FORMAT = "linkrisk-heads/1"


class PatchMean(nn.Module):
    """Mean over the patch axis: ``[B, P, C] -> [B, C]``; a ``[B, C]`` input passes unchanged."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=1) if features.ndim == 3 else features


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity, "patch_mean": PatchMean}


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    children = list(module.children())
    if children and not isinstance(module, (nn.Linear, nn.LayerNorm)):
        # A custom head class counts as its children in order; as_sequential checks that this
        # chain computes what the module computes.
        return [leaf for child in children for leaf in _leaves(child)]
    return [module]


def describe_head(head: nn.Module) -> list[dict]:
    """List the layers of ``head`` in order as JSON-ready dicts (type and shape, no weights)."""
    layers: list[dict] = []
    for layer in _leaves(head):
        if isinstance(layer, nn.Linear):
            layers.append({"type": "linear", "in": layer.in_features, "out": layer.out_features,
                           "bias": layer.bias is not None})
        elif isinstance(layer, nn.LayerNorm):
            if len(layer.normalized_shape) != 1:
                raise InputError(f"only LayerNorm over the last axis can be saved, got shape {layer.normalized_shape}")
            layers.append({"type": "layer_norm", "size": layer.normalized_shape[0], "eps": layer.eps,
                           "affine": layer.elementwise_affine})
        elif isinstance(layer, nn.GELU):
            layers.append({"type": "gelu", "approximate": layer.approximate})
        elif isinstance(layer, nn.Dropout):
            layers.append({"type": "identity"})
        else:
            kind = next((name for name, cls in _ACTIVATIONS.items() if type(layer) is cls), None)
            if kind is None:
                raise InputError(f"cannot save a head layer of type {type(layer).__name__}; supported: Linear, "
                                 f"LayerNorm, GELU, {', '.join(cls.__name__ for cls in _ACTIVATIONS.values())}")
            layers.append({"type": kind})
    return layers


def build_head(layers: list[dict]) -> nn.Sequential:
    """Build an ``nn.Sequential`` from a layer list written by :func:`describe_head` (weights uninitialised).

    Raises:
        InputError: the list or one of its layers is malformed (missing key, wrong type, size below 1).
    """
    if not isinstance(layers, list) or not layers:
        raise InputError(f"a head must be a non-empty list of layers, got {type(layers).__name__}")
    try:
        return nn.Sequential(*(_build_layer(layer) for layer in layers))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise InputError(f"malformed head layer list ({type(err).__name__}: {err})") from err


def _build_layer(layer: dict) -> nn.Module:
    if not isinstance(layer, dict):
        raise TypeError(f"a layer must be an object, got {layer!r}")
    for key in ("in", "out", "size"):
        if key in layer and int(layer[key]) < 1:
            raise ValueError(f"layer size {key}={layer[key]} is below 1")
    kind = layer.get("type")
    if kind == "linear":
        return nn.Linear(int(layer["in"]), int(layer["out"]), bias=bool(layer["bias"]))
    if kind == "layer_norm":
        return nn.LayerNorm(int(layer["size"]), eps=float(layer["eps"]), elementwise_affine=bool(layer["affine"]))
    if kind == "gelu":
        return nn.GELU(approximate=str(layer.get("approximate", "none")))
    if kind in _ACTIVATIONS:
        return _ACTIVATIONS[kind]()
    raise InputError(f"unknown head layer type {kind!r}; valid types: linear, layer_norm, gelu, "
                     f"{', '.join(_ACTIVATIONS)}")


def as_sequential(head: nn.Module) -> nn.Sequential:
    """Copy ``head`` into the saved form (an ``nn.Sequential`` of its layers), with the same weights.

    Raises:
        InputError: the head's forward is not the plain chain of its layers
            (for example an activation applied as a function), so the copy
            would compute something else.
    """
    layers = describe_head(head)
    if not all(torch.isfinite(parameter).all() for parameter in head.parameters()):
        raise InputError(f"the {type(head).__name__} head's weights contain NaN or infinity; use trained, finite weights")
    copy = build_head(layers)
    for target, source in zip(copy, _leaves(head)):
        if not isinstance(source, nn.Dropout):
            target.load_state_dict(source.state_dict())

    # Compare on a random batch in eval mode: a custom head may apply steps its children do not show.
    in_dim, _ = head_dims(layers)
    probe = torch.randn(4, 3, in_dim, generator=torch.Generator().manual_seed(0))
    if not any(layer["type"] == "patch_mean" for layer in layers):
        probe = probe[:, 0]
    was_training = head.training
    head.eval()
    with torch.no_grad():
        parameter = next(head.parameters())
        expected = head(probe.to(parameter.dtype)).float()
        actual = copy(probe)
    head.train(was_training)
    if expected.shape != actual.shape or not torch.allclose(expected, actual, rtol=1e-4, atol=1e-5):
        raise InputError(f"the {type(head).__name__} head is not a plain chain of its layers, so it cannot be "
                         "saved as a layer list; convert it to an nn.Sequential first")
    return copy


def head_dims(layers: list[dict]) -> tuple[int, int]:
    """Return ``(input dimension, output dimension)`` of a layer list; it must contain a linear layer."""
    linears = [layer for layer in layers if layer.get("type") == "linear"]
    if not linears:
        raise InputError("a head needs at least one linear layer")
    return int(linears[0]["in"]), int(linears[-1]["out"])


def save_heads(folder: Path, image_head: nn.Module, text_head: nn.Module, metadata: dict | None = None) -> None:
    """Write ``heads.json`` (layer lists + metadata) and ``heads.safetensors`` into ``folder`` atomically."""
    folder = Path(folder)
    heads = {"image_head": as_sequential(image_head), "text_head": as_sequential(text_head)}
    tensors = {f"{name}.{key}": value.detach().float().contiguous().cpu()
               for name, head in heads.items() for key, value in head.state_dict().items()}
    atomic_write(folder / "heads.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / "heads.json", {"format": HEADS_FORMAT,
                                       "image_head": describe_head(heads["image_head"]),
                                       "text_head": describe_head(heads["text_head"]),
                                       **(metadata or {})})


def load_heads(folder: Path) -> tuple[nn.Sequential, nn.Sequential, dict]:
    """Read heads written by :func:`save_heads`; returns ``(image_head, text_head, metadata)``."""
    folder = Path(folder)
    path = folder / "heads.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise InputError(f"{path}: not found; expected heads.json and heads.safetensors") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(spec, dict) or spec.get("format") != HEADS_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise InputError(f"{path}: format {found!r} is not {HEADS_FORMAT!r}")
    try:
        tensors = load_file(str(folder / "heads.safetensors"))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{folder / 'heads.safetensors'}: not a readable safetensors file ({err})") from err

    heads = []
    for name in ("image_head", "text_head"):
        if name not in spec:
            raise InputError(f"{path}: no {name} entry")
        try:
            head = build_head(spec[name])
        except InputError as err:
            raise InputError(f"{path}: {name}: {err}") from err
        prefix = f"{name}."
        try:
            head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        except RuntimeError as err:
            raise InputError(f"{folder / 'heads.safetensors'}: weights do not fit the {name} in heads.json "
                             f"({err})") from err
        heads.append(head)
    metadata = {k: v for k, v in spec.items() if k not in ("format", "image_head", "text_head")}
    return heads[0], heads[1], metadata
