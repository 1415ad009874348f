"""Frozen image encoders that need no downloaded weights.

No pretrained chest X-ray weights can be assumed offline, so the
reference model uses fixed feature extractors. Each encoder maps a batch
of grayscale images ``[B, S, S]`` (float32 in [0, 1], S = ``image_size``)
to features ``[B, feature_dim]``. ``benchmarks/encoders.py`` measures
their held-out linkage lift; ``randconv`` is the default because it gave
the highest lift there.
"""

from __future__ import annotations

import json
from typing import Protocol

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F

from linkrisk.errors import ConfigError


class ImageEncoder(Protocol):
    name: str
    image_size: int
    feature_dim: int

    def config(self) -> dict: ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...


def _standardize(images: np.ndarray) -> np.ndarray:
    """Per-image zero mean and unit variance, so exposure differences drop out."""
    mean = images.mean(axis=(1, 2), keepdims=True)
    std = images.std(axis=(1, 2), keepdims=True)
    return (images - mean) / np.maximum(std, 1e-6)


class RandomConvEncoder:
    """One fixed random convolution layer, ReLU, and average pooling on a grid.

    Filters are drawn from a seeded normal distribution, centred and scaled
    to unit norm, so they respond to local structure (edges, texture)
    rather than brightness. Features are the pooled responses on a
    ``grid x grid`` layout plus the global average: ``n_filters * (grid**2 + 1)``.
    """

    name = "randconv"

    def __init__(self, image_size: int = 128, n_filters: int = 64, kernel_size: int = 7, grid: int = 4, seed: int = 0):
        self.image_size = image_size
        self.n_filters = n_filters
        self.kernel_size = kernel_size
        self.grid = grid
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(n_filters, 1, kernel_size, kernel_size, generator=generator)
        weight = weight - weight.mean(dim=(2, 3), keepdim=True)
        self.weight = weight / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        self.feature_dim = n_filters * (grid * grid + 1)

    def config(self) -> dict:
        return {"name": self.name, "image_size": self.image_size, "n_filters": self.n_filters,
                "kernel_size": self.kernel_size, "grid": self.grid, "seed": self.seed}

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(_standardize(images)).unsqueeze(1)
        response = F.relu(F.conv2d(x, self.weight, stride=2, padding=self.kernel_size // 2))
        local = F.adaptive_avg_pool2d(response, self.grid).flatten(1)
        overall = response.mean(dim=(2, 3))
        return torch.cat([local, overall], dim=1).numpy().astype(np.float32)


class HistogramDCTEncoder:
    """Intensity histogram plus the low-frequency 2-D DCT coefficients.

    Features: ``n_bins`` histogram densities of the raw intensities and the
    ``n_freq x n_freq`` lowest-frequency orthonormal DCT-II coefficients of
    the standardised image: ``n_bins + n_freq**2``.
    """

    name = "histdct"

    def __init__(self, image_size: int = 128, n_bins: int = 64, n_freq: int = 16):
        self.image_size = image_size
        self.n_bins = n_bins
        self.n_freq = n_freq
        self.feature_dim = n_bins + n_freq * n_freq

    def config(self) -> dict:
        return {"name": self.name, "image_size": self.image_size, "n_bins": self.n_bins, "n_freq": self.n_freq}

    def encode(self, images: np.ndarray) -> np.ndarray:
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        hist = np.stack([np.histogram(img, bins=edges, density=True)[0] for img in images])
        coeffs = scipy.fft.dctn(_standardize(images), axes=(1, 2), norm="ortho")
        low = coeffs[:, : self.n_freq, : self.n_freq].reshape(len(images), -1)
        return np.concatenate([hist, low], axis=1).astype(np.float32)


IMAGE_ENCODERS = {"randconv": RandomConvEncoder, "histdct": HistogramDCTEncoder}


def create_image_encoder(name: str, **options) -> ImageEncoder:
    """Build a registered image encoder by name; unknown names list the valid ones."""
    if name not in IMAGE_ENCODERS:
        raise ConfigError(f"unknown image encoder {name!r}; valid names: {', '.join(sorted(IMAGE_ENCODERS))}")
    return IMAGE_ENCODERS[name](**options)


def encoder_key(config: dict) -> str:
    """Stable text form of an encoder config, for cache keys."""
    return json.dumps(config, sort_keys=True)
