"""One audit of a design: rank counts, pool metrics, hard negatives and the optional Monte Carlo check."""

from __future__ import annotations

import time

import numpy as np
import torch

from linkrisk._logging import logger
from linkrisk.audit.design import AuditDesign
from linkrisk.audit.montecarlo import monte_carlo_recall
from linkrisk.audit.negatives import FALLBACKS, LABEL_POLICIES, audit_label_matched
from linkrisk.audit.ranks import stream_counts
from linkrisk.audit.recall import (
    TIE_RULES,
    audit_counts,
    bootstrap_means,
    expected_recall_at_k,
    percentile_interval,
    resolve_pools,
)
from linkrisk.errors import ConfigError

NEGATIVES = ("random", "label_matched")


def run_audit(design: AuditDesign, pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
              n_boot: int = 1000, seed: int = 0, *, ties: str = "random", negatives: str = "random",
              label_policy: str = "zeros", fallback: str | None = None, monte_carlo_pools: int = 0,
              block_size: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Audit one design.

    Args:
        design: from :func:`~linkrisk.audit.design.build_design`.
        pools: pool sizes ``N`` and/or ``"full"``.
        ks: cut-offs ``K``.
        n_boot: patient-bootstrap resamples for every interval.
        seed: seed of the bootstrap and of the Monte Carlo pools.
        ties: tie rule of each ``value`` (all three are reported).
        negatives: ``random`` (uniform pools) or ``label_matched``.
        label_policy: with ``label_matched``, one of ``LABEL_POLICIES``.
        fallback: with ``label_matched``, None or ``nearest_label``.
        monte_carlo_pools: with ``random`` negatives, sample this many
            explicit pools per query and pool size and report them beside
            the closed form (0: off).

    Returns:
        The design's facts plus the summary of
        :func:`~linkrisk.audit.recall.audit_counts` or
        :func:`~linkrisk.audit.negatives.audit_matched`, and a
        ``monte_carlo`` list when requested.
    """
    for value, valid, what in ((ties, TIE_RULES, "tie rule"), (negatives, NEGATIVES, "negatives"),
                               (label_policy, LABEL_POLICIES, "label policy")):
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid values: {', '.join(valid)}")
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback {fallback!r}; valid values: none, nearest_label")
    if fallback and negatives != "label_matched":
        raise ConfigError("the nearest-label fallback applies to label-matched negatives only")
    if monte_carlo_pools < 0:
        raise ConfigError(f"the number of Monte Carlo pools must be 0 (off) or more, got {monte_carlo_pools}")
    if monte_carlo_pools and negatives != "random":
        raise ConfigError("Monte Carlo pools sample uniform pools; use them with random negatives")

    facts = {**design.facts, "n_patients": int(len(np.unique(design.query_patients)))}
    started = time.perf_counter()
    logger.info("audit started: %s, %s level, %d queries against %d candidate units, %s negatives",
                design.facts["direction"], design.facts["level"], len(design.queries), design.n_units, negatives)
    if negatives == "label_matched":
        if design.unit_labels is None:
            raise ConfigError(f"pathology-matched pools need one label vector per candidate unit; units of kind "
                              f"{design.facts['candidate_unit']!r} have none (use level study and labels in "
                              "reports.parquet)")
        result = audit_label_matched(design.queries, design.candidates, design.true_unit, design.query_patients,
                                     design.unit_labels, label_policy, pools, ks, n_boot, seed,
                                     candidate_unit=design.candidate_unit, ties=ties, fallback=fallback,
                                     block_size=block_size, device=device)
        logger.info("audit finished in %.1f s", time.perf_counter() - started)
        return {**facts, **result}

    counts = stream_counts(design.queries, design.candidates, design.true_unit, candidate_unit=design.candidate_unit,
                           block_size=block_size, device=device)
    result = {**facts, "negatives": "random", **audit_counts(counts.above, counts.equal, counts.n_candidates,
                                                             design.query_patients, pools, ks, n_boot, seed, ties)}
    if monte_carlo_pools:
        result["monte_carlo"] = _monte_carlo(design, counts, pools, ks, n_boot, seed, monte_carlo_pools, device)
    logger.info("audit finished in %.1f s", time.perf_counter() - started)
    return result


def _monte_carlo(design: AuditDesign, counts, pools, ks, n_boot: int, seed: int, n_pools: int, device) -> list[dict]:
    resolved = resolve_pools(list(pools), counts.n_candidates)
    sizes = [size for _, size in resolved]
    logger.info("Monte Carlo started: %d pools per query at N = %s", n_pools, sizes)
    hits = monte_carlo_recall(design.queries, design.candidates, design.true_unit, sizes, list(ks), n_pools, seed,
                              candidate_unit=design.candidate_unit, device=device)
    entries, per_query = [], []
    for p, (label, size) in enumerate(resolved):
        for j, k in enumerate(ks):
            if k >= size:
                continue
            exact = expected_recall_at_k(counts.above, counts.equal, counts.n_candidates, size, k)
            value = float(hits[p, j].mean())
            entries.append({"pool": label, "k": int(k), "value": value, "chance": k / size, "lift": value * size / k,
                            "closed_form": float(exact.mean()), "n_pools": int(n_pools), "tie_rule": "random"})
            per_query.append(hits[p, j])
    if per_query:
        intervals = percentile_interval(bootstrap_means(np.stack(per_query), design.query_patients, n_boot, seed))
        for entry, (low, high) in zip(entries, intervals):
            entry["ci95"] = [float(low), float(high)]
    return entries
