"""Pathology-matched hard negatives: pools drawn only from reports with the true report's labels.

Each report's 14 CheXpert observations become two bitmasks: ``positive``
and ``negative`` (bit ``j`` for observation ``j``). The label policy sets
what uncertain (-1) and blank (NaN) values become:

- ``zeros`` (default): both count as negative.
- ``ones``: uncertain counts as positive, blank as negative (blank means
  "not mentioned" in CheXpert-style labellers).
- ``ignore``: the observation is dropped from the true report's vector, so
  a candidate matches when it agrees on every observation the true report
  has as 1 or 0, whatever it has elsewhere.

A candidate matches a query when ``(c.pos & t.known) == t.pos`` and
``(c.neg & t.known) == t.neg``, with ``t`` the true report and ``t.known =
t.pos | t.neg``. Under ``zeros`` and ``ones`` every observation is known,
so this is plain equality of label vectors. The true report always
matches itself. A query whose matching group has fewer than ``N - 1``
others gets a capped pool of its whole group, and the output reports how
many queries that affects.

Nearest-label fallback (optional, named ``nearest_label`` in the output):
a query whose group is too small has its pool filled with the candidates
at the smallest label distance (observations known in the true vector on
which the candidate differs). Rings closer than the one that completes the
pool enter whole; the completing ring is sampled uniformly. The expected
Recall@K stays exact (a two-stratum multivariate hypergeometric sum).
"""

from __future__ import annotations


import numpy as np
import torch
from scipy.stats import hypergeom

from linkrisk.audit.ranks import RankCounts, stream_counts
from linkrisk.audit.recall import (
    TIE_RULES,
    bootstrap_means,
    expected_recall_at_k,
    log_comb,
    percentile_interval,
    rank_statistics,
    resolve_pools,
)
from linkrisk.errors import ConfigError, InputError

LABEL_POLICIES = ("zeros", "ones", "ignore")
FALLBACKS = (None, "nearest_label")


def label_bitmasks(labels: np.ndarray, policy: str = "zeros") -> tuple[np.ndarray, np.ndarray]:
    """Encode labels ``[n, L]`` (1, 0, -1, NaN; L <= 62) as ``(positive, negative)`` int64 bitmasks ``[n]``."""
    if policy not in LABEL_POLICIES:
        raise ConfigError(f"unknown label policy {policy!r}; valid policies: {', '.join(LABEL_POLICIES)}")
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] > 62:
        raise InputError(f"labels must be a 2-D array with at most 62 columns, got shape {labels.shape}")
    valid = np.isnan(labels) | np.isin(labels, (1.0, 0.0, -1.0))
    if not valid.all():
        row, column = np.argwhere(~valid)[0]
        raise InputError(f"label value {labels[row, column]} at row {row}, column {column} is outside {{1, 0, -1, blank}}")

    uncertain, blank = labels == -1.0, np.isnan(labels)
    positive, negative = labels == 1.0, labels == 0.0
    if policy == "zeros":
        negative = negative | uncertain | blank
    elif policy == "ones":
        positive = positive | uncertain
        negative = negative | blank
    weights = np.left_shift(np.int64(1), np.arange(labels.shape[1], dtype=np.int64))
    return (positive.astype(np.int64) @ weights), (negative.astype(np.int64) @ weights)


