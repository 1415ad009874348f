"""Attribute shortcuts: attribute-matched negatives and an attacker that links by attributes alone.

Attributes are integer codes, one column per attribute (a label vector,
view, sex, age band, site or source, any manifest column), with ``-1``
for a missing value. :func:`encode_attributes` builds such codes from
tables, jointly for queries and candidates so that equal values get equal
codes, and :func:`label_vector_codes` turns a label matrix into one code
per row.

Attribute-matched negatives (:func:`audit_attribute_matched`)
    A query's pool contains its true unit and others drawn uniformly from the
    units that share every chosen attribute value with the true unit. It
    generalises pathology-matched pools
    (:mod:`linkrisk.audit.negatives`) and reuses their closed form: the
    hypergeometric Recall@K within the matched group, and a group smaller
    than N caps the pool. The output gives the effective pool sizes (min,
    median, max) and the share of queries whose group filled the pool.

    Missing values: a query whose true unit has a missing value in any
    chosen column is left out and counted (``n_queries_with_missing``), and
    a unit with a missing value is never a matched negative (counted in
    ``n_candidates_with_missing``). Matching is plain equality of codes, so
    every group is an equivalence class.

Attribute oracle (:func:`oracle_rank_counts`, :func:`audit_attribute_oracle`)
    A baseline attacker that sees only attributes: a candidate's score is
    the number of chosen columns on which its value equals the query's,
    and a missing value never equals anything, not even another missing
    value. The oracle breaks its many ties at random, so its expected
    Recall@K is the closed form of :func:`~linkrisk.audit.recall.expected_recall_at_k`
    under the ``random`` rule, computed from attribute match counts.
    :func:`compare_with_oracle` gives the instance-level excess (model
    Recall@K minus oracle Recall@K) and the ratio, per pool.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from linkrisk.audit.negatives import audit_matched, label_bitmasks
from linkrisk.audit.ranks import stream_counts
from linkrisk.audit.recall import (
    TIE_RULES,
    audit_counts,
    bootstrap_means,
    expected_recall_at_k,
    percentile_interval,
    resolve_pools,
)
from linkrisk.errors import ConfigError, InputError

MISSING = -1

# Label policies under which matching label vectors is equality (``ignore`` is not symmetric).
EQUALITY_LABEL_POLICIES = ("zeros", "ones")

# Distinct query attribute rows compared with all distinct unit rows per step of the oracle.
_ORACLE_CHUNK_CELLS = 2**24


def _as_codes(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2 or (codes.size and not np.issubdtype(codes.dtype, np.integer)):
        raise InputError(f"{what} must be a 2-D integer array [rows, attributes], got shape {codes.shape} and "
                         f"dtype {codes.dtype}; encode tables with encode_attributes")
    codes = codes.astype(np.int64)
    if codes.size and codes.min() < MISSING:
        raise InputError(f"{what} contain codes below {MISSING}; use {MISSING} for a missing value")
    return codes


def encode_attributes(*tables: pd.DataFrame, columns: list[str]) -> list[np.ndarray]:
    """Encode ``columns`` of several tables jointly as integer codes, ``-1`` where missing.

    Equal values get equal codes across all tables, so a query table and a
    candidate table can be compared. A value is missing where
    :func:`pandas.isna` is true (None, NaN, NaT, ``pd.NA``). Map placeholders
    such as ``"unknown"`` or ``""`` to None first when they mean missing.

    Returns:
        One int64 array ``[len(table), len(columns)]`` per table.
    """
    if not columns:
        raise ConfigError("no attribute columns given; name at least one column")
    for number, table in enumerate(tables):
        absent = [column for column in columns if column not in table.columns]
        if absent:
            raise InputError(f"table {number} has no column {absent[0]!r}; its columns: {', '.join(map(str, table.columns))}")
    lengths = np.cumsum([0] + [len(table) for table in tables])
    encoded = np.empty((lengths[-1], len(columns)), dtype=np.int64)
    for position, column in enumerate(columns):
        joined = pd.concat([table[column].astype(object) for table in tables], ignore_index=True)
        encoded[:, position] = pd.factorize(joined, use_na_sentinel=True)[0]
    return [encoded[lengths[i]:lengths[i + 1]] for i in range(len(tables))]


def label_vector_codes(labels: np.ndarray, policy: str = "zeros") -> np.ndarray:
    """Encode each row's label vector ``[n, L]`` (1, 0, -1, NaN) as one code ``[n]``, ``-1`` where all blank.

    The label policy maps uncertain and blank values as in
    :func:`~linkrisk.audit.negatives.label_bitmasks`. Only ``zeros`` and
    ``ones`` are allowed, because under them two rows match exactly when
    their vectors are equal.
    """
    if policy not in EQUALITY_LABEL_POLICIES:
        raise ConfigError(f"label policy {policy!r} does not define equal label vectors; use one of "
                          f"{', '.join(EQUALITY_LABEL_POLICIES)}")
    labels = np.asarray(labels, dtype=np.float64)
    positive, negative = label_bitmasks(labels, policy)
    _, codes = np.unique(np.stack([positive, negative], axis=1), axis=0, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    blank = np.isnan(labels).all(axis=1) if labels.shape[1] else np.ones(len(labels), dtype=bool)
    codes[blank] = MISSING
    return codes


# --------------------------------------------------------------------------------------------------
# Attribute-matched negatives


def matched_groups(unit_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group units by their full attribute row: ``(group [U] int64, complete [U] bool)``.

    Units with any missing value are incomplete and get group ``-1``.
    """
    unit_codes = _as_codes(unit_codes, "unit attribute codes")
    complete = (unit_codes != MISSING).all(axis=1)
    group = np.full(len(unit_codes), -1, dtype=np.int64)
    if complete.any():
        _, inverse = np.unique(unit_codes[complete], axis=0, return_inverse=True)
        group[complete] = inverse.reshape(-1)
    return group, complete


