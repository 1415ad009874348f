"""Split audits: fit fresh heads on one part of a cohort and audit the held-out part, per kind of split.

A patient-disjoint split keeps every patient on one side. A
source-disjoint split keeps every source (for example the publication or
site an image came from) on one side, so the held-out part shows how much
of the linkage carries over to sources never seen in training. A patient
with images from several sources joins those sources into one block, so a
source-disjoint split is patient-disjoint too. Images without a source
form one block of their own.

Both splits use :func:`block_disjoint_test_mask`: blocks are shuffled
with the seed and moved to the held-out part until it has at least
``test_fraction`` of the images. The held-out share therefore overshoots
by up to one block, and a large source makes the two parts uneven (the
output gives the counts).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from linkrisk._logging import logger
from linkrisk.audit.design import build_design
from linkrisk.audit.run import run_audits
from linkrisk.errors import ConfigError, InputError

SPLIT_KINDS = ("patient", "source")
UNKNOWN_BLOCK = "\0no source"


def disjoint_blocks(patient_ids: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Return ``[n_images]`` block ids: connected components of patients and the groups their images belong to."""
    patients = pd.factorize(pd.Series(np.asarray(patient_ids).astype(str)))[0]
    group_values = pd.Series(groups, dtype=object).where(pd.notna(pd.Series(groups, dtype=object)), UNKNOWN_BLOCK)
    group_index = pd.factorize(group_values.astype(str))[0]
    n_patients, n_groups = int(patients.max()) + 1, int(group_index.max()) + 1
    edges = coo_matrix((np.ones(len(patients)), (patients, n_patients + group_index)),
                       shape=(n_patients + n_groups, n_patients + n_groups))
    _, component = connected_components(edges, directed=False)
    return component[patients].astype(np.int64)


def block_disjoint_test_mask(blocks: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Draw held-out blocks until at least ``test_fraction`` of the images are held out: ``[n_images]`` bool.

    Raises:
        InputError: fewer than two blocks, so no split keeps both sides non-empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"the held-out fraction must lie strictly between 0 and 1, got {test_fraction}")
    blocks = np.asarray(blocks, dtype=np.int64)
    unique, sizes = np.unique(blocks, return_counts=True)
    if len(unique) < 2:
        raise InputError("the cohort forms a single block of patients and sources, so no disjoint split exists")
    order = np.random.default_rng(seed).permutation(len(unique))
    target = test_fraction * len(blocks)
    held_out, count = [], 0
    for position in order:
        if count >= target or len(held_out) == len(unique) - 1:
            break
        held_out.append(unique[position])
        count += int(sizes[position])
    return np.isin(blocks, held_out)


