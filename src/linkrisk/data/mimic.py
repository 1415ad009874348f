"""MIMIC-CXR-JPG v2.0.0 images with MIMIC-CXR v2.0.0 free-text reports, in PhysioNet's layout.

Sources opened for the layout:

- PhysioNet project pages of MIMIC-CXR v2.0.0 (https://physionet.org/content/mimic-cxr/2.0.0/)
  and MIMIC-CXR-JPG v2.0.0 (https://physionet.org/content/mimic-cxr-jpg/2.0.0/): 377,110 JPG
  images of 227,827 studies with CheXpert and NegBio labels derived from the reports.
- https://mimic.mit.edu/docs/iv/modules/cxr: subject ids are 8 digits starting with 1, study
  ids 8 digits starting with 5, and an image (``dicom_id``) belongs to one study of one subject.
- MIT-LCP/mimic-code ``mimic-iv-cxr/txt/README.md`` (the code there wrote
  ``mimic-cxr-2.0.0-chexpert.csv.gz`` and ``mimic-cxr-2.0.0-negbio.csv.gz``),
  ``mimic-iv-cxr/txt/section_parser.py`` and ``txt/create_section_files.py`` (reports are
  ``files/p<NN>/p<subject_id>/s<study_id>.txt``, where ``p<NN>`` is ``p`` plus the first two
  digits of the subject id, with upper-case ``NAME:`` section headers).

NOTE: the PhysioNet file-description section was not available to check. The CSV column
names below agree with public code that reads the released files, and public download scripts
fetch the same ``mimic-cxr-2.0.0-*.csv.gz`` names from MIMIC-CXR-JPG v2.1.0.

Layout read from ``root``:

- ``mimic-cxr-2.0.0-split.csv.gz``: ``dicom_id, study_id, subject_id, split``, with split
  ``train``, ``validate`` or ``test``.
- ``mimic-cxr-2.0.0-metadata.csv.gz``: one row per image. Only ``dicom_id``, ``subject_id``,
  ``study_id`` and ``ViewPosition`` are read.
- ``mimic-cxr-2.0.0-chexpert.csv.gz`` or ``mimic-cxr-2.0.0-negbio.csv.gz``: ``subject_id,
  study_id`` and the 14 CheXpert observations, each 1.0, 0.0, -1.0 or blank.
- ``files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg``: the images.
- reports as ``files/p<NN>/p<subject_id>/s<study_id>.txt``, or in ``mimic-cxr-reports.zip``
  with members of the same path, or both.

An uncompressed ``.csv`` is read where its ``.csv.gz`` is absent.

Rules:

- Images are the metadata rows that the split file also lists with the same subject and
  study, whose JPG is at the path those ids give, and whose study has report text.
- Every metadata study with report text is a candidate report, even when none of its JPGs
  was downloaded.
- The report text is :func:`~linkrisk.data.sections.compose_text` of the report's sections
  under the :class:`~linkrisk.data.sections.TextPolicy`.
- A study with two report copies of different text (folder and zip) takes the zip copy, because
  reading a zip member checks its CRC-32, while an interrupted unzip can leave a short
  file in the folder.
- A row that repeats a ``dicom_id`` is dropped and the first row kept.
- Every record left out or repaired is counted in ``skipped`` or ``repairs`` and logged
  once per reason with its count and up to five ids, never with report text.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.data._tables import read_csv
from linkrisk.data.cohort import ALLOWED_LABEL_VALUES, CHEXPERT_LABELS, PairedCohort, _quote, has_text
from linkrisk.data.sections import TextPolicy, compose_text, split_sections
from linkrisk.errors import ConfigError, InputError

SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
LABEL_FILES = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz", "negbio": "mimic-cxr-2.0.0-negbio.csv.gz"}
REPORTS_ZIP = "mimic-cxr-reports.zip"
FILES_DIR = "files"

SPLIT_VALUES = ("train", "validate", "test")
# ViewPosition values mapped to cohort views. A blank value becomes "unknown", and any
# other value (for example "AP AXIAL" or "LAO") is kept as written.
VIEW_NAMES = {"PA": "PA", "AP": "AP", "LATERAL": "Lateral", "LL": "Lateral"}

# A radiology report is a few kilobytes, so a far larger file is not a report.
MAX_REPORT_BYTES = 4 * 2**20

# Paths relative to files/, with "/" as separator. "group" is the p<NN> folder.
_JPG_PATH = re.compile(r"^p(?P<group>\d{2})/p(?P<subject_id>\d+)/s(?P<study_id>\d+)/(?P<dicom_id>[^/]+)\.jpg$")
_REPORT_PATH = re.compile(r"^p(?P<group>\d{2})/p(?P<subject_id>\d+)/s(?P<study_id>\d+)\.txt$")
# Zip members are files/p<NN>/..., and a re-packed zip may put one folder in front.
_ZIP_MEMBER = re.compile(r"^(?:[^/]+/)?files/(?P<path>.+)$")


class _Tally:
    """Counts of skipped and repaired records by reason, each logged once with its count."""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()
        self.repairs: Counter = Counter()

    def skip(self, reason: str, ids: pd.Series | list, level: int = logging.WARNING) -> None:
        self._add(self.skipped, "skipped", reason, ids, level)

    def repair(self, reason: str, ids: pd.Series | list, level: int = logging.WARNING) -> None:
        self._add(self.repairs, "repaired", reason, ids, level)

    @staticmethod
    def _add(counts: Counter, verb: str, reason: str, ids: pd.Series | list, level: int) -> None:
        ids = list(ids)
        if not ids:
            return
        counts[reason] += len(ids)
        logger.log(level, "mimic: %s %d: %s (%s)", verb, len(ids), reason, _quote(ids))


def _table_path(root: Path, name: str) -> Path:
    """Return ``root/name``, or the uncompressed ``.csv`` when only that exists."""
    path = root / name
    plain = root / name.removesuffix(".gz")
    if not path.exists() and plain.is_file():
        return plain
    if not path.exists():
        raise InputError(f"{path}: not found; point the loader at the MIMIC-CXR-JPG folder that contains {name}")
    return path


def _read_table(path: Path, required: tuple[str, ...], **options) -> pd.DataFrame:
    """Read a CSV or gzipped CSV as strings, raising :class:`InputError` that names a damaged file."""
    try:
        return read_csv(path, required, compression="infer", dtype=str, **options)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(f"{path}: cannot be decompressed ({type(err).__name__}: {err}); the file is truncated "
                         "or damaged, so download it again") from err
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err


def _first_bad_line(bad: pd.Series) -> int:
    """Return the 1-based file line of the first flagged row (line 1 is the header)."""
    return int(np.flatnonzero(bad.to_numpy())[0]) + 2


def _clean_ids(table: pd.DataFrame, path: Path, numeric: tuple[str, ...], text: tuple[str, ...] = ()) -> None:
    """Strip id columns in place, raising one :class:`InputError` for all blank or non-numeric ids."""
    problems = []
    for column in (*numeric, *text):
        values = table[column].fillna("").str.strip()
        bad = ~values.str.fullmatch(r"\d+") if column in numeric else values == ""
        if bad.any():
            line = _first_bad_line(bad)
            kind = "a number" if column in numeric else "a non-empty id"
            problems.append(f"column {column!r} has {int(bad.sum())} values that are not {kind} "
                            f"(first at line {line}: {table[column].iloc[line - 2]!r})")
        # Object dtype: isin and merge on Arrow-backed strings are several times slower at 377k rows.
        table[column] = values.astype(object)
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems) + "; download the file again")


def _read_split(path: Path) -> pd.DataFrame:
    table = _read_table(path, ("dicom_id", "study_id", "subject_id", "split"))
    _clean_ids(table, path, ("subject_id", "study_id"), ("dicom_id",))
    table["split"] = table["split"].fillna("").str.strip()
    bad = ~table["split"].isin(SPLIT_VALUES)
    if bad.any():
        line = _first_bad_line(bad)
        raise InputError(f"{path}: {int(bad.sum())} rows have a split outside {', '.join(SPLIT_VALUES)} "
                         f"(first at line {line}: {table['split'].iloc[line - 2]!r}); download the file again")
    return table[["dicom_id", "subject_id", "study_id", "split"]]


def _read_metadata(path: Path) -> pd.DataFrame:
    required = ("dicom_id", "subject_id", "study_id", "ViewPosition")
    # A callable usecols skips the other columns without failing when a required one is absent.
    table = _read_table(path, required, usecols=lambda column: column in required)
    _clean_ids(table, path, ("subject_id", "study_id"), ("dicom_id",))
    position = table["ViewPosition"].fillna("").str.strip()
    table["view"] = position.map(VIEW_NAMES).fillna(position).replace("", "unknown")
    return table[["dicom_id", "subject_id", "study_id", "view"]]


def _read_labels(path: Path) -> pd.DataFrame:
    """Read a label file into ``subject_id, study_id`` and one float column per CheXpert label."""
    table = _read_table(path, ("subject_id", "study_id", *CHEXPERT_LABELS))
    _clean_ids(table, path, ("subject_id", "study_id"))
    duplicated = table["study_id"].duplicated(keep=False)
    if duplicated.any():
        raise InputError(f"{path}: study ids {_quote(table.loc[duplicated, 'study_id'].unique().tolist())} are "
                         f"listed more than once (first at line {_first_bad_line(duplicated)}); keep one row per study")

    problems = []
    for label in CHEXPERT_LABELS:
        values = pd.to_numeric(table[label], errors="coerce")
        bad = (values.isna() & table[label].notna()) | ~(values.isna() | values.isin(ALLOWED_LABEL_VALUES))
        if bad.any():
            line = _first_bad_line(bad)
            problems.append(f"column {label!r} has {int(bad.sum())} values outside {{1.0, 0.0, -1.0, blank}} "
                            f"(first at line {line}, study {table['study_id'].iloc[line - 2]}: "
                            f"{table[label].iloc[line - 2]!r})")
        table[label] = values
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems) + "; use the file as published by PhysioNet")
    return table[["subject_id", "study_id", *CHEXPERT_LABELS]]


def _drop_repeated_ids(table: pd.DataFrame, file_name: str, tally: _Tally) -> pd.DataFrame:
    repeated = table["dicom_id"].duplicated()
    tally.skip(f"{file_name} row repeating a dicom_id (first row kept)", table.loc[repeated, "dicom_id"])
    return table[~repeated]


def _join_split(metadata: pd.DataFrame, split: pd.DataFrame, tally: _Tally) -> pd.DataFrame:
    """Keep the images that metadata and split file both list with the same subject and study."""
    only_split = ~split["dicom_id"].isin(metadata["dicom_id"])
    tally.skip("image in the split file but not in metadata", split.loc[only_split, "dicom_id"])
    joined = metadata.merge(split, on="dicom_id", how="left", suffixes=("", "_split"), sort=False)
    only_metadata = joined["split"].isna()
    tally.skip("image in metadata but not in the split file", joined.loc[only_metadata, "dicom_id"])
    joined = joined[~only_metadata]
    differ = (joined["subject_id"] != joined["subject_id_split"]) | (joined["study_id"] != joined["study_id_split"])
    tally.skip("image whose subject_id or study_id differs between split file and metadata",
               joined.loc[differ, "dicom_id"])
    return joined.loc[~differ, ["dicom_id", "subject_id", "study_id", "view", "split"]]


def _list_studies(metadata: pd.DataFrame, tally: _Tally) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the metadata rows to keep and one ``subject_id, study_id`` row per study, in file order.

    A study id listed under two subject ids belongs to the first one, and rows naming another
    subject for it are skipped.
    """
    studies = metadata.drop_duplicates("study_id")[["subject_id", "study_id"]].reset_index(drop=True)
    owner = metadata["study_id"].map(studies.set_index("study_id")["subject_id"])
    other = metadata["subject_id"] != owner
    tally.skip("image whose study_id is listed under another subject_id earlier in metadata",
               metadata.loc[other, "dicom_id"])
    return metadata[~other], studies


