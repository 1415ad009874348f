"""Per-record and plot fields of a main audit: Recall@1 curve, assignment attack, rank histogram, risk table.

These go with the main view only (image-to-report, study level, each
image on its own, random negatives); the demo and configuration runs
both add them through :func:`main_audit_extras`, and the attribute and
file-metadata oracles beside the model through :func:`oracle_audits`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk._io import atomic_write
from linkrisk._logging import logger
from linkrisk.audit.assignment import assignment_attack
from linkrisk.audit.attributes import (
    EQUALITY_LABEL_POLICIES,
    LABELS_ATTRIBUTE,
    ORACLE_ATTRIBUTES,
    audit_attribute_oracle,
    audit_attributes,
    compare_with_oracle,
    design_attribute_codes,
    oracle_rank_counts,
)
from linkrisk.audit.design import build_design
from linkrisk.data.file_metadata import FILE_METADATA_ATTRIBUTES
from linkrisk.audit.ranks import rank_counts
from linkrisk.audit.recall import recall_curve
from linkrisk.audit.risk import rank_histogram, record_risk, true_score_margin

ASSIGNMENT_BATCH_SIZES = (10, 100, 1000)


def main_audit_extras(image_emb: np.ndarray, report_emb: np.ndarray, report_row: np.ndarray,
                      patient_ids: np.ndarray, image_ids: np.ndarray, folder: Path, n_boot: int,
                      seed: int, progress: bool = False, attributes: tuple | None = None,
                      pools: list = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10)) -> dict:
    """Compute the Recall@1 curve, the assignment attack and the rank histogram; write ``folder/risk.parquet``.

    Args:
        image_emb: ``[n_images, d]`` image embeddings; report_emb: ``[n_reports, d]``.
        report_row: ``[n_images]`` row of each image's true report; patient_ids, image_ids: ``[n_images]``.
        folder: where ``risk.parquet`` (one row per image: full-pool rank, Recall@1 at each pool, margin) goes.
        n_boot, seed: patient-bootstrap resamples and their seed.
        progress: show a progress bar over the assignment attack's batches.
        attributes: ``(query_codes [n_images, A], unit_codes [n_reports, A], names)`` from
            :func:`~linkrisk.audit.attributes.cohort_attribute_codes`, to audit the attribute oracle
            at ``pools`` and ``ks`` beside the model (None: no oracle).

    Returns:
        ``recall_at_1_curve``, ``assignment`` and ``rank_histogram`` (fields of a ``results.json`` run entry),
        and with ``attributes`` also ``attribute_oracle`` and ``oracle_comparison``.
    """
    above, equal = rank_counts(image_emb, report_emb, report_row)
    curve = recall_curve(above, equal, len(report_emb), patient_ids, k=1, n_boot=n_boot, seed=seed)
    risk = record_risk(image_ids, patient_ids, above, equal, len(report_emb),
                       true_score_margin(image_emb, report_emb, report_row))
    atomic_write(Path(folder) / "risk.parquet", lambda tmp: risk.to_parquet(tmp, index=False))
    assignment = assignment_attack(image_emb, report_emb, report_row, batch_sizes=list(ASSIGNMENT_BATCH_SIZES),
                                   n_batches=100, n_boot=n_boot, seed=seed, progress=progress)
    extras = {"recall_at_1_curve": curve, "assignment": assignment,
              "rank_histogram": rank_histogram(above, equal, len(report_emb))}
    if attributes is None:
        return extras

    query_codes, unit_codes, names = attributes
    oracle_above, oracle_equal = oracle_rank_counts(query_codes, unit_codes, report_row)
    extras["attribute_oracle"] = audit_attribute_oracle(query_codes, unit_codes, report_row, patient_ids,
                                                        list(pools), list(ks), n_boot, seed, list(names))
    extras["oracle_comparison"] = compare_with_oracle(above, equal, oracle_above, oracle_equal, len(report_emb),
                                                      patient_ids, list(pools), list(ks), n_boot, seed)
    return extras



def _present(images: pd.DataFrame | None, column: str) -> bool:
    return images is not None and column in images.columns and bool(images[column].notna().any())


def oracle_audits(design, images: pd.DataFrame | None, report_row: np.ndarray, pools: list, ks: list[int],
                  n_boot: int, seed: int, label_policy: str = "zeros") -> dict:
    """Audit the attribute oracle and the file-metadata oracle of a main design, each beside the model.

    The attribute oracle uses those of ``ORACLE_ATTRIBUTES`` the cohort has
    (image columns with any value, and the label vector where units have
    one) and adds their attribute-matched pools. The file-metadata oracle
    uses ``FILE_METADATA_ATTRIBUTES`` where ``images`` carries them. An
    oracle without any attribute is skipped: the output then has
    ``attribute_oracle_skipped`` or ``file_metadata_oracle_skipped`` with the
    reason, which is also logged.

    Returns:
        ``attribute_matched``, ``attribute_oracle`` (with ``attributes_missing``),
        ``oracle_comparison``, ``file_metadata_oracle`` and
        ``file_metadata_comparison``, each where computed.
    """
    # NOTE: a report's image attributes (sex, age band, file metadata) are taken from its own images. In a small
    # cohort their combination nearly identifies the pair (Recall@1 0.50 over the demo's 64 held-out COVID
    # candidates), so the oracle is a ceiling, not an attacker who reads the attributes from reports.
    result: dict = {}
    image_names = [name for name in ORACLE_ATTRIBUTES if name != LABELS_ATTRIBUTE]
    names = [name for name in image_names if _present(images, name)]
    has_labels = design.unit_labels is not None and np.asarray(design.unit_labels).shape[1] > 0
    if has_labels and label_policy in EQUALITY_LABEL_POLICIES:
        names.append(LABELS_ATTRIBUTE)
    missing = [name for name in ORACLE_ATTRIBUTES if name not in names]
    if names:
        codes = design_attribute_codes(design, images, report_row, names, label_policy=label_policy)
        audit = audit_attributes(design, *codes, list(pools), list(ks), n_boot, seed)
        audit["attribute_oracle"]["attributes_missing"] = missing
        result.update(audit)
    else:
        reason = (f"none of the oracle's attributes ({', '.join(ORACLE_ATTRIBUTES)}) is present; older embed folders "
                  "lack images.parquet attribute columns, so re-create the folder with linkrisk embed")
        logger.info("attribute oracle skipped: %s", reason)
        result["attribute_oracle_skipped"] = reason

    metadata = [name for name in FILE_METADATA_ATTRIBUTES if _present(images, name)]
    if metadata:
        codes = design_attribute_codes(design, images, report_row, metadata)
        audit = audit_attributes(design, *codes, list(pools), list(ks), n_boot, seed, matched=False)
        result["file_metadata_oracle"] = audit["attribute_oracle"]
        result["file_metadata_comparison"] = audit["oracle_comparison"]
    else:
        reason = ("no file metadata columns (" + ", ".join(FILE_METADATA_ATTRIBUTES) + ") in images.parquet; the "
                  "image files were absent when the folder was written, or the folder predates them")
        logger.info("file-metadata oracle skipped: %s", reason)
        result["file_metadata_oracle_skipped"] = reason
    return result


def folder_oracle_audits(folder: Path, pools: list, ks: list[int], n_boot: int, seed: int,
                         label_policy: str = "zeros") -> dict:
    """Run :func:`oracle_audits` on the main design of an embed folder (image-to-report, study level, each image)."""
    from linkrisk.audit.embeddings import REPORT_ID_COLUMNS, load_embeddings, load_images_table, load_reports_table

    image, report, pairs = load_embeddings(Path(folder))
    reports = load_reports_table(folder, len(report), required=False)
    labels = None
    if reports is not None:
        label_columns = [c for c in reports.columns if c not in REPORT_ID_COLUMNS]
        if label_columns:
            labels = reports[label_columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    design = build_design(image, report, pairs["report_row"].to_numpy(), pairs["patient_id"].astype(str).to_numpy(),
                          report_labels=labels)
    images = load_images_table(folder, pairs)
    if images is None:
        logger.info("%s: no images.parquet, so the attribute oracles see the label vector only", folder)
    return oracle_audits(design, images, pairs["report_row"].to_numpy(), pools, ks, n_boot, seed, label_policy)


__all__ = ["ASSIGNMENT_BATCH_SIZES", "folder_oracle_audits", "main_audit_extras", "oracle_audits"]
