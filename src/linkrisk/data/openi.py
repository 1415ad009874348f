"""Open-i (Indiana University chest X-ray collection) in the publisher's layout.

Source: NLM Open-i, https://openi.nlm.nih.gov/faq (licence CC BY-NC-ND 4.0).
Layout read here:

- ``NLMCXR_reports.tgz``: ``ecgen-radiology/<n>.xml``, one per study, with
  ``<AbstractText Label="FINDINGS|IMPRESSION|...">`` sections and
  ``<parentImage id="CXR<uid>_<k>_IM-....">`` for each of the study's images.
- ``NLMCXR_png/``: ``CXR<uid>_IM-....png``, often a partial download.
- ``chexpert_labels.csv`` (optional): ``uid`` plus the 14 CheXpert columns.
- ``indiana_projections.csv`` (optional, Kaggle re-packaging): the view
  (Frontal or Lateral) of each image.

One study per patient: the report id ``CXR<uid>`` is also the study and
patient id. Every report in the archive is a candidate, with or without
an image in the PNG folder.
"""

from __future__ import annotations

import re
import tarfile
import zlib
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.data._tables import read_csv
from linkrisk.data.cohort import ALLOWED_LABEL_VALUES, CHEXPERT_LABELS, PairedCohort, _quote, has_text
from linkrisk.errors import InputError

DEFAULT_SECTIONS: tuple[str, ...] = ("FINDINGS", "IMPRESSION")

# parentImage ids carry an image counter after the uid that PNG names drop:
# CXR1_1_IM-0001-3001 names the file CXR1_IM-0001-3001.png.
_PARENT_IMAGE = re.compile(r"^(CXR\d+)_\d+_(IM-.+)$")


def _png_stem(parent_image_id: str) -> str:
    match = _PARENT_IMAGE.match(parent_image_id)
    return f"{match.group(1)}_{match.group(2)}" if match else parent_image_id


def _parse_report(xml_bytes: bytes, sections: tuple[str, ...]) -> tuple[str, str, list[str]]:
    """Return ``(report_id, text, png_stems)`` of one report XML."""
    root = ET.fromstring(xml_bytes)
    uid_node = root.find("uId")
    if uid_node is None or not uid_node.get("id"):
        raise ValueError("no <uId id=...> element")
    texts = {node.get("Label", "").upper(): (node.text or "").strip() for node in root.iter("AbstractText")}
    text = "\n".join(texts[s] for s in sections if texts.get(s))
    stems = [_png_stem(node.get("id", "")) for node in root.iter("parentImage") if node.get("id")]
    return uid_node.get("id"), text, stems


# A radiology report XML is a few kilobytes; a member far larger is no report.
MAX_REPORT_BYTES = 4 * 2**20


def _read_archive(archive: Path, sections: tuple[str, ...], skipped: Counter) -> tuple[pd.DataFrame, dict[str, str]]:
    rows: list[tuple[str, str]] = []
    image_to_report: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                if member.size > MAX_REPORT_BYTES:
                    skipped["report XML larger than 4 MiB"] += 1
                    logger.warning("%s: skipped %s: %d bytes is too large for a report", archive.name, member.name,
                                   member.size)
                    continue
                try:
                    report_id, text, stems = _parse_report(tar.extractfile(member).read(), sections)
                except (ET.ParseError, ValueError) as err:
                    skipped["unparsable report XML"] += 1
                    logger.warning("%s: skipped %s: %s", archive.name, member.name, err)
                    continue
                rows.append((report_id, text))
                for stem in stems:
                    image_to_report[stem] = report_id
            _check_archive_end(tar, archive)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise InputError(f"{archive}: the report archive is damaged or truncated ({type(err).__name__}: {err}); "
                         "download it again") from err
    if not rows:
        raise InputError(f"{archive}: no report XML files found; expected ecgen-radiology/<n>.xml members")
    return pd.DataFrame(rows, columns=["report_id", "text"]), image_to_report


def _check_archive_end(tar: tarfile.TarFile, archive: Path) -> None:
    """Raise if anything but zero padding follows the end-of-archive marker.

    ``tarfile`` stops quietly at the first all-zero header, so damage in
    the middle of an archive would otherwise look like a short archive.
    Reading to the end also makes gzip verify its checksum.
    """
    while block := tar.fileobj.read(1 << 20):
        if block.count(0) != len(block):
            raise InputError(f"{archive}: data follows an early end-of-archive marker, so the archive is damaged; "
                             "download it again")