def matched_rank_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, positive: np.ndarray,
                        negative: np.ndarray, block_size: int | None = None,
                        device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank counts restricted to each query's label-matched candidates.

    Args:
        queries: ``[Q, D]`` embeddings; candidates: ``[M, D]``; true_index: ``[Q]``.
        positive, negative: ``[M]`` candidate bitmasks from :func:`label_bitmasks`.

    Returns:
        ``(above, equal, group_size)``, int64 ``[Q]``: matched others scoring
        above and tying with the true candidate, and the number of matched
        candidates including the true one.
    """
    counts = stream_counts(queries, candidates, true_index, unit_positive=positive, unit_negative=negative,
                           block_size=block_size, device=device)
    return counts.ring_above[:, 0], counts.ring_equal[:, 0], counts.ring_size[:, 0]


def capped_recall(above: np.ndarray, equal: np.ndarray, group_size: np.ndarray, pool_size: int | str, k: int,
                  ties: str = "random") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected Recall@K per query in pools capped at each query's matched group.

    ``pool_size`` ``"full"`` means each query's whole group. Returns
    ``(recall, chance, effective_pool)``, each ``[Q]``: chance is
    ``min(1, K / N_q)`` for the query's effective pool ``N_q``.
    """
    group_size = np.asarray(group_size, dtype=np.int64)
    effective = group_size if pool_size == "full" else np.minimum(int(pool_size), group_size)
    recall = np.empty(len(above), dtype=np.float64)
    for m, n in {(int(m), int(n)) for m, n in zip(group_size, effective)}:
        rows = (group_size == m) & (effective == n)
        recall[rows] = expected_recall_at_k(above[rows], equal[rows], m, n, k, ties) if n > k else 1.0
    return recall, np.minimum(1.0, k / effective), effective


def fallback_recall(ring_above: np.ndarray, ring_equal: np.ndarray, ring_size: np.ndarray, pool_size: int, k: int,
                    ties: str = "random") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Expected Recall@K per query in pools of ``pool_size`` filled by label distance (nearest-label fallback).

    Args:
        ring_above, ring_equal, ring_size: ``[Q, R]`` counts by label
            distance from :func:`~linkrisk.audit.ranks.stream_counts` (ring 0
            contains the true candidate).
        pool_size: ``N``; a query with fewer labelled candidates in all
            rings gets a pool of all of them.

    Returns:
        ``(recall, chance, effective_pool, distance)``, each ``[Q]``:
        ``distance`` is the farthest label distance the pool reaches.

    With ``D`` that farthest ring, rings ``< D`` enter whole (``a`` above,
    ``e`` tied others) and ``n`` candidates are drawn from ring ``D`` (size
    ``R``, ``a_D`` above, ``e_D`` tied). With ``x`` above and ``y`` tied
    drawn, the true candidate is among the top ``K`` when fewer than ``K``
    candidates precede it. Under random ties its position among its
    ``e + y + 1`` tied candidates is uniform, so
    ``P = sum_{x,y} pmf(x, y) * clip(K - a - x, 0, e + y + 1) / (e + y + 1)``.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    ring_above, ring_equal, ring_size = (np.asarray(a, dtype=np.int64) for a in (ring_above, ring_equal, ring_size))
    rows = np.arange(len(ring_size))
    cumulative = np.cumsum(ring_size, axis=1)
    total = cumulative[:, -1]
    effective = np.minimum(int(pool_size), total)
    distance = (cumulative < effective[:, None]).sum(1)
    inner = np.where(distance > 0, cumulative[rows, np.maximum(distance - 1, 0)], 1)  # true candidate included
    inner_above = np.cumsum(ring_above, axis=1)[rows, distance] - ring_above[rows, distance]
    inner_equal = np.cumsum(ring_equal, axis=1)[rows, distance] - ring_equal[rows, distance]
    ring_n = ring_size[rows, distance] - (distance == 0)  # others in the completing ring
    a_d, e_d = ring_above[rows, distance], ring_equal[rows, distance]
    draws = effective - inner

    if ties == "optimistic":
        recall = hypergeom.cdf(k - 1 - inner_above, ring_n, a_d, draws)
    elif ties == "pessimistic":
        recall = hypergeom.cdf(k - 1 - inner_above - inner_equal, ring_n, a_d + e_d, draws)
    else:
        recall = np.zeros(len(rows))
        log_total = log_comb(ring_n, draws)
        below = ring_n - a_d - e_d
        for x in range(k):
            log_x = log_comb(a_d, x)
            for y in range(int(min(e_d.max(initial=0), draws.max(initial=0))) + 1):
                log_pmf = log_x + log_comb(e_d, y) + log_comb(below, draws - x - y) - log_total
                tied = inner_equal + y + 1
                recall += np.exp(log_pmf) * np.clip(k - inner_above - x, 0, tied) / tied
    recall = np.where(effective <= k, 1.0, np.clip(recall, 0.0, 1.0))
    return recall, np.minimum(1.0, k / effective), effective, distance


