"""Patient-bootstrap intervals for per-label AUROC and their macro average.

Resample ``b`` draws patients with replacement as row ``b`` of
``numpy.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))``,
where patient ``k`` is the ``k``-th id of ``numpy.unique(groups)``. Every
image of a drawn patient enters the resample once per draw. The draws are
made in chunks of rows, which yields the same numbers as one call because
int64 draws are taken from the bit generator in order.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, InputError

# A percentile interval from fewer resamples than this is flagged as unreliable.
MIN_RESAMPLES = 200

# Resamples scored per chunk, which bounds memory at about
# _CHUNK * n_rows float64 values per chunk.
_CHUNK = 256


def weighted_auroc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of binary ``y`` ``[n]`` against ``score`` ``[n]`` under row weights ``[B, n]``; returns ``[B]``.

    Integer weights equal resampling rows that many times, so one call
    scores every bootstrap resample. Ties in ``score`` count one half, as in
    scikit-learn's ``roc_auc_score``. A resample without both classes gives NaN.
    Time and memory are ``O(B * n)``: scores are bucketed by distinct value,
    so no positive-by-negative matrix is built.
    """
    y = np.asarray(y)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    values, bucket = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True)
    bucket = bucket.reshape(-1)
    positive, negative = y == 1, y == 0

    def weight_per_value(rows: np.ndarray) -> np.ndarray:
        # [B, n_rows] @ one-hot [n_rows, n_values] sums each resample's weight per distinct score
        one_hot = sparse.csr_matrix((np.ones(int(rows.sum())), (np.arange(int(rows.sum())), bucket[rows])),
                                    shape=(int(rows.sum()), len(values)))
        return np.asarray((one_hot.T @ weights[:, rows].T).T)

    positive_weight = weight_per_value(positive)
    negative_weight = weight_per_value(negative)
    negative_below = np.cumsum(negative_weight, axis=1) - negative_weight
    wins = (positive_weight * (negative_below + 0.5 * negative_weight)).sum(axis=1)
    denominator = positive_weight.sum(axis=1) * negative_weight.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, wins / denominator, np.nan)


def patient_resample_counts(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Count how often each row is drawn in each patient-bootstrap resample: float64 ``[n_boot, n_rows]``.

    This builds all resamples at once, so use it for small cases and tests.
    :func:`auroc_intervals` draws the same resamples in chunks.
    """
    rng = np.random.default_rng(seed)
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    index = index.reshape(-1)
    return _draw_counts(rng, n_boot, int(index.max()) + 1)[:, index]


def _draw_counts(rng: np.random.Generator, size: int, n_groups: int) -> np.ndarray:
    """Draw ``size`` resamples of ``n_groups`` patients; returns float64 times drawn ``[size, n_groups]``."""
    drawn = rng.integers(0, n_groups, size=(size, n_groups), dtype=np.int64)
    drawn += n_groups * np.arange(size, dtype=np.int64)[:, None]
    return np.bincount(drawn.ravel(), minlength=size * n_groups).reshape(size, n_groups).astype(np.float64)


def auroc_intervals(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int, seed: int,
                    level: float = 0.95) -> dict:
    """Compute patient-bootstrap percentile intervals of each label's AUROC and of their mean.

    Args:
        y: ``[n, K]`` labels: 1 is positive and 0 negative. Any other
            value (for example -1 or NaN) leaves that row out of that label.
        scores: ``[n, K]`` scores, higher meaning more likely positive.
        groups: ``[n]`` patient ids.
        n_boot: resamples drawn.
        seed: seed of the draws (see the module docstring).
        level: coverage of the percentile intervals.

    Returns:
        ``{"label_ci": [K, 2], "macro_ci": [2], "resamples_used": int}``.
        Only resamples in which every label has both classes are used, and
        the label and macro intervals come from that same set, so each
        macro resample is the mean of the label values of that resample.
        Intervals are NaN when no resample qualifies.
    """
    if n_boot < 1:
        raise ConfigError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"interval level must be between 0 and 1, got {level}")
    y, scores, groups = np.asarray(y, dtype=np.float64), np.asarray(scores, dtype=np.float64), np.asarray(groups)
    if y.shape != scores.shape or y.ndim != 2 or len(groups) != len(y):
        raise InputError(f"labels {y.shape}, scores {scores.shape} and groups ({len(groups)}) do not match. "
                         "Expected [n, K], [n, K] and [n]")
    n_labels = y.shape[1]
    _, index = np.unique(groups, return_inverse=True)
    index = index.reshape(-1)
    n_groups = int(index.max()) + 1 if len(index) else 0
    if n_groups == 0 or n_labels == 0:
        return {"label_ci": np.full((n_labels, 2), np.nan), "macro_ci": np.full(2, np.nan), "resamples_used": 0}

    rng = np.random.default_rng(seed)
    stats = np.empty((n_labels, n_boot))
    usable = [np.isin(y[:, k], (0.0, 1.0)) for k in range(n_labels)]
    for start in range(0, n_boot, _CHUNK):
        size = min(_CHUNK, n_boot - start)
        row_weights = _draw_counts(rng, size, n_groups)[:, index]
        for k in range(n_labels):
            rows = usable[k]
            stats[k, start:start + size] = weighted_auroc(y[rows, k], scores[rows, k], row_weights[:, rows])

    complete = ~np.isnan(stats).any(axis=0)
    used = int(complete.sum())
    if used < min(MIN_RESAMPLES, n_boot):
        logger.warning("probe: only %d of %d bootstrap resamples contain both classes of every label; "
                       "the interval is unreliable", used, n_boot)
    else:
        logger.info("probe: %d of %d bootstrap resamples contain both classes of every label", used, n_boot)
    if used == 0:
        return {"label_ci": np.full((n_labels, 2), np.nan), "macro_ci": np.full(2, np.nan), "resamples_used": 0}

    tail = (1.0 - level) / 2.0 * 100.0
    complete_stats = stats[:, complete]
    label_ci = np.percentile(complete_stats, [tail, 100.0 - tail], axis=1).T
    macro_ci = np.percentile(complete_stats.mean(axis=0), [tail, 100.0 - tail])
    return {"label_ci": label_ci, "macro_ci": macro_ci, "resamples_used": used}
