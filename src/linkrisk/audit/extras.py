"""Per-record and plot fields of a main audit: Recall@1 curve, assignment attack, rank histogram, risk table.

These go with the main view only (image-to-report, study level, each
image on its own, random negatives); the demo and configuration runs
both add them through :func:`main_audit_extras`, with the attribute
oracle beside the model where the cohort has attributes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from linkrisk._io import atomic_write
from linkrisk.audit.assignment import assignment_attack
from linkrisk.audit.attributes import audit_attribute_oracle, compare_with_oracle, oracle_rank_counts
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


__all__ = ["ASSIGNMENT_BATCH_SIZES", "main_audit_extras"]
