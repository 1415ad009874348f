"""Open-i (Indiana University chest X-ray collection) in either of its two common layouts.

Source: NLM Open-i, https://openi.nlm.nih.gov/faq (licence CC BY-NC-ND 4.0).
The publisher's layout (``layout="xml"``):

- ``NLMCXR_reports.tgz``: ``ecgen-radiology/<n>.xml``, one per study, with
  ``<AbstractText Label="FINDINGS|IMPRESSION|...">`` sections and
  ``<parentImage id="CXR<uid>_<k>_IM-....">`` for each of the study's images.
- ``NLMCXR_png/``: ``CXR<uid>_IM-....png``, often a partial download.
- ``chexpert_labels.csv`` (optional): ``uid`` plus the 14 CheXpert columns.
- ``indiana_projections.csv`` (optional, Kaggle re-packaging): the view
  (Frontal or Lateral) of each image.

The Kaggle re-packaging (``layout="kaggle"``):

- ``indiana_reports.csv``: one row per study (``uid``, ``MeSH``,
  ``Problems``, ``image``, ``indication``, ``comparison``, ``findings``,
  ``impression``);
- ``indiana_projections.csv``: one row per image (``uid``, ``filename``
  ``<uid>_IM-....dcm.png``, ``projection``);
- ``images_normalized/<filename>``, often a partial download;
- ``chexpert_labels.csv`` (optional), as above.

One study per patient: the report id ``CXR<uid>`` is also the study and
patient id, and image ids are the official PNG stems (``CXR<uid>_IM-...``)
in both layouts, so the two layouts give comparable cohorts. Every report
is a candidate, with or without an image.
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
from linkrisk.data._tables import numeric_labels, read_csv
from linkrisk.data.cohort import CHEXPERT_LABELS, PairedCohort, _quote, has_text
from linkrisk.data.sections import TextPolicy, compose_text
from linkrisk.errors import ConfigError, InputError

LAYOUTS = ("auto", "xml", "kaggle")

# parentImage ids carry an image counter after the uid that PNG names drop:
# CXR1_1_IM-0001-3001 names the file CXR1_IM-0001-3001.png.
_PARENT_IMAGE = re.compile(r"^(CXR\d+)_\d+_(IM-.+)$")


def _png_stem(parent_image_id: str) -> str:
    match = _PARENT_IMAGE.match(parent_image_id)
    return f"{match.group(1)}_{match.group(2)}" if match else parent_image_id


def _parse_report(xml_bytes: bytes, policy: TextPolicy) -> tuple[str, str, list[str]]:
    """Return ``(report_id, text, png_stems)`` of one report XML."""
    root = ET.fromstring(xml_bytes)
    uid_node = root.find("uId")
    if uid_node is None or not uid_node.get("id"):
        raise ValueError("no <uId id=...> element")
    sections = {node.get("Label", "").lower(): (node.text or "").strip() for node in root.iter("AbstractText")}
    text, _ = compose_text(sections, policy, "\n".join(v for v in sections.values() if v))
    stems = [_png_stem(node.get("id", "")) for node in root.iter("parentImage") if node.get("id")]
    return uid_node.get("id"), text, stems


# A radiology report XML is a few kilobytes; a member far larger is no report.
MAX_REPORT_BYTES = 4 * 2**20


def _parse_or_repair(xml_bytes: bytes, policy: TextPolicy, repairs: Counter) -> tuple[str, str, list[str]]:
    """Parse a report; bytes that are not UTF-8 are replaced by U+FFFD and counted."""
    try:
        return _parse_report(xml_bytes, policy)
    except ET.ParseError:
        try:
            xml_bytes.decode("utf-8")
            raise
        except UnicodeDecodeError:
            parsed = _parse_report(xml_bytes.decode("utf-8", errors="replace").encode("utf-8"), policy)
            repairs["report with invalid UTF-8 bytes replaced"] += 1
            return parsed


def _read_archive(archive: Path, policy: TextPolicy, skipped: Counter,
                  repairs: Counter) -> tuple[pd.DataFrame, dict[str, str]]:
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
                    report_id, text, stems = _parse_or_repair(tar.extractfile(member).read(), policy, repairs)
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
    numeric_labels(table, CHEXPERT_LABELS, path)
    table["report_id"] = "CXR" + table["uid"].str.strip()
    return table[["report_id", *CHEXPERT_LABELS]]


def _read_views(path: Path) -> dict[str, str]:
    table = read_csv(path, ("filename", "projection"), dtype=str)
    # Kaggle names look like 1_IM-0001-4001.dcm.png for CXR1_IM-0001-4001.png.
    stems = "CXR" + table["filename"].str.replace(".dcm.png", "", regex=False)
    return dict(zip(stems, table["projection"].fillna("unknown")))


def _first_report_per_study(reports: pd.DataFrame, source: str, repairs: Counter) -> pd.DataFrame:
    """Keep the first report of a study listed more than once, counting copies with a different text."""
    repeated = reports["report_id"].duplicated(keep=False)
    if not repeated.any():
        return reports
    texts = reports[repeated].groupby("report_id")["text"].nunique()
    conflicting = texts.index[texts > 1].tolist()
    if conflicting:
        repairs["study with two different report texts (first kept)"] += len(conflicting)
    same = int((texts == 1).sum())
    if same:
        repairs["study listed twice with the same text (one kept)"] += same
    logger.warning("openi: %d studies are listed more than once in %s, %d of them with different texts; the first "
                   "listing is kept: %s", len(texts), source, len(conflicting), _quote(texts.index.tolist()))
    return reports.drop_duplicates("report_id", keep="first").reset_index(drop=True)


def _detect_layout(root: Path, layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"invalid Open-i layout {layout!r}; valid values: {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    if (root / "NLMCXR_reports.tgz").exists():
        return "xml"
    if (root / "indiana_reports.csv").exists():
        return "kaggle"
    raise InputError(f"{root}: neither NLMCXR_reports.tgz (official layout) nor indiana_reports.csv (Kaggle layout) "
                     "found; point the path at the folder holding Open-i's files")


def _xml_tables(root: Path, policy: TextPolicy, skipped: Counter,
                repairs: Counter) -> tuple[pd.DataFrame, pd.DataFrame]:
    archive = root / "NLMCXR_reports.tgz"
    png_dir = root / "NLMCXR_png"
    for required in (archive, png_dir):
        if not required.exists():
            raise InputError(f"{required}: not found; pass the folder holding Open-i's files")
    reports, image_to_report = _read_archive(archive, policy, skipped, repairs)
    reports = _first_report_per_study(reports, archive.name, repairs)
    if repairs:
        logger.warning("openi: %d reports contain bytes that are not UTF-8; replaced by U+FFFD",
                       repairs["report with invalid UTF-8 bytes replaced"])

    rows, unlisted = [], 0
    for png in sorted(png_dir.glob("*.png")):
        report_id = image_to_report.get(png.stem)
        if report_id is None:
            unlisted += 1
            continue
        rows.append((png.stem, str(png.resolve()), report_id))
    if unlisted:
        skipped["image not listed in any report"] += unlisted
        logger.warning("openi: skipped %d images in %s that no report lists as a parentImage", unlisted, png_dir.name)
    absent = len(set(image_to_report) - {row[0] for row in rows})
    logger.info("openi: %d report-listed images are not in %s (partial download)", absent, png_dir.name)
    return reports, pd.DataFrame(rows, columns=["image_id", "image_path", "report_id"])


def _kaggle_tables(root: Path, policy: TextPolicy, skipped: Counter,
                   repairs: Counter) -> tuple[pd.DataFrame, pd.DataFrame]:
    section_columns = ("findings", "impression", "indication", "comparison")
    path = root / "indiana_reports.csv"
    table = read_csv(path, ("uid", *section_columns), dtype=str, keep_default_na=False, encoding_errors="replace")
    replaced = table[list(section_columns)].apply(lambda column: column.str.contains("\ufffd", regex=False)).any(axis=1)
    if replaced.any():
        repairs["report with invalid UTF-8 bytes replaced"] += int(replaced.sum())
        logger.warning("openi: %d reports in %s contain bytes that are not UTF-8; replaced by U+FFFD",
                       int(replaced.sum()), path.name)
    texts = [compose_text(dict(zip(section_columns, row)), policy, "\n".join(v for v in row if v.strip()))[0]
             for row in table[list(section_columns)].itertuples(index=False)]
    reports = pd.DataFrame({"report_id": "CXR" + table["uid"].str.strip(), "text": texts})
    reports = _first_report_per_study(reports, path.name, repairs)

    projections = read_csv(root / "indiana_projections.csv", ("uid", "filename", "projection"), dtype=str)
    image_dir = root / "images_normalized"
    stems = "CXR" + projections["filename"].str.replace(".dcm.png", "", regex=False)
    paths = [image_dir / name for name in projections["filename"]]
    present = np.array([p.is_file() for p in paths], dtype=bool)
    listed = ("CXR" + projections["uid"].str.strip()).isin(reports["report_id"])
    if (~listed).any():
        skipped["image's uid has no report"] += int((~listed).sum())
        logger.warning("openi: skipped %d images whose uid is not in %s", int((~listed).sum()), path.name)
    missing = listed & ~present
    if missing.any():
        skipped["image file missing"] += int(missing.sum())
        logger.info("openi: %d listed images are not in %s (partial download)", int(missing.sum()), image_dir.name)
    keep = listed & present
    images = pd.DataFrame({"image_id": stems[keep].to_numpy(),
                           "image_path": [str(p.resolve()) for p, k in zip(paths, keep) if k],
                           "report_id": ("CXR" + projections.loc[keep, "uid"].str.strip()).to_numpy()})
    return reports, images


def load_openi(root: str | Path, text_policy: TextPolicy = TextPolicy(), layout: str = "auto") -> PairedCohort:
    """Load Open-i from ``root`` in the official (``xml``) or Kaggle layout.

    Args:
        root: folder with ``NLMCXR_reports.tgz`` and ``NLMCXR_png/``, or with
            ``indiana_reports.csv``, ``indiana_projections.csv`` and
            ``images_normalized/``.
        text_policy: report sections that form the text (default findings,
            then impression).
        layout: ``auto`` (the official layout when its archive is present,
            else Kaggle), ``xml`` or ``kaggle``.

    Returns:
        A validated :class:`PairedCohort` named ``openi``. Reports whose
        chosen sections are all empty are skipped, and so are their images.
    """
    root = Path(root)
    layout = _detect_layout(root, layout)
    skipped: Counter = Counter()
    repairs: Counter = Counter()
    reports, images = (_xml_tables if layout == "xml" else _kaggle_tables)(root, text_policy, skipped, repairs)
    logger.info("openi: %s layout, %d reports, report text %s", layout, len(reports), text_policy.describe())

    empty = ~has_text(reports["text"])
    if empty.any():
        skipped["report has no text in the chosen sections"] += int(empty.sum())
        logger.info("openi: %d reports have no text in sections %s; left out of the candidates", empty.sum(),
                    text_policy.describe())
    empty_ids = set(reports.loc[empty, "report_id"])
    reports = reports[~empty].reset_index(drop=True)
    orphaned = images["report_id"].isin(empty_ids)
    if orphaned.any():
        skipped["image's report has no text"] += int(orphaned.sum())
        logger.warning("openi: skipped %d images whose report has no text: %s", int(orphaned.sum()),
                       _quote(images.loc[orphaned, "image_id"].tolist()))
    images = images[~orphaned].reset_index(drop=True)

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
    images["view"] = images["image_id"].map(lambda stem: views.get(stem, "unknown")).astype(str)
    # One study per patient: the report id is also the study and patient id.
    images["study_id"] = images["report_id"]
    images["patient_id"] = images["report_id"]
    logger.info("openi: %d images with reports", len(images))

    cohort = PairedCohort(
        name="openi", images=images[["image_id", "image_path", "study_id", "patient_id", "report_id", "view"]],
        reports=reports, label_names=CHEXPERT_LABELS, source=str(root), skipped=dict(skipped), repairs=dict(repairs),
    )
    return cohort.validate()
