"""Projection heads: the only trainable part of the model.

Each head standardises its encoder's features with fixed statistics
(buffers, never trained) and maps them with one ``nn.Linear`` into the
shared embedding space. Heads are saved as ``heads.safetensors`` plus
``heads.json`` (dimensions, temperature, provenance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from linkrisk._io import atomic_write, write_json
from linkrisk.errors import InputError


class ProjectionHead(nn.Module):
    """Fixed standardisation followed by a linear projection: ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.linear = nn.Linear(in_dim, out_dim)

    def set_standardisation(self, features: np.ndarray) -> None:
        """Set the standardisation from features ``[n, in_dim]`` (std floored at 1e-6)."""
        features = torch.as_tensor(features, dtype=torch.float32)
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.std))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def fold_standardisation(head: ProjectionHead) -> nn.Linear:
    """Fold ``linear((x - mean) / std)`` into one ``nn.Linear`` with weight ``W / std`` and bias ``b - W (mean / std)``."""
    source = head.linear
    linear = nn.Linear(source.in_features, source.out_features, bias=True)
    with torch.no_grad():
        weight = source.weight / head.std
        linear.weight.copy_(weight)
        linear.bias.copy_(source.bias - weight @ head.mean)
    return linear


def plain_head(head: nn.Module) -> nn.Module:
    """Return ``head`` with a :class:`ProjectionHead`'s standardisation folded into its linear layer (others unchanged)."""
    return fold_standardisation(head) if isinstance(head, ProjectionHead) else head


def embed_rows(head: nn.Module, features: np.ndarray | None, batch_size: int = 8192) -> np.ndarray | None:
    """Project ``features`` ``[n, ...]`` with ``head`` and L2-normalise the rows; float32 ``[n, embed_dim]``."""
    if features is None:
        return None
    with torch.no_grad():
        out = [nn.functional.normalize(head(torch.as_tensor(np.asarray(features[i:i + batch_size], np.float32))), dim=-1)
               for i in range(0, len(features), batch_size)]
        if out:
            return torch.cat(out).numpy()
        width = head(torch.zeros(1, *np.asarray(features).shape[1:])).shape[-1]
    return np.zeros((0, width), np.float32)


class HeadPair(nn.Module):
    """An image head and a text head mapping frozen features into one embedding space.

    The heads may be any modules that Opacus can train (``ProjectionHead``,
    ``nn.Linear``, an ``nn.Sequential`` from a model adapter).
    """

    def __init__(self, image_head: nn.Module, text_head: nn.Module, temperature: float = 0.07):
        super().__init__()
        self.image_head = image_head
        self.text_head = text_head
        self.log_logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))

    @torch.no_grad()
    def embed(self, image_features: np.ndarray | None = None, text_features: np.ndarray | None = None,
              batch_size: int = 8192) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Project features and L2-normalise rows; returns float32 arrays ``[n, embed_dim]``."""
        self.eval()
        return embed_rows(self.image_head, image_features, batch_size), embed_rows(self.text_head, text_features,
                                                                                    batch_size)


class DualHeads(HeadPair):
    """Image and text :class:`ProjectionHead` s with one shared logit scale (1 / temperature)."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 64, temperature: float = 0.07):
        super().__init__(ProjectionHead(image_dim, embed_dim), ProjectionHead(text_dim, embed_dim), temperature)

    @property
    def dims(self) -> dict[str, int]:
        return {"image_dim": self.image_head.linear.in_features, "text_dim": self.text_head.linear.in_features,
                "embed_dim": self.image_head.linear.out_features}


def save_heads(heads: DualHeads, folder: Path, metadata: dict) -> None:
    """Write ``heads.safetensors`` and ``heads.json`` into ``folder`` (atomically)."""
    folder = Path(folder)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in heads.state_dict().items()}
    atomic_write(folder / "heads.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / "heads.json", {**heads.dims, **metadata})


def load_heads(folder: Path) -> tuple[DualHeads, dict]:
    """Read heads saved by :func:`save_heads`; returns ``(heads, metadata)``."""
    folder = Path(folder)
    try:
        metadata = json.loads((folder / "heads.json").read_text(encoding="utf-8"))
        heads = DualHeads(int(metadata["image_dim"]), int(metadata["text_dim"]), int(metadata["embed_dim"]))
        heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; a list in place of an object is a TypeError.
        raise InputError(f"{folder}: not a heads folder written by linkrisk demo, or a damaged one "
                         f"({type(err).__name__}: {err}); pass runs/<demo>/models/original or models/dp") from err
    return heads, metadata
