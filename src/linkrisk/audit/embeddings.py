"""Audit a folder of saved embeddings (as written by ``linkrisk demo``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.audit.attributes import (
    LABELS_ATTRIBUTE,
    audit_attributes,
    design_attribute_codes,
)
from linkrisk.audit.design import build_design
from linkrisk.audit.run import NEGATIVES, run_audit
from linkrisk.errors import ConfigError, InputError


def load_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Read ``image.npy``, ``report.npy`` and ``pairs.parquet``, checking that they fit together."""
    folder = Path(folder)
    image = _checked_rows(folder / "image.npy", _read_npy(folder / "image.npy"))
    report = _checked_rows(folder / "report.npy", _read_npy(folder / "report.npy"))
    if image.shape[1] != report.shape[1]:
        raise InputError(f"{folder}: image.npy rows have {image.shape[1]} dimensions but report.npy rows have "
                         f"{report.shape[1]}; both must come from the same model")
    if len(image) == 0:
        raise InputError(f"{folder / 'image.npy'}: no rows, so there is nothing to audit")
    if len(report) < 2:
        raise InputError(f"{folder / 'report.npy'}: {len(report)} row(s); ranking needs at least 2 candidate reports")

    path = folder / "pairs.parquet"
    pairs = _read_parquet(path, "expected image.npy, report.npy and pairs.parquet")
    return image, report, _checked_pairs(path, pairs, len(image), len(report))


def _read_parquet(path: Path, missing_hint: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: not found; {missing_hint}")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot be read as Parquet ({err})") from err


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise InputError(f"{path}: not found; expected image.npy, report.npy and pairs.parquet") from err
    except (ValueError, EOFError, OSError) as err:
        raise InputError(f"{path}: not a readable numeric .npy array ({type(err).__name__}: {err}); save the "
                         "embeddings as a float array with numpy.save (object arrays need pickle and are not read)") from err
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: is an .npz archive, not a single .npy array")
    return array


def _checked_pairs(path: Path, pairs: pd.DataFrame, n_images: int, n_reports: int) -> pd.DataFrame:
    """Check columns, row count, patient ids and report rows; return pairs with integer ``report_row``."""
    missing = [c for c in ("report_row", "patient_id") if c not in pairs.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}")
    if len(pairs) != n_images:
        raise InputError(f"{path}: {len(pairs)} rows but image.npy has {n_images}; both need one row per image")

    no_patient = pairs["patient_id"].isna() | (pairs["patient_id"].astype(str).str.strip() == "")
    if no_patient.any():
        raise InputError(f"{path}: {int(no_patient.sum())} rows have no patient_id (first at row "
                         f"{int(np.flatnonzero(no_patient.to_numpy())[0])}); intervals resample patients")

    if "image_id" in pairs.columns:
        repeated = pairs["image_id"].astype(str)
        repeated = repeated[repeated.duplicated()].unique()
        if len(repeated):
            shown = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
            raise InputError(f"{path}: duplicate image_id values ({shown}); each row is one image and needs its own "
                             "id, so re-create the folder or drop the repeated rows from image.npy and pairs.parquet")

    rows = pd.to_numeric(pairs["report_row"], errors="coerce")
    bad = rows.isna() | (rows != rows.round()) | (rows < 0) | (rows >= n_reports)
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{path}: {int(bad.sum())} report_row values are not row numbers of report.npy "
                         f"(0..{n_reports - 1}); first at row {first}: {pairs['report_row'].iloc[first]}")
    return pairs.assign(report_row=rows.astype(np.int64))


