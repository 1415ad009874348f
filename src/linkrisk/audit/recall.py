"""Exact expected Recall@K over uniform candidate pools, and rank statistics.

Pool model: a pool of size ``N`` contains the query's true candidate and
``N - 1`` others drawn uniformly without replacement from the ``M - 1``
others. Given a query's counts ``a`` (others scoring above the true one)
and ``e`` (others tying with it), the number of drawn above-candidates is
hypergeometric, so with optimistic tie-breaking

    P(hit@K) = F(a) = HypergeomCDF(K - 1; population M - 1, successes a, draws N - 1).

Tie rules (``TIE_RULES``):

- ``random`` (default): the true candidate's position among its ``e + 1``
  tied candidates is uniform, which places ``r ~ U{0..e}`` ties above it:
  ``P = mean_{r=0..e} F(a + r)``. A prefix sum of ``F`` over ``0..M-1``
  makes this O(M + Q) for any number of ties.
- ``optimistic``: every tie ranks below the true candidate, ``P = F(a)``.
- ``pessimistic``: every tie ranks above it, ``P = F(a + e)``.

Chance is ``K / N`` (a random scorer's Recall@K); lift is value / chance.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import digamma
from scipy.stats import hypergeom

from linkrisk._logging import logger
from linkrisk.audit.ranks import rank_counts
from linkrisk.errors import ConfigError, InputError

TIE_RULES = ("random", "optimistic", "pessimistic")


def _check_counts(above: np.ndarray, equal: np.ndarray, n_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    above = np.asarray(above, dtype=np.int64)
    equal = np.asarray(equal, dtype=np.int64)
    if above.shape != equal.shape:
        raise InputError(f"above and equal counts differ in shape ({above.shape} vs {equal.shape})")
    if len(above) and (above.min() < 0 or equal.min() < 0 or (above + equal).max() > n_candidates - 1):
        raise InputError(f"rank counts must satisfy 0 <= above + equal <= n_candidates - 1 = {n_candidates - 1}")
    return above, equal


def expected_recall_at_k(above: np.ndarray, equal: np.ndarray, n_candidates: int, pool_size: int, k: int,
                         ties: str = "random") -> np.ndarray:
    """Expected Recall@K per query over uniform pools of ``pool_size`` candidates.

    Args:
        above: ``[Q]`` others scoring strictly above the true candidate.
        equal: ``[Q]`` others tying with the true candidate.
        n_candidates: ``M``, all candidates including the true one.
        pool_size: ``N`` with ``1 <= N <= M``; ``N = M`` is the full pool.
        k: cut-off ``K >= 1``.
        ties: one of ``TIE_RULES``.

    Returns:
        float64 ``[Q]``: each query's probability that its true candidate
        ranks within the top ``K`` of a random pool.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    if not 1 <= pool_size <= n_candidates:
        raise ConfigError(f"pool size {pool_size} must be between 1 and the number of candidates ({n_candidates})")
    if k < 1:
        raise ConfigError(f"K must be at least 1, got {k}")
    above, equal = _check_counts(above, equal, n_candidates)

    # F[y] = P(at most K-1 of y above-candidates are drawn), y = 0..M-1.
    successes = np.arange(n_candidates)
    cdf = hypergeom.cdf(k - 1, n_candidates - 1, successes, pool_size - 1)
    if ties == "optimistic":
        return cdf[above]
    if ties == "pessimistic":
        return cdf[above + equal]
    prefix = np.concatenate([[0.0], np.cumsum(cdf)])
    return (prefix[above + equal + 1] - prefix[above]) / (equal + 1)


def normalised_rank(above: np.ndarray, equal: np.ndarray, n_candidates: int, ties: str = "random") -> np.ndarray:
    """Per-query normalised rank ``(rank - 1) / (M - 1)`` in the full pool: 0 best, chance 0.5.

    Under ``random`` ties the expected rank is ``1 + a + e / 2``. Returns
    NaN with a warning when ``M = 1``.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    above, equal = _check_counts(above, equal, n_candidates)
    if n_candidates < 2:
        warnings.warn("normalised rank is undefined with a single candidate; returning NaN", RuntimeWarning, stacklevel=2)
        return np.full(len(above), np.nan)
    offset = {"random": equal / 2.0, "optimistic": 0.0, "pessimistic": equal}[ties]
    return (above + offset) / (n_candidates - 1)


def reciprocal_rank(above: np.ndarray, equal: np.ndarray) -> np.ndarray:
    """Expected reciprocal rank in the full pool under random ties: ``mean_{r=0..e} 1 / (1 + a + r)``."""
    above = np.asarray(above, dtype=np.float64)
    equal = np.asarray(equal, dtype=np.float64)
    # sum_{r=0..e} 1/(a+1+r) = digamma(a+e+2) - digamma(a+1)
    return (digamma(above + equal + 2) - digamma(above + 1)) / (equal + 1)


def cluster_bootstrap_ci(values: np.ndarray, groups: np.ndarray, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` resampling whole groups (patients) with replacement.

    Each resample draws ``G`` groups from the ``G`` present; its statistic is
    the mean over all queries of the drawn groups. Returns ``(nan, nan)``
    with a warning when there are no values.
    """
    if n_boot < 1:
        raise ConfigError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        warnings.warn("bootstrap interval of an empty set is undefined; returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan"), float("nan")
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    group_sums = np.bincount(group_index, weights=values)
    group_sizes = np.bincount(group_index).astype(np.float64)
    n_groups = len(group_sums)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    stats = (draws @ group_sums) / (draws @ group_sizes)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def resolve_pools(pools: list[int | str], n_candidates: int) -> list[tuple[int | str, int]]:
    """Map requested pools to ``(label, N)``; numeric pools not smaller than ``M`` are dropped with a warning."""
    resolved: list[tuple[int | str, int]] = []
    too_large = [int(p) for p in pools if p != "full" and int(p) >= n_candidates]
    if too_large:
        logger.warning("pool sizes %s are not smaller than the %d candidates; left out (the whole set is 'full')",
                       too_large, n_candidates)
    for pool in pools:
        if pool == "full":
            resolved.append(("full", n_candidates))
        elif int(pool) < 2:
            raise ConfigError(f"pool sizes must be at least 2 or 'full', got {pool}")
        elif int(pool) < n_candidates:
            resolved.append((int(pool), int(pool)))
    return resolved


