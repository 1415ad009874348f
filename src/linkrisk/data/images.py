"""Decode radiographs into grayscale float arrays, with clear failures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from linkrisk.errors import InputError

# Pillow raises DecompressionBombError above twice this many pixels and
# warns above it; the warning is turned into a failure here as well.
MAX_PIXELS = 89_478_485

# A DICOM Part 10 file has a 128-byte preamble followed by these 4 bytes.
_DICOM_MAGIC = b"DICM"
_DICOM_SUFFIXES = (".dcm", ".dicom")

_REDOWNLOAD = "download or export the file again, or leave it out of the dataset"


class ImageReadError(InputError):
    """An image file that cannot be decoded; ``str()`` names the file, the cause and the next step."""


def read_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode one image file into a PIL image in mode ``L`` (8-bit luminance) or ``F``.

    Colour, alpha and palette images are converted to luminance (Pillow's
    ``convert("L")``: the alpha channel is dropped and a palette index is
    replaced by its colour). 16-bit and 32-bit integer images become mode
    ``F`` scaled by their maximum into [0, 1], so no precision is lost
    before resizing. Float images (mode ``F``) keep values already in
    [0, 1] and are otherwise scaled by their maximum; negative, NaN and
    infinite values become 0. DICOM files are decoded as described in
    :func:`read_dicom`.

    ``draft_size`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale
    (Pillow's ``Image.draft``), as long as both sides stay at least
    ``draft_size`` pixels. That is faster, and the pixels differ slightly
    from a full decode followed by a resize. Other formats ignore it.

    Raises:
        ImageReadError: missing, empty, truncated, undecodable or oversized file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: the file is empty (0 bytes); {_REDOWNLOAD}")
        if _is_dicom(path):
            return read_dicom(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageReadError(_too_large(path, img.width, img.height))
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
        raise ImageReadError(f"{path}: file not found; check the path, or leave the image out of the dataset") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err}); downscale the image "
                             f"below {MAX_PIXELS:,} pixels, or leave it out of the dataset") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err}); {_REDOWNLOAD}") from err


def _too_large(path: Path, width: int, height: int) -> str:
    return (f"{path}: {width}x{height} pixels exceeds the {MAX_PIXELS:,} pixel limit (a guard against "
            "decompression bombs); downscale the image, or leave it out of the dataset")


def _is_dicom(path: Path) -> bool:
    """Return whether ``path`` has a DICOM suffix or the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == _DICOM_MAGIC


def read_dicom(path: str | Path) -> Image.Image:
    """Decode a single-frame DICOM radiograph into a mode ``F`` image in [0, 1].

    The stored values go through the modality LUT (rescale slope and
    intercept) and the VOI LUT or window where the file has one, as a
    DICOM viewer shows them. They are then scaled from their minimum and
    maximum to [0, 1]. MONOCHROME1 images, whose bright values are dark
    on display, are inverted so that bone is bright as in MONOCHROME2.
    Colour images are converted to luminance (ITU-R 601-2 weights).
    Needs pydicom 3 (``pip install 'linkrisk[dicom]'``), and pylibjpeg or
    GDCM for compressed transfer syntaxes that pydicom cannot decode alone.

    Raises:
        ImageReadError: pydicom missing, unreadable file, no pixel data,
            several frames, oversized or undecodable pixel data.
    """
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as err:
        raise ImageReadError(f"{path}: is a DICOM file, and reading DICOM needs pydicom 3; install it with "
                             "pip install 'linkrisk[dicom]'") from err
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as err:
        raise ImageReadError(f"{path}: cannot read as DICOM ({type(err).__name__}: {err}); {_REDOWNLOAD}") from err
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"{path}: the DICOM file has no pixel data (for example a structured report or a "
                             "header-only file); point the dataset at the radiograph's image file")
    width, height = int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0)
    if width * height > MAX_PIXELS:
        raise ImageReadError(_too_large(path, width, height))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{path}: the DICOM file has {frames} frames; export the radiograph as a "
                             "single-frame file")
    try:
        pixels = dataset.pixel_array
    except (AttributeError, NotImplementedError, RuntimeError, ValueError, KeyError) as err:
        # pydicom raises RuntimeError or NotImplementedError for a transfer syntax without an installed
        # decoder, and ValueError for pixel data shorter than Rows x Columns require.
        raise ImageReadError(f"{path}: cannot decode the DICOM pixel data ({type(err).__name__}: {err}); install "
                             "pylibjpeg or GDCM for compressed files, or export the image again") from err

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        values = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif pixels.ndim == 2:
        values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    else:
        raise ImageReadError(f"{path}: DICOM pixel data of shape {list(pixels.shape)} is not one grayscale or "
                             "colour image; export the radiograph as a single-frame file")
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(scaled.astype(np.float32), mode="F")


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
