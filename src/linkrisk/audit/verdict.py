"""One plain-language verdict line per audit: is linkage above chance, how large at most, how much is attributes.

The line is built from fields a main audit already carries
(``permutation_test``, ``upper_bounds``, ``oracle_comparison``) and is
written into ``results.json`` and the report.
"""

from __future__ import annotations

import math

VERDICT_POOL = 100


def _entry(entries: list[dict], pool, k: int = 1) -> dict | None:
    return next((e for e in entries or [] if e.get("pool") == pool and e.get("k") == k), None)


def _headline_pool(run: dict):
    """Return N = 100 when the audit has it, else the full pool."""
    return VERDICT_POOL if _entry(run.get("recall", []), VERDICT_POOL) else "full"


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else "< 0.001"


def verdict_line(run: dict) -> str | None:
    """Return the verdict of one audit entry, or None when it has neither a permutation test nor upper bounds.

    Example: "linkage above chance (permutation p = 0.001 for the mean normalised rank, 0.002 for
    Recall@1 at N = 100); at most 3.2x chance (Recall@1 at most 3.2%) at N = 100 with 95% confidence;
    an attacker using only view, labels reaches 40% of the model's Recall@1 there; 35% of the linkage above
    chance is explained by attributes". A figure counts as above chance when either p-value is at most 0.05.
    """
    pool = _headline_pool(run)
    where = f"N = {pool}" if pool != "full" else "the full pool"
    parts = []
    above = True  # without a permutation test, the point estimate decides
    test = run.get("permutation_test")
    if test:
        rank_p = test["mean_normalised_rank"]["p_value"]
        recall = _entry(test.get("recall", []), pool)
        alpha = 0.05
        above = rank_p <= alpha or (recall is not None and recall["p_value"] <= alpha)
        detail = f"permutation p = {_p(rank_p)} for the mean normalised rank"
        if recall is not None:
            detail += f", {_p(recall['p_value'])} for Recall@1 at {where}"
        parts.append(("linkage above chance" if above else "no linkage shown above chance") + f" ({detail})")
    bound = _entry(run.get("upper_bounds", []), pool)
    if bound is not None and bound.get("lift_upper") is not None and math.isfinite(bound["lift_upper"]):
        parts.append(f"at most {bound['lift_upper']:.1f}x chance (Recall@1 at most {100 * bound['upper']:.1f}%) "
                     f"at {where} with {100 * bound['level']:.0f}% confidence")
    oracle_part = _oracle_clause(run, pool, above)
    if oracle_part:
        parts.append(oracle_part)
    return "; ".join(parts) if parts else None


# An attribute missing for more than this share of the candidates makes the oracle's figure a leak of which
# candidates have images, not a measure of attribute shortcuts, so the verdict leaves it out.
_MAX_MISSING_SHARE = 0.5


def _oracle_clause(run: dict, pool, above: bool = True) -> str | None:
    """Compare the model with the attribute oracle and state how much of the linkage above chance attributes explain.

    The explained share is ``(oracle - chance) / (model - chance)`` of
    Recall@1, capped at 100%, and is given only when the model's Recall@1 is
    above chance and the permutation test (where run) shows linkage.
    """
    comparison = _entry(run.get("oracle_comparison", []), pool)
    oracle = run.get("attribute_oracle") or {}
    if comparison is None or comparison["model"] <= 0:
        return None
    if any(share > _MAX_MISSING_SHARE for share in (oracle.get("missing_share") or {}).values()):
        return None
    names = ", ".join(str(name).replace("_", " ") for name in oracle.get("attributes") or [])
    model, attributes, chance = comparison["model"], comparison["oracle"], comparison["chance"]
    if attributes >= model:
        clause = f"an attacker using only {names} links at least as well as the model there"
        explained = model > chance and above
        return clause + ("; all of the linkage above chance may be explained by attributes" if explained else "")
    clause = f"an attacker using only {names} reaches {100 * attributes / model:.0f}% of the model's Recall@1 there"
    if model > chance and above:
        explained = min(1.0, max(0.0, (attributes - chance) / (model - chance)))
        clause += f"; {100 * explained:.0f}% of the linkage above chance is explained by attributes"
    return clause


__all__ = ["verdict_line"]
