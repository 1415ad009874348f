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
from scipy.special import digamma, gammaln
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

    return _apply_ties(_hit_cdf(n_candidates, pool_size, k), above, equal, ties)


def log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``log C(n, k)`` elementwise, ``-inf`` where ``k < 0`` or ``k > n``."""
    n, k = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(k, dtype=np.float64))
    valid = (k >= 0) & (k <= n)
    out = np.full(n.shape, -np.inf)
    out[valid] = gammaln(n[valid] + 1) - gammaln(k[valid] + 1) - gammaln(n[valid] - k[valid] + 1)
    return out


# Above this K, the CDF comes from scipy instead of a sum of K pmf terms.
_DIRECT_SUM_MAX_K = 64


def _hit_cdf(n_candidates: int, pool_size: int, k: int) -> np.ndarray:
    """``F[y]`` = P(at most K-1 of ``y`` above-candidates are drawn into the pool), ``y = 0..M-1``.

    For small K this sums the K hypergeometric pmf terms
    ``C(y, x) C(M-1-y, N-1-x) / C(M-1, N-1)`` in log space. The sum agrees
    with ``scipy.stats.hypergeom.cdf`` to rounding, and at M = 43,793 it took
    about 2% of scipy's time (benchmarks/audit.py).
    """
    successes = np.arange(n_candidates, dtype=np.float64)
    if k > _DIRECT_SUM_MAX_K:
        return hypergeom.cdf(k - 1, n_candidates - 1, successes, pool_size - 1)
    population, draws = n_candidates - 1, pool_size - 1
    log_total = log_comb(population, draws)
    cdf = np.zeros(n_candidates)
    for x in range(min(k, draws + 1)):
        cdf += np.exp(log_comb(successes, x) + log_comb(population - successes, draws - x) - log_total)
    return np.clip(cdf, 0.0, 1.0)


def _apply_ties(cdf: np.ndarray, above: np.ndarray, equal: np.ndarray, ties: str) -> np.ndarray:
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


def rank_statistics(normalised: np.ndarray, patient_ids: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    interval: np.ndarray | None = None) -> dict:
    """Summarise per-query normalised ranks as the mean normalised rank and the linkage AUC, with 95% intervals.

    The linkage AUC is ``1 - mean normalised rank``: the probability that
    the true candidate outscores a random other candidate (ties count one
    half under the ``random`` rule), so chance is 0.5 for both. Queries
    whose rank is NaN (no other candidate to rank against) are left out and
    counted in ``n_queries_ranked``.

    Args:
        normalised: ``[Q]`` per-query ``(rank - 1) / (M - 1)`` (:func:`normalised_rank`).
        patient_ids: ``[Q]`` bootstrap clusters.
        interval: a precomputed ``[low, high]`` interval of the mean normalised rank
            (from a shared set of resamples); computed here when None.

    Returns:
        ``{"mean_normalised_rank": {value, ci95, chance}, "linkage_auc": {value, ci95, chance},
        "n_queries_ranked": int}``; values are NaN when no query is ranked.
    """
    normalised = np.asarray(normalised, dtype=np.float64)
    ranked = ~np.isnan(normalised)
    if not ranked.any():
        nan = float("nan")
        return {"mean_normalised_rank": {"value": nan, "ci95": [nan, nan], "chance": 0.5},
                "linkage_auc": {"value": nan, "ci95": [nan, nan], "chance": 0.5}, "n_queries_ranked": 0}
    if interval is None:
        interval = percentile_interval(bootstrap_means(normalised[ranked], np.asarray(patient_ids)[ranked], n_boot,
                                                       seed))
    low, high = (float(v) for v in interval)
    mean = float(normalised[ranked].mean())
    return {"mean_normalised_rank": {"value": mean, "ci95": [low, high], "chance": 0.5},
            "linkage_auc": {"value": 1.0 - mean, "ci95": [1.0 - high, 1.0 - low], "chance": 0.5},
            "n_queries_ranked": int(ranked.sum())}


# Share of tied others ranked above the true candidate in the expected rank, per tie rule.
_TIE_SHARE = {"random": 0.5, "optimistic": 0.0, "pessimistic": 1.0}


def reciprocal_rank(above: np.ndarray, equal: np.ndarray, ties: str = "random") -> np.ndarray:
    """Expected reciprocal rank in the full pool.

    Under ``random`` ties it is ``mean_{r=0..e} 1 / (1 + a + r)``; under
    ``optimistic`` ``1 / (1 + a)``; under ``pessimistic`` ``1 / (1 + a + e)``.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    above = np.asarray(above, dtype=np.float64)
    equal = np.asarray(equal, dtype=np.float64)
    if ties == "optimistic":
        return 1.0 / (1.0 + above)
    if ties == "pessimistic":
        return 1.0 / (1.0 + above + equal)
    # sum_{r=0..e} 1/(a+1+r) = digamma(a+e+2) - digamma(a+1)
    return (digamma(above + equal + 2) - digamma(above + 1)) / (equal + 1)


