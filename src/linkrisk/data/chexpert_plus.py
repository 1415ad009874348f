"""CheXpert Plus (Stanford AIMI, 2024) in the publisher's layout.

Sources opened:

- Stanford-AIMI/chexpert-plus README (GitHub, commit 48b99aa). It names
  the report table ``df_chexpert_plus_240401.csv`` and its
  ``section_findings`` column. It shows the CheXbert labels
  ``chexbert_labels/findings_fixed.json`` as JSON Lines: one record per
  image with ``path_to_image`` (for example
  ``train/patient42142/study5/view1_frontal.jpg``) and the 14 CheXpert
  observations as 1.0, 0.0, -1.0 or null.
- P. Chambon et al., "CheXpert Plus: Augmenting a Large Chest X-ray
  Dataset with Text Radiology Reports, Patient Demographics and Additional
  Image Formats", arXiv:2405.19538 (abstract): 223,228 images, 187,711
  reports, 64,725 patients, DICOM and PNG images.
- Third-party code that reads the release, for names the README leaves
  out. A Redivis client of table ``df_chexpert_plus_240401`` lists
  ``path_to_image``, ``path_to_dcm``, ``deid_patient_id``,
  ``patient_report_date_order``, ``report`` and the ``section_*`` columns.
  A tensorflow-datasets builder reads ``frontal_lateral`` (Frontal or
  Lateral), ``ap_pa`` (AP, PA or blank), ``split`` (train or valid) and
  PNG files under ``PNG/PNG/``. Other loaders read
  ``chexbert_labels/impression_fixed.json`` and ``report_fixed.json``.

Layout read here: ``<root>/df_chexpert_plus_240401.csv`` with one row per
image, images at ``<root>/<path_to_image>``, and one CheXbert label file.
The study is the two folders above the image file
(``patient42142/study5``), and it is both the study id and the report id.

NOTE: the publisher's README names only ``findings_fixed.json``. The
default label file ``impression_fixed.json`` (labels of the impression
section, the section the original CheXpert labels came from) is named only
by third-party code, so ``labels=`` accepts any of the label files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.data._tables import read_csv
from linkrisk.data.cohort import ALLOWED_LABEL_VALUES, CHEXPERT_LABELS, PairedCohort, _quote, has_text
from linkrisk.data.sections import SECTION_NAMES, TextPolicy, compose_text
from linkrisk.errors import ConfigError, InputError

CSV_NAME = "df_chexpert_plus_240401.csv"
DEFAULT_LABELS = "chexbert_labels/impression_fixed.json"
LABEL_KEY = "path_to_image"

# Report sections of the text policy and the CSV columns that contain them.
# Two columns are joined with a newline, in this order, leaving out empty ones.
# NOTE: the publisher does not document how section_history and section_clinical_history
# differ, so both feed "history". Pass section_columns= to map them another way.
DEFAULT_SECTION_COLUMNS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "findings": ("section_findings",),
    "impression": ("section_impression",),
    "history": ("section_history", "section_clinical_history"),
    "comparison": ("section_comparison",),
    "technique": ("section_technique",),
})

ID_COLUMNS = ("path_to_image", "deid_patient_id", "frontal_lateral", "ap_pa", "split", "report")

# Official split spellings mapped to the cohort's split names.
SPLIT_NAMES = {"train": "train", "valid": "validate", "validate": "validate", "validation": "validate", "test": "test"}

# Bytes that are not UTF-8 arrive from the surrogateescape decoder as lone surrogates.
_INVALID_BYTE = "[\udc80-\udcff]"
# The study is the two folders above the file: train/patient42142/study5/view1_frontal.jpg.
_STUDY = r"^(?:.*/)?([^/]+/[^/]+)/[^/]+$"


def _resolve_section_columns(policy: TextPolicy,
                             section_columns: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    unknown = [name for name in section_columns if name not in SECTION_NAMES]
    if unknown:
        raise ConfigError(f"invalid section names {unknown} in section_columns; choose from {', '.join(SECTION_NAMES)}")
    unmapped = [name for name in policy.sections if not section_columns.get(name)]
    if unmapped:
        raise ConfigError(
            f"CheXpert Plus has no column for report sections {unmapped}; choose from "
            f"{', '.join(n for n in section_columns if section_columns[n])} or map them with section_columns="
        )
    return {name: tuple(section_columns[name]) for name in policy.sections}


def _read_report_table(csv_path: Path, required: tuple[str, ...], repairs: Counter) -> pd.DataFrame:
    """Read the report CSV as strings, replacing bytes that are not UTF-8 with U+FFFD and counting those rows."""
    needed = set(required)
    table = read_csv(csv_path, required, dtype=object, keep_default_na=False,
                     encoding_errors="surrogateescape", usecols=lambda column: column in needed)
    table = table.assign(row=np.arange(1, len(table) + 1))  # 1-based data row, header excluded

    damaged = pd.Series(False, index=table.index)
    for column in required:
        values = table[column]
        try:
            "\n".join(values).encode("utf-8")  # fast path: the column has no replaced bytes
            continue
        except UnicodeEncodeError:
            pass
        hit = values.str.contains(_INVALID_BYTE, regex=True)
        damaged |= hit
        table[column] = values.str.replace(_INVALID_BYTE, "\ufffd", regex=True)
    if damaged.any():
        repairs["row has bytes that are not UTF-8 (replaced with U+FFFD)"] += int(damaged.sum())
        logger.warning("chexpert_plus: %s: %d rows have bytes that are not UTF-8, replaced with U+FFFD "
                       "(data rows %s)", csv_path.name, int(damaged.sum()), _quote(table.loc[damaged, "row"].tolist()))
    return table


def _add_ids(table: pd.DataFrame, skipped: Counter) -> pd.DataFrame:
    """Add ``image_id``, ``study_id`` and ``patient_id``, skipping rows whose path or patient id is unusable."""
    path = table["path_to_image"].str.strip()
    study = path.str.extract(_STUDY, expand=False)
    unsafe = path.str.startswith("/") | path.str.contains("\\", regex=False) | path.str.contains(r"(?:^|/)\.\.(?:/|$)")
    bad_path = study.isna() | unsafe
    if bad_path.any():
        skipped["path_to_image is not a relative <patient>/<study>/<file> path"] += int(bad_path.sum())
        logger.warning("chexpert_plus: skipped %d rows whose path_to_image is not a relative "
                       "<patient>/<study>/<file> path (data rows %s)",
                       int(bad_path.sum()), _quote(table.loc[bad_path, "row"].tolist()))
    patient = table["deid_patient_id"].str.strip()
    no_patient = ~bad_path & (patient == "")
    if no_patient.any():
        skipped["deid_patient_id is empty"] += int(no_patient.sum())
        logger.warning("chexpert_plus: skipped %d rows with an empty deid_patient_id (data rows %s)",
                       int(no_patient.sum()), _quote(table.loc[no_patient, "row"].tolist()))
    keep = ~(bad_path | no_patient)
    return table[keep].assign(image_id=path[keep], study_id=study[keep], patient_id=patient[keep])


def _drop_duplicate_images(table: pd.DataFrame, skipped: Counter) -> pd.DataFrame:
    """Keep the first row of each ``path_to_image``, so later rows neither vote on the text nor add images."""
    duplicated = table["image_id"].duplicated()
    if duplicated.any():
        skipped["duplicate image row"] += int(duplicated.sum())
        logger.warning("chexpert_plus: skipped %d rows repeating an earlier path_to_image (data rows %s)",
                       int(duplicated.sum()), _quote(table.loc[duplicated, "row"].tolist()))
    return table[~duplicated]


def _unify_patients(table: pd.DataFrame, repairs: Counter) -> pd.DataFrame:
    """Give every image of a study the study's first ``deid_patient_id``, so one report has one patient."""
    first = table.groupby("study_id", sort=False)["patient_id"].transform("first")
    differs = table["patient_id"] != first
    if differs.any():
        studies = table.loc[differs, "study_id"].unique().tolist()
        repairs["study rows with different deid_patient_id (first row's id kept)"] += len(studies)
        logger.warning("chexpert_plus: %d studies list more than one deid_patient_id; their images take the "
                       "id of the study's first row (studies %s)", len(studies), _quote(studies))
    return table.assign(patient_id=first)