def matched_normalised_rank(above: np.ndarray, equal: np.ndarray, group_size: np.ndarray,
                            ties: str = "random") -> np.ndarray:
    """Per-query normalised rank ``(rank - 1) / (m - 1)`` within the matched group of ``m`` candidates, ``[Q]``.

    NaN for a query alone in its group (``m < 2``), which has no other
    candidate to rank against.
    """
    above, equal, group_size = (np.asarray(a, dtype=np.float64) for a in (above, equal, group_size))
    offset = {"random": equal / 2.0, "optimistic": 0.0, "pessimistic": equal}[ties]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(group_size >= 2, (above + offset) / (group_size - 1), np.nan)


def audit_matched(above: np.ndarray, equal: np.ndarray, group_size: np.ndarray, patient_ids: np.ndarray,
                  pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10), n_boot: int = 1000,
                  seed: int = 0, ties: str = "random", rings: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  ) -> dict:
    """Summarise matched rank counts: Recall@K, chance and lift per pool, with effective pool sizes.

    Each entry carries ``effective_pool`` (min, median, max of ``N_q``) and
    ``full_pool_share``, the share of queries whose group filled the
    requested pool. With ``rings`` (``ring_above, ring_equal, ring_size``)
    numeric pools too small for a group are filled by the nearest-label
    fallback; entries then also carry ``fallback_share`` (queries whose
    pool reached past their own group) and ``max_label_distance``.
    ``mean_normalised_rank`` and ``linkage_auc`` rank each query within its
    own matched group (``rank_scope``), and queries alone in their group are
    not ranked.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    above, equal, group_size = (np.asarray(a, dtype=np.int64) for a in (above, equal, group_size))
    entries, per_query = [], []
    for pool in pools:
        for k in ks:
            if pool != "full" and k >= int(pool):
                continue
            entry = {"pool": pool, "k": int(k)}
            if rings is not None and pool != "full":
                values, chance, effective, distance = fallback_recall(*rings, int(pool), k, ties)
                entry["fallback_share"] = float((distance > 0).mean())
                entry["max_label_distance"] = int(distance.max())
            else:
                values, chance, effective = capped_recall(above, equal, group_size, pool, k, ties)
            entry.update({
                "value": float(values.mean()), "chance": float(chance.mean()),
                "effective_pool": {"min": int(effective.min()), "median": float(np.median(effective)),
                                   "max": int(effective.max())},
                "full_pool_share": 1.0 if pool == "full" else float((np.minimum(group_size, int(pool))
                                                                     == int(pool)).mean()),
            })
            entries.append(entry)
            per_query.append(values)
    intervals = percentile_interval(bootstrap_means(np.stack(per_query), patient_ids, n_boot, seed)) \
        if per_query else np.empty((0, 2))
    ranks = rank_statistics(matched_normalised_rank(above, equal, group_size, ties), patient_ids, n_boot, seed)
    recall = []
    for entry, (low, high) in zip(entries, intervals):
        entry["ci95"] = [float(low), float(high)]
        entry["lift"] = entry["value"] / entry["chance"]
        recall.append(entry)
    return {"negatives": "label_matched", "fallback": "nearest_label" if rings is not None else None,
            "n_queries": int(len(above)), "queries_with_ties": int((equal > 0).sum()), "tie_rule": ties,
            "recall": recall, **ranks, "rank_scope": "matched group",
            "group_size": {"min": int(group_size.min()), "median": float(np.median(group_size)),
                           "max": int(group_size.max())}}


def summarise_matched(counts: RankCounts, unit_labelled: np.ndarray, true_unit: np.ndarray, patient_ids: np.ndarray,
                      policy: str, pools: list[int | str], ks: list[int], n_boot: int, seed: int, ties: str = "random",
                      fallback: str | None = None) -> dict:
    """Summarise pathology-matched pools from counts made with ``unit_labelled`` (see :func:`audit_label_matched`)."""
    unit_labelled = np.asarray(unit_labelled, dtype=bool)
    keep = unit_labelled[np.asarray(true_unit, dtype=np.int64)]
    if not keep.any():
        raise InputError("no query has a labelled true candidate, so pathology-matched pools are undefined")
    n_labelled = int(unit_labelled.sum())
    pools = [label for label, _ in resolve_pools(list(pools), n_labelled)]
    rings = (counts.ring_above[keep], counts.ring_equal[keep], counts.ring_size[keep]) if fallback else None
    result = audit_matched(counts.ring_above[keep, 0], counts.ring_equal[keep, 0], counts.ring_size[keep, 0],
                           np.asarray(patient_ids)[keep], pools, ks, n_boot, seed, ties, rings)
    return {**result, "label_policy": policy, "n_candidates": n_labelled,
            "n_queries_without_labels": int((~keep).sum()),
            "n_candidates_without_labels": int((~unit_labelled).sum()),
            "queries_without_matched_negatives": int((counts.ring_size[keep, 0] < 2).sum())}


def unit_label_masks(labels: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode unit labels as ``(positive, negative, labelled)``; a unit is labelled when any observation is not blank."""
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        raise InputError(f"labels must be a 2-D array [units, observations], got shape {labels.shape}")
    labelled = ~np.isnan(labels).all(axis=1) if labels.shape[1] else np.zeros(len(labels), bool)
    positive, negative = label_bitmasks(labels, policy)
    return positive, negative, labelled