def _parse_paths(relative: list[str], pattern: re.Pattern) -> pd.DataFrame:
    """Parse ``files/``-relative paths and add ``in_place``: whether the p<NN> folder matches the subject id."""
    # astype(object) keeps string columns when the list is empty (extract would give float64).
    parsed = pd.Series(relative, dtype=object).str.extract(pattern).astype(object)
    parsed["relative"] = pd.Series(relative, dtype=object)
    parsed = parsed.dropna(subset=["group"])
    parsed["in_place"] = parsed["group"] == parsed["subject_id"].str[:2]
    return parsed.drop(columns="group")


def _scan_files(files_dir: Path, tally: _Tally) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Walk ``files/`` once and return the JPG and report ``.txt`` files in the MIMIC-CXR layout."""
    jpgs: list[str] = []
    reports: list[str] = []
    top = str(files_dir)
    for folder, _, names in os.walk(top):
        # os.walk yields top + os.sep + subfolders, so slicing is a cheaper os.path.relpath.
        relative = folder[len(top) + 1:].replace(os.sep, "/") or "."
        for name in names:
            if name.endswith(".jpg"):
                jpgs.append(f"{relative}/{name}")
            elif name.endswith(".txt"):
                reports.append(f"{relative}/{name}")
    jpg_table = _parse_paths(jpgs, _JPG_PATH)
    report_table = _parse_paths(reports, _REPORT_PATH)
    outside = sorted(set(jpgs) - set(jpg_table["relative"]) | set(reports) - set(report_table["relative"]))
    tally.skip(f"JPG or .txt file under {FILES_DIR}/ outside the MIMIC-CXR layout", outside)
    return jpg_table, report_table


def _locate_images(images: pd.DataFrame, jpgs: pd.DataFrame, files_dir: Path, tally: _Tally) -> pd.DataFrame:
    """Add ``image_path``, skipping images whose JPG is missing or in another subject or study folder."""
    placed = jpgs[jpgs["in_place"]].drop_duplicates(["dicom_id", "subject_id", "study_id"])
    found = images.merge(placed[["dicom_id", "subject_id", "study_id", "relative"]],
                         on=["dicom_id", "subject_id", "study_id"], how="left", sort=False)
    absent = found["relative"].isna()
    elsewhere = absent & found["dicom_id"].isin(jpgs["dicom_id"])
    tally.skip("image whose JPG is in a folder that disagrees with the CSV subject_id or study_id",
               found.loc[elsewhere, "dicom_id"])
    tally.skip("image whose JPG file is missing (partial download)", found.loc[absent & ~elsewhere, "dicom_id"],
               level=logging.INFO)
    found = found[~absent].copy()
    found["image_path"] = str(files_dir.resolve()) + os.sep + found["relative"].str.replace("/", os.sep)
    return found.drop(columns="relative")


def _decode(data: bytes) -> tuple[str | None, bool]:
    """Decode UTF-8, replacing invalid bytes with U+FFFD, and return ``(text, replaced)``.

    The text is None for data longer than :data:`MAX_REPORT_BYTES`.
    """
    if len(data) > MAX_REPORT_BYTES:
        return None, False
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _read_folder_reports(rows: pd.DataFrame, files_dir: Path) -> pd.DataFrame:
    decoded = []
    for relative in rows["relative"]:
        path = files_dir / relative
        try:
            with open(path, "rb") as handle:
                decoded.append(_decode(handle.read(MAX_REPORT_BYTES + 1)))
        except OSError as err:
            raise InputError(f"{path}: cannot be read ({err}); check the file's permissions") from err
    return _with_texts(rows, decoded)


def _zip_members(archive: zipfile.ZipFile) -> pd.DataFrame:
    names, relative = [], []
    for info in archive.infolist():
        match = _ZIP_MEMBER.match(info.filename)
        if match and not info.is_dir():
            names.append(info.filename)
            relative.append(match.group("path"))
    table = _parse_paths(relative, _REPORT_PATH)
    table["member"] = [names[i] for i in table.index]
    return table


def _read_zip_reports(rows: pd.DataFrame, archive: zipfile.ZipFile) -> pd.DataFrame:
    decoded = []
    for member in rows["member"]:
        # Reading a member to its end makes zipfile check its CRC-32.
        with archive.open(member) as handle:
            decoded.append(_decode(handle.read(MAX_REPORT_BYTES + 1)))
    return _with_texts(rows, decoded)


def _with_texts(rows: pd.DataFrame, decoded: list[tuple[str | None, bool]]) -> pd.DataFrame:
    return rows.assign(full_text=[text for text, _ in decoded], replaced=[flag for _, flag in decoded])


def _match_reports(found: pd.DataFrame, studies: pd.DataFrame, tally: _Tally) -> pd.DataFrame:
    """Keep the report files at the path that the CSV ids give, and count the others."""
    known = found["study_id"].isin(studies["study_id"])
    tally.skip("report file of a study not in metadata", found.loc[~known, "source_path"])
    found = found[known].merge(studies[["study_id", "subject_id"]], on="study_id", suffixes=("", "_csv"))
    placed = found["in_place"] & (found["subject_id"] == found["subject_id_csv"])
    tally.skip("report file in a folder that disagrees with the CSV subject_id", found.loc[~placed, "source_path"])
    return found[placed].drop(columns="subject_id_csv")


def _collect_reports(studies: pd.DataFrame, folder_reports: pd.DataFrame, zip_path: Path, files_dir: Path,
                     tally: _Tally) -> pd.DataFrame:
    """Read one full report per study from the folder and the zip, taking the zip copy in a conflict.

    Returns ``subject_id, study_id, full_text`` in the order of the studies.
    """
    folder = folder_reports.assign(source=1, source_path=FILES_DIR + "/" + folder_reports["relative"])
    parts = [_read_folder_reports(_match_reports(folder, studies, tally), files_dir)]

    if zip_path.exists():
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = _zip_members(archive)
                members = members.assign(source=0, source_path=zip_path.name + ":" + members["member"])
                parts.append(_read_zip_reports(_match_reports(members, studies, tally), archive))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error) as err:
            raise InputError(f"{zip_path}: the reports zip is damaged or truncated ({type(err).__name__}: {err}); "
                             "download it again") from err

    found = pd.concat(parts, ignore_index=True)
    oversized = found["full_text"].isna()
    tally.skip(f"report file larger than {MAX_REPORT_BYTES // 2**20} MiB", found.loc[oversized, "source_path"])
    found = found[~oversized]

    texts_per_study = found.groupby("study_id")["full_text"].transform("nunique")
    conflicts = found.loc[texts_per_study > 1, "study_id"].unique()
    tally.repair("report with two copies of different text (zip copy used)", conflicts)
    # The stable sort puts the zip copy (source 0) before the folder copy (source 1).
    found = found.sort_values("source", kind="stable").drop_duplicates("study_id")
    tally.repair("report with invalid UTF-8 bytes (replaced by U+FFFD)",
                 found.loc[found["replaced"].astype(bool), "study_id"])

    missing = studies.loc[~studies["study_id"].isin(found["study_id"]), "study_id"]
    tally.skip("study in metadata without a report file at its path", missing)
    # Reports follow the order of their studies' first rows in metadata.
    return studies[["study_id"]].merge(found[["subject_id", "study_id", "full_text"]], on="study_id")


def _compose_reports(found: pd.DataFrame, policy: TextPolicy, tally: _Tally) -> pd.DataFrame:
    """Apply the text policy, skipping reports without text and counting the fallbacks used."""
    texts = []
    used_full = []
    lacking: dict[str, list[str]] = {name: [] for name in policy.sections}
    for study_id, full_text in zip(found["study_id"], found["full_text"]):
        sections = split_sections(full_text)
        text, fallback = compose_text(sections, policy, full_text)
        texts.append(text)
        if fallback:
            used_full.append(study_id)
        elif text:
            for name in policy.sections:
                if not (sections.get(name) or "").strip():
                    lacking[name].append(study_id)
    found = found.assign(text=texts)

    for name, study_ids in lacking.items():
        tally.repair(f"report without {name} text (other chosen sections used)", study_ids, level=logging.INFO)
    tally.repair("report without text in the chosen sections (whole report used)", used_full, level=logging.INFO)
    empty = ~has_text(found["text"])
    tally.skip("report without text in the chosen sections", found.loc[empty, "study_id"])
    return found[~empty]


def _attach_labels(reports: pd.DataFrame, labels: pd.DataFrame, label_path: Path, tally: _Tally) -> pd.DataFrame:
    """Add the label columns, keyed by ``subject_id, study_id``. Reports without a label row get NaN."""
    subjects = reports.set_index("study_id")["subject_id"]
    expected = labels["study_id"].map(subjects)
    other = expected.notna() & (labels["subject_id"] != expected)
    tally.skip(f"{label_path.name} row whose subject_id differs from metadata (labels left unknown)",
               labels.loc[other, "study_id"])
    merged = reports.merge(labels, on=["subject_id", "study_id"], how="left", sort=False, indicator=True)
    labelled = int((merged["_merge"] == "both").sum())
    logger.info("mimic: %s has a row for %d of %d reports; the others have unknown labels", label_path.name,
                labelled, len(merged))
    return merged.drop(columns="_merge")


def load_mimic_cxr(root: str | Path, text_policy: TextPolicy = TextPolicy(), labels: str = "chexpert") -> PairedCohort:
    """Load MIMIC-CXR-JPG v2.0.0 and its MIMIC-CXR reports from ``root``.

    Args:
        root: folder containing the ``mimic-cxr-2.0.0-*.csv.gz`` files, ``files/`` with the JPGs
            and the reports as ``.txt`` files under ``files/`` or as ``mimic-cxr-reports.zip``.
        text_policy: report sections that form the text, and the fallback when none has text.
        labels: ``chexpert`` or ``negbio``, the label file that fills the 14 CheXpert columns.

    Returns:
        A validated :class:`PairedCohort` named ``mimic`` with one row per image and one report
        per study (``report_id`` is the study id). ``split`` maps each image to its official
        split. Studies absent from the label file have NaN labels.

    Raises:
        ConfigError: ``labels`` is not one of the label files.
        InputError: a required file is missing, damaged or has invalid rows, no report file
            exists, or no image is left.
    """
    if labels not in LABEL_FILES:
        raise ConfigError(f"invalid label file {labels!r}; valid values: {', '.join(LABEL_FILES)}")
    root = Path(root)
    files_dir = root / FILES_DIR
    zip_path = root / REPORTS_ZIP
    if not files_dir.is_dir():
        raise InputError(f"{files_dir}: not found; point the loader at the MIMIC-CXR-JPG folder that contains files/")
    split = _read_split(_table_path(root, SPLIT_FILE))
    metadata = _read_metadata(_table_path(root, METADATA_FILE))
    label_path = _table_path(root, LABEL_FILES[labels])
    label_table = _read_labels(label_path)

    tally = _Tally()
    metadata = _drop_repeated_ids(metadata, "metadata", tally)
    split = _drop_repeated_ids(split, "split file", tally)
    metadata, studies = _list_studies(metadata, tally)
    images = _join_split(metadata, split, tally)

    jpgs, folder_reports = _scan_files(files_dir, tally)
    if folder_reports.empty and not zip_path.exists():
        raise InputError(f"{root}: no report found; expected {REPORTS_ZIP} or {FILES_DIR}/p<NN>/p<subject_id>/"
                         "s<study_id>.txt files from MIMIC-CXR")
    images = _locate_images(images, jpgs, files_dir, tally)
    reports = _compose_reports(_collect_reports(studies, folder_reports, zip_path, files_dir, tally),
                               text_policy, tally)

    without_text = ~images["study_id"].isin(reports["study_id"])
    tally.skip("image of a study without report text", images.loc[without_text, "dicom_id"])
    images = images[~without_text].reset_index(drop=True)
    if images.empty:
        raise InputError(f"{root}: no usable images (skipped: {dict(tally.skipped) or 'the CSV files have no rows'}); "
                         f"check that {FILES_DIR}/ contains the JPGs and the reports")

    shared = int(reports["text"].duplicated(keep=False).sum())
    if shared:
        logger.info("mimic: %d reports share their text with another report", shared)
    reports = _attach_labels(reports, label_table, label_path, tally)

    cohort = PairedCohort(
        name="mimic",
        images=pd.DataFrame({
            "image_id": images["dicom_id"].to_numpy(),
            "image_path": images["image_path"].to_numpy(),
            "study_id": images["study_id"].to_numpy(),
            "patient_id": images["subject_id"].to_numpy(),
            "report_id": images["study_id"].to_numpy(),
            "view": images["view"].to_numpy(),
        }),
        reports=reports.rename(columns={"study_id": "report_id"})[["report_id", "text", *CHEXPERT_LABELS]],
        label_names=CHEXPERT_LABELS,
        source=str(root),
        skipped=dict(tally.skipped),
        repairs=dict(tally.repairs),
        split=dict(zip(images["dicom_id"], images["split"])),
    )
    logger.info("mimic: %d images, %d reports, %d patients", cohort.n_images, cohort.n_reports, cohort.n_patients)
    return cohort.validate()