def _official_split(table: pd.DataFrame, csv_path: Path) -> pd.Series:
    """Map the ``split`` column to train, validate or test, leaving blanks blank."""
    raw = table["split"].str.strip()
    names = raw.str.lower().map(SPLIT_NAMES)
    unknown = names.isna() & (raw != "")
    if unknown.any():
        first = int(np.flatnonzero(unknown.to_numpy())[0])
        raise InputError(
            f"{csv_path}: data row {table['row'].iloc[first]} has split {raw.iloc[first]!r} "
            f"({int(unknown.sum())} rows with unknown split values); expected one of {', '.join(SPLIT_NAMES)}"
        )
    blank = int((raw == "").sum())
    if blank:
        logger.info("chexpert_plus: %d rows have no official split", blank)
    return names.fillna("")


def _views(table: pd.DataFrame) -> np.ndarray:
    side = table["frontal_lateral"].str.strip().str.lower()
    projection = table["ap_pa"].str.strip().str.upper()
    frontal = side == "frontal"
    return np.select(
        [side == "lateral", frontal & (projection == "AP"), frontal & (projection == "PA"), frontal],
        ["Lateral", "AP", "PA", "Frontal"],
        "unknown",
    )


def _section_texts(table: pd.DataFrame, columns: dict[str, tuple[str, ...]]) -> dict[str, pd.Series]:
    """Return each policy section's text per row, joining its columns with a newline."""
    texts = {}
    for section, names in columns.items():
        joined = table[names[0]].str.strip()
        for name in names[1:]:
            part = table[name].str.strip()
            both = (joined != "") & (part != "")
            joined = (joined + "\n" + part).where(both, joined.where(joined != "", part))
        texts[section] = joined
    return texts


