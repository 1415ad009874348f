"""Report sections on how strong the evidence is: tests, bounds, power, attribute shortcuts, rank statistics, splits.

Each builder reads only results fields and returns display-ready rows. A
group or run without the fields gets no rows, so the template leaves the
section out.
"""

from __future__ import annotations

from linkrisk.report.format import (
    as_dict, as_list, cohort_title, direction_title, fmt_count, fmt_interval, fmt_lift, fmt_num, fmt_pct, fmt_pool,
    fmt_signed, heads_title, image_level_title, is_missing)

HEADLINE_POOL = 100


def _entry(entries, pool, k: int = 1) -> dict | None:
    return next((e for e in as_list(entries) if isinstance(e, dict) and e.get("pool") == pool and e.get("k") == k),
                None)


def _headline_pool(run: dict):
    return HEADLINE_POOL if _entry(run.get("recall"), HEADLINE_POOL) else "full"


def _p_value(value) -> str:
    if is_missing(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _rank_cells(block: dict) -> dict:
    rank, auc = as_dict(block.get("mean_normalised_rank")), as_dict(block.get("linkage_auc"))
    return {"mnr": fmt_num(rank.get("value")), "mnr_ci": fmt_interval(rank.get("ci95"), fmt_num),
            "auc": fmt_num(auc.get("value")), "auc_ci": fmt_interval(auc.get("ci95"), fmt_num)}


def _power_cell(run: dict, pool, lift: float) -> str:
    entry = next((e for e in as_list(run.get("power")) if e.get("pool") == pool and e.get("lift") == lift), None)
    if entry is None:
        return "n/a"
    needed = entry.get("required_queries")
    needed = fmt_count(needed) if needed is not None else "over 10 million"
    return f"{fmt_pct(entry.get('power_at_queries'))} ({fmt_pct(entry.get('power_at_patients'))}); {needed}"


def _test_row(run: dict) -> dict:
    pool = _headline_pool(run)
    test = as_dict(run.get("permutation_test"))
    bound = _entry(run.get("upper_bounds"), pool)
    recall_test = _entry(test.get("recall"), pool)
    if not test:
        recall_p = "not run"
    elif recall_test is None:
        recall_p = "n/a"
    else:
        recall_p = _p_value(recall_test.get("p_value"))
    return {
        "heads": heads_title(run["heads"]), "pool": fmt_pool(pool, run.get("n_candidates")),
        "queries": fmt_count(run.get("n_queries")), "patients": fmt_count(run.get("n_patients")),
        **_rank_cells(run),
        "rank_p": _p_value(as_dict(test.get("mean_normalised_rank")).get("p_value")) if test else "not run",
        "recall_p": recall_p,
        "upper": fmt_pct(bound.get("upper")) if bound else "n/a",
        "lift_upper": fmt_lift(bound.get("lift_upper")) if bound else "n/a",
        "power_2": _power_cell(run, pool, 2.0), "power_5": _power_cell(run, pool, 5.0),
    }


def _attacker_rows(run: dict) -> list[dict]:
    pool = _headline_pool(run)
    rows = []
    for oracle_key, comparison_key, label in (("attribute_oracle", "oracle_comparison", "attributes"),
                                              ("file_metadata_oracle", "file_metadata_comparison", "file metadata")):
        oracle = as_dict(run.get(oracle_key))
        comparison = _entry(run.get(comparison_key), pool)
        if not oracle or comparison is None:
            continue
        missing = as_dict(oracle.get("missing_share"))
        mostly_missing = [name for name, share in missing.items() if not is_missing(share) and share > 0.5]
        rows.append({
            "heads": heads_title(run["heads"]), "attacker": f"{label}: {', '.join(map(str, oracle.get('attributes') or []))}",
            "pool": fmt_pool(pool, run.get("n_candidates")), "model": fmt_pct(comparison.get("model")),
            "oracle": fmt_pct(comparison.get("oracle")), "chance": fmt_pct(comparison.get("chance")),
            "excess": fmt_signed(comparison.get("excess")),
            "excess_ci": fmt_interval(comparison.get("excess_ci95"), fmt_signed),
            "note": (f"missing for most candidates: {', '.join(mostly_missing)}" if mostly_missing else ""),
        })
    return rows


def _pool_definitions(group) -> list[dict]:
    """Build one row per audit block with rank statistics: uniform, pathology-matched, attribute-matched, views."""
    rows = []
    for run in group.main + group.matched + group.views:
        if "mean_normalised_rank" not in run:
            continue
        if run.get("negatives") == "label_matched":
            definition = "pathology-matched pools (rank within the label group)"
        elif run.get("view") == "extra":
            definition = (f"{direction_title(run.get('direction'))}, {run.get('level')} level, "
                          f"{image_level_title(run.get('image_level'))}")
        else:
            definition = "uniform pools (main audit)"
        rows.append({"heads": heads_title(run["heads"]), "definition": definition,
                     "queries": fmt_count(run.get("n_queries_ranked", run.get("n_queries"))), **_rank_cells(run)})
        for key, label in (("attribute_matched", "attribute-matched pools on "), ("attribute_oracle",
                                                                                  "attribute oracle on "),
                           ("file_metadata_oracle", "file-metadata oracle on ")):
            block = as_dict(run.get(key))
            if "mean_normalised_rank" in block:
                rows.append({"heads": heads_title(run["heads"]),
                             "definition": label + ", ".join(map(str, block.get("attributes") or [])),
                             "queries": fmt_count(block.get("n_queries_ranked", block.get("n_queries"))),
                             **_rank_cells(block)})
    return rows


def evidence_sections(groups) -> list[dict]:
    """Build, per group, the tests and bounds, the attribute attackers and the rank statistics of every pool."""
    sections = []
    for group in groups:
        tests = [_test_row(run) for run in group.main if run.get("permutation_test") or run.get("upper_bounds")
                 or run.get("power")]
        attackers = [row for run in group.main for row in _attacker_rows(run)]
        skipped = sorted({str(run[key]) for run in group.main for key in ("attribute_oracle_skipped",
                                                                          "file_metadata_oracle_skipped")
                          if run.get(key)})
        ranks = _pool_definitions(group)
        if tests or attackers or ranks:
            sections.append({"title": group.title, "tests": tests, "attackers": attackers, "skipped": skipped,
                             "ranks": ranks})
    return sections


def _split_row(split: dict) -> dict:
    audit = as_dict(split.get("audit"))
    small = _entry(audit.get("recall"), 10) or _entry(audit.get("recall"), "full")
    full = _entry(audit.get("recall"), "full")
    test = as_dict(audit.get("permutation_test"))
    return {
        "split": f"{split.get('split', 'n/a')}-disjoint",
        "train": f"{fmt_count(split.get('n_train_images'))} / {fmt_count(split.get('n_train_patients'))} / "
                 f"{fmt_count(split.get('n_train_sources'))}",
        "test": f"{fmt_count(split.get('n_test_images'))} / {fmt_count(split.get('n_test_patients'))} / "
                f"{fmt_count(split.get('n_test_sources'))}",
        "shared": fmt_count(split.get("n_shared_sources")),
        "cells": [{"pool": fmt_pool(entry.get("pool"), audit.get("n_candidates")), "value": fmt_pct(entry.get("value")),
                   "ci": fmt_interval(entry.get("ci95")), "lift": fmt_lift(entry.get("lift")),
                   "lift_ci": fmt_interval(entry.get("lift_ci95"), fmt_lift)} if entry else None
                  for entry in (small, full if full is not small else None)],
        **_rank_cells(audit),
        "rank_p": _p_value(as_dict(test.get("mean_normalised_rank")).get("p_value")) if test else "not run",
    }


def split_sections(results: dict) -> list[dict]:
    """Build one table per split audit entry: the held-out audit of each split, side by side."""
    sections = []
    for entry in as_list(results.get("split_audit")):
        if not isinstance(entry, dict) or not as_list(entry.get("splits")):
            continue
        title = cohort_title(entry.get("cohort")) + (f" ({entry['model']})" if entry.get("model") else "")
        sections.append({"title": title, "rows": [_split_row(split) for split in entry["splits"]
                                                  if isinstance(split, dict)]})
    return sections


__all__ = ["evidence_sections", "split_sections"]
