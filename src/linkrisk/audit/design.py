"""Audit designs: the direction, hit level, image level and merged texts of one set of paired embeddings.

An audit design turns image and report embeddings plus their pairing
into queries, candidates, candidate *units* and each query's true unit:

- ``direction``: ``image_to_report`` (an image looks for its report) or
  ``report_to_image`` (a report looks for its images).
- ``level``: ``study`` (only the query's own study is a hit) or ``patient``
  (any study of the same patient is a hit). At patient level the
  candidates of one patient form one unit, which scores the best of its
  members, so pools are pools of patients.
- ``image_level``: ``image`` (every image on its own) or ``study_mean``
  (the mean of a study's image embeddings, re-normalised, as one image).
  For ``report_to_image`` at ``image`` level, a study's images form one
  unit: the report finds its study when any of its images scores best.
- ``merge_identical``: identical report texts become one candidate
  (``image_to_report``, ``study`` level). Identical texts are recognised as
  bitwise-identical report embedding rows, which identical texts always
  produce; the output counts the merged rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from linkrisk.errors import ConfigError, InputError

DIRECTIONS = ("image_to_report", "report_to_image")
LEVELS = ("study", "patient")
IMAGE_LEVELS = ("image", "study_mean")


@dataclass
class AuditDesign:
    """Queries and candidate units for one audit.

    Attributes:
        queries: ``[Q, D]`` float32 query embeddings.
        candidates: ``[M, D]`` float32 candidate embeddings.
        true_unit: ``[Q]`` int, each query's true candidate unit.
        candidate_unit: ``[M]`` int unit of each candidate, or None when every candidate is its own unit.
        n_units: number of candidate units.
        query_patients: ``[Q]`` patient of each query (the bootstrap's clusters).
        query_ids: ``[Q]`` image ids (image queries) or report rows (report queries and study means).
        unit_labels: ``[n_units, L]`` label values per unit, or None where units have no single label vector.
        facts: what the design is, for the output.
    """

    queries: np.ndarray
    candidates: np.ndarray
    true_unit: np.ndarray
    candidate_unit: np.ndarray | None
    n_units: int
    query_patients: np.ndarray
    query_ids: np.ndarray
    unit_labels: np.ndarray | None
    facts: dict = field(default_factory=dict)


def _check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid values: {', '.join(valid)}")


def _study_patients(report_row: np.ndarray, patient_ids: np.ndarray, n_reports: int,
                    report_patients: np.ndarray | None) -> np.ndarray:
    """Patient of every report row (object array; None where unknown), checked for conflicts."""
    patients = np.full(n_reports, None, dtype=object)
    if report_patients is not None:
        known = pd.notna(report_patients)
        patients[known] = np.asarray(report_patients, dtype=object)[known].astype(str)
    table = pd.DataFrame({"row": report_row, "patient": patient_ids.astype(str)}).drop_duplicates()
    shared = table["row"].duplicated(keep=False)
    if shared.any():
        row = int(table.loc[shared, "row"].iloc[0])
        raise InputError(f"report row {row} is the true report of images from several patients "
                         f"({', '.join(sorted(table.loc[table['row'] == row, 'patient']))[:200]}); "
                         "a report belongs to one patient, so fix pairs.parquet")
    rows, paired = table["row"].to_numpy(), table["patient"].to_numpy(dtype=object)
    conflict = pd.notna(patients[rows]) & (patients[rows] != paired)
    if conflict.any():
        row = int(rows[conflict][0])
        raise InputError(f"report row {row}: reports.parquet names patient {patients[row]} but its images belong to "
                         f"{paired[conflict][0]}; make the two files agree")
    patients[rows] = paired
    return patients


def _study_means(image: np.ndarray, study_index: np.ndarray, studies: np.ndarray) -> np.ndarray:
    """Mean image embedding of each study, re-normalised: ``[len(studies), D]``."""
    sums = np.zeros((len(studies), image.shape[1]), dtype=np.float64)
    np.add.at(sums, study_index, image.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        row = int(studies[np.flatnonzero(norms[:, 0] == 0)[0]])
        raise InputError(f"the image embeddings of the study of report row {row} cancel out, so their mean has no "
                         "direction; audit with --image-level image")
    return (sums / norms).astype(np.float32)


def _factorize(keys: np.ndarray) -> np.ndarray:
    return pd.factorize(pd.Series(keys, dtype=object))[0].astype(np.int64)


def _merged_labels(labels: np.ndarray | None, unit: np.ndarray, n_units: int) -> np.ndarray | None:
    """Give each merged unit the label vector of its first labelled row; rows without any label do not vote."""
    if labels is None:
        return None
    labelled = ~np.isnan(labels).all(axis=1)
    rows = np.arange(len(unit))
    # Labelled rows first, then file order: the first row of each unit in this order gives its vector.
    order = np.lexsort((rows, ~labelled))
    first = np.full(n_units, -1, dtype=np.int64)
    first[unit[order[::-1]]] = order[::-1]
    merged = labels[first]
    same = (labels == merged[unit]) | (np.isnan(labels) & np.isnan(merged[unit]))
    differs = labelled & ~same.all(axis=1)
    if differs.any():
        row = int(np.flatnonzero(differs)[0])
        raise InputError(f"report rows {int(first[unit[row]])} and {row} have identical embeddings but different "
                         "labels; merged texts need one label vector, so audit without merging")
    return merged


@dataclass
class _Pairing:
    """Checked arrays shared by both directions."""

    image: np.ndarray           # [n_images, D]
    report: np.ndarray          # [n_reports, D]
    report_row: np.ndarray      # [n_images]
    patient_ids: np.ndarray     # [n_images] str
    image_ids: np.ndarray       # [n_images] str
    labels: np.ndarray | None   # [n_reports, L]
    report_patient: np.ndarray  # [n_reports] object, None where unknown
    studies: np.ndarray         # [S] report rows that have images
    first_image: np.ndarray     # [S] first image of each study
    study_index: np.ndarray     # [n_images] study of each image
    facts: dict


def build_design(image: np.ndarray, report: np.ndarray, report_row: np.ndarray, patient_ids: np.ndarray, *,
                 image_ids: np.ndarray | None = None, report_labels: np.ndarray | None = None,
                 report_patients: np.ndarray | None = None, direction: str = "image_to_report",
                 level: str = "study", image_level: str = "image", merge_identical: bool = False) -> AuditDesign:
    """Build queries and candidate units from paired embeddings.

    Args:
        image: ``[n_images, D]`` image embeddings; report: ``[n_reports, D]``.
        report_row: ``[n_images]`` row of each image's true report (its study).
        patient_ids: ``[n_images]`` patient of each image.
        image_ids: ``[n_images]`` ids for the output (default: row numbers).
        report_labels: ``[n_reports, L]`` label values, for pathology-matched pools.
        report_patients: ``[n_reports]`` patient of each report where known
            (reports without images); the images' patients fill the rest.
        direction, level, image_level, merge_identical: see the module docstring.
    """
    _check_choice(direction, DIRECTIONS, "direction")
    _check_choice(level, LEVELS, "level")
    _check_choice(image_level, IMAGE_LEVELS, "image level")
    if merge_identical and (direction != "image_to_report" or level != "study"):
        raise ConfigError("merging identical report texts applies to report candidates at study level "
                          "(direction image_to_report, level study)")

    report_row = np.asarray(report_row)
    if report_row.size and not np.issubdtype(report_row.dtype, np.integer):
        raise InputError(f"report rows must be integers, got dtype {report_row.dtype}")
    report_row = report_row.astype(np.int64)
    patient_ids = np.asarray(patient_ids).astype(str)
    report = np.asarray(report, dtype=np.float32)
    if len(report_row) != len(image) or len(patient_ids) != len(image):
        raise InputError(f"{len(image)} images but {len(report_row)} report rows and {len(patient_ids)} patient ids")
    if len(report_row) and (report_row.min() < 0 or report_row.max() >= len(report)):
        raise InputError(f"report rows must lie in [0, {len(report)}), got {report_row.min()}..{report_row.max()}")
    if report_labels is not None and len(report_labels) != len(report):
        raise InputError(f"{len(report)} reports but {len(report_labels)} label rows")
    studies, first_image, study_index = np.unique(report_row, return_index=True, return_inverse=True)
    pairing = _Pairing(
        image=np.asarray(image, dtype=np.float32), report=report, report_row=report_row, patient_ids=patient_ids,
        image_ids=np.arange(len(image)).astype(str) if image_ids is None else np.asarray(image_ids).astype(str),
        labels=None if report_labels is None else np.asarray(report_labels, dtype=np.float64),
        report_patient=_study_patients(report_row, patient_ids, len(report), report_patients),
        studies=studies, first_image=first_image, study_index=study_index.reshape(-1),
        facts={"direction": direction, "level": level, "image_level": image_level,
               "merge_identical": bool(merge_identical), "n_images": int(len(image)), "n_studies": int(len(studies))})
    if direction == "image_to_report":
        return _image_to_report(pairing, level, image_level, merge_identical)
    return _report_to_image(pairing, level, image_level)


def _image_to_report(p: _Pairing, level: str, image_level: str, merge_identical: bool) -> AuditDesign:
    if image_level == "image":
        queries, true_row, query_patients, query_ids = p.image, p.report_row, p.patient_ids, p.image_ids
    else:
        queries = _study_means(p.image, p.study_index, p.studies)
        true_row, query_patients, query_ids = p.studies, p.report_patient[p.studies].astype(str), p.studies.astype(str)
    rows = {"n_candidate_rows": int(len(p.report))}

    if level == "patient":
        # A report without a known patient is a patient of its own.
        keys = np.array([patient if patient is not None else f"\0report row {row}"
                         for row, patient in enumerate(p.report_patient)], dtype=object)
        unit = _factorize(keys)
        return AuditDesign(queries, p.report, unit[true_row], unit, int(unit.max()) + 1, query_patients, query_ids,
                           None, {**p.facts, "candidate_unit": "patient (best-scoring report)", **rows,
                                  "n_merged_candidates": 0})
    if merge_identical:
        _, unit = np.unique(p.report, axis=0, return_inverse=True)
        unit = unit.reshape(-1).astype(np.int64)
        n_units = int(unit.max()) + 1
        return AuditDesign(queries, p.report, unit[true_row], unit, n_units, query_patients, query_ids,
                           _merged_labels(p.labels, unit, n_units),
                           {**p.facts, "candidate_unit": "distinct report text", **rows,
                            "n_merged_candidates": int(len(p.report) - n_units)})
    return AuditDesign(queries, p.report, true_row, None, len(p.report), query_patients, query_ids, p.labels,
                       {**p.facts, "candidate_unit": "report", **rows, "n_merged_candidates": 0})


def _report_to_image(p: _Pairing, level: str, image_level: str) -> AuditDesign:
    """Build report queries (every report with images) against image candidates."""
    queries = p.report[p.studies]
    query_patients = p.report_patient[p.studies].astype(str)
    query_ids = p.studies.astype(str)
    study_labels = None if p.labels is None else p.labels[p.studies]
    facts = {**p.facts, "n_merged_candidates": 0}

    if image_level == "study_mean":
        candidates = _study_means(p.image, p.study_index, p.studies)
        facts["n_candidate_rows"] = int(len(p.studies))
        if level == "patient":
            unit = _factorize(query_patients)
            return AuditDesign(queries, candidates, unit, unit, int(unit.max()) + 1, query_patients, query_ids, None,
                               {**facts, "candidate_unit": "patient (best-scoring study mean)"})
        return AuditDesign(queries, candidates, np.arange(len(p.studies)), None, len(p.studies), query_patients,
                           query_ids, study_labels, {**facts, "candidate_unit": "study (mean image embedding)"})

    facts["n_candidate_rows"] = int(len(p.image))
    if level == "patient":
        unit = _factorize(p.patient_ids)
        return AuditDesign(queries, p.image, unit[p.first_image], unit, int(unit.max()) + 1, query_patients,
                           query_ids, None, {**facts, "candidate_unit": "patient (best-scoring image)"})
    return AuditDesign(queries, p.image, np.arange(len(p.studies)), p.study_index.astype(np.int64), len(p.studies),
                       query_patients, query_ids, study_labels, {**facts, "candidate_unit": "study (best-scoring image)"})
