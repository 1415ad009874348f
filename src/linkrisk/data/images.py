"""Decode radiographs into grayscale float arrays, with clear failures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow raises DecompressionBombError above twice this many pixels and
# warns above it; the warning is turned into a failure here as well.
MAX_PIXELS = 89_478_485


class ImageReadError(Exception):
    """An image file that cannot be decoded; ``str()`` names the file and the cause."""


def read_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode one image file into a PIL image in mode ``L`` (8-bit luminance) or ``F``.

    Colour, alpha and palette images are converted to luminance. 16-bit
    and 32-bit integer images become mode ``F`` scaled by their maximum
    into [0, 1], so no precision is lost before resizing. Float images
    (mode ``F``) keep values already in [0, 1] and are otherwise scaled by
    their maximum; negative, NaN and infinite values become 0.

    ``draft_size`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale
    (Pillow's ``Image.draft``), as long as both sides stay at least
    ``draft_size`` pixels. That is faster, and the pixels differ slightly
    from a full decode followed by a resize. Other formats ignore it.

    Raises:
        ImageReadError: missing, truncated, undecodable or oversized file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageReadError(f"{path}: {img.width}x{img.height} pixels exceeds the {MAX_PIXELS:,} pixel limit")
                if draft_size and img.format == "JPEG":
                    img.draft("L", (draft_size, draft_size))
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    array = np.asarray(img, dtype=np.float32)
                    return Image.fromarray(array / max(float(array.max()), 1.0), mode="F")
                if img.mode == "F":
                    array = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                    array = np.maximum(array, 0.0)
                    return Image.fromarray(array / max(float(array.max()), 1.0), mode="F")
                return img.convert("L")
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def to_8bit(image: Image.Image) -> Image.Image:
    """Return a mode ``L`` image; a mode ``F`` image in [0, 1] is rounded to 0-255."""
    if image.mode == "L":
        return image
    array = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L")


def grayscale_array(image: Image.Image, size: int) -> np.ndarray:
    """Resize an ``L`` or ``F`` image (bilinear, aspect ratio not kept) to a ``[size, size]`` float32 array in [0, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if image.mode == "L":
        array = array / 255.0
    resized = Image.fromarray(array, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def load_grayscale(path: str | Path, size: int) -> np.ndarray:
    """Decode one image (:func:`read_image`) to a ``[size, size]`` float32 array in [0, 1].

    The image is resized to a square (bilinear) without keeping the aspect ratio.

    Raises:
        ImageReadError: missing, truncated, undecodable or oversized file.
    """
    return grayscale_array(read_image(path), size)
