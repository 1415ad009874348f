"""Attribute-matched pools and the attribute oracle against brute-force enumeration, and the oracle on real data."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from linkrisk.audit.attributes import (
    audit_attribute_matched,
    compare_with_oracle,
    encode_attributes,
    label_vector_codes,
    oracle_rank_counts,
)
from linkrisk.audit.recall import expected_recall_at_k
from linkrisk.errors import ConfigError


def _enumerate(scores: np.ndarray, true: int, members: list[int], pool_size: int, k: int) -> dict[str, float]:
    """Recall@K over every pool of ``pool_size`` from ``members`` holding ``true`` and every order of its ties.

    Each pool's orderings are all permutations sorted by descending score.
    ``random`` averages the hit over them, ``optimistic`` takes the best and
    ``pessimistic`` the worst.
    """
    others = [m for m in members if m != true]
    pool_size = min(pool_size, len(members))
    totals = {"random": 0.0, "optimistic": 0.0, "pessimistic": 0.0}
    pools = list(itertools.combinations(others, pool_size - 1))
    for drawn in pools:
        pool = (true, *drawn)
        hits = [order.index(true) < k for order in itertools.permutations(pool)
                if all(scores[a] >= scores[b] for a, b in zip(order, order[1:]))]
        totals["random"] += sum(hits) / len(hits)
        totals["optimistic"] += max(hits)
        totals["pessimistic"] += min(hits)
    return {rule: total / len(pools) for rule, total in totals.items()}


def _tied_cohort():
    """Integer-valued embeddings (exact in float32) with tied candidates, and attribute codes with gaps."""
    candidates = np.array([[2, 0], [1, 1], [1, 1], [0, 2], [2, 1], [1, 0], [0, 1], [2, 2], [1, 2]], dtype=np.float32)
    queries = np.array([[1, 0], [1, 1], [0, 1], [2, 1], [1, 2], [1, 1], [2, 0]], dtype=np.float32)
    true_unit = np.array([0, 1, 3, 4, 8, 2, 6])
    # Columns: a view-like code and a sex-like code; -1 is missing.
    unit_codes = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [0, 0], [0, -1], [0, 0], [1, 0], [-1, 1]])
    patients = np.array(["a", "a", "b", "c", "d", "e", "f"])
    return queries, candidates, true_unit, unit_codes, patients


def test_matched_pools_match_enumeration():
    queries, candidates, true_unit, unit_codes, patients = _tied_cohort()
    scores = queries.astype(np.float64) @ candidates.T.astype(np.float64)
    complete = (unit_codes != -1).all(axis=1)
    kept = [q for q in range(len(queries)) if complete[true_unit[q]]]
    pools, ks = [2, 3, "full"], [1, 2]
    for ties in ("random", "optimistic", "pessimistic"):
        result = audit_attribute_matched(queries, candidates, true_unit, patients, unit_codes, pools, ks, n_boot=20,
                                         ties=ties)
        assert result["n_queries_with_missing"] == 1
        assert result["n_candidates_with_missing"] == 2
        assert result["n_queries"] == len(kept)
        for entry in result["recall"]:
            brute = []
            for q in kept:
                t = true_unit[q]
                members = [u for u in range(len(candidates))
                           if complete[u] and (unit_codes[u] == unit_codes[t]).all()]
                size = len(members) if entry["pool"] == "full" else entry["pool"]
                brute.append(_enumerate(scores[q], t, members, size, entry["k"])[ties])
            assert entry["value"] == pytest.approx(np.mean(brute), abs=1e-12), (ties, entry)


def test_matched_pools_effective_sizes():
    queries, candidates, true_unit, unit_codes, patients = _tied_cohort()
    result = audit_attribute_matched(queries, candidates, true_unit, patients, unit_codes, [3, "full"], [1],
                                     n_boot=20, attribute_names=["view", "sex"])
    # Five kept queries have true units in group (0, 0) of 5 units, one in (1, 0) of 2 units.
    entry = next(e for e in result["recall"] if e["pool"] == 3)
    assert entry["effective_pool"] == {"min": 2, "median": 3.0, "max": 3}
    assert entry["full_pool_share"] == pytest.approx(5 / 6)
    assert result["attributes"] == ["view", "sex"]
    assert result["negatives"] == "attribute_matched"


def test_oracle_matches_enumeration():
    rng = np.random.default_rng(4)
    n_units, n_queries, n_attributes = 7, 6, 3
    unit_codes = rng.integers(-1, 2, size=(n_units, n_attributes))
    true_unit = rng.integers(0, n_units, size=n_queries)
    query_codes = unit_codes[true_unit].copy()
    query_codes[rng.uniform(size=query_codes.shape) < 0.3] = -1  # some of the query's attributes are missing
    above, equal = oracle_rank_counts(query_codes, unit_codes, true_unit)
    for q in range(n_queries):
        # Brute-force score: attributes equal and present on both sides.
        scores = np.array([sum(query_codes[q, a] == unit_codes[u, a] and query_codes[q, a] != -1
                               for a in range(n_attributes)) for u in range(n_units)], dtype=float)
        for pool_size, k in ((2, 1), (4, 1), (4, 2), (n_units, 1), (n_units, 3)):
            closed = expected_recall_at_k(above[q:q + 1], equal[q:q + 1], n_units, pool_size, k, "random")[0]
            brute = _enumerate(scores, int(true_unit[q]), list(range(n_units)), pool_size, k)["random"]
            assert closed == pytest.approx(brute, abs=1e-12), (q, pool_size, k)


def test_missing_never_matches_in_oracle():
    unit_codes = np.array([[-1], [-1], [0]])
    above, equal = oracle_rank_counts(np.array([[-1]]), unit_codes, np.array([0]))
    # Every unit scores 0 against a missing query value: two others tie with the true unit.
    assert (above[0], equal[0]) == (0, 2)
    above, equal = oracle_rank_counts(np.array([[0]]), unit_codes, np.array([0]))
    assert (above[0], equal[0]) == (1, 1)


def test_encode_attributes_joint_codes():
    queries = pd.DataFrame({"view": ["PA", "AP", None], "age": [30, np.nan, 50]})
    units = pd.DataFrame({"view": ["AP", "Lateral"], "age": [50, 30]})
    query_codes, unit_codes = encode_attributes(queries, units, columns=["view", "age"])
    assert query_codes[1, 0] == unit_codes[0, 0]
    assert query_codes[2, 0] == -1
    assert query_codes[1, 1] == -1
    assert query_codes[0, 1] == unit_codes[1, 1]
    assert query_codes[2, 1] == unit_codes[0, 1]
    assert unit_codes[1, 0] not in query_codes[:, 0]


def test_label_vector_codes():
    labels = np.array([[1, 0, np.nan], [1, 0, 0], [1, -1, 0], [np.nan, np.nan, np.nan]])
    zeros = label_vector_codes(labels, "zeros")
    assert zeros[0] == zeros[1] == zeros[2]
    assert zeros[3] == -1
    ones = label_vector_codes(labels, "ones")
    assert ones[0] == ones[1] != ones[2]
    with pytest.raises(ConfigError, match="equal label vectors"):
        label_vector_codes(labels, "ignore")


def test_excess_over_oracle():
    model_above, model_equal = np.array([0, 0, 3, 1]), np.array([0, 0, 0, 0])
    oracle_above, oracle_equal = np.array([0, 2, 0, 4]), np.array([3, 1, 0, 5])
    entries = compare_with_oracle(model_above, model_equal, oracle_above, oracle_equal, 20,
                                  np.array(["a", "b", "c", "d"]), pools=[5, "full"], ks=[1], n_boot=50)
    for entry in entries:
        size = 20 if entry["pool"] == "full" else entry["pool"]
        model = expected_recall_at_k(model_above, model_equal, 20, size, 1).mean()
        oracle = expected_recall_at_k(oracle_above, oracle_equal, 20, size, 1).mean()
        assert entry["excess"] == pytest.approx(model - oracle)
        assert entry["ratio"] == pytest.approx(model / oracle)


def _covid_attributes(cohort, extra: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Query (image) and unit (report) attribute codes of the COVID cohort.

    Attributes are the view, the finding label vector and any columns of
    ``extra`` (per image). A report takes its images' value when they all
    agree and is missing otherwise. A query takes its true report's finding.
    """
    images, reports = cohort.images, cohort.reports
    report_index = pd.Series(np.arange(len(reports)), index=reports["report_id"])
    true_unit = report_index[images["report_id"]].to_numpy()
    per_image = images[["report_id"]].assign(view=images["view"].replace("unknown", None))
    if extra is not None:
        per_image = per_image.join(extra)
    columns = [c for c in per_image.columns if c != "report_id"]

    def agreed(values: pd.Series):
        distinct = values.dropna().unique()
        return distinct[0] if len(distinct) == 1 and values.notna().all() else None

    per_report = per_image.groupby("report_id")[columns].agg(agreed).reindex(reports["report_id"]).reset_index()
    query_codes, unit_codes = encode_attributes(per_image, per_report, columns=columns)
    findings = label_vector_codes(reports[list(cohort.label_names)].to_numpy(), "zeros")
    query_codes = np.column_stack([query_codes, findings[true_unit]])
    unit_codes = np.column_stack([unit_codes, findings])
    return query_codes, unit_codes, true_unit, columns + ["finding"]


