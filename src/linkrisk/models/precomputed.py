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

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from linkrisk._logging import logger
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
        raise InputError(f"{path}: not a readable .npy array ({type(err).__name__}: {err}); save the features as "
                         "a float array with numpy.save (object arrays need pickle and are not read)") from err
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


@dataclasses.dataclass
class FeatureCohort:
    """A cohort's cached pre-projection features with everything mitigation, audits and probes need.

    Attributes:
        name, source: cohort name and where its features came from.
        fingerprint: content hash of the features and ids (checkpoint keys).
        image_features: ``[n_images, ...]``; report_features: ``[n_reports, d_text]``.
        report_row: ``[n_images]`` row of each image's true report.
        patient_ids: ``[n_images]`` patient of each image (str).
        image_labels: ``[n_images, L]`` labels of each image's report (1, 0, -1, NaN); label_names: ``L`` names.
        image_head, text_head: the model's heads for these features.
    """

    name: str
    source: str
    image_features: np.ndarray
    report_features: np.ndarray
    report_row: np.ndarray
    patient_ids: np.ndarray
    image_labels: np.ndarray
    label_names: list[str]
    image_head: nn.Module
    text_head: nn.Module
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            digest = hashlib.sha256()
            for array in (self.image_features, self.report_features, self.report_row):
                digest.update(np.ascontiguousarray(array).tobytes())
            digest.update("\0".join(map(str, self.patient_ids)).encode())
            self.fingerprint = digest.hexdigest()[:16]

    def subset(self, patients: set[str], name: str) -> "FeatureCohort":
        """Return the images of ``patients`` with only the reports they point to."""
        keep = np.isin(self.patient_ids, list(patients))
        reports, new_row = np.unique(self.report_row[keep], return_inverse=True)
        return FeatureCohort(name, self.source, self.image_features[keep], self.report_features[reports],
                             new_row.astype(np.int64), self.patient_ids[keep], self.image_labels[keep],
                             list(self.label_names), self.image_head, self.text_head)


def load_feature_cohort(folder: str | Path, name: str | None = None) -> FeatureCohort:
    """Read a ``linkrisk embed`` output folder (pre-projection features, ids, labels, heads) as a :class:`FeatureCohort`."""
    folder = Path(folder)
    adapter = PrecomputedAdapter(folder)
    if not adapter.pre_projection:
        raise InputError(f"{folder}: no image_features.npy and report_features.npy; mitigation trains heads on "
                         "pre-projection features, so pass a folder written by linkrisk embed")

    images_path = folder / "images.parquet"
    try:
        images = pd.read_parquet(images_path, columns=["image_id", "patient_id", "report_id"])
        reports = pd.read_parquet(folder / "reports.parquet")
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{images_path}: needs image_id, patient_id and report_id columns ({err})") from err

    position = pd.Series(np.arange(len(reports)), index=reports["report_id"].astype(str).values)
    missing = ~images["report_id"].astype(str).isin(position.index)
    if missing.any():
        raise InputError(f"{images_path}: {int(missing.sum())} images point to a report_id missing from "
                         f"reports.parquet (first: {images['report_id'][missing].iloc[0]})")
    report_row = position.loc[images["report_id"].astype(str).values].to_numpy().astype(np.int64)
    label_names = [c for c in reports.columns if c != "report_id"]
    labels = reports[label_names].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    image_labels = labels[report_row] if label_names else np.zeros((len(images), 0))

    source = folder.name
    summary = folder / "embed.json"
    if summary.is_file():
        try:
            source = json.loads(summary.read_text(encoding="utf-8"))["dataset"]["source"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: unreadable; the cohort's source is taken from the folder name", summary)

    # Copies in memory: training and projection write into tensors made from these arrays.
    return FeatureCohort(name or folder.name, str(source), np.array(adapter.image_features, np.float32),
                         np.array(adapter.report_features, np.float32), report_row,
                         images["patient_id"].astype(str).to_numpy(), image_labels, label_names,
                         adapter.image_head, adapter.text_head)