def _compose(table: pd.DataFrame, policy: TextPolicy, sections: dict[str, pd.Series]) -> pd.DataFrame:
    """Add ``text`` and ``used_fallback`` per row with the shared report text policy."""
    names = list(sections)
    full = table["report"] if policy.fallback == "full" else pd.Series(None, index=table.index, dtype=object)
    composed = [
        compose_text(dict(zip(names, values[:-1])), policy, values[-1])
        for values in zip(*(sections[n] for n in names), full)
    ]
    text, used_fallback = zip(*composed) if composed else ((), ())
    return table.assign(text=list(text), used_fallback=list(used_fallback))


def _choose_study_texts(table: pd.DataFrame, repairs: Counter) -> pd.DataFrame:
    """Pick one report text per study: the most frequent non-empty text, ties to the earliest row.

    Rows without text do not vote. Return ``study_id``, ``text`` and
    ``row`` (the first data row carrying the chosen text).
    """
    voting = table[has_text(table["text"])]
    counts = (voting.groupby(["study_id", "text"], sort=False)["row"]
              .agg(["size", "min"]).reset_index().rename(columns={"min": "row"}))
    counts = counts.sort_values(["study_id", "size", "row"], ascending=[True, False, True], kind="stable")
    chosen = counts.drop_duplicates("study_id")[["study_id", "text", "row"]].reset_index(drop=True)

    texts_per_study = counts.groupby("study_id").size()
    conflicted = texts_per_study[texts_per_study > 1].index.tolist()
    if conflicted:
        repairs["study rows with different report texts (most frequent text kept)"] += len(conflicted)
        logger.warning("chexpert_plus: %d studies have rows with different report texts; each keeps its most "
                       "frequent text, ties going to the earliest row (studies %s)", len(conflicted), _quote(conflicted))
    return chosen


