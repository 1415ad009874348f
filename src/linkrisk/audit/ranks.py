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

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from linkrisk._logging import logger
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
        rescored: query-unit pairs re-scored in float64 (reduced precision only).
    """

    above: np.ndarray
    equal: np.ndarray
    n_candidates: int
    ring_above: np.ndarray | None = None
    ring_equal: np.ndarray | None = None
    ring_size: np.ndarray | None = None
    rescored: int = 0


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

    scored: np.ndarray              # distinct candidate rows to score, [Mu, D]
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
            negative: np.ndarray | None, labelled: np.ndarray | None) -> _Layout:
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
    return _Layout(np.ascontiguousarray(scored), expand, unit_starts, unit_group,
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


PRECISIONS = ("fp32", "bf16", "fp16")

# Unit roundoff and subnormal spacing of the reduced-precision formats (IEEE 754; bfloat16 keeps fp32's exponents).
_UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
_SUBNORMAL_SPACING = {"bf16": 2.0 ** -133, "fp16": 2.0 ** -24}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Share of free accelerator memory one block may use when the block size is chosen automatically.
DEVICE_MEMORY_SHARE = 0.5


def score_error_bound(query_norm: np.ndarray, candidate_norm: float, dim: int, precision: str) -> np.ndarray:
    """Bound the error of a reduced-precision cosine score against its exact value.

    The score ``q·c`` is computed from ``q`` and ``c`` rounded to ``precision``,
    accumulated in float32 and rounded to ``precision`` again. Let ``u`` be
    the unit roundoff and ``s`` half the subnormal spacing. Each rounded
    vector is off by ``δx ≤ u‖x‖ + √D·s``. The product is then off by at
    most ``(‖q‖+δq)δc + δq‖c‖``, the float32 sum by
    ``γ_D (‖q‖+δq)(‖c‖+δc)`` with ``γ_D = D·2⁻²⁴ / (1 − D·2⁻²⁴)`` (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1), and
    the output rounding by ``u`` times the result. A float64 term (``D·2⁻⁵³``) is added so that decisions
    also agree with the float64 re-scores.

    Args:
        query_norm: ``[B]`` L2 norms of the queries.
        candidate_norm: the largest L2 norm among the candidates.
        dim: embedding dimension ``D``.
        precision: ``bf16`` or ``fp16``.

    Returns:
        ``[B]`` float64: bound on ``|score − q·c|`` for any candidate of each query.
    """
    u, s = _UNIT_ROUNDOFF[precision], _SUBNORMAL_SPACING[precision] / 2
    q = np.asarray(query_norm, dtype=np.float64)
    dq = u * q + np.sqrt(dim) * s
    dc = u * candidate_norm + np.sqrt(dim) * s
    gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    product = (q + dq) * dc + dq * candidate_norm
    summed = gamma * (q + dq) * (candidate_norm + dc)
    computed = (q + dq) * (candidate_norm + dc) * (1 + gamma)
    return product + summed + u * computed + s + dim * 2.0 ** -53 * q * candidate_norm


def auto_block_size(n_scored: int, n_candidates: int, n_units: int, *, device: str | torch.device = "cpu",
                    precision: str = "fp32", labelled: bool = False) -> int:
    """Choose how many queries one block scores: from 128 MiB on CPU, from free device memory elsewhere.

    On a CUDA device the budget is :data:`DEVICE_MEMORY_SHARE` of the memory
    :func:`torch.cuda.mem_get_info` reports free. Bytes per query row count
    the float32 scores (and their reduced-precision copy), the duplicate and
    unit expansions, comparison masks and, with labels, the int64 group sums.
    """
    device = torch.device(device)
    budget = DEFAULT_BLOCK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * DEVICE_MEMORY_SHARE)
    row_bytes = 4 * (n_scored + n_candidates + n_units) + 2 * n_units
    if precision != "fp32":
        row_bytes += 2 * n_scored + 4 * n_units + 2 * n_units  # reduced scores, differences, ambiguity masks
    if labelled:
        row_bytes += 8 * n_units
    return max(1, budget // row_bytes)


@dataclass
class BlockCounts:
    """Counts for one block of queries (rows of the query matrix), as returned to the engine."""

    rows: np.ndarray
    above: np.ndarray
    equal: np.ndarray
    ring_above: np.ndarray | None = None
    ring_equal: np.ndarray | None = None
    rescored: int = 0


@dataclass
class CountPlan:
    """Inputs of every block of one pass, prepared once: queries, the candidate layout and the block order.

    A plan contains NumPy arrays only, so it pickles cheaply, and the Ray
    engine puts it in the object store once. Torch copies are made on first
    use in each process and are not pickled.
    """

    queries: np.ndarray
    layout: _Layout
    true_unit: np.ndarray
    true_group: np.ndarray
    query_order: np.ndarray
    n_units: int
    n_candidates: int
    labelled: bool
    whole_groups: bool
    self_match: np.ndarray | None
    n_rings: int
    block_size: int
    device: str
    use_numpy: bool
    precision: str
    candidate_norm: float

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_tensors", None)
        return state

    def blocks(self) -> list[np.ndarray]:
        """Query rows of each block, in the order the single-process engine scores them."""
        return [self.query_order[start:start + self.block_size]
                for start in range(0, len(self.query_order), self.block_size)]

    def tensors(self) -> dict:
        """Torch copies of the arrays the matmul and the counting need, on the plan's device (cached)."""
        cached = self.__dict__.get("_tensors")
        if cached is not None:
            return cached
        device, layout = self.device, self.layout
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            scored = torch.as_tensor(layout.scored, device=device)
            cached = {
                "scored": scored,
                "expand": None if layout.expand is None else torch.as_tensor(layout.expand, device=device),
                "unit": None if layout.unit_starts is None else torch.as_tensor(
                    np.repeat(np.arange(self.n_units), np.diff(np.r_[layout.unit_starts, self.n_candidates])),
                    device=device),
                "group": torch.as_tensor(layout.unit_group, device=device).view(1, -1) if self.labelled else None,
            }
        if self.precision != "fp32":
            cached["scored_low"] = scored.to(_DTYPES[self.precision])
            cached["scored64"] = scored.double()
        self.__dict__["_tensors"] = cached
        return cached


