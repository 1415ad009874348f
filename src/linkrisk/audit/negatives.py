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
"""

from __future__ import annotations

import numpy as np
import torch

from linkrisk.audit.recall import cluster_bootstrap_ci, expected_recall_at_k, resolve_pools
from linkrisk.audit.ranks import _check
from linkrisk.errors import ConfigError, InputError

LABEL_POLICIES = ("zeros", "ones", "ignore")


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
                        negative: np.ndarray, block_size: int = 1024,
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
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    true_index = np.asarray(true_index, dtype=np.int64)
    _check(queries, candidates, true_index)
    if len(positive) != len(candidates) or len(negative) != len(candidates):
        raise InputError(f"{len(candidates)} candidates but {len(positive)}/{len(negative)} label rows")

    cand = torch.as_tensor(candidates, device=device)
    pos = torch.as_tensor(np.asarray(positive, dtype=np.int64), device=device)
    neg = torch.as_tensor(np.asarray(negative, dtype=np.int64), device=device)
    true_t = torch.as_tensor(true_index, device=device)
    # Identical embedding rows must tie exactly whatever the matmul kernel does.
    _, first, inverse = np.unique(candidates, axis=0, return_index=True, return_inverse=True)
    canonical = torch.as_tensor(first[inverse.reshape(-1)], device=device)

    above = np.empty(len(queries), dtype=np.int64)
    equal = np.empty(len(queries), dtype=np.int64)
    size = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), block_size):
        stop = min(start + block_size, len(queries))
        rows = true_t[start:stop]
        t_pos, t_neg = pos[rows].view(-1, 1), neg[rows].view(-1, 1)
        known = t_pos | t_neg
        match = ((pos.view(1, -1) & known) == t_pos) & ((neg.view(1, -1) & known) == t_neg)
        scores = (torch.as_tensor(queries[start:stop], device=device) @ cand.T)[:, canonical]
        true = scores.gather(1, rows.view(-1, 1))
        above[start:stop] = ((scores > true) & match).sum(1).cpu().numpy()
        equal[start:stop] = ((scores == true) & match).sum(1).cpu().numpy() - 1
        size[start:stop] = match.sum(1).cpu().numpy()
    return above, equal, size


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


def audit_matched(above: np.ndarray, equal: np.ndarray, group_size: np.ndarray, patient_ids: np.ndarray,
                  pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10), n_boot: int = 1000,
                  seed: int = 0) -> dict:
    """Summarise matched rank counts: Recall@K, chance and lift per pool, with effective pool sizes.

    Each entry carries ``effective_pool`` (min, median, max of ``N_q``) and
    ``full_pool_share``, the share of queries whose group filled the
    requested pool.
    """
    recall = []
    for pool in pools:
        for k in ks:
            if pool != "full" and k >= int(pool):
                continue
            per_query, chance, effective = capped_recall(above, equal, group_size, pool, k)
            value, mean_chance = float(per_query.mean()), float(chance.mean())
            low, high = cluster_bootstrap_ci(per_query, patient_ids, n_boot=n_boot, seed=seed)
            recall.append({
                "pool": pool, "k": int(k), "value": value, "ci95": [low, high], "chance": mean_chance,
                "lift": value / mean_chance,
                "effective_pool": {"min": int(effective.min()), "median": float(np.median(effective)),
                                   "max": int(effective.max())},
                "full_pool_share": 1.0 if pool == "full" else float((effective == int(pool)).mean()),
            })
    return {"negatives": "label_matched", "n_queries": int(len(above)), "queries_with_ties": int((equal > 0).sum()),
            "recall": recall,
            "group_size": {"min": int(group_size.min()), "median": float(np.median(group_size)),
                           "max": int(group_size.max())}}


def audit_label_matched(image_emb: np.ndarray, report_emb: np.ndarray, report_row: np.ndarray,
                        patient_ids: np.ndarray, labels: np.ndarray, policy: str = "zeros",
                        pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """Image-to-report audit with pathology-matched pools.

    Reports with no known label at all are left out as candidates. Images
    whose true report has none are left out as queries. The output counts
    both. ``labels`` is ``[n_reports, L]`` (1, 0, -1, NaN).
    """
    labels = np.asarray(labels, dtype=np.float64)
    labelled = ~np.isnan(labels).all(axis=1) if labels.shape[1] else np.zeros(len(labels), bool)
    new_row = np.cumsum(labelled) - 1
    queries = labelled[report_row]
    if not queries.any():
        raise InputError("no image has a labelled true report, so pathology-matched pools are undefined")

    positive, negative = label_bitmasks(labels[labelled], policy)
    above, equal, size = matched_rank_counts(image_emb[queries], report_emb[labelled], new_row[report_row[queries]],
                                             positive, negative)
    pools = [label for label, _ in resolve_pools(list(pools), int(labelled.sum()))]
    result = audit_matched(above, equal, size, np.asarray(patient_ids)[queries], pools, ks, n_boot, seed)
    return {**result, "label_policy": policy, "n_candidates": int(labelled.sum()),
            "n_queries_without_labels": int((~queries).sum()),
            "n_candidates_without_labels": int((~labelled).sum())}