def _count_report_gaps(table: pd.DataFrame, chosen: pd.DataFrame, sections: dict[str, pd.Series],
                       repairs: Counter) -> None:
    """Count kept reports with an empty policy section, and those whose text came from the full report."""
    for section, texts in sections.items():
        empty = int((~has_text(texts.set_axis(table["row"]).loc[chosen["row"]])).sum())
        if empty:
            repairs[f"report has no {section} text (kept with the other sections)"] += empty
            logger.info("chexpert_plus: %d reports have no %s text", empty, section)
    fallback = int(table.set_index("row")["used_fallback"].loc[chosen["row"]].sum())
    if fallback:
        repairs["report text is the full report (chosen sections empty)"] += fallback
        logger.info("chexpert_plus: %d reports use the full report because the chosen sections are empty", fallback)


def _read_label_records(path: Path) -> pd.DataFrame:
    """Parse a JSON Lines file into a table with a 1-based ``line`` column."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from err
    records, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: line {number} is not valid JSON ({err.msg}); "
                             "the label file must hold one JSON object per line") from err
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object; "
                             "the label file must hold one JSON object per line")
        records.append(record)
        lines.append(number)
    if not records:
        raise InputError(f"{path}: the label file is empty; expected one JSON object per image")
    return pd.DataFrame.from_records(records).assign(line=lines)


def _read_labels(path: Path) -> pd.DataFrame:
    """Read a CheXbert label file: ``path_to_image``, the 14 labels as floats (NaN = blank) and ``line``."""
    if not path.is_file():
        raise InputError(f"{path}: label file not found; point labels= at a chexbert_labels/*_fixed.json file, "
                         "or pass labels=None to load without labels")
    table = _read_label_records(path)
    missing = [c for c in (LABEL_KEY, *CHEXPERT_LABELS) if c not in table.columns]
    if missing:
        raise InputError(f"{path}: records lack keys {missing}; expected {LABEL_KEY!r} and the 14 CheXpert labels")
    for label in CHEXPERT_LABELS:
        column = table[label]
        values = pd.to_numeric(column, errors="coerce")
        bad = (values.isna() & column.notna()) | ~(values.isna() | values.isin(ALLOWED_LABEL_VALUES))
        if column.dtype == bool:
            bad[:] = True
        elif column.dtype == object:  # JSON true/false would otherwise pass as 1 and 0
            present = column.dropna()
            bad |= present.map(type).eq(bool).reindex(column.index, fill_value=False)
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            value = column.iloc[first]
            value_text = repr(value) if isinstance(value, str) else str(value)
            raise InputError(
                f"{path}: line {table['line'].iloc[first]}: {label!r} is {value_text} "
                f"({int(bad.sum())} invalid values in this column); labels must be 1, 0, -1 or null"
            )
        table[label] = values.astype(float)
    table[LABEL_KEY] = table[LABEL_KEY].astype(str).str.strip()
    return table[[LABEL_KEY, *CHEXPERT_LABELS, "line"]]


def _study_labels(table: pd.DataFrame, chosen: pd.DataFrame, labels: pd.DataFrame, path: Path,
                  skipped: Counter, repairs: Counter) -> pd.DataFrame:
    """Key image labels to studies: each study takes the labels of its earliest labelled row carrying the kept text.

    A study without such a row takes its earliest labelled row. Return
    ``report_id`` plus the 14 labels, for labelled studies only.
    """
    rows = table[["image_id", "study_id", "row", "text"]]
    joined = labels.merge(rows, left_on=LABEL_KEY, right_on="image_id", how="left")
    unmatched = joined["study_id"].isna()
    if unmatched.any():
        skipped["label row for an image not in the report CSV"] += int(unmatched.sum())
        logger.info("chexpert_plus: %s: %d label rows name images not in %s (lines %s)", path.name,
                    int(unmatched.sum()), CSV_NAME, _quote(joined.loc[unmatched, "line"].tolist()))
    joined = joined[~unmatched & joined["study_id"].isin(chosen["study_id"])]
    kept_text = joined["study_id"].map(chosen.set_index("study_id")["text"])
    joined = joined.assign(carries_kept_text=joined["text"] == kept_text)

    signature = pd.util.hash_pandas_object(joined[list(CHEXPERT_LABELS)].fillna(9.0), index=False)
    variants = signature.groupby(joined["study_id"].to_numpy()).nunique()
    disagreeing = variants[variants > 1].index.tolist()
    if disagreeing:
        repairs["study images with different labels (labels of the kept text's row used)"] += len(disagreeing)
        logger.warning("chexpert_plus: %d studies have images with different labels; each takes the labels of its "
                       "earliest row carrying the kept report text (studies %s)", len(disagreeing), _quote(disagreeing))

    ordered = joined.sort_values(["study_id", "carries_kept_text", "row", "line"],
                                 ascending=[True, False, True, True], kind="stable")
    first = ordered.drop_duplicates("study_id")
    return first.rename(columns={"study_id": "report_id"})[["report_id", *CHEXPERT_LABELS]]


def _find_images(table: pd.DataFrame, image_root: Path, image_suffix: str | None, check_images: bool,
                 skipped: Counter) -> pd.DataFrame:
    """Add the absolute ``image_path`` and, when ``check_images``, skip rows whose file does not exist."""
    relative = table["image_id"]
    if image_suffix is not None:
        relative = relative.str.replace(r"(\.[^./]*)?$", image_suffix, regex=True, n=1)
    paths = str(image_root.resolve()) + os.sep + relative
    table = table.assign(image_path=paths)
    if not check_images:
        logger.info("chexpert_plus: image files not checked (check_images=False)")
        return table
    exists = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
    missing = int((~exists).sum())
    if missing and not exists.any():
        raise InputError(
            f"{image_root}: none of the {missing} listed image files exists (first: {paths.iloc[0]}); "
            "for the PNG download pass image_dir= (the folder containing train/ and valid/) and image_suffix='.png', "
            "or pass check_images=False to load without image files"
        )
    if missing:
        skipped["image file missing"] += missing
        logger.info("chexpert_plus: skipped %d images whose file is missing under %s (for example %s)",
                    missing, image_root, _quote(table.loc[~exists, "image_id"].tolist()))
    return table[exists]


def load_chexpert_plus(
    root: str | Path,
    text_policy: TextPolicy = TextPolicy(),
    labels: str | Path | None = DEFAULT_LABELS,
    *,
    check_images: bool = True,
    image_dir: str | Path = ".",
    image_suffix: str | None = None,
    section_columns: Mapping[str, tuple[str, ...]] = DEFAULT_SECTION_COLUMNS,
) -> PairedCohort:
    """Load CheXpert Plus from ``root`` (the folder containing ``df_chexpert_plus_240401.csv``).

    One image per CSV row and one report per study (``patient<n>/study<m>``).
    The report text comes from ``text_policy`` over the ``section_*``
    columns, and ``report`` is the full text for ``fallback="full"``.

    Rules, each counted in ``skipped`` or ``repairs`` and logged once:

    - Bytes that are not UTF-8 are replaced with U+FFFD.
    - A ``path_to_image`` listed again keeps its first row.
    - When the rows of one study carry different texts, the most frequent
      non-empty text wins, and a tie goes to the text of the earliest row.
    - A study with no text is skipped, with its images.
    - With ``check_images``, an image whose file is missing is skipped, but
      its report stays a candidate.
    - The label file labels images, and a study takes the labels of its
      earliest labelled row carrying the kept text. Studies without a
      labelled row get NaN labels.

    Args:
        root: folder with the report CSV (and the images, see ``image_dir``).
        text_policy: report sections joined into the text.
        labels: CheXbert label file (JSON Lines), relative to ``root`` or
            absolute. ``None`` loads without labels (all NaN).
        check_images: skip rows whose image file is missing. ``False``
            keeps every row without touching the image files.
        image_dir: folder, relative to ``root`` or absolute, that
            ``path_to_image`` is relative to.
        image_suffix: replaces the file suffix of ``path_to_image``, for
            example ``".png"``. ``None`` keeps it.
        section_columns: policy section name to the CSV columns containing it.

    Returns:
        A validated :class:`PairedCohort` named ``chexpert_plus`` whose
        ``split`` maps each image id to train, validate (``valid`` in the
        CSV) or test.

    Raises:
        InputError: missing CSV or label file, missing columns, an unknown
            split value, invalid label values, or no image file found.
        ConfigError: a policy section with no CSV column.
    """
    # NOTE: the tensorflow-datasets builder cited above states that the CSV lists .jpg paths
    # while the PNG download contains .png files. Pass image_dir and image_suffix for that layout.
    root = Path(root)
    csv_path = root / CSV_NAME
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: not found; point root at the folder containing CheXpert Plus's {CSV_NAME}")
    columns = _resolve_section_columns(text_policy, section_columns)
    required = tuple(dict.fromkeys([*ID_COLUMNS, *(c for names in columns.values() for c in names)]))

    skipped: Counter = Counter()
    repairs: Counter = Counter()
    table = _read_report_table(csv_path, required, repairs)
    table = _drop_duplicate_images(_add_ids(table, skipped), skipped)
    table = _unify_patients(table, repairs)
    table = table.assign(split_name=_official_split(table, csv_path), view=_views(table))

    sections = _section_texts(table, columns)
    table = _compose(table, text_policy, sections)
    chosen = _choose_study_texts(table, repairs)
    _count_report_gaps(table, chosen, sections, repairs)

    if chosen.empty:
        raise InputError(f"{csv_path}: no study has text in sections {text_policy.describe()} "
                         f"(skipped: {dict(skipped) or 'the file has no data rows'}); "
                         "check the file or choose other sections")
    no_text = ~table["study_id"].isin(chosen["study_id"])
    if no_text.any():
        skipped["report has no text in the chosen sections"] += int(table.loc[no_text, "study_id"].nunique())
        skipped["image's report has no text"] += int(no_text.sum())
        logger.info("chexpert_plus: skipped %d studies (%d images) with no text in sections %s",
                    table.loc[no_text, "study_id"].nunique(), int(no_text.sum()), text_policy.describe())

    reports = pd.DataFrame({"report_id": chosen["study_id"], "text": chosen["text"]})
    reports = _attach_labels(reports, table, chosen, root, labels, skipped, repairs)
    shared = int(reports["text"].duplicated(keep=False).sum())
    if shared:
        logger.info("chexpert_plus: %d reports share their text with another study", shared)

    image_rows = _find_images(table[~no_text], _under(root, image_dir), image_suffix, check_images, skipped)
    images = pd.DataFrame({
        "image_id": image_rows["image_id"].to_numpy(),
        "image_path": image_rows["image_path"].to_numpy(),
        "study_id": image_rows["study_id"].to_numpy(),
        "patient_id": image_rows["patient_id"].to_numpy(),
        "report_id": image_rows["study_id"].to_numpy(),
        "view": image_rows["view"].to_numpy(),
    })
    split = dict(zip(image_rows["image_id"], image_rows["split_name"]))
    split = {image: name for image, name in split.items() if name}

    logger.info("chexpert_plus: %d images, %d reports, %d patients", len(images), len(reports),
                images["patient_id"].nunique())
    cohort = PairedCohort(
        name="chexpert_plus", images=images, reports=reports, label_names=CHEXPERT_LABELS,
        source=str(root), skipped=dict(skipped), repairs=dict(repairs), split=split,
    )
    return cohort.validate()


def _under(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def _attach_labels(reports: pd.DataFrame, table: pd.DataFrame, chosen: pd.DataFrame, root: Path,
                   labels: str | Path | None, skipped: Counter, repairs: Counter) -> pd.DataFrame:
    if labels is None:
        logger.info("chexpert_plus: no label file given; labels unknown")
        return reports.assign(**{label: np.nan for label in CHEXPERT_LABELS})
    path = _under(root, labels)
    by_study = _study_labels(table, chosen, _read_labels(path), path, skipped, repairs)
    reports = reports.merge(by_study, on="report_id", how="left")
    labelled = int(reports["report_id"].isin(by_study["report_id"]).sum())
    if labelled == 0 and len(reports):
        logger.warning("chexpert_plus: %s matches none of the %d reports; its path_to_image values must match "
                       "those in %s", path.name, len(reports), CSV_NAME)
    logger.info("chexpert_plus: labels from %s for %d of %d reports; the rest are unknown (NaN)",
                path.name, labelled, len(reports))
    return reports
