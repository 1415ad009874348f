"""COVID-19 image data collection (ieee8023/covid-chestxray-dataset layout).

Source: J. P. Cohen et al., "COVID-19 Image Data Collection: Prospective
Predictions Are the Future", MELBA 2020; https://github.com/ieee8023/covid-chestxray-dataset.
Layout read here: ``metadata.csv`` (one row per image: patientid, view,
modality, finding, filename, clinical_notes, ...) and ``images/``.

The report is the row's ``clinical_notes``. Images of one patient that
share a note share one report (report and study id = patient id plus a
hash of the note). The same note under two patients stays two reports
whose texts tie. Labels come from ``finding``: each of its
comma- or slash-separated parts is one binary label.

The image table adds four attribute columns (None where blank): ``sex``
(``M`` or ``F``), ``age_band`` (the decade, for example ``50-59``), ``site``
(the ``location`` column: hospital, city or country as written) and
``source`` (where the image was published: ``doi:<doi>`` when the row
has a DOI, else ``host:<web host of url>``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.data._tables import read_csv
from linkrisk.data.cohort import PairedCohort, _quote, has_text
from linkrisk.errors import InputError

REQUIRED_COLUMNS = ("patientid", "view", "modality", "finding", "filename", "clinical_notes")
X_RAY_VIEWS = {"PA": "PA", "AP": "AP", "AP Supine": "AP Supine", "APS": "AP Supine", "L": "Lateral"}


def _finding_parts(finding: str) -> list[str]:
    parts = str(finding).replace("/", ",").split(",")
    return [p.strip() for p in parts if p.strip()]


def _is_plain_name(name: str) -> bool:
    """Return whether ``name`` is a bare file name inside images/ (no folders, no '..', not absolute)."""
    name = name.strip()
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and len(name.encode()) <= 255


def _blank_to_none(values: pd.Series) -> pd.Series:
    values = values.astype(str).str.strip()
    return values.where(values != "", None)


def _age_band(ages: pd.Series) -> pd.Series:
    """Map ages in years to decade bands (``50-59``); blank or non-numeric ages become None."""
    years = pd.to_numeric(ages.astype(str).str.strip(), errors="coerce")
    decade = (years // 10 * 10).where(years >= 0)
    return decade.map(lambda d: None if pd.isna(d) else f"{int(d)}-{int(d) + 9}").astype(object)


def _publication_source(doi: pd.Series, url: pd.Series) -> pd.Series:
    """Name where each image was published: ``doi:<doi>``, else ``host:<url host>``, else None."""
    doi, url = _blank_to_none(doi), _blank_to_none(url)
    hosts = url.map(lambda u: None if u is None else (urlparse(u).netloc.lower() or None))
    source = ("doi:" + doi.str.lower()).where(doi.notna(), "host:" + hosts)
    return source.where(source.notna(), None).astype(object)


def _patient_groups(rows: pd.DataFrame) -> dict[str, str]:
    """Map each patient id to one group id, joining patients that share an image file.

    The collection lists a few files under two patient ids; a
    patient-disjoint split must keep such patients together.
    """
    parent = {p: p for p in rows["patientid"]}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for _, group in rows.groupby("filename")["patientid"]:
        first, *others = sorted(set(group))
        for other in others:
            a, b = find(first), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {p: find(p) for p in parent}


def load_covid(root: str | Path) -> PairedCohort:
    """Load the COVID-19 collection from ``root`` (the folder with ``metadata.csv`` and ``images/``).

    Rows are kept when the modality is X-ray, the view is a radiograph
    view, the note has text, the file name is plain and the image file
    exists. Every other row is skipped and counted by reason, because a
    partial download is normal.
    A file listed twice keeps its first row.
    """
    root = Path(root)
    csv_path = root / "metadata.csv"
    if not csv_path.exists():
        raise InputError(f"{csv_path}: not found; pass the folder holding the collection's metadata.csv")
    table = read_csv(csv_path, REQUIRED_COLUMNS, dtype=str, keep_default_na=False)

    table = table.assign(csv_row=np.arange(2, len(table) + 2))  # 1-based file line, after the header
    skipped: Counter = Counter()

    def keep(mask: pd.Series, reason: str) -> pd.DataFrame:
        mask = mask.astype(bool)  # an empty or mapped mask has object dtype
        dropped = int((~mask).sum())
        if dropped:
            skipped[reason] += dropped
            logger.info("covid: skipped %d rows: %s", dropped, reason)
        return table[mask]

    table = keep(table["modality"].str.strip() == "X-ray", "modality is not X-ray")
    table = keep(table["view"].str.strip().isin(X_RAY_VIEWS), "view is not a radiograph view")
    table = keep(has_text(table["clinical_notes"]), "empty clinical note")
    table = keep(table["filename"].map(_is_plain_name), "filename is not a plain file name")
    exists = table["filename"].map(lambda name: (root / "images" / name).is_file())
    absent = table.loc[~exists, "filename"].tolist()
    table = keep(exists, "image file not in images/")
    if absent:
        logger.info("covid: files not in images/: %s", _quote(absent))

    if table.empty:
        raise InputError(f"{csv_path}: no usable rows (skipped: {dict(skipped) or 'the file has no data rows'}); "
                         "check that images/ holds the listed files")

    groups = _patient_groups(table)
    joined = [f"{p} with {g}" for p, g in sorted(groups.items()) if p != g]
    if joined:
        logger.info("covid: patient ids sharing image files count as one patient: %s", _quote(joined))
    duplicated = table["filename"].duplicated()
    if duplicated.any():
        logger.warning(
            "covid: skipped %d rows listing an image file already listed (csv rows %s)",
            int(duplicated.sum()), _quote(table.loc[duplicated, "csv_row"].tolist()),
        )
        skipped["image file listed twice"] += int(duplicated.sum())
        table = table[~duplicated]

    table = table.assign(patient_id=table["patientid"].map(groups), note=table["clinical_notes"].str.strip())
    note_hash = table["note"].map(lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()[:10])
    table = table.assign(report_id="p" + table["patient_id"] + "-" + note_hash)

    images = pd.DataFrame({
        "image_id": table["filename"].values,
        "image_path": [str((root / "images" / f).resolve()) for f in table["filename"]],
        "study_id": table["report_id"].values,
        "patient_id": table["patient_id"].values,
        "report_id": table["report_id"].values,
        "view": table["view"].str.strip().map(X_RAY_VIEWS).values,
        "sex": _blank_to_none(table["sex"]).where(lambda s: s.isin(["M", "F"]), None).values
        if "sex" in table.columns else None,
        "age_band": _age_band(table["age"]).values if "age" in table.columns else None,
        "site": _blank_to_none(table["location"]).values if "location" in table.columns else None,
        "source": _publication_source(table["doi"] if "doi" in table.columns else pd.Series("", index=table.index),
                                      table["url"] if "url" in table.columns else pd.Series("", index=table.index)
                                      ).values,
    })

    first = table.drop_duplicates("report_id")
    label_names = tuple(sorted({part for f in table["finding"] for part in _finding_parts(f)}))
    report_findings = table.groupby("report_id")["finding"].agg(lambda fs: {p for f in fs for p in _finding_parts(f)})
    reports = pd.DataFrame({"report_id": first["report_id"].values, "text": first["note"].values})
    for label in label_names:
        reports[label] = [float(label in report_findings[r]) for r in reports["report_id"]]

    logger.info(
        "covid: %d images, %d reports, %d patients; %d rows skipped",
        len(images), len(reports), images["patient_id"].nunique(), sum(skipped.values()),
    )
    cohort = PairedCohort(
        name="covid", images=images, reports=reports, label_names=label_names,
        source=str(root), skipped=dict(skipped),
    )
    return cohort.validate()