def audit_counts(above: np.ndarray, equal: np.ndarray, n_candidates: int, patient_ids: np.ndarray,
                 pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """Summarise rank counts into Recall@K per pool, with lift and patient-bootstrap intervals.

    Pools smaller than the candidate set are reported by size, the whole
    set as ``"full"``; K values not smaller than N are left out (Recall is 1
    there by definition). Every entry carries the ``random`` value and
    its optimistic and pessimistic tie bounds.
    """
    above, equal = _check_counts(above, equal, n_candidates)
    recall = []
    for label, pool_size in resolve_pools(list(pools), n_candidates):
        for k in ks:
            if k >= pool_size:
                continue
            per_query = expected_recall_at_k(above, equal, n_candidates, pool_size, k)
            value = float(per_query.mean()) if len(per_query) else float("nan")
            low, high = cluster_bootstrap_ci(per_query, patient_ids, n_boot=n_boot, seed=seed)
            chance = k / pool_size
            recall.append({
                "pool": label, "k": int(k), "value": value, "ci95": [low, high], "chance": chance,
                "lift": value / chance, "lift_ci95": [low / chance, high / chance],
                "optimistic": float(expected_recall_at_k(above, equal, n_candidates, pool_size, k, "optimistic").mean()),
                "pessimistic": float(expected_recall_at_k(above, equal, n_candidates, pool_size, k, "pessimistic").mean()),
            })

    ranks = normalised_rank(above, equal, n_candidates)
    rank_ci = cluster_bootstrap_ci(ranks, patient_ids, n_boot=n_boot, seed=seed)
    rr = reciprocal_rank(above, equal)
    return {
        "n_queries": int(len(above)),
        "n_candidates": int(n_candidates),
        "queries_with_ties": int((equal > 0).sum()),
        "recall": recall,
        "full_pool": {
            "mean_normalised_rank": float(ranks.mean()) if len(ranks) else float("nan"),
            "mean_normalised_rank_ci95": list(rank_ci),
            "median_rank": float(np.median(1 + above + equal / 2.0)) if len(above) else float("nan"),
            "mean_reciprocal_rank": float(rr.mean()) if len(rr) else float("nan"),
        },
    }


def audit_embeddings(image_emb: np.ndarray, report_emb: np.ndarray, report_row: np.ndarray, patient_ids: np.ndarray,
                     pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                     n_boot: int = 2000, seed: int = 0, block_size: int | None = None) -> dict:
    """Image-to-report audit of L2-normalised embeddings; see :func:`audit_counts` for the output."""
    above, equal = rank_counts(image_emb, report_emb, report_row, block_size=block_size)
    return audit_counts(above, equal, len(report_emb), patient_ids, pools, ks, n_boot, seed)


def recall_curve(above: np.ndarray, equal: np.ndarray, n_candidates: int, patient_ids: np.ndarray, k: int = 1,
                 n_points: int = 24, n_boot: int = 500, seed: int = 0) -> list[dict]:
    """Expected Recall@K at log-spaced pool sizes from ``max(K + 1, 2)`` to ``M``, for plots.

    Returns a list of ``{pool, value, ci95, chance}`` with integer ``pool`` (the last is ``M``).
    """
    low_end = max(k + 1, 2)
    if n_candidates < low_end:
        return []
    sizes = np.unique(np.geomspace(low_end, n_candidates, n_points).round().astype(int))
    curve = []
    for size in sizes:
        per_query = expected_recall_at_k(above, equal, n_candidates, int(size), k)
        curve.append({"pool": int(size), "value": float(per_query.mean()),
                      "ci95": list(cluster_bootstrap_ci(per_query, patient_ids, n_boot=n_boot, seed=seed)),
                      "chance": k / float(size)})
    return curve