def _read_labels(path: Path) -> pd.DataFrame:
    table = read_csv(path, ("uid", *CHEXPERT_LABELS), dtype={"uid": str})
    duplicated = table["uid"][table["uid"].duplicated()]
    if len(duplicated):
        raise InputError(f"{path}: uid {_quote(duplicated.unique().tolist())} listed more than once; keep one row per study")
    for label in CHEXPERT_LABELS:
        values = pd.to_numeric(table[label], errors="coerce")
        bad = (values.isna() & table[label].notna()) | ~(values.isna() | values.isin(ALLOWED_LABEL_VALUES))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: column {label!r} has {int(bad.sum())} values outside {{1, 0, -1, blank}} "
                             f"(first at line {row + 2}: {table[label].iloc[row]!r})")
        table[label] = values
    table["report_id"] = "CXR" + table["uid"].str.strip()
    return table[["report_id", *CHEXPERT_LABELS]]


def _read_views(path: Path) -> dict[str, str]:
    table = read_csv(path, ("filename", "projection"), dtype=str)
    # Kaggle names look like 1_IM-0001-4001.dcm.png for CXR1_IM-0001-4001.png.
    stems = "CXR" + table["filename"].str.replace(".dcm.png", "", regex=False)
    return dict(zip(stems, table["projection"].fillna("unknown")))


def load_openi(root: str | Path, sections: tuple[str, ...] = DEFAULT_SECTIONS) -> PairedCohort:
    """Load Open-i from ``root`` (the folder holding the archive and PNG folder).

    Args:
        root: folder with ``NLMCXR_reports.tgz`` and ``NLMCXR_png/``.
        sections: report sections joined (newline) into the report text,
            in this order; a missing or empty section is left out.

    Returns:
        A validated :class:`PairedCohort` named ``openi``. Reports whose
        chosen sections are all empty are skipped, and so are their images.
    """
    root = Path(root)
    archive = root / "NLMCXR_reports.tgz"
    png_dir = root / "NLMCXR_png"
    for required in (archive, png_dir):
        if not required.exists():
            raise InputError(f"{required}: not found; point --data at the folder holding Open-i's files")

    skipped: Counter = Counter()
    reports, image_to_report = _read_archive(archive, tuple(s.upper() for s in sections), skipped)

    empty = ~has_text(reports["text"])
    if empty.any():
        skipped["report has no text in the chosen sections"] += int(empty.sum())
        logger.info("openi: %d reports have no text in sections %s; left out of the candidates", empty.sum(), sections)
    empty_ids = set(reports.loc[empty, "report_id"])
    reports = reports[~empty].reset_index(drop=True)

    labels_path = root / "chexpert_labels.csv"
    if labels_path.exists():
        reports = reports.merge(_read_labels(labels_path), on="report_id", how="left")
        labelled = int(reports[CHEXPERT_LABELS[0]].notna().sum())
        if labelled == 0:
            logger.warning("openi: %s matches none of the %d reports; its uid column must hold the numbers "
                           "of CXR<uid>", labels_path.name, len(reports))
        logger.info("openi: CheXpert labels for %d of %d reports", labelled, len(reports))
    else:
        for label in CHEXPERT_LABELS:
            reports[label] = float("nan")
        logger.info("openi: %s not found; labels unknown", labels_path.name)

    views_path = root / "indiana_projections.csv"
    views = _read_views(views_path) if views_path.exists() else {}

    image_rows = []
    for png in sorted(png_dir.glob("*.png")):
        report_id = image_to_report.get(png.stem)
        if report_id is None:
            skipped["image not listed in any report"] += 1
            logger.warning("openi: skipped image %s: no report lists it as a parentImage", png.name)
            continue
        if report_id in empty_ids:
            skipped["image's report has no text"] += 1
            logger.warning("openi: skipped image %s: its report %s has no text", png.name, report_id)
            continue
        image_rows.append((png.stem, str(png.resolve()), report_id, report_id, report_id, views.get(png.stem, "unknown")))
    images = pd.DataFrame(image_rows, columns=["image_id", "image_path", "study_id", "patient_id", "report_id", "view"])
    absent = len(set(image_to_report) - set(images["image_id"])) - skipped["image's report has no text"]
    logger.info(
        "openi: %d images with reports; %d images listed in reports are not in %s (partial download)",
        len(images), max(absent, 0), png_dir.name,
    )

    cohort = PairedCohort(
        name="openi", images=images, reports=reports, label_names=CHEXPERT_LABELS,
        source=str(root), skipped=dict(skipped),
    )
    return cohort.validate()
