"""Report sections for mitigation: the privacy–linkage–utility frontier, transfer and the refit attacker.

:func:`render_mitigation_section` returns an HTML fragment (figures as
embedded PNG) that the demo report includes; :func:`write_mitigation_report`
wraps it into the self-contained page that ``linkrisk mitigate`` writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from linkrisk._io import write_text  # noqa: E402
from linkrisk.report.html import _png  # noqa: E402

# The ε of the published reference setting; the refit plot draws the DP point nearest to it.
REFERENCE_EPSILON = 0.34


def _epsilon_value(epsilon) -> float:
    return math.inf if epsilon == "inf" else float(epsilon)


def _x_positions(points: list[dict]) -> tuple[list[float], list[str]]:
    """Place finite ε on a log axis and ε = inf one decade to the right of the largest finite one."""
    finite = [_epsilon_value(p["epsilon"]) for p in points if math.isfinite(_epsilon_value(p["epsilon"]))]
    right = (max(finite) if finite else 1.0) * 10.0
    xs = [_epsilon_value(p["epsilon"]) if math.isfinite(_epsilon_value(p["epsilon"])) else right for p in points]
    labels = [f"{_epsilon_value(p['epsilon']):g}" if math.isfinite(_epsilon_value(p["epsilon"])) else "∞ (no DP)"
              for p in points]
    return xs, labels


def _entry(row: dict, pool) -> dict | None:
    return next((e for e in row["recall_at_1"] if e["pool"] == pool), None)


def _epsilon_axis(ax, xs: list[float], labels: list[str], ylabel: str) -> None:
    """Label a log ε axis at the sweep's points, with ``ylabel`` and a light grid."""
    ax.set_xscale("log")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("target ε")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def frontier_plot(sweep: dict, cohort: str) -> str:
    """Recall@1 (N = 100 and the largest pool) and probe macro AUROC against ε for one target, as base64 PNG."""
    points = sweep["points"]
    rows = [next(t for t in p["targets"] if t["cohort"] == cohort) for p in points]
    original = next(t for t in sweep["original"] if t["cohort"] == cohort)
    xs, labels = _x_positions(points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    pools = [e["pool"] for e in original["recall_at_1"]]
    for pool in (pools[0], pools[-1]) if len(pools) > 1 else pools:
        entries = [_entry(row, pool) for row in rows]
        values = [e["value"] for e in entries]
        low = [e["value"] - e["ci95"][0] for e in entries]
        high = [e["ci95"][1] - e["value"] for e in entries]
        line = left.errorbar(xs, values, yerr=[low, high], marker="o", ms=4, capsize=3, label=f"DP heads, N={pool}")
        left.axhline(_entry(original, pool)["value"], color=line[0].get_color(), ls=":", lw=1,
                     label=f"original heads, N={pool}")
        left.axhline(_entry(original, pool)["chance"], color=line[0].get_color(), ls="--", lw=0.8, alpha=0.6,
                     label=f"chance, N={pool}")
    _epsilon_axis(left, xs, labels, "Recall@1 (expected over pools)")
    left.legend(fontsize=6)

    probes = [row["probe"] for row in rows]
    if "skipped" not in original["probe"] and all("skipped" not in p for p in probes):
        values = [p["macro_auroc"] for p in probes]
        low = [v - p["ci95"][0] if math.isfinite(v) else 0 for v, p in zip(values, probes)]
        high = [p["ci95"][1] - v if math.isfinite(v) else 0 for v, p in zip(values, probes)]
        right.errorbar(xs, values, yerr=[low, high], marker="o", ms=4, capsize=3, color="tab:green", label="DP heads")
        right.axhline(original["probe"]["macro_auroc"], color="tab:green", ls=":", lw=1, label="original heads")
        right.axhline(0.5, color="k", ls="--", lw=0.8, label="chance")
        right.legend(fontsize=6)
    else:
        reason = original["probe"].get("skipped", "probe skipped")
        right.text(0.5, 0.5, "no probe:\n" + reason.replace(" the training", "\nthe training"), ha="center",
                   va="center", transform=right.transAxes, fontsize=7)
    _epsilon_axis(right, xs, labels, "probe macro AUROC")
    fig.suptitle(cohort, fontsize=10)
    return _png(fig)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def render_mitigation_section(results: dict) -> str:
    """Render the mitigation section (frontier per target, tables, refit attacker) as an HTML fragment."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("linkrisk", "report/templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    env.filters["pct"] = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"
    sweep = results["sweep"]
    cohorts = [row["cohort"] for row in sweep["original"]]
    plots = {cohort: frontier_plot(sweep, cohort) for cohort in cohorts}
    refit_plots = {entry["target"]: refit_plot(entry, sweep) for entry in results.get("refit", [])}
    return env.get_template("mitigation.html").render(results=results, sweep=sweep, cohorts=cohorts, plots=plots,
                                                      refit_plots=refit_plots, entry_at=_entry)


def write_mitigation_report(results: dict, path: Path) -> None:
    """Write the self-contained ``linkrisk mitigate`` report (one HTML file, no external assets)."""
    section = render_mitigation_section(results)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>linkrisk mitigation report</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}"
            "img{max-width:100%}.note{color:#555;font-size:90%}</style></head><body>"
            f"{section}</body></html>\n")
    write_text(Path(path), page)


def _nearest_reference_point(points: list[dict]) -> dict | None:
    finite = [p for p in points if math.isfinite(_epsilon_value(p["epsilon"]))]
    if not finite:
        return None
    return min(finite, key=lambda p: abs(math.log(_epsilon_value(p["epsilon"]) / REFERENCE_EPSILON)))


def refit_plot(entry: dict, sweep: dict) -> str:
    """Recall@1 of the refit attacker against its auxiliary pair count k, beside the original and DP heads."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    pool = entry["table"][0]["pool"] if entry["table"] else "full"
    for method in dict.fromkeys(row["method"] for row in entry["table"]):
        rows = sorted((row for row in entry["table"] if row["method"] == method), key=lambda row: row["n_aux_pairs"])
        xs = [row["n_aux_pairs"] for row in rows]
        ax.plot(xs, [row["repeats_mean"] for row in rows], marker="o", ms=4, label=f"refit: {method}")
        ax.fill_between(xs, [row["repeats_min"] for row in rows], [row["repeats_max"] for row in rows], alpha=0.15)
    original = next((t for t in sweep["original"] if t["cohort"] == entry["target"]), None)
    if original is not None and _entry(original, pool) is not None:
        ax.axhline(_entry(original, pool)["value"], color="k", ls=":", lw=1, label="original heads")
        ax.axhline(_entry(original, pool)["chance"], color="k", ls="--", lw=0.8, alpha=0.6, label="chance")
    point = _nearest_reference_point(sweep["points"])
    if point is not None:
        row = next((t for t in point["targets"] if t["cohort"] == entry["target"]), None)
        if row is not None and _entry(row, pool) is not None:
            ax.axhline(_entry(row, pool)["value"], color="tab:red", ls="-.", lw=1,
                       label=f"DP heads, ε = {point['epsilon']}")
    ax.set_xscale("log")
    ticks = sorted({row["n_aux_pairs"] for row in entry["table"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("auxiliary image-report pairs k held by the attacker")
    ax.set_ylabel(f"Recall@1, N={pool}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(f"{entry['target']}: attacker with pairs from {entry['aux']}", fontsize=9)
    return _png(fig)
