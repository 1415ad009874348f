"""Per-query counts of candidates scoring above and equal to the true one.

Every pool metric derives from two counts per query ``q``:

- ``above[q]``: candidates scoring strictly above the true candidate,
- ``equal[q]``: *other* candidates with exactly the same score.

Candidates can be grouped into *units* (a patient's reports, a study's
images, identical report texts). A unit scores the maximum of its
members' scores, and counts are then over units: "does any report of
this patient outrank every other patient's reports?".

Candidates with bitwise-identical embedding rows (duplicate report
texts) are scored once and copied, so they tie exactly whatever the
matmul kernel does. Scores are float32 and computed over blocks of
queries; the ``[Q, M]`` score matrix is never held.

With unit labels (:func:`~linkrisk.audit.negatives.label_bitmasks`), the
same pass also counts, per query, the units at each *label distance*
from the true unit: the number of observations known in the true unit's
vector on which the other unit differs. Distance 0 is the
pathology-matched group; larger distances feed the nearest-label
fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from linkrisk.errors import InputError

# Default working memory for one block of scores and its comparison masks.
DEFAULT_BLOCK_BYTES = 128 * 2**20


@dataclass
class RankCounts:
    """Counts from one streaming pass.

    Attributes:
        above, equal: int64 ``[Q]`` over all other units.
        n_candidates: units in the population ``M`` (the true one included).
        ring_above, ring_equal, ring_size: int64 ``[Q, R]`` or None. Column
            ``d`` counts units at label distance ``d`` from the true unit:
            scoring above it, tying with it (the true unit excluded), and
            in total (the true unit included at ``d = 0``).
    """

    above: np.ndarray
    equal: np.ndarray
    n_candidates: int
    ring_above: np.ndarray | None = None
    ring_equal: np.ndarray | None = None
    ring_size: np.ndarray | None = None


def _check(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, n_targets: int | None = None) -> None:
    if queries.ndim != 2 or candidates.ndim != 2:
        raise InputError(f"embeddings must be 2-D, got queries {queries.shape} and candidates {candidates.shape}")
    if queries.shape[1] != candidates.shape[1]:
        raise InputError(
            f"query and candidate embeddings differ in dimension ({queries.shape[1]} vs {candidates.shape[1]})"
        )
    if len(true_index) != len(queries):
        raise InputError(f"{len(queries)} queries but {len(true_index)} true indices")
    n_targets = len(candidates) if n_targets is None else n_targets
    if len(true_index) and (true_index.min() < 0 or true_index.max() >= n_targets):
        raise InputError(f"true indices must lie in [0, {n_targets}), got {true_index.min()}..{true_index.max()}")
    for name, array in (("query", queries), ("candidate", candidates)):
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise InputError(f"{bad.sum()} {name} embedding rows contain NaN or inf (first row {np.flatnonzero(bad)[0]})")


def _as_index(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"{what} must be integers, got dtype {values.dtype}")
    return values.astype(np.int64)


def first_identical_row(rows: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Index of the first row bitwise identical to each row of ``rows`` ``[M, D]``: ``[M]`` int64.

    Rows are hashed (a wrapping int64 dot product of their bits with random
    weights), and rows sharing a hash are compared exactly, so memory stays
    at a few bytes per row.
    """
    rows = np.ascontiguousarray(rows)
    bits = rows.view(np.int32) if rows.dtype.itemsize == 4 else rows.view(np.int64)
    weights = np.random.default_rng(0).integers(-2**62, 2**62, size=bits.shape[1], dtype=np.int64)
    hashes = np.empty(len(rows), dtype=np.int64)
    with np.errstate(over="ignore"):
        for start in range(0, len(rows), chunk):
            hashes[start:start + chunk] = bits[start:start + chunk].astype(np.int64) @ weights
    first = np.arange(len(rows), dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    boundaries = np.flatnonzero(np.diff(hashes[order]) != 0) + 1
    for members in np.split(order, boundaries):
        if len(members) < 2:
            continue
        remaining = list(members)
        while remaining:
            head, rest = remaining[0], np.array(remaining[1:], dtype=np.int64)
            same = (rows[rest] == rows[head]).all(axis=1) if len(rest) else np.zeros(0, bool)
            first[rest[same]] = head
            remaining = list(rest[~same])
    return first


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of non-negative int64 values, elementwise."""
    as_bytes = np.ascontiguousarray(values, dtype=np.int64).view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(-1).astype(np.int64)


@dataclass
class _Layout:
    """Candidates sorted by unit (units become contiguous column ranges), deduplicated, and unit label groups."""

    scored: torch.Tensor            # distinct candidate rows to score, [Mu, D]
    expand: np.ndarray | None       # [M] row of ``scored`` for each sorted candidate; None without duplicates
    unit_starts: np.ndarray | None  # [U] first sorted column of each unit; None when units are single candidates
    unit_group: np.ndarray          # [U] label group of each unit
    group_order: np.ndarray         # [U] units sorted by group
    group_starts: np.ndarray        # [G] first position of each group in ``group_order``
    group_members: list             # G arrays (or slices) of the units in each group
    distance: np.ndarray | None     # [G, G] label distance from the row group to the column group; -1: no match


def _label_groups(n_units: int, positive: np.ndarray | None, negative: np.ndarray | None,
                  labelled: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Group units by label state: ``(unit_group [U], distance [G, G])``."""
    if positive is None:
        return np.zeros(n_units, dtype=np.int64), None
    keys = np.stack([positive, negative], axis=1)
    if labelled is not None:
        keys[~labelled] = -1  # one group that matches nothing, itself included
    group_keys, unit_group = np.unique(keys, axis=0, return_inverse=True)
    known = group_keys[:, 0] | group_keys[:, 1]
    distance = (_popcount(known)[:, None] - _popcount(group_keys[:, None, 0] & group_keys[None, :, 0])
                - _popcount(group_keys[:, None, 1] & group_keys[None, :, 1]))
    unknown = (group_keys == -1).all(axis=1)
    distance[unknown, :] = -1
    distance[:, unknown] = -1
    return unit_group.reshape(-1).astype(np.int64), distance


def _layout(candidates: np.ndarray, candidate_unit: np.ndarray, n_units: int, positive: np.ndarray | None,
            negative: np.ndarray | None, labelled: np.ndarray | None, device: str | torch.device) -> _Layout:
    unit_group, distance = _label_groups(n_units, positive, negative, labelled)
    group_order = np.argsort(unit_group, kind="stable")
    group_starts = np.flatnonzero(np.r_[True, np.diff(unit_group[group_order]) != 0])
    group_members = []
    for members in np.split(group_order, group_starts[1:]):
        contiguous = len(members) and members[-1] - members[0] + 1 == len(members)
        group_members.append(slice(int(members[0]), int(members[-1]) + 1) if contiguous else members)

    # Candidates are copied only when units of several rows are not already contiguous.
    single = len(candidates) == n_units
    column_order = np.argsort(candidate_unit, kind="stable")
    identity = bool((column_order == np.arange(len(column_order))).all())
    sorted_candidates = candidates if identity else candidates[column_order]
    unit_starts = None if single else np.flatnonzero(np.r_[True, np.diff(candidate_unit[column_order]) != 0])

    first = first_identical_row(sorted_candidates)
    distinct = np.flatnonzero(first == np.arange(len(first)))
    expand = None
    scored = sorted_candidates
    if len(distinct) < len(sorted_candidates):
        scored = sorted_candidates[distinct]
        position = np.empty(len(first), dtype=np.int64)
        position[distinct] = np.arange(len(distinct))
        expand = position[first]
    return _Layout(torch.as_tensor(np.ascontiguousarray(scored), device=device), expand, unit_starts, unit_group,
                   group_order, group_starts, group_members, distance)


def _count_true(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        return mask.view(np.int8).sum(1, dtype=np.int64)
    return mask.sum(1).cpu().numpy()


def _submatrix(mask: np.ndarray | torch.Tensor, rows: np.ndarray, columns: np.ndarray | slice):
    if isinstance(columns, slice):
        return mask[rows, columns]
    if isinstance(mask, np.ndarray):
        return mask[np.ix_(rows, columns)]
    return mask[torch.as_tensor(rows, device=mask.device)][:, torch.as_tensor(columns, device=mask.device)]


def _group_counts(mask: np.ndarray | torch.Tensor, layout: _Layout, unit_group: torch.Tensor | None) -> np.ndarray:
    """Sum a ``[B, U]`` mask over the units of each label group: ``[B, G]``."""
    if isinstance(mask, np.ndarray):
        return np.add.reduceat(mask[:, layout.group_order].view(np.int8), layout.group_starts, axis=1, dtype=np.int64)
    out = torch.zeros(mask.shape[0], len(layout.group_starts), dtype=torch.int64, device=mask.device)
    out.scatter_add_(1, unit_group.expand(mask.shape[0], -1), mask.to(torch.int64))
    return out.cpu().numpy()


def stream_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, *,
                  candidate_unit: np.ndarray | None = None, unit_positive: np.ndarray | None = None,
                  unit_negative: np.ndarray | None = None, unit_labelled: np.ndarray | None = None,
                  rings: bool = False, block_size: int | None = None,
                  device: str | torch.device = "cpu", backend: str = "auto") -> RankCounts:
    """Count units scoring above and tying with each query's true unit, in one pass over score blocks.

    Args:
        queries: ``[Q, D]`` float embeddings (L2-normalised for cosine scores).
        candidates: ``[M, D]`` float embeddings.
        true_index: ``[Q]`` int, each query's true unit (a candidate row when
            ``candidate_unit`` is None).
        candidate_unit: ``[M]`` int unit of each candidate, ids ``0..U-1``
            all present. A unit scores the maximum over its members.
        unit_positive, unit_negative: ``[U]`` int64 label bitmasks per unit
            (:func:`~linkrisk.audit.negatives.label_bitmasks`); with them the
            counts are also split by label distance (``ring_*``).
        unit_labelled: ``[U]`` bool; units marked False match no query
            (their queries get empty rings). Default: every unit labelled.
        rings: count every label distance (for the nearest-label fallback);
            otherwise only distance 0, the pathology-matched group.
        block_size: queries scored per matmul. Default: as many as fit in
            128 MiB of scores and masks.
        device: torch device for the matmul (and the counting off CPU).
        backend: ``auto`` (NumPy on CPU, torch elsewhere) or ``torch``.

    Returns:
        :class:`RankCounts`.
    """
    true_index = _as_index(true_index, "true indices")
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    if candidate_unit is None:
        unit = np.arange(len(candidates), dtype=np.int64)
    else:
        unit = _as_index(candidate_unit, "candidate units")
        if unit.shape != (len(candidates),):
            raise InputError(f"{len(candidates)} candidates but {unit.shape[0] if unit.ndim else 0} unit ids")
    n_units = int(unit.max()) + 1 if len(unit) else 0
    if len(unit) and (unit.min() < 0 or len(np.unique(unit)) != n_units):
        raise InputError(f"candidate unit ids must cover 0..{n_units - 1} without gaps")
    _check(queries, candidates, true_index, n_units)
    labelled = unit_positive is not None
    if labelled and (len(unit_positive) != n_units or len(unit_negative) != n_units):
        raise InputError(f"{n_units} candidate units but {len(unit_positive)}/{len(unit_negative)} label rows")

    layout = _layout(candidates, unit, n_units, np.asarray(unit_positive, np.int64) if labelled else None,
                     np.asarray(unit_negative, np.int64) if labelled else None,
                     None if unit_labelled is None else np.asarray(unit_labelled, dtype=bool), device)
    true_unit = true_index
    true_group = layout.unit_group[true_unit]
    use_numpy = backend == "auto" and torch.device(device).type == "cpu"
    # Sorting queries by true group keeps each block's matched columns to a few groups.
    query_order = np.argsort(true_group, kind="stable") if labelled else np.arange(len(queries))
    # Pathology-matched counts without rings: when no group matches another, distance 0 is one group.
    whole_groups = labelled and not rings and bool(
        (layout.distance != 0)[~np.eye(len(layout.group_starts), dtype=bool)].all())
    self_match = layout.distance.diagonal() == 0 if labelled else None
    n_rings = 0
    if labelled:
        n_rings = int(layout.distance.max()) + 1 if rings else 1

    if block_size is None:
        row_bytes = 4 * (len(layout.scored) + len(candidates) + n_units) + 2 * n_units
        block_size = max(1, DEFAULT_BLOCK_BYTES // row_bytes)
    torch_unit = None if layout.unit_starts is None else torch.as_tensor(
        np.repeat(np.arange(n_units), np.diff(np.r_[layout.unit_starts, len(candidates)])), device=device)
    torch_group = torch.as_tensor(layout.unit_group, device=device).view(1, -1) if labelled else None
    expand_t = None if layout.expand is None else torch.as_tensor(layout.expand, device=device)

    above = np.empty(len(queries), dtype=np.int64)
    equal = np.empty(len(queries), dtype=np.int64)
    ring_above = np.zeros((len(queries), n_rings), dtype=np.int64)
    ring_equal = np.zeros((len(queries), n_rings), dtype=np.int64)
    for start in range(0, len(queries), block_size):
        rows = query_order[start:start + block_size]
        scores = torch.as_tensor(queries[rows], device=device) @ layout.scored.T
        if use_numpy:
            scores = scores.numpy()
            if layout.expand is not None:
                scores = scores[:, layout.expand]
            if layout.unit_starts is not None:
                scores = np.maximum.reduceat(scores, layout.unit_starts, axis=1)
            true = scores[np.arange(len(rows)), true_unit[rows]][:, None]
            higher, tied = np.greater(scores, true), np.equal(scores, true)
        else:
            if expand_t is not None:
                scores = scores[:, expand_t]
            if torch_unit is not None:
                scores = torch.full((len(rows), n_units), float("-inf"), device=device).scatter_reduce_(
                    1, torch_unit.expand(len(rows), -1), scores, "amax")
            true = scores.gather(1, torch.as_tensor(true_unit[rows], device=device).view(-1, 1))
            higher, tied = scores > true, scores == true
        above[rows] = _count_true(higher)
        equal[rows] = _count_true(tied) - 1
        if not labelled:
            continue
        if whole_groups:
            for group in np.unique(true_group[rows]):
                if not self_match[group]:
                    continue
                inside = np.flatnonzero(true_group[rows] == group)
                members = layout.group_members[group]
                ring_above[rows[inside], 0] = _count_true(_submatrix(higher, inside, members))
                ring_equal[rows[inside], 0] = _count_true(_submatrix(tied, inside, members)) - 1
            continue
        by_group_above = _group_counts(higher, layout, torch_group)
        by_group_equal = _group_counts(tied, layout, torch_group)
        distance = layout.distance[true_group[rows]]
        for ring in range(n_rings):
            at_ring = distance == ring
            ring_above[rows, ring] = (by_group_above * at_ring).sum(1)
            ring_equal[rows, ring] = (by_group_equal * at_ring).sum(1)
        ring_equal[rows, 0] -= self_match[true_group[rows]]

    if not labelled:
        return RankCounts(above, equal, n_units)
    group_sizes = np.bincount(layout.unit_group, minlength=len(layout.group_starts))
    ring_size = np.zeros((len(queries), n_rings), dtype=np.int64)
    for ring in range(n_rings):
        ring_size[:, ring] = ((layout.distance[true_group] == ring) * group_sizes[None, :]).sum(1)
    return RankCounts(above, equal, n_units, ring_above, ring_equal, ring_size)


def rank_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                block_size: int | None = None, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Count candidates scoring above and equal to each query's true candidate.

    Args:
        queries: ``[Q, D]`` float embeddings (L2-normalised for cosine scores).
        candidates: ``[M, D]`` float embeddings.
        true_index: ``[Q]`` int, row of each query's true candidate.
        block_size: queries scored per matmul (default: from a 128 MiB budget).
        device: torch device for the matmul.

    Returns:
        ``(above, equal)``: int64 arrays ``[Q]``; ``equal`` excludes the true candidate itself.
    """
    counts = stream_counts(queries, candidates, true_index, block_size=block_size, device=device)
    return counts.above, counts.equal