def test_oracle_links_covid_above_chance(covid, data_dir):
    # Independent measurements on this collection found that view, sex, age band
    # and finding alone link notes to images above chance.
    metadata = pd.read_csv(data_dir / "covid-chestxray" / "metadata.csv", dtype=str, keep_default_na=False)
    metadata = metadata.drop_duplicates("filename").set_index("filename")
    ages = pd.to_numeric(metadata["age"], errors="coerce")
    demographics = pd.DataFrame({"sex": metadata["sex"].replace("", None),
                                 "age_band": (ages // 10 * 10).astype("Int64")}, index=metadata.index)
    demographics = demographics.reindex(covid.images["image_id"]).set_index(covid.images.index)

    for extra in (None, demographics):
        query_codes, unit_codes, true_unit, names = _covid_attributes(covid, extra)
        n_units = len(unit_codes)
        above, equal = oracle_rank_counts(query_codes, unit_codes, true_unit)
        for pool_size in (10, n_units):
            value = expected_recall_at_k(above, equal, n_units, pool_size, 1).mean()
            chance = 1 / pool_size
            label = "full" if pool_size == n_units else pool_size
            message = (f"oracle on {', '.join(names)}: Recall@1 at N={label} is {value:.4f} "
                       f"(chance {chance:.4f}, lift {value / chance:.2f})")
            assert np.isfinite(value), message
            assert value > chance, message


def _metadata_cohort():
    """The tied cohort with per-image attributes that have gaps: an ``unknown`` view and a missing size band.

    Each image has its own true report, and reports 5 and 7 have no image,
    so every image column is missing for them.
    """
    queries, candidates, true_unit, _, patients = _tied_cohort()
    images = pd.DataFrame({
        "view": ["PA", "PA", "AP", "PA", "unknown", "PA", "AP"],
        "size_band": pd.array([17, 17, 17, None, 18, 17, 17], dtype="Int64"),
        "file_format": ["JPEG", "JPEG", "PNG", "JPEG", "JPEG", "JPEG", "PNG"],
    })
    return queries, candidates, true_unit, patients, images


def _agreed_brute(values: list, members: list[int]):
    present = [values[m] for m in members]
    if not present or any(v is None or pd.isna(v) or v == "unknown" for v in present) or len(set(present)) != 1:
        return None
    return present[0]


def test_metadata_matched_pools_match_enumeration():
    from linkrisk.audit.attributes import audit_attributes, design_attribute_codes
    from linkrisk.audit.design import build_design

    queries, candidates, true_unit, patients, images = _metadata_cohort()
    design = build_design(queries, candidates, true_unit, patients)
    columns = ["view", "size_band", "file_format"]
    query_codes, unit_codes, facts = design_attribute_codes(design, images, true_unit, columns)
    # Units 5 and 7 have no image; unit 8 has an "unknown" view; unit 4's image lacks a size band.
    assert facts["missing_share"]["view"] == pytest.approx(3 / 9)
    assert facts["missing_share"]["size_band"] == pytest.approx(3 / 9)

    unit_values = {}
    for u in range(len(candidates)):
        members = [i for i in range(len(queries)) if true_unit[i] == u]
        unit_values[u] = tuple(_agreed_brute(images[c].astype(object).tolist(), members) for c in columns)
    complete = {u for u, values in unit_values.items() if all(v is not None for v in values)}
    kept = [q for q in range(len(queries)) if true_unit[q] in complete]
    scores = queries.astype(np.float64) @ candidates.T.astype(np.float64)

    result = audit_attributes(design, query_codes, unit_codes, facts, [2, 3, "full"], [1, 2], n_boot=20)
    matched = result["attribute_matched"]
    assert matched["n_queries"] == len(kept)
    assert matched["n_candidates_with_missing"] == len(candidates) - len(complete)
    for entry in matched["recall"]:
        brute = []
        for q in kept:
            t = int(true_unit[q])
            members = [u for u in complete if unit_values[u] == unit_values[t]]
            size = len(members) if entry["pool"] == "full" else entry["pool"]
            brute.append(_enumerate(scores[q], t, members, size, entry["k"])["random"])
        assert entry["value"] == pytest.approx(np.mean(brute), abs=1e-12), entry


def test_metadata_oracle_matches_enumeration():
    from linkrisk.audit.attributes import audit_attributes, design_attribute_codes
    from linkrisk.audit.design import build_design

    queries, candidates, true_unit, patients, images = _metadata_cohort()
    design = build_design(queries, candidates, true_unit, patients)
    columns = ["view", "size_band", "file_format"]
    query_codes, unit_codes, facts = design_attribute_codes(design, images, true_unit, columns)
    result = audit_attributes(design, query_codes, unit_codes, facts, [3, "full"], [1], n_boot=20, matched=False)
    assert "attribute_matched" not in result

    brute = []
    for q in range(len(queries)):
        own = [images[c].astype(object).iloc[q] for c in columns]
        own = [None if v is None or pd.isna(v) or v == "unknown" else v for v in own]
        oracle_scores = []
        for u in range(len(candidates)):
            members = [i for i in range(len(queries)) if true_unit[i] == u]
            values = [_agreed_brute(images[c].astype(object).tolist(), members) for c in columns]
            oracle_scores.append(sum(a is not None and a == b for a, b in zip(own, values)))
        brute.append(_enumerate(np.array(oracle_scores, dtype=float), int(true_unit[q]),
                                list(range(len(candidates))), 3, 1)["random"])
    entry = next(e for e in result["attribute_oracle"]["recall"] if e["pool"] == 3)
    assert entry["value"] == pytest.approx(np.mean(brute), abs=1e-12)
    comparison = next(e for e in result["oracle_comparison"] if e["pool"] == 3)
    assert comparison["oracle"] == pytest.approx(entry["value"])
    assert comparison["excess"] == pytest.approx(comparison["model"] - comparison["oracle"])


def test_unknown_attribute_lists_available():
    from linkrisk.audit.attributes import design_attribute_codes
    from linkrisk.audit.design import build_design

    queries, candidates, true_unit, patients, images = _metadata_cohort()
    design = build_design(queries, candidates, true_unit, patients)
    with pytest.raises(ConfigError, match="unknown attribute column 'sex'; available here: file_format, labels"):
        design_attribute_codes(design, images, true_unit, ["sex"])
    with pytest.raises(ConfigError, match="needs one label vector per candidate unit"):
        design_attribute_codes(design, images, true_unit, ["labels"])
    reverse = build_design(queries, candidates, true_unit, patients, direction="report_to_image")
    with pytest.raises(ConfigError, match="image-to-report"):
        design_attribute_codes(reverse, images, true_unit, ["view"])


def test_matched_ranks_within_group():
    queries, candidates, true_unit, unit_codes, patients = _tied_cohort()
    result = audit_attribute_matched(queries, candidates, true_unit, patients, unit_codes, ["full"], [1], n_boot=20)
    scores = queries.astype(np.float64) @ candidates.T.astype(np.float64)
    complete = (unit_codes != -1).all(axis=1)
    ranks = []
    for q in range(len(queries)):
        t = true_unit[q]
        if not complete[t]:
            continue
        members = [u for u in range(len(candidates)) if complete[u] and (unit_codes[u] == unit_codes[t]).all()]
        others = [u for u in members if u != t]
        above = sum(scores[q, u] > scores[q, t] for u in others)
        equal = sum(scores[q, u] == scores[q, t] for u in others)
        ranks.append((above + equal / 2) / len(others))
    assert result["mean_normalised_rank"]["value"] == pytest.approx(np.mean(ranks))
    assert result["linkage_auc"]["value"] == pytest.approx(1 - np.mean(ranks))
    assert result["rank_scope"] == "matched group"