# Resamples drawn per chunk, bounding memory at about 8 * chunk * groups bytes.
_BOOT_CHUNK = 100


def bootstrap_means(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of several per-query figures under one shared set of patient (cluster) resamples.

    Each resample draws ``G`` groups with replacement from the ``G``
    present. Its statistic is the mean over all queries of the drawn
    groups, and a group drawn twice counts twice. All figures see the same
    resamples, so differences between them are resampled consistently.

    Args:
        values: ``[F, Q]`` (or ``[Q]``) per-query values.
        groups: ``[Q]`` cluster labels (patient ids).
        n_boot: number of resamples.
        seed: seed of the resampling.

    Returns:
        float64 ``[F, n_boot]`` (or ``[n_boot]``) resampled means.
    """
    if n_boot < 1:
        raise ConfigError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    values = np.asarray(values, dtype=np.float64)
    single = values.ndim == 1
    values = np.atleast_2d(values)
    groups = np.asarray(groups)
    if len(groups) != values.shape[1]:
        raise InputError(f"{values.shape[1]} values but {len(groups)} group labels")
    _, group_index = np.unique(groups, return_inverse=True)
    group_index = group_index.reshape(-1)
    n_groups = int(group_index.max()) + 1
    group_sums = np.stack([np.bincount(group_index, weights=row, minlength=n_groups) for row in values], axis=1)
    group_sizes = np.bincount(group_index, minlength=n_groups).astype(np.float64)

    rng = np.random.default_rng(seed)
    index_type = np.int32 if _BOOT_CHUNK * n_groups < 2**31 else np.int64
    stats = np.empty((len(values), n_boot))
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        drawn = rng.integers(0, n_groups, size=(size, n_groups), dtype=index_type)
        drawn += (n_groups * np.arange(size, dtype=index_type))[:, None]
        times = np.bincount(drawn.ravel(),
                            minlength=size * n_groups).reshape(size, n_groups).astype(np.float64)
        stats[:, start:start + size] = ((times @ group_sums) / (times @ group_sizes)[:, None]).T
    return stats[0] if single else stats


def percentile_interval(stats: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval of resampled statistics along the last axis: ``[..., 2]`` (low, high)."""
    tail = (1.0 - level) / 2.0 * 100.0
    return np.moveaxis(np.percentile(stats, [tail, 100.0 - tail], axis=-1), 0, -1)


def cluster_bootstrap_ci(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` resampling whole groups (patients) with replacement.

    See :func:`bootstrap_means`. Returns ``(nan, nan)`` with a warning when
    there are no values.
    """
    if n_boot < 1:
        raise ConfigError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        warnings.warn("bootstrap interval of an empty set is undefined; returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan"), float("nan")
    low, high = percentile_interval(bootstrap_means(values, groups, n_boot, seed), level)
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
                 n_boot: int = 1000, seed: int = 0, ties: str = "random") -> dict:
    """Summarise rank counts into Recall@K per pool, with lift and patient-bootstrap intervals.

    Pools smaller than the candidate set are reported by size, the whole
    set as ``"full"``; K values not smaller than N are left out (Recall is 1
    there by definition). ``value`` and its interval follow the tie rule
    ``ties``; every entry also carries the value under each of the three
    rules (``random``, ``optimistic``, ``pessimistic``). All intervals share
    one set of patient resamples.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    above, equal = _check_counts(above, equal, n_candidates)
    entries, per_query = [], []
    resolved = resolve_pools(list(pools), n_candidates)
    unreported = sorted({int(k) for k in ks if all(k >= size for _, size in resolved)})
    if unreported:
        logger.warning("K values %s are not smaller than any pool size, so no Recall@K is reported for them "
                       "(it would be 1 by definition)", unreported)
    for label, pool_size in resolved:
        for k in ks:
            if k >= pool_size:
                continue
            cdf = _hit_cdf(n_candidates, pool_size, k)
            by_rule = {rule: _apply_ties(cdf, above, equal, rule) for rule in TIE_RULES}
            per_query.append(by_rule[ties])
            entries.append({"pool": label, "k": int(k), "chance": k / pool_size,
                            **{rule: float(v.mean()) if len(v) else float("nan") for rule, v in by_rule.items()}})
    ranks = normalised_rank(above, equal, n_candidates, ties)
    rr = reciprocal_rank(above, equal, ties)
    per_query += [ranks, rr]
    if len(above):
        intervals = percentile_interval(bootstrap_means(np.stack(per_query), patient_ids, n_boot, seed))
    else:
        warnings.warn("no queries: every figure is undefined; returning NaN", RuntimeWarning, stacklevel=2)
        intervals = np.full((len(per_query), 2), np.nan)

    recall = []
    for entry, (low, high) in zip(entries, intervals):
        value, chance = entry[ties], entry["chance"]
        recall.append({"pool": entry["pool"], "k": entry["k"], "value": value, "ci95": [float(low), float(high)],
                       "chance": chance, "lift": value / chance, "lift_ci95": [low / chance, high / chance],
                       "random": entry["random"], "optimistic": entry["optimistic"],
                       "pessimistic": entry["pessimistic"]})
    return {
        "n_queries": int(len(above)),
        "n_candidates": int(n_candidates),
        "queries_with_ties": int((equal > 0).sum()),
        "tie_rule": ties,
        "recall": recall,
        **(rank_statistics(ranks, patient_ids, interval=intervals[-2]) if len(above) else
           rank_statistics(np.full(0, np.nan), patient_ids)),
        "full_pool": {
            "mean_normalised_rank": float(ranks.mean()) if len(ranks) else float("nan"),
            "mean_normalised_rank_ci95": [float(v) for v in intervals[-2]],
            "median_rank": float(np.median(1 + above + equal * _TIE_SHARE[ties])) if len(above) else float("nan"),
            "mean_rank": float((1 + above + equal * _TIE_SHARE[ties]).mean()) if len(above) else float("nan"),
            "mean_reciprocal_rank": float(rr.mean()) if len(rr) else float("nan"),
            "mean_reciprocal_rank_ci95": [float(v) for v in intervals[-1]],
        },
    }


def audit_embeddings(image_emb: np.ndarray, report_emb: np.ndarray, report_row: np.ndarray, patient_ids: np.ndarray,
                     pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                     n_boot: int = 1000, seed: int = 0, block_size: int | None = None) -> dict:
    """Image-to-report audit of L2-normalised embeddings; see :func:`audit_counts` for the output."""
    above, equal = rank_counts(image_emb, report_emb, report_row, block_size=block_size)
    return audit_counts(above, equal, len(report_emb), patient_ids, pools, ks, n_boot, seed)


def recall_curve(above: np.ndarray, equal: np.ndarray, n_candidates: int, patient_ids: np.ndarray, k: int = 1,
                 n_points: int = 24, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Expected Recall@K at log-spaced pool sizes from ``max(K + 1, 2)`` to ``M``, for plots.

    Returns a list of ``{pool, value, ci95, chance}`` with integer ``pool`` (the last is ``M``).
    """
    low_end = max(k + 1, 2)
    if n_candidates < low_end:
        return []
    sizes = np.unique(np.geomspace(low_end, n_candidates, n_points).round().astype(int))
    per_query = np.stack([expected_recall_at_k(above, equal, n_candidates, int(size), k) for size in sizes])
    intervals = percentile_interval(bootstrap_means(per_query, patient_ids, n_boot, seed))
    return [{"pool": int(size), "value": float(values.mean()), "ci95": [float(low), float(high)],
             "chance": k / float(size)} for size, values, (low, high) in zip(sizes, per_query, intervals)]
