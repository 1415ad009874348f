"""Tests, upper bounds and power for the question "is there instance-level linkage at all?".

Three tools, all pure functions over arrays:

- :func:`permutation_test`: a patient-block permutation test of the null
  "no linkage" for Recall@K at pool N and for the mean normalised rank.
- :func:`recall_upper_bounds`: one-sided 95% upper confidence bounds on
  Recall@K and lift ("the risk is at most X").
- :func:`required_queries`: how many independent queries a study needs to
  detect a given lift over chance at pool N and cut-off K.

Permutation scheme (:func:`patient_permutations`)
    Each patient's queries are sorted by (true unit, query row). Its
    *shape* is the tuple that numbers its distinct true units in order of
    first appearance: two images sharing one report give ``(0, 0)``, two
    images with a report each give ``(0, 1)``. Patients of equal shape form
    one stratum. One permutation ``pi`` shuffles the patients uniformly
    inside every stratum. Every query of patient ``p`` then takes as its
    "true" unit the true unit of the query at the same position in patient
    ``pi(p)``. So a patient's
    queries move together, queries that share a true unit keep sharing
    one, and all candidates (reports without images included) stay where
    they are. A patient maps to itself with probability 1 / (stratum
    size), as a uniform draw from the permutation group requires. The
    patient alone in its stratum always keeps its own units. That makes
    the test conservative but keeps it exact.

    Under the null that a patient's query embeddings are exchangeable with
    those of any other patient of the same shape, given all candidate
    embeddings, the observed statistic and the B permuted ones are
    exchangeable, so ``p = (1 + #{null at least as extreme}) / (1 + B)`` is
    a valid p-value: ``P(p <= u) <= u``.

Upper bounds
    Two patient-bootstrap bounds, both resampling whole patients: the
    one-sided percentile bound (the ``level`` quantile of the resampled
    means) and the studentized (bootstrap-t) bound, which corrects for the
    skew of a small proportion. On 200 simulated cohorts without linkage
    (the cohorts of tests/test_stats.py, N = 10, K = 1) the percentile
    bound covered chance in 88.5% of cohorts of 30 patients and 91.5% of
    60, the studentized one in 93.5% and 96.5%. Neither is reliable for
    Recall@1 in the full pool, where few queries hit (they covered it in
    about 67%). For Recall@1 in the full pool each query is a hit or a miss
    when no tie reaches the top rank, and the exact one-sided
    Clopper–Pearson bound applies as well. It treats the queries as
    independent trials. The *reported* bound (``upper``) is the largest of
    the available bounds, because each guards against another's failure:
    the bootstrap bounds collapse to 0 when no query is a hit, and
    Clopper–Pearson ignores the correlation of one patient's queries.

Power
    :func:`required_queries` models each query as an independent Bernoulli
    hit with probability ``p0 = K / N`` under the null and ``p1 = lift * p0``
    under the alternative. A query's expected Recall@K over pools is a
    probability in [0, 1] whose variance is at most that of the Bernoulli
    hit, so the answer is an upper estimate for the closed-form statistic.
    It counts independent queries, i.e. patients with one query each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import beta, binom, norm

from linkrisk.audit.ranks import DEFAULT_BLOCK_BYTES, first_identical_row
from linkrisk.audit.recall import (
    TIE_RULES,
    bootstrap_means,
    expected_recall_at_k,
    normalised_rank,
    resolve_pools,
)
from linkrisk.errors import ConfigError, InputError

POWER_METHODS = ("exact", "normal")

# Bootstrap resamples drawn per step of the studentized bound.
_BOOT_CHUNK = 100

# Null values within this relative distance of the observed value count as
# "at least as extreme": equal sums of per-query values may differ in the
# last bits when added in another order, and counting them keeps p valid.
_EXTREME_TOLERANCE = 1e-9


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")


# --------------------------------------------------------------------------------------------------
# Patient-block permutations


@dataclass
class PatientPermutations:
    """Patient-block permutations of the query-to-true-unit assignment.

    Attributes:
        patient_index: ``[Q]`` patient of each query, ``0..G-1``.
        slot: ``[Q]`` position of each query in its patient's order (sorted by true unit, then row).
        patient_start: ``[G]`` first position of each patient in ``ordered_unit``.
        ordered_unit: ``[Q]`` true units of all queries, grouped by patient in slot order.
        stratum: ``[G]`` stratum (shape) of each patient.
        mapping: ``[B, G]`` int32: the patient whose true units each patient takes, per permutation.
    """

    patient_index: np.ndarray
    slot: np.ndarray
    patient_start: np.ndarray
    ordered_unit: np.ndarray
    stratum: np.ndarray
    mapping: np.ndarray

    @property
    def n_permutations(self) -> int:
        return int(self.mapping.shape[0])

    def true_units(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Return the permuted true unit of each query in ``rows``: int64 ``[B, len(rows)]``."""
        rows = np.arange(len(self.slot)) if rows is None else np.arange(len(self.slot))[rows]
        source = self.mapping[:, self.patient_index[rows]]
        return self.ordered_unit[self.patient_start[source] + self.slot[rows][None, :]]


