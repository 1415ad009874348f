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


class DualHeads(nn.Module):
    """Image and text projection heads with one shared logit scale (1 / temperature)."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 64, temperature: float = 0.07):
        super().__init__()
        self.image_head = ProjectionHead(image_dim, embed_dim)
        self.text_head = ProjectionHead(text_dim, embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))

    @property
    def dims(self) -> dict[str, int]:
        return {"image_dim": self.image_head.linear.in_features, "text_dim": self.text_head.linear.in_features,
                "embed_dim": self.image_head.linear.out_features}

    @torch.no_grad()
    def embed(self, image_features: np.ndarray | None = None, text_features: np.ndarray | None = None,
              batch_size: int = 8192) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Project features and L2-normalise rows; returns float32 arrays ``[n, embed_dim]``."""
        def run(head: ProjectionHead, features: np.ndarray | None) -> np.ndarray | None:
            if features is None:
                return None
            out = [nn.functional.normalize(head(torch.as_tensor(features[i:i + batch_size])), dim=-1)
                   for i in range(0, len(features), batch_size)]
            return torch.cat(out).numpy() if out else np.zeros((0, head.linear.out_features), np.float32)

        self.eval()
        return run(self.image_head, image_features), run(self.text_head, text_features)


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
