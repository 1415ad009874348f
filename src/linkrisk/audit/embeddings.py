"""Audit a folder of saved embeddings (as written by ``linkrisk demo``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk.audit.recall import audit_counts
from linkrisk.audit.ranks import rank_counts
from linkrisk.errors import InputError


def load_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Read ``image.npy``, ``report.npy`` and ``pairs.parquet``, checking that they fit together."""
    folder = Path(folder)
    arrays = []
    for name in ("image.npy", "report.npy"):
        path = folder / name
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except FileNotFoundError as err:
            raise InputError(f"{path}: not found; expected image.npy, report.npy and pairs.parquet") from err
        except ValueError as err:
            raise InputError(f"{path}: not a plain numeric .npy array ({err})") from err
    path = folder / "pairs.parquet"
    try:
        pairs = pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise InputError(f"{path}: cannot be read ({err})") from err
    image, report = arrays
    missing = [c for c in ("report_row", "patient_id") if c not in pairs.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    if len(pairs) != len(image):
        raise InputError(f"{path}: {len(pairs)} rows but image.npy has {len(image)}; both need one row per image")
    return image, report, pairs


def audit_folder(folder: Path, pools: list, ks: list[int], n_boot: int = 2000, seed: int = 0) -> dict:
    """Image-to-report audit of a saved embeddings folder; output as :func:`audit_counts`."""
    image, report, pairs = load_embeddings(folder)
    above, equal = rank_counts(image, report, pairs["report_row"].to_numpy())
    return audit_counts(above, equal, len(report), pairs["patient_id"].astype(str).to_numpy(), pools, ks,
                        n_boot=n_boot, seed=seed)