def patient_permutations(true_unit: np.ndarray, query_patients: np.ndarray, n_permutations: int,
                         seed: int = 0) -> PatientPermutations:
    """Draw ``n_permutations`` patient-block permutations; the scheme is in the module docstring.

    Args:
        true_unit: ``[Q]`` int, each query's true candidate unit.
        query_patients: ``[Q]`` patient of each query (any hashable labels).
        n_permutations: ``B >= 1``.
        seed: seed of ``numpy.random.default_rng``.

    Memory is ``4 * B * G`` bytes for ``G`` patients (about 260 MB at
    B = 999 and 65,000 patients).
    """
    if n_permutations < 1:
        raise ConfigError(f"the number of permutations must be at least 1, got {n_permutations}")
    true_unit = np.asarray(true_unit, dtype=np.int64)
    query_patients = np.asarray(query_patients)
    if true_unit.ndim != 1 or query_patients.shape != true_unit.shape:
        raise InputError(f"{true_unit.shape} true units but {query_patients.shape} patient labels; give one per query")
    _, patient_index = np.unique(query_patients.astype(str), return_inverse=True)
    patient_index = patient_index.reshape(-1).astype(np.int64)
    n_patients = int(patient_index.max()) + 1 if len(patient_index) else 0

    order = np.lexsort((np.arange(len(true_unit)), true_unit, patient_index))
    ordered_patient = patient_index[order]
    patient_start = np.searchsorted(ordered_patient, np.arange(n_patients))
    slot = np.empty(len(true_unit), dtype=np.int64)
    slot[order] = np.arange(len(true_unit)) - patient_start[ordered_patient]
    ordered_unit = true_unit[order]

    # Shape of a patient: its true units renumbered 0, 1, ... Slots are sorted by unit, so
    # renumbering by rank is renumbering by first appearance.
    shapes: dict[tuple, int] = {}
    stratum = np.empty(n_patients, dtype=np.int64)
    bounds = np.r_[patient_start, len(order)]
    for patient in range(n_patients):
        _, renumbered = np.unique(ordered_unit[bounds[patient]:bounds[patient + 1]], return_inverse=True)
        stratum[patient] = shapes.setdefault(tuple(renumbered.reshape(-1).tolist()), len(shapes))

    rng = np.random.default_rng(seed)
    mapping = np.tile(np.arange(n_patients, dtype=np.int32), (n_permutations, 1))
    for members in (np.flatnonzero(stratum == s) for s in range(len(shapes))):
        if len(members) < 2:
            continue
        shuffled = rng.permuted(np.tile(np.arange(len(members)), (n_permutations, 1)), axis=1)
        mapping[:, members] = members[shuffled]
    return PatientPermutations(patient_index, slot, patient_start, ordered_unit, stratum, mapping)


# --------------------------------------------------------------------------------------------------
# Permutation test