def _checked_rows(path: Path, array: np.ndarray) -> np.ndarray:
    """Reject non-2-D, non-finite or zero rows; L2-normalise rows that are not unit length (with a warning)."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{path}: expected a 2-D numeric array [rows, dimensions], got shape {array.shape} "
                         f"and dtype {array.dtype}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} rows contain NaN or inf (first row {int(np.flatnonzero(bad)[0])}); "
                         "re-create the embeddings")
    norms = np.linalg.norm(array, axis=1)
    zero = norms == 0
    if zero.any():
        raise InputError(f"{path}: {int(zero.sum())} rows are zero vectors (first row {int(np.flatnonzero(zero)[0])}); "
                         "a zero embedding has no direction, so re-create the embeddings")
    off = np.abs(norms - 1.0) > 1e-3
    if off.any():
        logger.warning("%s: %d rows are not unit length; L2-normalising them for cosine scores", path, int(off.sum()))
        array = array / norms[:, None]
    return array


# Columns of reports.parquet that are ids, not labels; every other column is a label.
REPORT_ID_COLUMNS = ("report_id", "patient_id", "study_id", "image_id")


def load_reports_table(folder: Path, n_reports: int, required: bool) -> pd.DataFrame | None:
    """Read ``reports.parquet`` (one row per ``report.npy`` row); None when absent and not ``required``."""
    path = Path(folder) / "reports.parquet"
    if not path.is_file() and not required:
        return None
    table = _read_parquet(path, "pathology-matched pools need the report labels saved beside the embeddings")
    if len(table) != n_reports:
        raise InputError(f"{path}: {len(table)} rows but report.npy has {n_reports}; both need one row per report")
    return table


def load_report_labels(folder: Path, n_reports: int) -> np.ndarray:
    """Read the label columns of ``reports.parquet`` as ``[n_reports, L]`` floats (1, 0, -1, NaN)."""
    path = Path(folder) / "reports.parquet"
    table = load_reports_table(folder, n_reports, required=True)
    return _label_columns(path, table)


def _label_columns(path: Path, table: pd.DataFrame) -> np.ndarray:
    columns = [c for c in table.columns if c not in REPORT_ID_COLUMNS]
    if not columns:
        raise InputError(f"{path}: no label columns besides {', '.join(REPORT_ID_COLUMNS)}")
    labels = table[columns].apply(pd.to_numeric, errors="coerce")
    bad = (labels.isna() & table[columns].notna()).to_numpy()
    if bad.any():
        # The value itself is not printed: a text column here could hold report text.
        row, column = np.argwhere(bad)[0]
        raise InputError(f"{path}: column {columns[column]!r} row {row} is not a number; only label columns "
                         f"(1, 0, -1, blank) and the ids {', '.join(REPORT_ID_COLUMNS)} belong in this table")
    outside = ~(labels.isna() | labels.isin([1.0, 0.0, -1.0])).to_numpy()
    if outside.any():
        row, column = np.argwhere(outside)[0]
        raise InputError(f"{path}: column {columns[column]!r} row {row} has label value {labels.iat[row, column]}; "
                         "labels must be 1, 0, -1 or blank")
    return labels.to_numpy(dtype=np.float64)


def load_images_table(folder: Path, pairs: pd.DataFrame) -> pd.DataFrame | None:
    """Read ``images.parquet`` in the row order of ``pairs``; None when the folder has none.

    Rows are matched on ``image_id`` when both tables have it, else taken
    in file order, which then must have one row per pair.
    """
    path = Path(folder) / "images.parquet"
    if not path.is_file():
        return None
    table = _read_parquet(path, "attribute columns are read from images.parquet")
    if "image_id" in table.columns and "image_id" in pairs.columns:
        position = pd.Series(np.arange(len(table)), index=table["image_id"].astype(str).to_numpy())
        if position.index.duplicated().any():
            raise InputError(f"{path}: duplicate image_id values; each row is one image")
        wanted = pairs["image_id"].astype(str)
        absent = ~wanted.isin(position.index)
        if absent.any():
            raise InputError(f"{path}: {int(absent.sum())} images of pairs.parquet have no row (first: "
                             f"{wanted[absent].iloc[0]}); re-create the folder")
        return table.iloc[position.loc[wanted.to_numpy()].to_numpy()].reset_index(drop=True)
    if len(table) != len(pairs):
        raise InputError(f"{path}: {len(table)} rows but pairs.parquet has {len(pairs)}; both need one row per image")
    return table.reset_index(drop=True)


def folder_attributes(folder: Path, pairs: pd.DataFrame, reports: pd.DataFrame | None, design, columns: list[str],
                      label_policy: str = "zeros") -> tuple[np.ndarray, np.ndarray, dict]:
    """Attribute codes of a folder's design from ``images.parquet`` and ``reports.parquet``.

    See :func:`~linkrisk.audit.attributes.design_attribute_codes` for the
    rules; raises :class:`ConfigError` naming the available columns when
    one is missing.
    """
    images = load_images_table(folder, pairs) if not str(folder).startswith("manifest:") else None
    return design_attribute_codes(design, images, pairs["report_row"].to_numpy(), list(columns), reports,
                                  label_policy)


def _manifest_embeddings(spec: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Embeddings, pairs and report labels from a Parquet manifest with both embedding columns."""
    from linkrisk.data.registry import load_dataset

    cohort = load_dataset(spec)
    if set(cohort.embeddings) != {"image", "report"}:
        raise InputError(f"{spec}: auditing a manifest needs both image_embedding and report_embedding columns")
    row_of = {report_id: row for row, report_id in enumerate(cohort.reports["report_id"])}
    pairs = pd.DataFrame({"image_id": cohort.images["image_id"],
                          "report_row": cohort.images["report_id"].map(row_of).astype(np.int64),
                          "patient_id": cohort.images["patient_id"]})
    image = _checked_rows(Path(spec) / "image_embedding", cohort.embeddings["image"])
    report = _checked_rows(Path(spec) / "report_embedding", cohort.embeddings["report"])
    reports = cohort.reports[["report_id", *cohort.label_names]]
    return image, report, pairs, reports


