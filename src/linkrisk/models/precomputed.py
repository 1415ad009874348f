"""Embeddings computed elsewhere, by any model, as an adapter.

Folder layout (the layout ``linkrisk embed`` writes, so its output is a
valid input here):

``images.parquet`` (or ``pairs.parquet``)
    one row per image with an ``image_id`` column, in array row order.
``reports.parquet``
    one row per report with a ``report_id`` column, in array row order.
``image_features.npy``, ``report_features.npy`` (optional)
    pre-projection features ``[n_images, d_image]`` (or a patch grid
    ``[n_images, patches, d_image]``) and ``[n_reports, d_text]``,
    with ``heads.json`` + ``heads.safetensors`` (:mod:`linkrisk.models.head_io`)
    holding the heads that project them.
``image.npy``, ``report.npy``
    projected embeddings ``[n, embed_dim]``, used when there are no
    pre-projection features. The heads are then identity ``nn.Linear``
    layers, so DP fine-tuning starts from the given embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from linkrisk.errors import InputError
from linkrisk.models.head_io import load_heads

# At most this many missing ids are quoted in one error message.
_MAX_QUOTED = 5


def identity_head(dim: int) -> nn.Linear:
    """Return ``nn.Linear(dim, dim)`` initialised to the identity map (zero bias)."""
    linear = nn.Linear(dim, dim, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(dim))
        linear.bias.zero_()
    return linear


def _read_array(path: Path, allow_patches: bool = False) -> np.ndarray:
    """Memory-map a float ``.npy`` array: ``[rows, dim]``, or ``[rows, patches, dim]`` where ``allow_patches``."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, EOFError, OSError) as err:
        raise InputError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from err
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: is an .npz archive, not a single .npy array; save each array with numpy.save")
    shapes = "[rows, dimensions] or [rows, patches, dimensions]" if allow_patches else "[rows, dimensions]"
    if array.ndim not in ((2, 3) if allow_patches else (2,)) or not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{path}: expected a float array {shapes}, got shape {array.shape} and dtype {array.dtype}")
    return array


def _read_ids(folder: Path, names: tuple[str, ...], column: str, n_rows: int, array_name: str) -> pd.Index:
    path = next((folder / name for name in names if (folder / name).is_file()), None)
    if path is None:
        raise InputError(f"{folder}: none of {', '.join(names)} found; they give the {column} of each row of "
                         f"{array_name}")
    try:
        table = pd.read_parquet(path, columns=[column])
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: cannot read a {column!r} column ({err})") from err
    ids = pd.Index(table[column].astype(str))
    if len(ids) != n_rows:
        raise InputError(f"{path}: {len(ids)} rows but {array_name} has {n_rows}; they must match row for row")
    if ids.has_duplicates:
        duplicated = ids[ids.duplicated()].unique()[:_MAX_QUOTED]
        raise InputError(f"{path}: duplicate {column} values ({', '.join(duplicated)}); each row needs its own id")
    return ids