@dataclass
class PermutationTest:
    """Result of :func:`permutation_test`.

    Attributes:
        recall: one dict per (pool, K): ``pool``, ``k``, ``chance``,
            ``observed``, ``null_mean``, ``null_q95`` and ``p_value``.
        mean_normalised_rank: ``observed``, ``null_mean``, ``null_q05`` and
            ``p_value`` (lower is more extreme).
        null_recall: ``[E, B]`` null Recall@K per entry of ``recall``.
        null_rank: ``[B]`` null mean normalised rank.
        facts: the scheme, B, seed, tie rule and stratum counts.
    """

    recall: list[dict]
    mean_normalised_rank: dict
    null_recall: np.ndarray
    null_rank: np.ndarray
    facts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the JSON-ready summary, without the null arrays."""
        return {**self.facts, "recall": self.recall, "mean_normalised_rank": self.mean_normalised_rank}


def _unit_score_blocks(queries: np.ndarray, candidates: np.ndarray, candidate_unit: np.ndarray | None,
                       block_size: int, device: str | torch.device, on_device: bool | None = None):
    """Yield ``(rows, scores)``: float32 ``[B, U]`` unit scores (max over members) per block of queries.

    Bitwise-identical candidate rows are scored once and copied, as in
    :func:`~linkrisk.audit.ranks.stream_counts`, so identical texts tie exactly.
    On a CPU the scores are a NumPy array; on another device they stay
    there as a torch tensor, for :func:`_counts_for_targets_on_device`
    (``on_device`` forces either form).
    """
    on_device = torch.device(device).type != "cpu" if on_device is None else on_device
    if candidate_unit is None:
        column_order, unit_starts = None, None
    else:
        column_order = np.argsort(candidate_unit, kind="stable")
        unit_starts = np.flatnonzero(np.r_[True, np.diff(candidate_unit[column_order]) != 0])
    ordered = candidates if column_order is None else candidates[column_order]
    first = first_identical_row(ordered)
    distinct = np.flatnonzero(first == np.arange(len(first)))
    expand = None
    if len(distinct) < len(ordered):
        position = np.empty(len(first), dtype=np.int64)
        position[distinct] = np.arange(len(distinct))
        expand = position[first]
    scored = torch.as_tensor(np.ascontiguousarray(ordered[distinct]), device=device)
    expand_t = None if expand is None else torch.as_tensor(expand, device=device)
    unit_t = None if unit_starts is None else torch.as_tensor(
        np.repeat(np.arange(len(unit_starts)), np.diff(np.r_[unit_starts, len(candidates)])), device=device)
    for start in range(0, len(queries), block_size):
        rows = np.arange(start, min(start + block_size, len(queries)))
        scores = torch.as_tensor(queries[rows], device=device) @ scored.T
        if on_device:
            if expand_t is not None:
                scores = scores[:, expand_t]
            if unit_t is not None:
                scores = torch.full((len(rows), len(unit_starts)), float("-inf"), device=device).scatter_reduce_(
                    1, unit_t.expand(len(rows), -1), scores, "amax")
            yield rows, scores
            continue
        scores = scores.numpy()
        if expand is not None:
            scores = scores[:, expand]
        if unit_starts is not None:
            scores = np.maximum.reduceat(scores, unit_starts, axis=1)
        yield rows, scores


def _counts_for_targets(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Count units above and tying with each target unit, row by row: ``[B_rows, T]`` each.

    ``targets`` is ``[B_rows, T]`` unit indices. Each row is sorted once,
    so a row costs ``O(U log U + T log U)``.
    """
    n_units = scores.shape[1]
    above = np.empty(targets.shape, dtype=np.int64)
    equal = np.empty(targets.shape, dtype=np.int64)
    for row in range(len(scores)):
        ordered = np.sort(scores[row])
        values = scores[row, targets[row]]
        right = np.searchsorted(ordered, values, side="right")
        above[row] = n_units - right
        equal[row] = right - np.searchsorted(ordered, values, side="left") - 1
    return above, equal


