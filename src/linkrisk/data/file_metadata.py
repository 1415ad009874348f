"""Image file metadata read from headers only, and the attribute columns a cohort's images carry.

:func:`read_file_metadata` returns, per path, the file size and what the
image header states (width, height, PIL mode and format) without decoding
pixels: Pillow's ``Image.open`` reads the header lazily, and DICOM files
are read with pydicom up to the pixel data. A missing or unreadable file
gets missing values (``<NA>``/None) and is counted in the log, never an
error, because metadata are an optional attribute.

Exact sizes and dimensions nearly identify a file, so matching or the
attribute oracle on them would re-link through the file itself rather than
through a shared attribute. :func:`metadata_bands` therefore derives coarse
bands (``size_band``: the power of two of the byte count;
``aspect_band``: width / height rounded to 0.1; ``side_band``: the longer
side's power of two), which are the default metadata attributes.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from linkrisk._logging import logger

METADATA_COLUMNS = ("file_bytes", "width", "height", "aspect_ratio", "pil_mode", "file_format")
BAND_COLUMNS = ("size_band", "aspect_band", "side_band")
# Metadata attributes of the file-metadata oracle: categorical values and coarse bands only.
FILE_METADATA_ATTRIBUTES = ("file_format", "pil_mode", "size_band", "aspect_band")
# Cohort attribute columns that loaders may add to the image table, beside the required ``view``.
COHORT_ATTRIBUTE_COLUMNS = ("view", "sex", "age_band", "site", "source")

_DICOM_SUFFIXES = (".dcm", ".dicom")


def _header(path: Path) -> tuple[int | None, int | None, str | None, str | None]:
    """Return ``(width, height, mode, format)`` from the file header; raise OSError-like errors when unreadable."""
    with open(path, "rb") as handle:
        preamble = handle.read(132)
    if path.suffix.lower() in _DICOM_SUFFIXES or preamble[128:] == b"DICM":
        return _dicom_header(path)
    with warnings.catch_warnings():
        # Only the header is read, so a huge image costs nothing here; the decoder applies its own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return int(image.width), int(image.height), str(image.mode), str(image.format)


def _dicom_header(path: Path) -> tuple[int | None, int | None, str | None, str | None]:
    try:
        import pydicom
    except ImportError:
        logger.info("%s: DICOM header not read because pydicom is not installed; only the size is kept", path)
        return None, None, None, "DICOM"
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as err:
        raise ValueError(f"not a valid DICOM file ({err})") from err
    width, height = dataset.get("Columns"), dataset.get("Rows")
    photometric = dataset.get("PhotometricInterpretation")
    return (int(width) if width else None, int(height) if height else None,
            str(photometric).strip() if photometric else None, "DICOM")


def read_file_metadata(paths) -> pd.DataFrame:
    """Read size and header fields of each image file, one row per path, in order.

    Args:
        paths: image file paths (str or Path); empty or None entries count as missing.

    Returns:
        A DataFrame with columns ``file_bytes`` (Int64, bytes), ``width`` and
        ``height`` (Int64, pixels), ``aspect_ratio`` (float64, width / height),
        ``pil_mode`` and ``file_format`` (object: Pillow's mode and format names,
        or ``DICOM`` with the photometric interpretation as the mode), and the
        bands of :func:`metadata_bands`. Missing or unreadable files get
        missing values in every column they lack.
    """
    rows, problems = [], Counter()
    for raw in paths:
        row = dict.fromkeys(METADATA_COLUMNS)
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or str(raw) == "":
            problems["no path"] += 1
            rows.append(row)
            continue
        path = Path(raw)
        try:
            row["file_bytes"] = path.stat().st_size
            width, height, row["pil_mode"], row["file_format"] = _header(path)
        except FileNotFoundError:
            problems["file not found"] += 1
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, KeyError) as err:
            problems[f"header unreadable ({type(err).__name__})"] += 1
        else:
            row["width"], row["height"] = width, height
            if width and height:
                row["aspect_ratio"] = width / height
        rows.append(row)
    if problems:
        logger.info("file metadata: %d of %d images without full metadata: %s", sum(problems.values()), len(rows),
                    ", ".join(f"{reason}: {count}" for reason, count in sorted(problems.items())))

    table = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    for column in ("file_bytes", "width", "height"):
        table[column] = pd.array(table[column], dtype="Int64")
    table["aspect_ratio"] = pd.to_numeric(table["aspect_ratio"], errors="coerce").astype(np.float64)
    for column in ("pil_mode", "file_format"):
        table[column] = table[column].astype(object).where(table[column].notna(), None)
    return pd.concat([table, metadata_bands(table)], axis=1)


def metadata_bands(table: pd.DataFrame) -> pd.DataFrame:
    """Derive coarse, shareable bands from exact metadata; missing inputs give missing bands.

    Returns ``size_band`` (Int64: ``floor(log2(file_bytes))``, so 17 is 128-255 KiB),
    ``aspect_band`` (float64: width / height rounded to one decimal) and
    ``side_band`` (Int64: ``floor(log2(max(width, height)))``, so 9 is 512-1023 px).
    """
    size = pd.to_numeric(table["file_bytes"], errors="coerce").astype(np.float64)
    side = np.fmax(pd.to_numeric(table["width"], errors="coerce").astype(np.float64),
                   pd.to_numeric(table["height"], errors="coerce").astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        size_band = np.where(size > 0, np.floor(np.log2(size)), np.nan)
        side_band = np.where(side > 0, np.floor(np.log2(side)), np.nan)
    return pd.DataFrame({
        "size_band": pd.array(pd.Series(size_band).round(), dtype="Int64"),
        "aspect_band": pd.to_numeric(table["aspect_ratio"], errors="coerce").astype(np.float64).round(1),
        "side_band": pd.array(pd.Series(side_band).round(), dtype="Int64"),
    }, index=table.index)


def image_attribute_table(images: pd.DataFrame, with_files: bool = True) -> pd.DataFrame:
    """Return the attribute columns of a cohort's image table, row-aligned, with file metadata where files exist.

    The cohort columns of ``COHORT_ATTRIBUTE_COLUMNS`` that the table has
    are kept as written (``view`` keeps ``unknown``). With
    ``with_files`` the files under ``image_path`` are read for
    :func:`read_file_metadata`. Rows without a path get missing metadata.
    """
    columns = [column for column in COHORT_ATTRIBUTE_COLUMNS if column in images.columns]
    table = images[columns].astype(object).reset_index(drop=True)
    table = table.where(table.notna(), None)
    if with_files and "image_path" in images.columns:
        table = pd.concat([table, read_file_metadata(images["image_path"].tolist())], axis=1)
    return table


__all__ = ["BAND_COLUMNS", "COHORT_ATTRIBUTE_COLUMNS", "FILE_METADATA_ATTRIBUTES", "METADATA_COLUMNS",
           "image_attribute_table", "metadata_bands", "read_file_metadata"]