def audit_label_matched(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                        patient_ids: np.ndarray, labels: np.ndarray, policy: str = "zeros",
                        pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                        n_boot: int = 1000, seed: int = 0, *, candidate_unit: np.ndarray | None = None,
                        ties: str = "random", fallback: str | None = None, block_size: int | None = None,
                        device: str | torch.device = "cpu") -> dict:
    """Audit with pathology-matched pools.

    Args:
        queries: ``[Q, D]``; candidates: ``[M, D]``; true_index: ``[Q]`` true unit.
        patient_ids: ``[Q]`` cluster labels for the bootstrap.
        labels: ``[U, L]`` label values per candidate unit (1, 0, -1, NaN);
            units are candidate rows when ``candidate_unit`` is None.
        policy: one of ``LABEL_POLICIES``.
        fallback: None or ``"nearest_label"``.

    Units with no known label at all are left out as candidates, and
    queries whose true unit has none are left out as queries. The output
    counts both.
    """
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback {fallback!r}; valid values: none, nearest_label")
    n_units = len(candidates) if candidate_unit is None else int(np.max(candidate_unit)) + 1
    if np.ndim(labels) != 2 or len(labels) != n_units:
        raise InputError(f"{n_units} candidate units but labels of shape {np.shape(labels)}")
    positive, negative, labelled = unit_label_masks(labels, policy)
    if not labelled[np.asarray(true_index, dtype=np.int64)].any():
        raise InputError("no query has a labelled true candidate, so pathology-matched pools are undefined")
    counts = stream_counts(queries, candidates, true_index, candidate_unit=candidate_unit, unit_positive=positive,
                           unit_negative=negative, unit_labelled=labelled, rings=fallback is not None,
                           block_size=block_size, device=device)
    return summarise_matched(counts, labelled, true_index, patient_ids, policy, pools, ks, n_boot, seed, ties, fallback)