def _part(image: np.ndarray, report: np.ndarray, report_row: np.ndarray, patient_ids: np.ndarray,
          rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keep image ``rows`` and only the reports they point to, renumbering report rows."""
    kept_reports, new_row = np.unique(report_row[rows], return_inverse=True)
    return image[rows], report[kept_reports], new_row.reshape(-1).astype(np.int64), patient_ids[rows]


def split_audit(image_features: np.ndarray, report_features: np.ndarray, report_row: np.ndarray,
                patient_ids: np.ndarray, groups: np.ndarray | None, *, kind: str, test_fraction: float = 0.25,
                seed: int = 0, fit_config=None, pools=(10, 100, 1000, "full"), ks=(1, 5, 10), n_boot: int = 1000,
                permutations: int = 999, progress: bool = False) -> dict:
    """Fit heads on the training part of one split and audit the held-out part (image to report, random pools).

    Args:
        image_features: ``[n_images, d_image]`` frozen pre-projection features.
        report_features: ``[n_reports, d_text]`` frozen pre-projection features.
        report_row: ``[n_images]`` row of each image's true report.
        patient_ids: ``[n_images]`` patient of each image.
        groups: ``[n_images]`` source of each image (None or NaN where unknown); needed for ``kind`` ``source``.
        kind: ``patient`` or ``source``.
        fit_config: :class:`~linkrisk.models.train.FitConfig` of the heads (its seed is replaced by ``seed``).

    Returns:
        ``split``, counts of images, patients and sources on each side, the
        fitting history's best step, and ``audit``: the held-out audit as in
        :func:`~linkrisk.audit.run.run_audits` (random negatives, with
        permutation test, upper bounds and power).
    """
    from linkrisk.models.train import FitConfig, fit_heads

    if kind not in SPLIT_KINDS:
        raise ConfigError(f"unknown split kind {kind!r}; valid kinds: {', '.join(SPLIT_KINDS)}")
    patient_ids = np.asarray(patient_ids).astype(str)
    report_row = np.asarray(report_row, dtype=np.int64)
    if np.ndim(image_features) != 2 or np.ndim(report_features) != 2:
        raise InputError(f"a split audit fits linear heads on one feature vector per row; got image features of "
                         f"shape {np.shape(image_features)} and report features of shape {np.shape(report_features)}")
    if kind == "source" and (groups is None or not pd.Series(groups, dtype=object).notna().any()):
        raise InputError("a source-disjoint split needs a source per image; this cohort has no source column")
    block_groups = patient_ids if kind == "patient" else np.asarray(groups, dtype=object)
    blocks = disjoint_blocks(patient_ids, block_groups)
    test = block_disjoint_test_mask(blocks, test_fraction, seed)
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    train = _part(image_features, report_features, report_row, patient_ids, train_rows)
    held_out = _part(image_features, report_features, report_row, patient_ids, test_rows)

    config = dataclasses.replace(fit_config or FitConfig(), seed=seed)
    heads, history = fit_heads(*train, config, progress=progress)
    image_emb, report_emb = heads.embed(held_out[0], held_out[1])
    design = build_design(image_emb, report_emb, held_out[2], held_out[3])
    audit = run_audits(design, list(pools), list(ks), n_boot, seed, permutations=permutations)[0]

    source = pd.Series(groups if groups is not None else [None] * len(patient_ids), dtype=object)
    result = {
        "split": kind, "test_fraction": float(test_fraction), "seed": int(seed),
        "n_train_images": int(len(train_rows)), "n_test_images": int(len(test_rows)),
        "n_train_patients": int(len(np.unique(train[3]))), "n_test_patients": int(len(np.unique(held_out[3]))),
        "n_train_sources": int(source.iloc[train_rows].nunique()),
        "n_test_sources": int(source.iloc[test_rows].nunique()),
        "n_shared_sources": int(len(set(source.iloc[train_rows].dropna()) & set(source.iloc[test_rows].dropna()))),
        "best_step": history.get("best_step"),
        "audit": audit,
    }
    r1 = next((e for e in audit["recall"] if e["pool"] == "full" and e["k"] == 1), None)
    logger.info("split audit (%s-disjoint): %d training / %d held-out images; full-pool Recall@1 %s",
                kind, result["n_train_images"], result["n_test_images"],
                f"{r1['value']:.3f} ({r1['lift']:.1f}x chance)" if r1 else "n/a")
    return result


def split_audits(image_features: np.ndarray, report_features: np.ndarray, report_row: np.ndarray,
                 patient_ids: np.ndarray, sources: np.ndarray | None, **options) -> dict:
    """Run :func:`split_audit` for each kind the cohort allows: patient, and source where ``sources`` has values.

    Returns ``{"group_column": "source", "splits": [...]}``, the splits side by side.
    """
    kinds = ["patient"]
    if sources is not None and pd.Series(sources, dtype=object).notna().any():
        kinds.append("source")
    else:
        logger.info("split audit: no source per image, so only the patient-disjoint split is audited")
    splits = [split_audit(image_features, report_features, report_row, patient_ids, sources, kind=kind, **options)
              for kind in kinds]
    return {"group_column": "source", "splits": splits}


__all__ = ["SPLIT_KINDS", "block_disjoint_test_mask", "disjoint_blocks", "split_audit", "split_audits"]
