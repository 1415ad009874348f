"""Linear-probe macro AUROC: one logistic regression per label on image embeddings.

A label enters the macro average only when its known values include both
classes in the training split and in the test split. Otherwise AUROC is
undefined there, so the label is listed as skipped with the reason.
Uncertain (-1) and unknown (NaN) values are left out of that label's fit
and score.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from linkrisk._logging import logger


# A percentile interval from fewer resamples than this is flagged as unreliable.
MIN_RESAMPLES = 200


def _usable(y: np.ndarray) -> np.ndarray:
    return np.isin(y, (0.0, 1.0))


def probe_macro_auroc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      test_groups: np.ndarray, label_names: list[str], n_boot: int = 1000, seed: int = 0,
                      C: float = 1.0, min_count: int = 1) -> dict:
    """Fit one probe per label and report macro AUROC on the test split, with a patient-bootstrap CI.

    Args:
        train_x, test_x: ``[n, D]`` image embeddings.
        train_y, test_y: ``[n, L]`` labels (1, 0, -1 uncertain, NaN unknown).
        test_groups: ``[n_test]`` patient ids; the bootstrap resamples patients.
        label_names: ``L`` names.
        C: inverse L2 regularisation strength of scikit-learn's ``LogisticRegression``.
        min_count: a label is used only with at least this many positives
            and this many negatives in each split.

    Returns:
        ``{"macro_auroc", "ci95", "labels": [{name, auroc, n_train_pos, n_test_pos}], "skipped_labels"}``.
        ``macro_auroc`` is NaN, with a warning, when no label is usable.
    """
    scores: dict[int, np.ndarray] = {}
    labels, skipped = [], []
    for j, name in enumerate(label_names):
        tr, te = _usable(train_y[:, j]), _usable(test_y[:, j])
        n_train_pos, n_test_pos = int((train_y[tr, j] == 1).sum()), int((test_y[te, j] == 1).sum())
        if min(n_train_pos, tr.sum() - n_train_pos, n_test_pos, te.sum() - n_test_pos) < min_count:
            skipped.append({"name": name, "reason": f"needs {min_count}+ positives and negatives in both splits",
                            "n_train_pos": n_train_pos, "n_test_pos": n_test_pos})
            continue
        model = LogisticRegression(C=C, max_iter=5000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(train_x[tr], train_y[tr, j])
        score = np.full(len(test_x), np.nan)
        score[te] = model.decision_function(test_x[te])
        scores[j] = score
        labels.append({"name": name, "auroc": float(roc_auc_score(test_y[te, j], score[te])),
                       "n_train_pos": n_train_pos, "n_test_pos": n_test_pos})

    if not labels:
        warnings.warn("probe macro AUROC is undefined: no label has both classes in both splits; returning NaN",
                      RuntimeWarning, stacklevel=2)
        return {"macro_auroc": float("nan"), "ci95": [float("nan"), float("nan")], "bootstrap_resamples_used": 0,
                "labels": [],
                "skipped_labels": skipped}

    macro = float(np.mean([entry["auroc"] for entry in labels]))
    ci, used = _bootstrap_macro(scores, test_y, np.asarray(test_groups), n_boot, seed)
    logger.info("probe: macro AUROC %.3f over %d labels (%d skipped)", macro, len(labels), len(skipped))
    return {"macro_auroc": macro, "ci95": ci, "bootstrap_resamples_used": used, "labels": labels,
            "skipped_labels": skipped}


def weighted_auroc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of binary ``y`` ``[n]`` against ``score`` ``[n]`` under row weights ``[B, n]``; returns ``[B]``.

    Integer weights equal resampling rows that many times, so one call
    scores every bootstrap resample. Ties in ``score`` count one half, as in
    scikit-learn's ``roc_auc_score``. A resample without both classes gives NaN.
    """
    positive, negative = score[y == 1], score[y == 0]
    wins = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    w_pos, w_neg = weights[:, y == 1], weights[:, y == 0]
    denominator = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, np.einsum("bi,ij,bj->b", w_pos, wins, w_neg) / denominator, np.nan)


def _bootstrap_macro(scores: dict[int, np.ndarray], test_y: np.ndarray, groups: np.ndarray, n_boot: int,
                     seed: int) -> tuple[list[float], int]:
    """Return the percentile CI of macro AUROC over patient resamples, and the number of resamples used."""
    rng = np.random.default_rng(seed)
    _, index = np.unique(groups, return_inverse=True)
    n_groups = index.max() + 1
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    row_weights = draws[:, index].astype(np.float64)  # [n_boot, n_test]: times each row is drawn
    per_label = []
    for j, score in scores.items():
        usable = _usable(test_y[:, j])
        per_label.append(weighted_auroc(test_y[usable, j], score[usable], row_weights[:, usable]))
    per_label = np.stack(per_label)
    # Keep only resamples in which every label has both classes, so each
    # bootstrap statistic averages the same label set as the point estimate.
    complete = ~np.isnan(per_label).any(axis=0)
    if complete.sum() < min(MIN_RESAMPLES, n_boot):
        logger.warning("probe: only %d of %d bootstrap resamples contain both classes of every label; "
                       "the interval is unreliable", int(complete.sum()), n_boot)
    else:
        logger.info("probe: %d of %d bootstrap resamples contain both classes of every label", int(complete.sum()), n_boot)
    if not complete.any():
        return [float("nan"), float("nan")], 0
    low, high = np.percentile(per_label[:, complete].mean(axis=0), [2.5, 97.5])
    return [float(low), float(high)], int(complete.sum())