def _group_bitmasks(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode group ids as ``(positive, negative)`` bitmasks whose label distance is 0 only for equal ids.

    The bits of the id are the "positive" observations and their
    complement the "negative" ones, so the label distance of
    :func:`~linkrisk.audit.ranks.stream_counts` is the Hamming distance of
    the ids.
    """
    n_bits = max(1, int(group.max(initial=0)).bit_length())
    if n_bits > 62:
        raise InputError(f"{int(group.max()) + 1} attribute groups do not fit in 62-bit masks")
    full = np.int64((1 << n_bits) - 1)
    positive = np.maximum(group, 0).astype(np.int64)
    return positive, (~positive) & full


def attribute_matched_counts(queries: np.ndarray, candidates: np.ndarray, true_unit: np.ndarray,
                             unit_codes: np.ndarray, *, candidate_unit: np.ndarray | None = None,
                             block_size: int | None = None, device: str | torch.device = "cpu"):
    """Rank counts of each query within its attribute-matched group, from one streaming pass.

    Args:
        queries: ``[Q, D]``; candidates: ``[M, D]``; true_unit: ``[Q]``.
        unit_codes: ``[U, A]`` attribute codes per candidate unit, ``-1`` missing.
        candidate_unit: ``[M]`` unit of each candidate (default: one per row).

    Returns:
        ``(counts, complete)``: :class:`~linkrisk.audit.ranks.RankCounts`
        whose ``ring_*[:, 0]`` are the matched counts (``ring_size`` includes
        the true unit), and ``[U]`` bool, the units without missing values.
        ``above``/``equal`` are the uniform-pool counts of the same pass.

    NOTE: the pass builds a ``[G, G]`` int64 distance matrix over the G
    distinct attribute rows, so G in the tens of thousands needs gigabytes.
    """
    unit_codes = _as_codes(unit_codes, "unit attribute codes")
    n_units = len(candidates) if candidate_unit is None else int(np.max(candidate_unit)) + 1
    if len(unit_codes) != n_units:
        raise InputError(f"{n_units} candidate units but {len(unit_codes)} attribute rows")
    group, complete = matched_groups(unit_codes)
    positive, negative = _group_bitmasks(group)
    counts = stream_counts(queries, candidates, true_unit, candidate_unit=candidate_unit, unit_positive=positive,
                           unit_negative=negative, unit_labelled=complete, block_size=block_size, device=device)
    return counts, complete


def summarise_attribute_matched(counts, complete: np.ndarray, true_unit: np.ndarray, patient_ids: np.ndarray,
                                pools: list[int | str], ks: list[int], n_boot: int = 1000, seed: int = 0,
                                ties: str = "random", attribute_names: list[str] | None = None) -> dict:
    """Summarise attribute-matched counts (see :func:`attribute_matched_counts`) per pool and K.

    Returns the output of :func:`~linkrisk.audit.negatives.audit_matched`
    (``value``, ``ci95``, ``chance``, ``lift``, ``effective_pool``,
    ``full_pool_share`` per entry) with ``negatives`` set to
    ``attribute_matched`` and the missing-value counts.
    """
    complete = np.asarray(complete, dtype=bool)
    true_unit = np.asarray(true_unit, dtype=np.int64)
    keep = complete[true_unit]
    if not keep.any():
        raise InputError("every query's true unit has a missing attribute value, so attribute-matched pools "
                         "are undefined")
    n_complete = int(complete.sum())
    pools = [label for label, _ in resolve_pools(list(pools), n_complete)]
    result = audit_matched(counts.ring_above[keep, 0], counts.ring_equal[keep, 0], counts.ring_size[keep, 0],
                           np.asarray(patient_ids)[keep], pools, ks, n_boot, seed, ties)
    return {**result, "negatives": "attribute_matched", "attributes": attribute_names,
            "n_candidates": n_complete, "n_queries_with_missing": int((~keep).sum()),
            "n_candidates_with_missing": int((~complete).sum()),
            "queries_without_matched_negatives": int((counts.ring_size[keep, 0] < 2).sum())}


def audit_attribute_matched(queries: np.ndarray, candidates: np.ndarray, true_unit: np.ndarray,
                            patient_ids: np.ndarray, unit_codes: np.ndarray,
                            pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                            n_boot: int = 1000, seed: int = 0, *, attribute_names: list[str] | None = None,
                            candidate_unit: np.ndarray | None = None, ties: str = "random",
                            block_size: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Audit with attribute-matched pools; the rules are in the module docstring.

    Args:
        queries, candidates, true_unit, candidate_unit: as in
            :func:`~linkrisk.audit.ranks.stream_counts`.
        patient_ids: ``[Q]`` bootstrap clusters.
        unit_codes: ``[U, A]`` attribute codes per unit, ``-1`` missing.
        attribute_names: names of the A columns, for the output.
        ties: tie rule of each ``value``.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    counts, complete = attribute_matched_counts(queries, candidates, true_unit, unit_codes,
                                                candidate_unit=candidate_unit, block_size=block_size, device=device)
    return summarise_attribute_matched(counts, complete, true_unit, patient_ids, pools, ks, n_boot, seed, ties,
                                       attribute_names)


# --------------------------------------------------------------------------------------------------
# Attribute oracle


def oracle_rank_counts(query_codes: np.ndarray, unit_codes: np.ndarray,
                       true_unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank counts of the attribute oracle: units matching more, and as many, attributes as the true unit.

    Args:
        query_codes: ``[Q, A]`` attribute codes of each query, ``-1`` missing.
        unit_codes: ``[U, A]`` attribute codes of each candidate unit, in the same coding.
        true_unit: ``[Q]`` each query's true unit.

    Returns:
        ``(above, equal)``, int64 ``[Q]``: other units whose match count
        (columns with equal, non-missing codes) is above, and equal to, the
        true unit's. Distinct attribute rows are compared once, so the cost
        is ``O(G_q * G_u * A)`` for G distinct rows on each side.
    """
    query_codes = _as_codes(query_codes, "query attribute codes")
    unit_codes = _as_codes(unit_codes, "unit attribute codes")
    true_unit = np.asarray(true_unit, dtype=np.int64)
    if query_codes.shape[1] != unit_codes.shape[1]:
        raise InputError(f"queries have {query_codes.shape[1]} attribute columns but units {unit_codes.shape[1]}")
    if len(true_unit) != len(query_codes):
        raise InputError(f"{len(query_codes)} query attribute rows but {len(true_unit)} true units")
    if len(true_unit) and (true_unit.min() < 0 or true_unit.max() >= len(unit_codes)):
        raise InputError(f"true units must lie in [0, {len(unit_codes)}), got {true_unit.min()}..{true_unit.max()}")
    n_attributes = query_codes.shape[1]

    true_matches = ((query_codes == unit_codes[true_unit]) & (query_codes != MISSING)).sum(axis=1)
    query_rows, query_group = np.unique(query_codes, axis=0, return_inverse=True)
    unit_rows, unit_group = np.unique(unit_codes, axis=0, return_inverse=True)
    unit_weight = np.bincount(unit_group.reshape(-1), minlength=len(unit_rows)).astype(np.int64)

    # histogram[g, s]: units matching exactly s attributes of distinct query row g.
    histogram = np.zeros((len(query_rows), n_attributes + 1), dtype=np.int64)
    chunk = max(1, _ORACLE_CHUNK_CELLS // max(1, len(unit_rows) * n_attributes))
    for start in range(0, len(query_rows), chunk):
        rows = query_rows[start:start + chunk]
        matches = ((rows[:, None, :] == unit_rows[None, :, :]) & (rows[:, None, :] != MISSING)).sum(axis=2)
        for level in range(n_attributes + 1):
            histogram[start:start + chunk, level] = (matches == level) @ unit_weight

    at_least = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # at_least[g, s]: units matching >= s
    query_group = query_group.reshape(-1)
    above = np.where(true_matches < n_attributes,
                     at_least[query_group, np.minimum(true_matches + 1, n_attributes)], 0)
    equal = histogram[query_group, true_matches] - 1
    return above.astype(np.int64), equal.astype(np.int64)


def audit_attribute_oracle(query_codes: np.ndarray, unit_codes: np.ndarray, true_unit: np.ndarray,
                           patient_ids: np.ndarray, pools: list[int | str] = (10, 100, 1000, "full"),
                           ks: list[int] = (1, 5, 10), n_boot: int = 1000, seed: int = 0,
                           attribute_names: list[str] | None = None) -> dict:
    """Summarise the attribute oracle like a model: Recall@K per pool, chance, lift and patient-bootstrap intervals.

    The oracle's own tie rule is ``random``, so ``value`` is under that
    rule. The optimistic and pessimistic values in every entry show how
    much of it rests on ties.
    """
    above, equal = oracle_rank_counts(query_codes, unit_codes, true_unit)
    result = audit_counts(above, equal, len(np.asarray(unit_codes)), patient_ids, pools, ks, n_boot, seed, "random")
    return {**result, "attacker": "attribute_oracle", "attributes": attribute_names}


def compare_with_oracle(model_above: np.ndarray, model_equal: np.ndarray, oracle_above: np.ndarray,
                        oracle_equal: np.ndarray, n_candidates: int, patient_ids: np.ndarray,
                        pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
                        n_boot: int = 1000, seed: int = 0, ties: str = "random") -> list[dict]:
    """Instance-level excess of a model over the attribute oracle, per pool and K.

    Both count pairs must come from the same queries and candidate units.
    The model's values follow ``ties``, the oracle's the ``random`` rule.
    ``excess`` is model Recall@K minus oracle Recall@K and ``ratio`` model
    over oracle (None where the oracle's value is 0). Their 95% intervals
    are percentile intervals from one shared set of patient resamples, so
    the paired difference is resampled consistently.
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"unknown tie rule {ties!r}; valid rules: {', '.join(TIE_RULES)}")
    model_above, model_equal, oracle_above, oracle_equal = (
        np.asarray(a, dtype=np.int64) for a in (model_above, model_equal, oracle_above, oracle_equal))
    if not model_above.shape == model_equal.shape == oracle_above.shape == oracle_equal.shape:
        raise InputError("model and oracle rank counts must cover the same queries")
    entries, rows = [], []
    for label, size in resolve_pools(list(pools), n_candidates):
        for k in ks:
            if k >= size:
                continue
            model = expected_recall_at_k(model_above, model_equal, n_candidates, size, k, ties)
            oracle = expected_recall_at_k(oracle_above, oracle_equal, n_candidates, size, k, "random")
            entries.append((label, size, int(k), float(model.mean()), float(oracle.mean())))
            rows += [model, oracle]
    if not entries:
        return []
    resampled = bootstrap_means(np.stack(rows), patient_ids, n_boot, seed).reshape(len(entries), 2, n_boot)
    excess_ci = percentile_interval(resampled[:, 0] - resampled[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_ci = percentile_interval(resampled[:, 0] / resampled[:, 1])

    results = []
    for (label, size, k, model, oracle), excess_interval, ratio_interval in zip(entries, excess_ci, ratio_ci):
        ratio = model / oracle if oracle > 0 else None
        results.append({"pool": label, "k": k, "chance": k / size, "model": model, "oracle": oracle,
                        "excess": model - oracle, "excess_ci95": [float(v) for v in excess_interval],
                        "ratio": ratio,
                        "ratio_ci95": [float(v) for v in ratio_interval] if ratio is not None else None})
    return results


def cohort_attribute_codes(images: pd.DataFrame, reports: pd.DataFrame, report_labels: np.ndarray | None,
                           report_row: np.ndarray, label_policy: str = "zeros") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Build the oracle's attribute codes of a paired cohort: each image's view and its report's label vector.

    Args:
        images: the cohort's image table (column ``view``), one row per query.
        reports: the cohort's report table, one row per candidate unit.
        report_labels: ``[n_reports, L]`` label matrix, or None when the cohort has no labels.
        report_row: ``[n_images]`` row of each image's true report.
        label_policy: ``zeros`` or ``ones`` (see :func:`label_vector_codes`).

    Returns:
        ``(query_codes [n_images, A], unit_codes [n_reports, A], names)``. A report's view is the view
        its images share, and missing where they disagree or it has none. The query's label code is
        its true report's, which hands the oracle the exact findings: its figure is a ceiling on what
        an attacker predicting attributes from pixels could reach.
    """
    report_row = np.asarray(report_row, dtype=np.int64)
    views = images["view"].astype(object).where(images["view"].notna(), None).replace({"": None})
    per_report = pd.DataFrame({"row": report_row, "view": views.to_numpy()}).groupby("row")["view"]
    agreed = per_report.agg(lambda values: values.iloc[0] if values.nunique(dropna=False) == 1 else None)
    report_views = pd.Series([None] * len(reports), dtype=object)
    report_views.iloc[agreed.index.to_numpy()] = agreed.to_numpy()
    query_view, unit_view = encode_attributes(pd.DataFrame({"view": views.to_numpy()}),
                                              pd.DataFrame({"view": report_views.to_numpy()}), columns=["view"])
    columns_query, columns_unit, names = [query_view[:, 0]], [unit_view[:, 0]], ["view"]
    if report_labels is not None and np.asarray(report_labels).shape[1]:
        unit_labels = label_vector_codes(report_labels, label_policy)
        columns_query.append(unit_labels[report_row])
        columns_unit.append(unit_labels)
        names.append("labels")
    return np.stack(columns_query, axis=1), np.stack(columns_unit, axis=1), names


# --------------------------------------------------------------------------------------------------
# Attribute codes of an audit design, and the attribute audit of one design

LABELS_ATTRIBUTE = "labels"
# Attributes of the default oracle: what a report's text commonly states (view, sex, age) and its findings.
ORACLE_ATTRIBUTES = ("view", "sex", "age_band", LABELS_ATTRIBUTE)
# Image-table values that mean "missing" in attribute columns.
MISSING_STRINGS = ("", "unknown")


def _missing_to_none(values: pd.Series) -> pd.Series:
    values = values.astype(object)
    missing = values.isna() | values.map(lambda v: isinstance(v, str) and v.strip() in MISSING_STRINGS)
    return values.where(~missing, None)


def agreed_values(values: pd.Series, group: np.ndarray, n_groups: int) -> pd.Series:
    """Return each group's common value: the value when every member has it and none is missing, else None.

    Args:
        values: one value per row (None or NaN where missing).
        group: ``[rows]`` int group of each row, ``0..n_groups-1``.

    Returns:
        object Series of length ``n_groups``; a group without rows is None.
    """
    table = pd.DataFrame({"group": np.asarray(group, dtype=np.int64), "value": _missing_to_none(values).to_numpy()})
    stats = table.groupby("group")["value"].agg(["first", "size", "count", "nunique"])
    agreed = stats["first"].where((stats["count"] == stats["size"]) & (stats["nunique"] == 1), None)
    result = pd.Series([None] * n_groups, dtype=object)
    result.iloc[agreed.index.to_numpy()] = agreed.astype(object).to_numpy()
    return result


def design_attribute_codes(design, images: pd.DataFrame | None, report_row: np.ndarray, columns: list[str],
                           reports: pd.DataFrame | None = None,
                           label_policy: str = "zeros") -> tuple[np.ndarray, np.ndarray, dict]:
    """Build query and unit attribute codes of an image-to-report design from its image and report tables.

    Args:
        design: an :class:`~linkrisk.audit.design.AuditDesign` with direction ``image_to_report``.
        images: one row per image (rows of ``report_row``) with the image attribute columns, or None.
        report_row: ``[n_images]`` row of each image's true report.
        columns: attribute names: image columns, report columns (label columns), or ``labels``
            for the whole label vector (:func:`label_vector_codes` under ``label_policy``).
        reports: one row per report row, or None.

    Rules: an image column gives a query (an image, or a study mean) and a
    candidate unit the value shared by all their images, and a missing
    value where the images disagree or any lacks one. A unit without
    images, such as a report that only serves as a candidate, is
    therefore missing on every image column. A report column and
    ``labels`` give a unit the value shared by its reports, and a query
    the value of its true unit: the query is handed its true report's
    findings, as in :func:`cohort_attribute_codes`.

    Returns:
        ``(query_codes [Q, A], unit_codes [U, A], facts)``; ``facts`` has
        ``attributes`` (the names) and ``missing_share`` (per name, the share
        of candidate units missing it).

    Raises:
        ConfigError: a design other than image-to-report, an unknown column
            (the message lists the available ones), or ``labels`` for units
            without a label vector.
    """
    if design.facts.get("direction") != "image_to_report":
        raise ConfigError("attribute matching and the attribute oracle take image-to-report audits (images query "
                          "reports); use --direction image-to-report")
    if not columns:
        raise ConfigError("no attribute columns given; name at least one, for example view,sex,labels")
    report_row = np.asarray(report_row, dtype=np.int64)
    n_units = design.n_units
    row_unit = np.arange(len(design.candidates)) if design.candidate_unit is None else design.candidate_unit
    image_unit = row_unit[report_row]
    if design.facts.get("image_level") == "study_mean":
        position = {int(study): q for q, study in enumerate(design.query_ids)}
        query_of_image = np.array([position[int(row)] for row in report_row], dtype=np.int64)
    else:
        query_of_image = np.arange(len(report_row))
    n_queries = len(design.queries)

    image_columns = [] if images is None else [c for c in images.columns if c not in _ID_COLUMNS]
    report_columns = [] if reports is None else [c for c in reports.columns if c not in _ID_COLUMNS]
    query_codes, unit_codes, missing = [], [], {}
    for column in columns:
        if column == LABELS_ATTRIBUTE:
            if design.unit_labels is None:
                raise ConfigError(f"attribute {LABELS_ATTRIBUTE!r} needs one label vector per candidate unit; units of "
                                  f"kind {design.facts.get('candidate_unit')!r} have none (use level study and "
                                  "label columns in reports.parquet)")
            unit = label_vector_codes(design.unit_labels, label_policy)
            query = unit[design.true_unit]
        elif column in image_columns:
            query_values = agreed_values(images[column].reset_index(drop=True), query_of_image, n_queries)
            unit_values = agreed_values(images[column].reset_index(drop=True), image_unit, n_units)
            query, unit = (codes[:, 0] for codes in encode_attributes(
                pd.DataFrame({column: query_values}), pd.DataFrame({column: unit_values}), columns=[column]))
        elif column in report_columns:
            unit_values = agreed_values(reports[column].reset_index(drop=True), row_unit, n_units)
            unit = encode_attributes(pd.DataFrame({column: unit_values}), columns=[column])[0][:, 0]
            query = unit[design.true_unit]
        else:
            available = sorted(set(image_columns) | set(report_columns) | {LABELS_ATTRIBUTE})
            raise ConfigError(f"unknown attribute column {column!r}; available here: {', '.join(available)}")
        query_codes.append(query)
        unit_codes.append(unit)
        missing[column] = float((unit == MISSING).mean()) if len(unit) else float("nan")
    facts = {"attributes": list(columns), "missing_share": missing}
    return np.stack(query_codes, axis=1), np.stack(unit_codes, axis=1), facts


# Id columns of images.parquet and reports.parquet, never attributes.
_ID_COLUMNS = ("image_id", "study_id", "patient_id", "report_id", "image_path", "text")


def audit_attributes(design, query_codes: np.ndarray, unit_codes: np.ndarray, facts: dict,
                     pools: list[int | str], ks: list[int], n_boot: int = 1000, seed: int = 0, *,
                     ties: str = "random", matched: bool = True, block_size: int | None = None,
                     device: str | torch.device = "cpu") -> dict:
    """Audit one design on chosen attributes: matched pools, the oracle on the same attributes, and the excess.

    One streaming pass gives both the model's uniform-pool rank counts and
    its counts within each attribute-matched group.

    Returns:
        ``attribute_matched`` (:func:`summarise_attribute_matched`; only with
        ``matched``), ``attribute_oracle`` (:func:`audit_attribute_oracle`,
        with ``missing_share`` per attribute) and ``oracle_comparison``
        (:func:`compare_with_oracle`, model against oracle in uniform pools).
    """
    names = list(facts["attributes"])
    counts, complete = attribute_matched_counts(design.queries, design.candidates, design.true_unit, unit_codes,
                                                candidate_unit=design.candidate_unit, block_size=block_size,
                                                device=device)
    result = {}
    if matched:
        if complete[design.true_unit].any():
            result["attribute_matched"] = summarise_attribute_matched(
                counts, complete, design.true_unit, design.query_patients, pools, ks, n_boot, seed, ties, names)
        else:
            result["attribute_matched"] = {"negatives": "attribute_matched", "attributes": names, "recall": [],
                                           "skipped": "every query's true candidate misses one of the attributes"}
    oracle_above, oracle_equal = oracle_rank_counts(query_codes, unit_codes, design.true_unit)
    oracle = audit_counts(oracle_above, oracle_equal, design.n_units, design.query_patients, pools, ks, n_boot, seed,
                          "random")
    result["attribute_oracle"] = {**oracle, "attacker": "attribute_oracle", "attributes": names,
                                  "missing_share": facts["missing_share"]}
    result["oracle_comparison"] = compare_with_oracle(counts.above, counts.equal, oracle_above, oracle_equal,
                                                      design.n_units, design.query_patients, pools, ks, n_boot,
                                                      seed, ties)
    return result