def plan_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, *,
                candidate_unit: np.ndarray | None = None, unit_positive: np.ndarray | None = None,
                unit_negative: np.ndarray | None = None, unit_labelled: np.ndarray | None = None,
                rings: bool = False, block_size: int | None = None, device: str | torch.device = "cpu",
                backend: str = "auto", precision: str = "fp32") -> CountPlan:
    """Check the inputs and prepare a :class:`CountPlan`; arguments as for :func:`stream_counts`."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown score precision {precision!r}; valid values: {', '.join(PRECISIONS)}")
    true_index = _as_index(true_index, "true indices")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
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
                     None if unit_labelled is None else np.asarray(unit_labelled, dtype=bool))
    true_group = layout.unit_group[true_index]
    # Sorting queries by true group keeps each block's matched columns to a few groups.
    query_order = np.argsort(true_group, kind="stable") if labelled else np.arange(len(queries))
    # Pathology-matched counts without rings: when no group matches another, distance 0 is one group.
    whole_groups = labelled and not rings and bool(
        (layout.distance != 0)[~np.eye(len(layout.group_starts), dtype=bool)].all())
    n_rings = 0
    if labelled:
        n_rings = int(layout.distance.max()) + 1 if rings else 1
    if block_size is None:
        block_size = auto_block_size(len(layout.scored), len(candidates), n_units, device=device,
                                     precision=precision, labelled=labelled)
    candidate_norm = float(np.linalg.norm(layout.scored, axis=1).max()) if len(layout.scored) else 0.0
    if precision == "fp16" and len(queries):
        # Scores beyond fp16's range (65504) would become inf. Scaling the queries by a power of two keeps every
        # score below 2^14, is exact in float32, and leaves each query's ordering of the candidates unchanged.
        largest = float(np.linalg.norm(queries, axis=1).max()) * candidate_norm
        if largest > 2.0 ** 14:
            queries = queries * np.float32(2.0 ** -math.ceil(math.log2(largest / 2.0 ** 14)))
    return CountPlan(queries, layout, true_index, true_group, query_order, n_units, len(candidates), labelled,
                     whole_groups, layout.distance.diagonal() == 0 if labelled else None, n_rings, int(block_size),
                     str(device), backend == "auto" and torch.device(device).type == "cpu" and precision == "fp32",
                     precision, candidate_norm)


# NOTE: the CUDA-only paths (block size from free memory, cuBLAS reduction flags) have run with a mocked
# torch.cuda.mem_get_info only. benchmarks/scale.py --gpu exercises them on a real device.
@contextlib.contextmanager
def _full_precision_reductions(device: torch.device):
    """Ask cuBLAS to accumulate reduced-precision products in float32, as the error bound assumes."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