def _counts_for_targets_on_device(scores: torch.Tensor, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_counts_for_targets` for a torch ``[B_rows, U]`` block on its device: one sort per block."""
    n_units = scores.shape[1]
    ordered = torch.sort(scores, dim=1).values
    values = scores.gather(1, torch.as_tensor(targets, device=scores.device))
    right = torch.searchsorted(ordered, values, right=True)
    left = torch.searchsorted(ordered, values, right=False)
    return (n_units - right).cpu().numpy().astype(np.int64), (right - left - 1).cpu().numpy().astype(np.int64)


def permutation_test(queries: np.ndarray, candidates: np.ndarray, true_unit: np.ndarray,
                     query_patients: np.ndarray, *, pools: list[int | str] = ("full",), ks: list[int] = (1,),
                     n_permutations: int = 999, seed: int = 0, ties: str = "random",
                     candidate_unit: np.ndarray | None = None, block_size: int | None = None,
                     device: str | torch.device = "cpu") -> PermutationTest:
    """Test "no linkage" by permuting whole patients; the scheme is in the module docstring.

    Args:
        queries: ``[Q, D]`` float embeddings (L2-normalised for cosine scores).
        candidates: ``[M, D]`` float embeddings.
        true_unit: ``[Q]`` int, each query's true unit (a candidate row when
            ``candidate_unit`` is None).
        query_patients: ``[Q]`` patient of each query: the permutation blocks.
        pools: pool sizes ``N`` and/or ``"full"``; numeric pools not smaller
            than the number of units are left out, as in the audit.
        ks: cut-offs ``K``; pairs with ``K >= N`` are left out.
        n_permutations: ``B``, the number of permuted assignments.
        seed: seed of the permutations.
        ties: tie rule of Recall@K and of the rank (``random``: mid-rank).
        candidate_unit: ``[M]`` unit of each candidate, ids ``0..U-1``; a unit
            scores the maximum over its members.
        block_size: queries scored per matmul (default: about 128 MiB of scores).
        device: torch device of the matmul. On a GPU the rows are sorted and searched there too
            (``torch.sort``, ``torch.searchsorted``); on a CPU with NumPy, row by row.

    Statistics are means over queries: expected Recall@K over uniform pools
    (:func:`~linkrisk.audit.recall.expected_recall_at_k`) and the mean
    normalised rank ``(rank - 1) / (U - 1)`` (chance 0.5). Recall's p-value
    is ``(1 + #{null >= observed}) / (1 + B)``, the rank's
    ``(1 + #{null <= observed}) / (1 + B)``.

    Cost: one pass of ``Q x U`` scores in blocks, whatever U is: each
    query row is sorted once (``O(U log U)``), and then its permuted true
    unit is looked up by binary search in every permutation
    (``O(B log U)``). Memory: one block of scores, ``[block, B + 1]`` counts
    and the ``[B, G]`` patient mapping.
    """
    _check_ties(ties)
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    true_unit = np.asarray(true_unit)
    if true_unit.size and not np.issubdtype(true_unit.dtype, np.integer):
        raise InputError(f"true units must be integers, got dtype {true_unit.dtype}")
    true_unit = true_unit.astype(np.int64)
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise InputError(f"embeddings must be 2-D arrays of equal width, got queries {queries.shape} and "
                         f"candidates {candidates.shape}")
    if len(queries) == 0 or len(true_unit) != len(queries):
        raise InputError(f"{len(queries)} queries but {len(true_unit)} true units; give at least one query and "
                         "one true unit per query")
    for name, array in (("query", queries), ("candidate", candidates)):
        if not np.isfinite(array).all():
            raise InputError(f"{name} embeddings contain NaN or inf; remove or repair those rows")
    if candidate_unit is None:
        n_units = len(candidates)
    else:
        candidate_unit = np.asarray(candidate_unit, dtype=np.int64)
        n_units = int(candidate_unit.max()) + 1
        if candidate_unit.shape != (len(candidates),) or len(np.unique(candidate_unit)) != n_units:
            raise InputError(f"candidate units must give one id per candidate covering 0..{n_units - 1}")
    if true_unit.min() < 0 or true_unit.max() >= n_units:
        raise InputError(f"true units must lie in [0, {n_units}), got {true_unit.min()}..{true_unit.max()}")
    if n_units < 2:
        raise InputError("a permutation test needs at least 2 candidate units")

    resolved = [(label, size, int(k)) for label, size in resolve_pools(list(pools), n_units) for k in ks
                if int(k) < size]
    if not resolved:
        raise ConfigError(f"no pool size N and cut-off K with K < N among pools {list(pools)} and K {list(ks)} "
                          f"for {n_units} units")
    permutations = patient_permutations(true_unit, query_patients, n_permutations, seed)
    if block_size is None:
        block_size = max(1, DEFAULT_BLOCK_BYTES // (8 * (len(candidates) + n_units) + 16 * (n_permutations + 1)))

    # Column 0 is the observed assignment, columns 1..B the permutations.
    recall_sums = np.zeros((len(resolved), n_permutations + 1))
    rank_sums = np.zeros(n_permutations + 1)
    for rows, scores in _unit_score_blocks(queries, candidates, candidate_unit, block_size, device):
        targets = np.concatenate([true_unit[rows][:, None], permutations.true_units(rows).T], axis=1)
        count = _counts_for_targets if isinstance(scores, np.ndarray) else _counts_for_targets_on_device
        above, equal = count(scores, targets)
        flat_above, flat_equal = above.ravel(), equal.ravel()
        for entry, (_, size, k) in enumerate(resolved):
            values = expected_recall_at_k(flat_above, flat_equal, n_units, size, k, ties).reshape(above.shape)
            recall_sums[entry] += values.sum(axis=0)
        rank_sums += normalised_rank(flat_above, flat_equal, n_units, ties).reshape(above.shape).sum(axis=0)

    n_queries = len(queries)
    recall_means, rank_means = recall_sums / n_queries, rank_sums / n_queries
    recall = []
    for entry, (label, size, k) in enumerate(resolved):
        observed, null = recall_means[entry, 0], recall_means[entry, 1:]
        extreme = null >= observed - _EXTREME_TOLERANCE * max(1.0, abs(observed))
        recall.append({"pool": label, "k": k, "chance": k / size, "observed": float(observed),
                       "null_mean": float(null.mean()), "null_q95": float(np.percentile(null, 95)),
                       "p_value": float((1 + extreme.sum()) / (1 + n_permutations))})
    observed_rank, null_rank = rank_means[0], rank_means[1:]
    rank_extreme = null_rank <= observed_rank + _EXTREME_TOLERANCE * max(1.0, abs(observed_rank))
    rank = {"observed": float(observed_rank), "chance": 0.5, "null_mean": float(null_rank.mean()),
            "null_q05": float(np.percentile(null_rank, 5)),
            "p_value": float((1 + rank_extreme.sum()) / (1 + n_permutations))}

    stratum_sizes = np.bincount(permutations.stratum)
    facts = {"scheme": "patient_block_permutation", "n_permutations": int(n_permutations), "seed": int(seed),
             "tie_rule": ties, "n_queries": int(n_queries), "n_candidates": int(n_units),
             "n_patients": int(len(permutations.stratum)), "n_strata": int(len(stratum_sizes)),
             "n_patients_fixed": int((stratum_sizes == 1).sum())}
    return PermutationTest(recall, rank, recall_means[:, 1:], null_rank, facts)


# --------------------------------------------------------------------------------------------------
# One-sided upper bounds


def bootstrap_upper_bound(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> np.ndarray:
    """One-sided percentile upper bound of the mean, resampling whole groups (patients).

    Args:
        values: ``[F, Q]`` (or ``[Q]``) per-query values.
        groups: ``[Q]`` patient of each query.
        level: confidence level of the one-sided bound.

    Returns:
        ``[F]`` (or a 0-d array): the ``level`` quantile of the resampled
        means (linear interpolation, as :func:`numpy.percentile`).
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the confidence level must lie strictly between 0 and 1, got {level}")
    return np.percentile(bootstrap_means(values, groups, n_boot, seed), 100.0 * level, axis=-1)


def studentized_upper_bound(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95) -> float | np.ndarray:
    """One-sided studentized (bootstrap-t) upper bound of the mean of ``values``, resampling patients.

    The mean is a ratio of patient sums to patient sizes. Its standard
    error is the linearised (delta-method) cluster estimate
    ``sqrt(G / (G - 1) * sum_g (S_g - mean * n_g)^2) / sum_g n_g``, on the
    sample and on every resample. With ``t_b = (mean_b - mean) / se_b`` the
    bound is ``mean - quantile(t, 1 - level) * se``. A resample with
    ``se_b = 0`` gets ``t_b = 0`` when its mean equals the sample's and
    ``-inf`` or ``+inf`` otherwise. Returns the mean itself when ``se = 0``.

    Args:
        values: ``[Q]`` per-query values, or ``[F, Q]`` for ``F`` figures
            bounded from the same patient resamples in one pass.
        groups: ``[Q]`` patient of each query.

    Returns:
        A float for ``[Q]`` values, else ``[F]`` float64.
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the confidence level must lie strictly between 0 and 1, got {level}")
    if n_boot < 1:
        raise ConfigError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    single = values.ndim == 1
    values = np.atleast_2d(values)
    if values.ndim != 2 or len(groups) != values.shape[1] or values.shape[1] == 0:
        raise InputError(f"need one group label per value and at least one value, got {values.shape} values and "
                         f"{groups.shape} groups")
    _, group_index = np.unique(groups, return_inverse=True)
    group_index = group_index.reshape(-1)
    n_groups = int(group_index.max()) + 1
    sums = np.stack([np.bincount(group_index, weights=row, minlength=n_groups) for row in values], axis=1)  # [G, F]
    sizes = np.bincount(group_index, minlength=n_groups).astype(np.float64)
    if n_groups < 2:
        means = values.mean(axis=1)
        return float(means[0]) if single else means

    def mean_and_se(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, G]`` patient multiplicities -> means and standard errors ``[B, F]``."""
        total = (times @ sizes)[:, None]
        mean = (times @ sums) / total
        squares = times @ sums**2 - 2 * mean * (times @ (sums * sizes[:, None])) + mean**2 * (times @ sizes**2)[:, None]
        return mean, np.sqrt(np.maximum(squares, 0.0) * n_groups / (n_groups - 1)) / total

    mean, se = (v[0] for v in mean_and_se(np.ones((1, n_groups))))
    rng = np.random.default_rng(seed)
    t_values = np.empty((n_boot, values.shape[0]))
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        drawn = rng.integers(0, n_groups, size=(size, n_groups))
        offsets = np.arange(size)[:, None] * n_groups
        times = np.bincount((drawn + offsets).ravel(), minlength=size * n_groups).reshape(size, n_groups)
        boot_mean, boot_se = mean_and_se(times.astype(np.float64))
        difference = boot_mean - mean
        with np.errstate(divide="ignore", invalid="ignore"):
            t_chunk = difference / boot_se
        degenerate = boot_se == 0.0
        t_chunk[degenerate] = np.where(difference[degenerate] == 0.0, 0.0, np.copysign(np.inf, difference[degenerate]))
        t_values[start:start + size] = t_chunk
    with np.errstate(invalid="ignore"):  # an infinite quantile times se = 0; such figures return the mean below
        bounds = mean - np.quantile(t_values, 1.0 - level, method="lower", axis=0) * se
    bounds = np.where(se == 0.0, mean, bounds)
    return float(bounds[0]) if single else bounds


def clopper_pearson_upper(hits: int, n: int, level: float = 0.95) -> float:
    """Exact one-sided Clopper–Pearson upper bound of a binomial proportion: ``Beta(level; x + 1, n - x)``.

    Returns 1.0 when every trial is a hit. With no hits it is
    ``1 - (1 - level) ** (1 / n)``, about ``3 / n`` at 95%.
    """
    if n < 1 or not 0 <= hits <= n:
        raise InputError(f"need 0 <= hits <= n with n >= 1, got hits={hits}, n={n}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"the confidence level must lie strictly between 0 and 1, got {level}")
    if hits == n:
        return 1.0
    return float(beta.ppf(level, hits + 1, n - hits))


def recall_upper_bounds(above: np.ndarray, equal: np.ndarray, n_candidates: int, patient_ids: np.ndarray,
                        pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                        n_boot: int = 1000, seed: int = 0, ties: str = "random", level: float = 0.95) -> list[dict]:
    """One-sided upper confidence bounds on Recall@K and lift per pool; the rule is in the module docstring.

    Args:
        above, equal: ``[Q]`` rank counts (:func:`~linkrisk.audit.ranks.rank_counts`).
        n_candidates: ``M``, candidate units including the true one.
        patient_ids: ``[Q]`` bootstrap clusters.
        pools, ks: as in :func:`~linkrisk.audit.recall.audit_counts`.
        ties: tie rule of the values.
        level: one-sided confidence level.

    Returns:
        One dict per (pool, K): ``value``, ``chance``, ``lift``,
        ``upper_percentile``, ``upper_studentized``, ``upper_clopper_pearson``
        (None unless pool is ``full``, K is 1 and every query's value is 0
        or 1), ``upper`` (reported: the largest of them), ``lift_upper`` and
        ``upper_method`` (the name of the bound reported).
    """
    _check_ties(ties)
    above = np.asarray(above, dtype=np.int64)
    equal = np.asarray(equal, dtype=np.int64)
    if len(above) == 0:
        raise InputError("no queries, so no upper bound can be computed")
    entries, per_query = [], []
    for label, size in resolve_pools(list(pools), n_candidates):
        for k in ks:
            if k >= size:
                continue
            entries.append((label, size, int(k)))
            per_query.append(expected_recall_at_k(above, equal, n_candidates, size, k, ties))
    if not entries:
        raise ConfigError(f"no pool size N and cut-off K with K < N among pools {list(pools)} and K {list(ks)}")
    percentile = np.atleast_1d(bootstrap_upper_bound(np.stack(per_query), patient_ids, n_boot, seed, level))
    studentized = studentized_upper_bound(np.stack(per_query), patient_ids, n_boot, seed, level)

    results = []
    for (label, size, k), values, percentile_upper, studentized_upper in zip(entries, per_query, percentile,
                                                                            studentized):
        chance = k / size
        bounds = {"percentile": float(percentile_upper), "studentized": float(studentized_upper)}
        exact = None
        if label == "full" and k == 1 and np.isin(values, (0.0, 1.0)).all():
            exact = clopper_pearson_upper(int(values.sum()), len(values), level)
            bounds["clopper_pearson"] = exact
        method = max(bounds, key=bounds.get)
        upper = bounds[method]
        value = float(values.mean())
        results.append({"pool": label, "k": k, "level": level, "value": value, "chance": chance,
                        "lift": value / chance, "upper_percentile": bounds["percentile"],
                        "upper_studentized": bounds["studentized"], "upper_clopper_pearson": exact,
                        "upper": upper, "lift_upper": upper / chance, "upper_method": method})
    return results


# --------------------------------------------------------------------------------------------------
# Power


def _check_power_inputs(lift: float, pool_size: int, k: int, alpha: float, power: float) -> tuple[float, float]:
    if not 1 <= k < pool_size:
        raise ConfigError(f"need 1 <= K < N, got K={k}, N={pool_size}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ConfigError(f"alpha and power must lie strictly between 0 and 1, got alpha={alpha}, power={power}")
    chance = k / pool_size
    recall = lift * chance
    if lift <= 1.0 or recall > 1.0:
        raise ConfigError(f"lift must be above 1 and at most N / K = {pool_size / k:g}, got {lift}")
    return chance, recall


def binomial_power(n_queries: np.ndarray | int, chance: float, recall: float, alpha: float = 0.05) -> np.ndarray:
    """Power of the exact one-sided binomial test of ``p = chance`` against ``p = recall > chance``.

    The test rejects when the hits reach ``c``, the smallest count with
    ``P(X >= c | chance) <= alpha``. Returns the power per ``n`` (float64,
    the shape of ``n_queries``).
    """
    n = np.asarray(n_queries, dtype=np.int64)
    # binom.isf gives the smallest x with P(X > x) <= alpha; step up where rounding left it one short.
    critical = np.asarray(binom.isf(alpha, n, chance), dtype=np.float64) + 1
    too_low = binom.sf(critical - 1, n, chance) > alpha
    critical = np.where(too_low, critical + 1, critical)
    return binom.sf(critical - 1, n, recall)


def required_queries(lift: float, pool_size: int, k: int = 1, alpha: float = 0.05, power: float = 0.8,
                     method: str = "exact", max_queries: int = 10**7) -> int:
    """Number of independent queries needed to detect Recall@K = lift * K / N at pool N.

    One-sided test of ``Recall@K > K / N`` at level ``alpha``, under the
    Bernoulli model in the module docstring.

    - ``normal``: ``n = ((z_{1-alpha} sqrt(p0 q0) + z_{power} sqrt(p1 q1)) / (p1 - p0))^2``,
      rounded up.
    - ``exact``: the smallest ``n`` whose exact binomial test
      (:func:`binomial_power`) reaches ``power``. Exact power is a sawtooth
      in ``n``, so a few larger ``n`` can fall just below ``power`` again.

    Raises:
        ConfigError: on invalid inputs, or when no ``n <= max_queries`` reaches ``power``.
    """
    if method not in POWER_METHODS:
        raise ConfigError(f"unknown power method {method!r}; valid methods: {', '.join(POWER_METHODS)}")
    chance, recall = _check_power_inputs(lift, pool_size, k, alpha, power)
    spread = norm.ppf(1 - alpha) * math.sqrt(chance * (1 - chance)) + norm.ppf(power) * math.sqrt(recall * (1 - recall))
    normal = max(1, math.ceil((spread / (recall - chance)) ** 2))
    if method == "normal":
        return normal

    chunk = 4096
    for start in range(1, max_queries + 1, chunk):
        sizes = np.arange(start, min(start + chunk, max_queries + 1))
        reached = np.flatnonzero(binomial_power(sizes, chance, recall, alpha) >= power)
        if len(reached):
            return int(sizes[reached[0]])
    raise ConfigError(f"no number of queries up to {max_queries} reaches power {power} for lift {lift} at "
                      f"N={pool_size}, K={k}; raise max_queries or the lift")


# Lifts over chance whose detection power every audit with random negatives reports.
POWER_LIFTS = (2.0, 5.0)


def power_table(n_queries: int, n_patients: int, pool_sizes: list[tuple[int | str, int]],
                lifts: tuple[float, ...] = POWER_LIFTS, k: int = 1, alpha: float = 0.05,
                power: float = 0.8) -> list[dict]:
    """Power of an audit's query count to detect a lift over chance, and the queries needed for ``power``.

    Under the Bernoulli model of the module docstring, per pool ``N`` and
    lift: ``power_at_queries`` treats all ``n_queries`` as independent and
    ``power_at_patients`` counts one query per patient, the safer reading
    when patients have several images. ``required_queries`` is the exact
    binomial count for ``power`` (:func:`required_queries`; None when no
    count up to ten million reaches it). Pairs whose lift exceeds ``N / K``
    are left out.

    Args:
        pool_sizes: ``(label, N)`` pairs, for example from
            :func:`~linkrisk.audit.recall.resolve_pools`.
    """
    entries = []
    for label, size in pool_sizes:
        if k >= size:
            continue
        chance = k / size
        for lift in lifts:
            if lift * chance > 1.0:
                continue
            recall = lift * chance
            entries.append({
                "pool": label, "k": int(k), "lift": float(lift), "alpha": float(alpha), "chance": chance,
                "n_queries": int(n_queries), "n_patients": int(n_patients),
                "power_at_queries": float(binomial_power(n_queries, chance, recall, alpha)),
                "power_at_patients": float(binomial_power(n_patients, chance, recall, alpha)),
                "target_power": float(power),
                "required_queries": _required_or_none(lift, size, k, alpha, power),
            })
    return entries


def _required_or_none(lift: float, size: int, k: int, alpha: float, power: float) -> int | None:
    """Return :func:`required_queries`, or None when no count up to its search limit reaches ``power``."""
    try:
        return required_queries(lift, size, k, alpha, power)
    except ConfigError:
        return None
