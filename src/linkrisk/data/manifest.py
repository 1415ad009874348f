"""Generic manifest: anyone's paired cohort as one CSV or Parquet table.

One row per image. Columns (names are case-sensitive):

==================== ======== ===================================================
column               required meaning
==================== ======== ===================================================
``image_id``         yes      unique image id; leave it empty on a row that only
                              adds a candidate report without an image
``patient_id``       yes      patient of the image (the privacy and bootstrap unit)
``report_id``        yes      the image's true report; rows of one study share it
``report_text``      yes [1]  the report text, kept as written
``image_path``       yes [2]  image file, absolute or relative to the manifest's folder
``study_id``         no       defaults to ``report_id``
``view``             no       ``PA``, ``AP``, ``Lateral``, ...; defaults to ``unknown``
``split``            no       official split of the image (``train``, ``validate``, ``test``)
CheXpert names       no       any of the 14 CheXpert observations, values 1, 0, -1 or blank
``image_embedding``  no       Parquet only: list of floats, precomputed image embedding
``report_embedding`` no       Parquet only: list of floats, precomputed report embedding
==================== ======== ===================================================

[1] not needed when every row has a ``report_embedding``.
[2] not needed when every image row has an ``image_embedding``.

With both embedding columns the manifest can be audited directly
(``linkrisk audit manifest:PATH``); encoders are not needed. Rows of one
report must agree on its text, labels and embedding: the first row wins,
and disagreements are counted in ``repairs``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.data._tables import numeric_labels, read_csv
from linkrisk.data.cohort import CHEXPERT_LABELS, PairedCohort, _quote, has_text
from linkrisk.errors import InputError

REQUIRED_COLUMNS = ("image_id", "patient_id", "report_id")
EMBEDDING_COLUMNS = ("image_embedding", "report_embedding")


def _resolve(manifest: Path, row, image_path) -> str:
    """Return the absolute image path of one manifest row ("" when empty); a symlink loop is an input error."""
    if not isinstance(image_path, str) or not image_path:
        return ""
    try:
        return str((manifest.parent / image_path).resolve())
    except (RuntimeError, OSError) as err:
        # Python < 3.13 raises RuntimeError for a symlink loop, later versions OSError (ELOOP).
        raise InputError(f"{manifest}: row {row}: image_path {image_path!r} cannot be resolved ({err}); fix the "
                         "link or the path") from err


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: not found or not a file; a manifest is a .csv or .parquet table")
    if path.suffix.lower() == ".parquet":
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: cannot be read as Parquet ({err})") from err
    if path.suffix.lower() in (".csv", ".gz"):
        return read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    raise InputError(f"{path}: unknown manifest format {path.suffix!r}; use .csv, .csv.gz or .parquet")


def _as_text_ids(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    for column in ("image_id", "patient_id", "report_id", "study_id", "view", "split"):
        if column in table.columns:
            table[column] = table[column].astype("string").str.strip()
    blank = table["report_id"].isna() | (table["report_id"] == "")
    if blank.any():
        raise InputError(f"{path}: {int(blank.sum())} rows have no report_id (first at row "
                         f"{int(np.flatnonzero(blank.to_numpy())[0])}); every row needs one")
    return table


def _embedding_matrix(values: pd.Series, ids: pd.Series, path: Path, column: str, kind: str) -> np.ndarray:
    """Stack one embedding column into ``[rows, d]``; errors name the ``kind`` id (``image`` or ``report``) of the row."""
    rows = [np.asarray(v, dtype=np.float32) if v is not None else None for v in values]
    missing = [i for i, row in enumerate(rows) if row is None or row.ndim != 1 or len(row) == 0]
    if missing:
        raise InputError(f"{path}: {len(missing)} rows have no {column} (first: {kind} id {ids.iloc[missing[0]]}); "
                         f"give every {kind} an embedding or leave its rows out")
    widths = {len(row) for row in rows}
    if len(widths) != 1:
        raise InputError(f"{path}: {column} rows differ in length ({sorted(widths)[:5]}); every row needs the same length")
    matrix = np.stack(rows)
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: {int(bad.sum())} {column} values contain NaN or inf (first: {kind} id "
                         f"{ids.iloc[first]}); re-create the embeddings or leave those rows out")
    return matrix


def _labels(table: pd.DataFrame, path: Path) -> tuple[str, ...]:
    names = tuple(label for label in CHEXPERT_LABELS if label in table.columns)
    numeric_labels(table, names, path, line_offset=None)
    return names


def load_manifest(path: str | Path) -> PairedCohort:
    """Load a manifest (CSV or Parquet) into a validated :class:`PairedCohort`.

    Precomputed embeddings, when present, are returned in
    ``cohort.embeddings`` (``image``: rows of ``cohort.images``; ``report``:
    rows of ``cohort.reports``).
    """
    path = Path(path)
    table = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    has_report_embedding = "report_embedding" in table.columns
    has_image_embedding = "image_embedding" in table.columns
    if "report_text" not in table.columns and not has_report_embedding:
        missing.append("report_text")
    if missing:
        raise InputError(f"{path}: missing columns {missing}; the manifest columns are listed in docs/datasets.md")
    if (has_report_embedding or has_image_embedding) and path.suffix.lower() != ".parquet":
        raise InputError(f"{path}: embedding columns need a Parquet manifest (lists of floats)")
    table = _as_text_ids(table.reset_index(drop=True), path)
    label_names = _labels(table, path)
    skipped: Counter = Counter()
    repairs: Counter = Counter()

    # Reports: the first row of each report id wins; disagreements are counted.
    if "report_text" not in table.columns:
        table["report_text"] = table["report_id"].map(lambda rid: f"(embedding only: {rid})")
    first_rows = table.drop_duplicates("report_id", keep="first")
    for column in ("report_text", *label_names):
        per_report = table.groupby("report_id", sort=False)[column].nunique(dropna=False)
        conflicts = int((per_report > 1).sum())
        if conflicts:
            repairs[f"report with different {column} across rows (first row kept)"] += conflicts
            logger.warning("%s: %d reports have different %s across rows; the first row is kept: %s", path.name,
                           conflicts, column, _quote(per_report.index[per_report > 1].tolist()))
    reports = pd.DataFrame({"report_id": first_rows["report_id"].to_numpy(),
                            "text": first_rows["report_text"].fillna("").to_numpy()})
    for label in label_names:
        reports[label] = first_rows[label].to_numpy()
    empty = ~has_text(reports["text"])
    if empty.any():
        skipped["report has no text"] += int(empty.sum())
        logger.warning("%s: %d reports have no text and are left out with their images: %s", path.name,
                       int(empty.sum()), _quote(reports.loc[empty, "report_id"].tolist()))

    # Images: rows with an image id, whose report has text and whose file exists.
    image_rows = table[table["image_id"].notna() & (table["image_id"] != "")].copy()
    textless = image_rows["report_id"].isin(set(reports.loc[empty, "report_id"]))
    if textless.any():
        skipped["image whose report has no text"] += int(textless.sum())
    image_rows = image_rows[~textless]
    if not has_image_embedding:
        if "image_path" not in table.columns:
            raise InputError(f"{path}: missing column image_path (or image_embedding in a Parquet manifest)")
        resolved = [_resolve(path, row, p) for row, p in zip(image_rows.index, image_rows["image_path"])]
        image_rows["image_path"] = resolved
        absent = np.array([not p or not Path(p).is_file() for p in resolved], dtype=bool)
        if absent.any():
            skipped["image file missing"] += int(absent.sum())
            logger.warning("%s: %d image files are missing and left out: %s", path.name, int(absent.sum()),
                           _quote(image_rows.loc[absent, "image_id"].tolist()))
            image_rows = image_rows[~absent]
    else:
        # Embedding-only images have no file; the path names where the vector came from.
        listed_paths = image_rows.get("image_path", pd.Series("", index=image_rows.index)).fillna("")
        image_rows["image_path"] = np.where(listed_paths == "", f"{path}#image_embedding", listed_paths)
    reports = reports[~empty].reset_index(drop=True)

    images = pd.DataFrame({
        "image_id": image_rows["image_id"].to_numpy(dtype=str),
        "image_path": image_rows["image_path"].to_numpy(dtype=str),
        "study_id": (image_rows["study_id"].fillna(image_rows["report_id"]) if "study_id" in image_rows
                     else image_rows["report_id"]).to_numpy(dtype=str),
        "patient_id": image_rows["patient_id"].fillna("").to_numpy(dtype=str),
        "report_id": image_rows["report_id"].to_numpy(dtype=str),
        "view": (image_rows["view"].fillna("unknown") if "view" in image_rows else
                 pd.Series("unknown", index=image_rows.index)).to_numpy(dtype=str),
    })
    split = dict(zip(images["image_id"], image_rows["split"].fillna("").astype(str))) if "split" in image_rows else {}
    cohort = PairedCohort(name=path.stem.split(".")[0], images=images, reports=reports, label_names=label_names,
                          source=str(path), skipped=dict(skipped), repairs=dict(repairs),
                          split={k: v for k, v in split.items() if v})
    cohort.validate()

    embeddings = {}
    if has_image_embedding:
        embeddings["image"] = _embedding_matrix(image_rows["image_embedding"], image_rows["image_id"], path,
                                                "image_embedding", "image")
    if has_report_embedding:
        by_report = first_rows.set_index("report_id")["report_embedding"]
        embeddings["report"] = _embedding_matrix(by_report.loc[reports["report_id"]], reports["report_id"], path,
                                                 "report_embedding", "report")
    if embeddings.keys() == {"image", "report"} and embeddings["image"].shape[1] != embeddings["report"].shape[1]:
        raise InputError(f"{path}: image embeddings have {embeddings['image'].shape[1]} dimensions but report "
                         f"embeddings {embeddings['report'].shape[1]}; both must come from one model")
    cohort.embeddings = embeddings
    logger.info("%s: %d images, %d reports, %d patients%s", path.name, cohort.n_images, cohort.n_reports,
                cohort.n_patients, " with precomputed embeddings" if embeddings else "")
    return cohort