class PrecomputedAdapter:
    """Image and report features read from a folder, looked up by id.

    Attributes:
        image_features, report_features: ``[n, d]`` arrays (memory-mapped).
        image_ids, report_ids: the id of each row.
        image_head, text_head: saved heads, or identity heads for projected embeddings.
        pre_projection: whether the features are pre-projection features.
    """

    preprocess = None
    tokenizer = None
    context_length = None

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder; pass the folder holding the precomputed embeddings")
        self.name = f"precomputed:{folder}"
        has_features = [(folder / name).is_file() for name in ("image_features.npy", "report_features.npy")]
        if all(has_features):
            self.pre_projection = True
            image_name, report_name = "image_features.npy", "report_features.npy"
        elif any(has_features):
            raise InputError(f"{folder}: only one of image_features.npy and report_features.npy is present; "
                             "provide both, or neither to use image.npy and report.npy")
        else:
            self.pre_projection = False
            image_name, report_name = "image.npy", "report.npy"
        for name in (image_name, report_name):
            if not (folder / name).is_file():
                raise InputError(f"{folder / name}: not found; a precomputed folder needs image_features.npy and "
                                 "report_features.npy (with heads.json), or image.npy and report.npy")
        # Patch-grid image features (BioViL) are pre-projection features with a patch-wise head.
        self.image_features = _read_array(folder / image_name, allow_patches=self.pre_projection)
        self.report_features = _read_array(folder / report_name)
        self.image_ids = _read_ids(folder, ("images.parquet", "pairs.parquet"), "image_id",
                                   len(self.image_features), image_name)
        self.report_ids = _read_ids(folder, ("reports.parquet",), "report_id", len(self.report_features), report_name)

        if self.pre_projection:
            if not (folder / "heads.json").is_file():
                raise InputError(f"{folder / 'heads.json'}: not found; pre-projection features need the heads that "
                                 "project them (heads.json + heads.safetensors), or remove image_features.npy and "
                                 "report_features.npy to use image.npy and report.npy")
            self.image_head, self.text_head, _ = load_heads(folder)
        else:
            if self.image_features.shape[1] != self.report_features.shape[1]:
                raise InputError(f"{folder}: image.npy has {self.image_features.shape[1]} dimensions but report.npy "
                                 f"has {self.report_features.shape[1]}; both must be in one embedding space")
            self.image_head = identity_head(self.image_features.shape[1])
            self.text_head = identity_head(self.report_features.shape[1])
        self.embed_dim = self._check_heads(folder)

    def _check_heads(self, folder: Path) -> int:
        """Run both heads on one zero row; return the embedding dimension they share."""
        dims = []
        for head, features, name in ((self.image_head, self.image_features, "image"),
                                     (self.text_head, self.report_features, "text")):
            try:
                with torch.no_grad():
                    out = head(torch.zeros(1, *features.shape[1:]))
            except RuntimeError as err:
                raise InputError(f"{folder}: the {name} head does not accept features of shape "
                                 f"{list(features.shape[1:])} ({err}); the features and heads.json must come from "
                                 "the same model") from err
            if out.ndim != 2:
                raise InputError(f"{folder}: the {name} head maps features of shape {list(features.shape[1:])} to "
                                 f"{list(out.shape[1:])}, not to one vector per row; patch-grid features need a head "
                                 "ending in patch_mean")
            dims.append(int(out.shape[-1]))
        if dims[0] != dims[1]:
            raise InputError(f"{folder}: the image head gives {dims[0]}-d embeddings but the text head {dims[1]}-d; "
                             "both must map into one embedding space")
        return dims[0]

    def _lookup(self, features: np.ndarray, index: pd.Index, ids, kind: str) -> np.ndarray:
        rows = index.get_indexer(pd.Index(ids).astype(str))
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            quoted = ", ".join(str(ids[i]) for i in missing[:_MAX_QUOTED])
            raise InputError(f"{self.name}: {len(missing)} {kind} ids of the dataset have no precomputed row "
                             f"(first: {quoted}); embed them with the same model or leave them out of the dataset")
        selected = np.asarray(features[rows], dtype=np.float32)
        bad = ~np.isfinite(selected.reshape(len(selected), -1)).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputError(f"{self.name}: {int(bad.sum())} {kind} rows contain NaN or infinity (first: id "
                             f"{ids[first]}); recompute them")
        return selected

    def image_features_for(self, image_ids) -> np.ndarray:
        """Return float32 ``[len(image_ids), d_image]`` rows for these image ids, in their order."""
        return self._lookup(self.image_features, self.image_ids, list(image_ids), "image")

    def report_features_for(self, report_ids) -> np.ndarray:
        """Return float32 ``[len(report_ids), d_text]`` rows for these report ids, in their order."""
        return self._lookup(self.report_features, self.report_ids, list(report_ids), "report")

    def warn_truncated(self) -> None:
        """Log nothing: the texts were encoded elsewhere."""
