"""One audit of a design: rank counts, pool metrics, hard negatives and the optional Monte Carlo check."""

from __future__ import annotations

import time

import numpy as np
import torch

from linkrisk._logging import logger
from linkrisk.audit.design import AuditDesign
from linkrisk.audit.montecarlo import monte_carlo_recall
from linkrisk.audit.negatives import FALLBACKS, LABEL_POLICIES, summarise_matched, unit_label_masks
from linkrisk.audit.ranks import stream_counts
from linkrisk.audit.stats import permutation_test, power_table, recall_upper_bounds
from linkrisk.audit.recall import (
    TIE_RULES,
    audit_counts,
    bootstrap_means,
    expected_recall_at_k,
    percentile_interval,
    resolve_pools,
)
from linkrisk.errors import ConfigError, InputError

NEGATIVES = ("random", "label_matched")


def run_audit(design: AuditDesign, pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
              n_boot: int = 1000, seed: int = 0, *, negatives: str = "random", **options) -> dict:
    """Audit one design with one kind of negatives; see :func:`run_audits`."""
    return run_audits(design, pools, ks, n_boot, seed, negatives=(negatives,), **options)[0]


def run_audits(design: AuditDesign, pools: list[int | str] = (10, 100, 1000, "full"), ks: list[int] = (1, 5, 10),
               n_boot: int = 1000, seed: int = 0, *, negatives: tuple[str, ...] = ("random",), ties: str = "random",
               label_policy: str = "zeros", fallback: str | None = None, monte_carlo_pools: int = 0,
               permutations: int = 0, upper_level: float | None = 0.95, block_size: int | None = None,
               device: str | torch.device = "cpu", precision: str = "fp32", engine=None) -> list[dict]:
    """Audit one design from a single streaming pass, once per kind of negatives.

    Args:
        design: from :func:`~linkrisk.audit.design.build_design`.
        pools: pool sizes ``N`` and/or ``"full"``.
        ks: cut-offs ``K``.
        n_boot: patient-bootstrap resamples for every interval.
        seed: seed of the bootstrap and of the Monte Carlo pools.
        negatives: kinds to report, from ``random`` (uniform pools) and
            ``label_matched``; the scores are computed once for all.
        ties: tie rule of each ``value`` (all three are reported).
        label_policy: with ``label_matched``, one of ``LABEL_POLICIES``.
        fallback: with ``label_matched``, None or ``nearest_label``.
        monte_carlo_pools: with ``random`` negatives, sample this many
            explicit pools per query and pool size and report them beside
            the closed form (0: off).
        permutations: with ``random`` negatives, run a permutation test of
            "no linkage" with this many patient permutations
            (:func:`~linkrisk.audit.stats.permutation_test`; 0: off).
        upper_level: with ``random`` negatives, add one-sided upper
            confidence bounds on Recall@K and lift at this level
            (:func:`~linkrisk.audit.stats.recall_upper_bounds`; None: off).
        block_size, device, precision, engine: how the rank counts are
            computed (:func:`~linkrisk.audit.ranks.stream_counts`).

    Returns:
        One dict per kind: the design's facts plus the summary of
        :func:`~linkrisk.audit.recall.audit_counts` or
        :func:`~linkrisk.audit.negatives.summarise_matched`, and
        ``upper_bounds``, ``permutation_test`` and ``monte_carlo`` with
        random negatives when requested. Random negatives always add
        ``power`` (:func:`~linkrisk.audit.stats.power_table`, K = 1, lifts 2 and 5).
    """
    negatives = tuple(negatives)
    _check_pools_and_ks(pools, ks)
    for value, valid, what in ((ties, TIE_RULES, "tie rule"), (label_policy, LABEL_POLICIES, "label policy"),
                               *((kind, NEGATIVES, "negatives") for kind in negatives)):
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid values: {', '.join(valid)}")
    if not negatives:
        raise ConfigError("no kind of negatives requested; choose random and/or label_matched")
    if fallback not in FALLBACKS:
        raise ConfigError(f"unknown fallback {fallback!r}; valid values: none, nearest_label")
    if fallback and "label_matched" not in negatives:
        raise ConfigError("the nearest-label fallback applies to label-matched negatives only")
    if monte_carlo_pools < 0:
        raise ConfigError(f"the number of Monte Carlo pools must be 0 (off) or more, got {monte_carlo_pools}")
    if permutations < 0:
        raise ConfigError(f"the number of permutations must be 0 (off) or more, got {permutations}")
    if upper_level is not None and not 0.5 <= upper_level < 1:
        raise ConfigError(f"the upper bounds' confidence level must be in [0.5, 1), got {upper_level}")
    if monte_carlo_pools and "random" not in negatives:
        raise ConfigError("Monte Carlo pools sample uniform pools; use them with random negatives")
    masks = (None, None, None)
    if "label_matched" in negatives:
        if design.unit_labels is None:
            raise ConfigError(f"pathology-matched pools need one label vector per candidate unit; units of kind "
                              f"{design.facts['candidate_unit']!r} have none (use level study and labels in "
                              "reports.parquet)")
        masks = unit_label_masks(design.unit_labels, label_policy)
        if not masks[2][design.true_unit].any():
            raise InputError("no query has a labelled true candidate, so pathology-matched pools are undefined")

    facts = {**design.facts, "n_patients": int(len(np.unique(design.query_patients)))}
    started = time.perf_counter()
    logger.info("audit started: %s, %s level, %d queries against %d candidate units, negatives %s",
                design.facts["direction"], design.facts["level"], len(design.queries), design.n_units,
                ", ".join(negatives))
    counts = stream_counts(design.queries, design.candidates, design.true_unit, candidate_unit=design.candidate_unit,
                           unit_positive=masks[0], unit_negative=masks[1], unit_labelled=masks[2],
                           rings=fallback is not None, block_size=block_size, device=device,
                           precision=precision, engine=engine)
    logger.info("rank counts finished in %.1f s", time.perf_counter() - started)
    facts["scoring"] = {"precision": precision, "engine": getattr(engine, "name", "local"),
                        "rescored_pairs": int(counts.rescored)}
    results = []
    for kind in negatives:
        if kind == "label_matched":
            results.append({**facts, **summarise_matched(counts, masks[2], design.true_unit, design.query_patients,
                                                         label_policy, pools, ks, n_boot, seed, ties, fallback)})
            continue
        result = {**facts, "negatives": "random", **audit_counts(counts.above, counts.equal, counts.n_candidates,
                                                                 design.query_patients, pools, ks, n_boot, seed, ties)}
        sizes = [(pool, counts.n_candidates if pool == "full" else int(pool)) for pool in pools
                 if pool == "full" or int(pool) < counts.n_candidates]
        result["power"] = power_table(result["n_queries"], facts["n_patients"], sizes)
        if upper_level is not None:
            result["upper_bounds"] = recall_upper_bounds(counts.above, counts.equal, counts.n_candidates,
                                                         design.query_patients, pools, ks, n_boot, seed, ties,
                                                         upper_level)
        if permutations:
            logger.info("permutation test started: %d patient permutations", permutations)
            result["permutation_test"] = permutation_test(
                design.queries, design.candidates, design.true_unit, design.query_patients, pools=pools, ks=ks,
                n_permutations=permutations, seed=seed, ties=ties, candidate_unit=design.candidate_unit,
                block_size=block_size, device=device).to_dict()
        if monte_carlo_pools:
            result["monte_carlo"] = _monte_carlo(design, counts, pools, ks, n_boot, seed, monte_carlo_pools, device)
        results.append(result)
    logger.info("audit finished in %.1f s", time.perf_counter() - started)
    return results


def _check_pools_and_ks(pools: list[int | str], ks: list[int]) -> None:
    for pool in pools:
        if pool != "full" and not (isinstance(pool, (int, np.integer)) and not isinstance(pool, bool) and pool >= 2):
            raise ConfigError(f"invalid pool {pool!r}; pools are integers >= 2 or 'full'")
    if not ks:
        raise ConfigError("no cut-off K given; use for example ks=[1, 5, 10]")
    for k in ks:
        if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
            raise ConfigError(f"invalid K {k!r}; cut-offs are integers >= 1")


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
