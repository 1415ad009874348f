"""Number formats and display names shared by the report's text, tables and figures.

Every figure goes through these functions so that one quantity reads the
same everywhere. A missing value (None, NaN or infinite) prints as "n/a".
"""

from __future__ import annotations

import math

COHORT_TITLES = {
    "covid_test": "COVID-19 collection, held-out patients",
    "covid_train": "COVID-19 collection, training patients",
    "openi": "Open-i (external, no retraining)",
}
HEADS_TITLES = {"original": "original heads", "dp": "DP heads"}
PROBE_TITLES = {"covid": "the COVID-19 collection (findings)", "openi": "Open-i (CheXpert labels)"}
DIRECTION_TITLES = {"image_to_report": "image → report", "report_to_image": "report → image"}
IMAGE_LEVEL_TITLES = {"image": "each image", "study_mean": "study mean image"}

MISSING = "n/a"


def is_missing(value) -> bool:
    """Return True for None, NaN, infinities and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not math.isfinite(value)


# Rates below this many percent print as "<0.0001%": a chance of 1/N for N up to a million stays visible.
SMALLEST_PERCENT = 1e-4


def as_dict(value) -> dict:
    """Return ``value`` when it is a dict, else an empty one, so optional nested objects read as absent."""
    return value if isinstance(value, dict) else {}


def as_list(value) -> list:
    """Return ``value`` when it is a list, else an empty one, so optional lists read as absent."""
    return value if isinstance(value, list) else []


def fmt_pct(value) -> str:
    """Format a rate in [0, 1] as a percentage: one decimal from 1%, two significant digits below."""
    if is_missing(value):
        return MISSING
    percent = 100.0 * value
    if percent == 0 or abs(percent) >= 0.995:
        return f"{percent:.1f}%"
    if 0 < percent < SMALLEST_PERCENT:
        return f"<{SMALLEST_PERCENT:.4f}%"
    decimals = min(4, 1 - math.floor(math.log10(abs(percent))))
    return f"{percent:.{decimals}f}%"


def fmt_points(value) -> str:
    """Format a difference of two rates as signed percentage points."""
    return MISSING if is_missing(value) else f"{100.0 * value:+.1f} percentage points"


def fmt_num(value, digits: int = 3) -> str:
    return MISSING if is_missing(value) else f"{value:.{digits}f}"


def fmt_signed(value, digits: int = 3) -> str:
    return MISSING if is_missing(value) else f"{value:+.{digits}f}"


def fmt_lift(value) -> str:
    """Format a multiple of chance: one decimal below 100, none from 100."""
    if is_missing(value):
        return MISSING
    return f"{value:.0f}×" if abs(value) >= 100 else f"{value:.1f}×"


def fmt_count(value) -> str:
    if is_missing(value):
        return MISSING
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def fmt_sci(value) -> str:
    """Format a small probability such as δ with two significant digits (6e-06 becomes 6e-6)."""
    if is_missing(value):
        return MISSING
    text = f"{value:.2g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def fmt_interval(ci, formatter=fmt_pct) -> str:
    """Format a ``[low, high]`` interval as "[low, high]" with ``formatter``, or "n/a" when it is absent."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or is_missing(ci[0]) or is_missing(ci[1]):
        return MISSING
    return f"[{formatter(ci[0])}, {formatter(ci[1])}]"


def fmt_epsilon(epsilon) -> str:
    """Format a privacy budget ε, printing ``"inf"`` and infinity as ∞ (no DP)."""
    if epsilon == "inf" or (isinstance(epsilon, float) and math.isinf(epsilon)):
        return "∞"
    return MISSING if is_missing(epsilon) else f"{epsilon:g}"


def fmt_pool(pool, n_candidates=None) -> str:
    """Format a pool size N. ``"full"`` names the candidate count when it is known."""
    if pool == "full":
        return "full" if is_missing(n_candidates) else f"full ({fmt_count(n_candidates)})"
    return fmt_count(pool)


def cohort_title(cohort) -> str:
    """Return the display name of a cohort, or the raw name when it has no title."""
    return COHORT_TITLES.get(cohort, str(cohort))


def heads_title(heads) -> str:
    return HEADS_TITLES.get(heads, str(heads))


def probe_title(cohort) -> str:
    return PROBE_TITLES.get(cohort, str(cohort))


def probe_heading(cohort) -> str:
    """Return a probed cohort's title for a heading: the sentence form without its leading "the"."""
    title = probe_title(cohort)
    title = title[4:] if title.startswith("the ") else title
    return title[:1].upper() + title[1:]


def direction_title(direction) -> str:
    return DIRECTION_TITLES.get(direction, str(direction).replace("_", " "))


def image_level_title(image_level) -> str:
    return IMAGE_LEVEL_TITLES.get(image_level, str(image_level).replace("_", " "))


def group_title(model, cohort) -> str:
    """Return the title of a (model, cohort) group. Config runs name their model and the demo's runs do not."""
    return cohort_title(cohort) if model is None else f"{model}: {cohort_title(cohort)}"