def _exact_unit_scores(plan: CountPlan, tensors: dict, query_rows: np.ndarray, units: np.ndarray) -> torch.Tensor:
    """Float64 scores of query ``query_rows[i]`` against unit ``units[i]`` (a unit scores its best member)."""
    device, layout = plan.device, plan.layout
    if layout.unit_starts is None:
        pair, columns = np.arange(len(units)), units
    else:
        ends = np.r_[layout.unit_starts[1:], plan.n_candidates]
        sizes = ends[units] - layout.unit_starts[units]
        pair = np.repeat(np.arange(len(units)), sizes)
        offsets = np.arange(len(pair)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        columns = layout.unit_starts[units][pair] + offsets
    rows_scored = columns if layout.expand is None else layout.expand[columns]
    scores = torch.empty(len(pair), dtype=torch.float64, device=device)
    step = max(1, (1 << 22) // max(1, plan.queries.shape[1]))
    for start in range(0, len(pair), step):
        part = slice(start, start + step)
        query = torch.as_tensor(plan.queries[query_rows[pair[part]]], device=device).double()
        candidate = tensors["scored64"][torch.as_tensor(rows_scored[part], device=device)]
        scores[part] = (query * candidate).sum(1)
    if layout.unit_starts is None:
        return scores
    best = torch.full((len(units),), float("-inf"), dtype=torch.float64, device=device)
    return best.scatter_reduce_(0, torch.as_tensor(pair, device=device), scores, "amax")


def _reduced_precision_masks(plan: CountPlan, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Masks ``higher`` and ``tied`` ``[B, U]`` from reduced-precision scores, ambiguous pairs re-scored in float64.

    A pair is decided from the reduced scores when the difference to the
    true unit's score exceeds twice :func:`score_error_bound`. Every other
    pair (ties and near-ties) is scored again as a float64 dot product of
    the float32 embeddings. The masks therefore equal those of exact
    float64 scores.
    """
    tensors, device = plan.tensors(), torch.device(plan.device)
    queries = torch.as_tensor(plan.queries[rows], device=device)
    with _full_precision_reductions(device):
        scores = (queries.to(_DTYPES[plan.precision]) @ tensors["scored_low"].T).float()
    if tensors["expand"] is not None:
        scores = scores[:, tensors["expand"]]
    if tensors["unit"] is not None:
        scores = torch.full((len(rows), plan.n_units), float("-inf"), device=device).scatter_reduce_(
            1, tensors["unit"].expand(len(rows), -1), scores, "amax")
    true_unit = torch.as_tensor(plan.true_unit[rows], device=device).view(-1, 1)
    difference = scores - scores.gather(1, true_unit)
    # The difference and the margin are float32 numbers: a relative 2^-10 on top covers their own rounding.
    bound = score_error_bound(np.linalg.norm(plan.queries[rows], axis=1), plan.candidate_norm, plan.queries.shape[1],
                              plan.precision)
    margin = torch.as_tensor(2 * bound * (1 + 2.0 ** -10), dtype=torch.float32, device=device).view(-1, 1)
    higher = difference > margin
    # Anything not decided either way is re-scored, including differences that are not finite.
    ambiguous = ~higher & ~(difference < -margin)
    ambiguous.scatter_(1, true_unit, False)
    tied = torch.zeros_like(higher)
    tied.scatter_(1, true_unit, True)
    pair_row, pair_unit = ambiguous.nonzero(as_tuple=True)
    if len(pair_row):
        local = pair_row.cpu().numpy()
        exact_true = _exact_unit_scores(plan, tensors, rows, plan.true_unit[rows])
        exact = _exact_unit_scores(plan, tensors, rows[local], pair_unit.cpu().numpy())
        higher[pair_row, pair_unit] = exact > exact_true[pair_row]
        tied[pair_row, pair_unit] = exact == exact_true[pair_row]
    return higher, tied, int(len(pair_row))


def count_block(plan: CountPlan, rows: np.ndarray) -> BlockCounts:
    """Count one block of queries (``rows`` of the query matrix) against every candidate unit."""
    layout, rescored = plan.layout, 0
    if plan.use_numpy:
        scores = torch.as_tensor(plan.queries[rows]) @ plan.tensors()["scored"].T
        scores = scores.numpy()
        if layout.expand is not None:
            scores = scores[:, layout.expand]
        if layout.unit_starts is not None:
            scores = np.maximum.reduceat(scores, layout.unit_starts, axis=1)
        true = scores[np.arange(len(rows)), plan.true_unit[rows]][:, None]
        higher, tied = np.greater(scores, true), np.equal(scores, true)
    elif plan.precision != "fp32":
        higher, tied, rescored = _reduced_precision_masks(plan, rows)
    else:
        tensors, device = plan.tensors(), plan.device
        scores = torch.as_tensor(plan.queries[rows], device=device) @ tensors["scored"].T
        if tensors["expand"] is not None:
            scores = scores[:, tensors["expand"]]
        if tensors["unit"] is not None:
            scores = torch.full((len(rows), plan.n_units), float("-inf"), device=device).scatter_reduce_(
                1, tensors["unit"].expand(len(rows), -1), scores, "amax")
        true = scores.gather(1, torch.as_tensor(plan.true_unit[rows], device=device).view(-1, 1))
        higher, tied = scores > true, scores == true
    counts = BlockCounts(rows, _count_true(higher), _count_true(tied) - 1, rescored=rescored)
    if not plan.labelled:
        return counts

    true_group = plan.true_group[rows]
    counts.ring_above = np.zeros((len(rows), plan.n_rings), dtype=np.int64)
    counts.ring_equal = np.zeros((len(rows), plan.n_rings), dtype=np.int64)
    if plan.whole_groups:
        for group in np.unique(true_group):
            if not plan.self_match[group]:
                continue
            inside = np.flatnonzero(true_group == group)
            members = layout.group_members[group]
            counts.ring_above[inside, 0] = _count_true(_submatrix(higher, inside, members))
            counts.ring_equal[inside, 0] = _count_true(_submatrix(tied, inside, members)) - 1
        return counts
    torch_group = None if isinstance(higher, np.ndarray) else plan.tensors()["group"]
    by_group_above = _group_counts(higher, layout, torch_group)
    by_group_equal = _group_counts(tied, layout, torch_group)
    distance = layout.distance[true_group]
    for ring in range(plan.n_rings):
        at_ring = distance == ring
        counts.ring_above[:, ring] = (by_group_above * at_ring).sum(1)
        counts.ring_equal[:, ring] = (by_group_equal * at_ring).sum(1)
    counts.ring_equal[:, 0] -= plan.self_match[true_group]
    return counts


class LocalEngine:
    """Count the blocks one after another in this process (the default engine)."""

    name = "local"

    def map_blocks(self, plan: CountPlan, blocks: list[np.ndarray]):
        """Yield :class:`BlockCounts` for each block, in order."""
        for rows in blocks:
            yield count_block(plan, rows)


def assemble_counts(plan: CountPlan, parts) -> RankCounts:
    """Put the block results of one pass back in query order: :class:`RankCounts`."""
    n_queries = len(plan.queries)
    above = np.empty(n_queries, dtype=np.int64)
    equal = np.empty(n_queries, dtype=np.int64)
    ring_above = np.zeros((n_queries, plan.n_rings), dtype=np.int64)
    ring_equal = np.zeros((n_queries, plan.n_rings), dtype=np.int64)
    seen = np.zeros(n_queries, dtype=bool)
    rescored = 0
    for part in parts:
        above[part.rows], equal[part.rows] = part.above, part.equal
        seen[part.rows] = True
        rescored += part.rescored
        if plan.labelled:
            ring_above[part.rows], ring_equal[part.rows] = part.ring_above, part.ring_equal
    if not seen.all():
        raise RuntimeError(f"the counting engine returned no result for {int((~seen).sum())} queries")
    if plan.precision != "fp32":
        logger.info("scores in %s: %d of %d query-candidate pairs were too close to call and were re-scored in "
                    "float64", plan.precision, rescored, n_queries * plan.n_units)
    if not plan.labelled:
        return RankCounts(above, equal, plan.n_units, rescored=rescored)
    layout = plan.layout
    group_sizes = np.bincount(layout.unit_group, minlength=len(layout.group_starts))
    ring_size = np.zeros((n_queries, plan.n_rings), dtype=np.int64)
    for ring in range(plan.n_rings):
        ring_size[:, ring] = ((layout.distance[plan.true_group] == ring) * group_sizes[None, :]).sum(1)
    return RankCounts(above, equal, plan.n_units, ring_above, ring_equal, ring_size, rescored=rescored)


def stream_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray, *,
                  candidate_unit: np.ndarray | None = None, unit_positive: np.ndarray | None = None,
                  unit_negative: np.ndarray | None = None, unit_labelled: np.ndarray | None = None,
                  rings: bool = False, block_size: int | None = None,
                  device: str | torch.device = "cpu", backend: str = "auto", precision: str = "fp32",
                  engine=None) -> RankCounts:
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
        block_size: queries scored per matmul. Default
            (:func:`auto_block_size`): as many as fit in 128 MiB of scores
            and masks on CPU, or in half the free memory of a CUDA device.
        device: torch device for the matmul (and the counting off CPU).
        backend: ``auto`` (NumPy on CPU, torch elsewhere) or ``torch``.
        precision: ``fp32`` (default), or ``bf16`` / ``fp16`` matmuls whose
            ties and near-ties are re-scored in float64
            (:func:`score_error_bound`): the counts then equal those of exact
            float64 scores, which the float32 engine matches except for
            score differences below its own rounding (about ``D·2⁻²⁴``).
        engine: where the blocks run: None (this process,
            :class:`LocalEngine`) or a
            :class:`~linkrisk.audit.distributed.RayEngine`. Every engine
            scores the same blocks, so the counts are identical.

    Returns:
        :class:`RankCounts`.
    """
    plan = plan_counts(queries, candidates, true_index, candidate_unit=candidate_unit, unit_positive=unit_positive,
                       unit_negative=unit_negative, unit_labelled=unit_labelled, rings=rings, block_size=block_size,
                       device=device, backend=backend, precision=precision)
    engine = engine or LocalEngine()
    return assemble_counts(plan, engine.map_blocks(plan, plan.blocks()))


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