def audit_folder(folder: Path, pools: list, ks: list[int], n_boot: int = 1000, seed: int = 0,
                 negatives: str = "random", label_policy: str = "zeros", *, direction: str = "image_to_report",
                 level: str = "study", image_level: str = "image", merge_identical: bool = False,
                 ties: str = "random", fallback: str | None = None, monte_carlo_pools: int = 0,
                 permutations: int = 0, match: list[str] | None = None, device: str = "cpu",
                 precision: str = "fp32", block_size: int | None = None, engine=None) -> dict:
    """Audit a saved embeddings folder; see :func:`~linkrisk.audit.run.run_audit` for the options and output.

    ``negatives`` accepts ``label-matched`` as a spelling of
    ``label_matched``. Labels and report patients come from
    ``reports.parquet`` when present (required for label-matched pools).
    With ``match`` (attribute names: columns of ``images.parquet`` or
    ``reports.parquet``, or ``labels``) the output adds
    ``attribute_matched``, ``attribute_oracle`` and ``oracle_comparison``
    on those attributes (:func:`~linkrisk.audit.attributes.audit_attributes`).
    """
    negatives = negatives.replace("-", "_")
    if negatives not in NEGATIVES:
        raise ConfigError(f"unknown negatives {negatives!r}; valid values: random, label-matched")
    if str(folder).startswith("manifest:"):
        image, report, pairs, reports = _manifest_embeddings(str(folder))
    else:
        image, report, pairs = load_embeddings(Path(folder))
        reports = load_reports_table(folder, len(report), required=negatives == "label_matched")
    labels = report_patients = None
    if reports is not None:
        if "patient_id" in reports.columns:
            report_patients = reports["patient_id"].to_numpy(dtype=object)
        if negatives == "label_matched" or (match and LABELS_ATTRIBUTE in match):
            source = str(folder).removeprefix("manifest:") if str(folder).startswith("manifest:") else \
                Path(folder) / "reports.parquet"
            labels = _label_columns(Path(source), reports)
    if pairs["patient_id"].nunique() == 1:
        logger.warning("%s: all %d images belong to one patient (%s), so every patient-bootstrap resample is the "
                       "same and the 95%% intervals have zero width; audit a cohort with more patients for "
                       "intervals that show uncertainty", folder, len(pairs), pairs["patient_id"].iloc[0])
    image_ids = pairs["image_id"].to_numpy() if "image_id" in pairs.columns else None
    design = build_design(image, report, pairs["report_row"].to_numpy(), pairs["patient_id"].astype(str).to_numpy(),
                          image_ids=image_ids, report_labels=labels, report_patients=report_patients,
                          direction=direction, level=level, image_level=image_level, merge_identical=merge_identical)
    attributes = None
    if match:
        # Checked before the audit's scoring pass, so a wrong column name fails at once.
        attributes = folder_attributes(folder, pairs, reports, design, list(match), label_policy)
    result = run_audit(design, pools, ks, n_boot, seed, ties=ties, negatives=negatives, label_policy=label_policy,
                       fallback=fallback, monte_carlo_pools=monte_carlo_pools,
                       permutations=permutations if negatives == "random" else 0, device=device,
                       precision=precision, block_size=block_size, engine=engine)
    if attributes is not None:
        logger.info("attribute audit started: matched pools and oracle on %s", ", ".join(match))
        result.update(audit_attributes(design, *attributes, pools, ks, n_boot, seed, ties=ties, device=device))
    return result
