"""Shared steps of the linear and zero-shot probes: label checks, class counts, skips and the result dict.

Label values are 1 (positive), 0 (negative), -1 (uncertain) and NaN
(unknown). Uncertain and unknown values are left out of that label's fit
and score, and are counted as ``excluded``.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import roc_auc_score

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, InputError
from linkrisk.probe.bootstrap import auroc_intervals

# Default minimum number of positives and of negatives per split. With
# fewer positives a test AUROC is the rank of a handful of images, and a
# patient-bootstrap resample often lacks the class entirely.
DEFAULT_MIN_COUNT = 5


def check_labels(y: np.ndarray, n_rows: int, label_names: list[str], split: str) -> np.ndarray:
    """Validate a ``[n_rows, len(label_names)]`` label matrix of 1, 0, -1 and NaN, and return it as float64."""
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n_rows, len(label_names)):
        raise InputError(f"{split} labels have shape {y.shape}, expected ({n_rows}, {len(label_names)}): "
                         "one row per image and one column per label name")
    invalid = ~(np.isin(y, (1.0, 0.0, -1.0)) | np.isnan(y))
    if invalid.any():
        row, column = np.argwhere(invalid)[0]
        raise InputError(f"{split} labels contain {int(invalid.sum())} values other than 1, 0, -1 and NaN, "
                         f"first {y[row, column]!r} at row {row}, label {label_names[column]!r}")
    return y


def check_min_count(min_count: int) -> None:
    """Raise ``ConfigError`` unless ``min_count`` is a positive integer."""
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ConfigError(f"min_count must be an integer of at least 1, got {min_count!r}")


def class_counts(column: np.ndarray) -> tuple[int, int, int]:
    """Count positives, negatives and excluded (uncertain or unknown) values of one label column."""
    positives = int((column == 1).sum())
    negatives = int((column == 0).sum())
    return positives, negatives, len(column) - positives - negatives


def shortfall(counts: dict[str, tuple[int, int, int]], min_count: int) -> str | None:
    """Describe which splits have fewer than ``min_count`` positives or negatives, or return None if none has.

    ``counts`` maps a split name (``"train"``, ``"test"``) to :func:`class_counts`.
    """
    short = [f"{split} split has {positives} positives and {negatives} negatives"
             for split, (positives, negatives, _) in counts.items() if min(positives, negatives) < min_count]
    if not short:
        return None
    return f"{' and '.join(short)}, but at least {min_count} of each are required in every split"


def count_fields(counts: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """Flatten split counts to ``n_{split}_pos``, ``n_{split}_neg`` and ``n_{split}_excluded`` fields."""
    fields = {}
    for split, (positives, negatives, excluded) in counts.items():
        fields[f"n_{split}_pos"] = positives
        fields[f"n_{split}_neg"] = negatives
        fields[f"n_{split}_excluded"] = excluded
    return fields


def summarise_aurocs(test_y: np.ndarray, scores: dict[int, np.ndarray], entries: list[dict], skipped: list[dict],
                     test_groups: np.ndarray, n_boot: int, seed: int, probe_name: str) -> dict:
    """Score each used label, attach patient-bootstrap intervals and return the probe result dict.

    Args:
        test_y: ``[n, L]`` test labels.
        scores: label column to ``[n]`` test scores, in the order of ``entries``.
        entries: one dict per used label (name and counts) that gets
            ``auroc`` and ``ci95`` added.
        skipped: dicts of the labels left out, with the reason.
        test_groups: ``[n]`` patient ids for the bootstrap.
        probe_name: name of the probe in messages (``"linear probe"``, ``"zero-shot"``).

    Returns:
        ``{"macro_auroc", "ci95", "bootstrap_resamples_used", "n_boot", "labels", "skipped_labels"}``.
        ``macro_auroc`` and the intervals are NaN, with a ``RuntimeWarning``,
        when no label is usable.
    """
    for entry, (column, score) in zip(entries, scores.items()):
        rows = np.isin(test_y[:, column], (0.0, 1.0))
        entry["auroc"] = float(roc_auc_score(test_y[rows, column], score[rows]))

    if not entries:
        warnings.warn(f"{probe_name} macro AUROC is undefined: no label has at least the minimum number of positives "
                      "and negatives in every split; returning NaN", RuntimeWarning, stacklevel=3)
        return {"macro_auroc": float("nan"), "ci95": [float("nan"), float("nan")], "bootstrap_resamples_used": 0,
                "n_boot": n_boot, "labels": [], "skipped_labels": skipped}

    columns = list(scores)
    score_matrix = np.stack([scores[column] for column in columns], axis=1)
    intervals = auroc_intervals(test_y[:, columns], score_matrix, test_groups, n_boot, seed)
    for entry, (low, high) in zip(entries, intervals["label_ci"]):
        entry["ci95"] = [float(low), float(high)]
    macro = float(np.mean([entry["auroc"] for entry in entries]))
    logger.info("%s: macro AUROC %.3f over %d labels (%d skipped)", probe_name, macro, len(entries), len(skipped))
    return {"macro_auroc": macro, "ci95": [float(value) for value in intervals["macro_ci"]],
            "bootstrap_resamples_used": intervals["resamples_used"], "n_boot": n_boot, "labels": entries,
            "skipped_labels": skipped}
