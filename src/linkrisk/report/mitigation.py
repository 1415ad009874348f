"""Report sections for mitigation: the privacy–linkage–utility frontier, transfer and the refit attacker.

:func:`render_frontier_section` and :func:`render_refit_section` return
HTML fragments (figures as embedded PNG) that the demo report includes;
:func:`write_mitigation_report` wraps both into the self-contained page
that ``linkrisk mitigate`` writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from linkrisk._io import write_text  # noqa: E402
from linkrisk.report.figures import to_png  # noqa: E402
from linkrisk.report.format import (  # noqa: E402
    as_dict, as_list, cohort_title, fmt_epsilon, fmt_interval, fmt_lift, fmt_num, fmt_pct, fmt_pool, fmt_sci,
    is_missing)
from linkrisk.report.templating import environment  # noqa: E402

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
    if xs:
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("target ε")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _error_bars(entries: list[dict | None], key: str) -> list[list[float]]:
    """Return ``[below, above]`` error-bar lengths of each entry's ``ci95`` around ``entry[key]``, zeros if absent."""
    below, above = [], []
    for entry in entries:
        value = None if entry is None else entry.get(key)
        ci = None if entry is None else entry.get("ci95")
        if is_missing(value) or not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(is_missing(v) for v in ci):
            below.append(0.0)
            above.append(0.0)
            continue
        # Clamped at 0: a value a rounding error outside its interval would make matplotlib reject the bar.
        below.append(max(0.0, value - ci[0]))
        above.append(max(0.0, ci[1] - value))
    return [below, above]


def _number(value) -> float:
    return math.nan if is_missing(value) else float(value)


def _target_rows(sweep: dict, cohort: str) -> tuple[list[dict], list[dict]]:
    """Return the sweep points that audited ``cohort`` and their target rows, in ε order."""
    points, rows = [], []
    for point in sweep["points"]:
        row = next((t for t in point.get("targets", []) if t.get("cohort") == cohort), None)
        if row is not None:
            points.append(point)
            rows.append(row)
    return points, rows


def frontier_plot(sweep: dict, cohort: str) -> str:
    """Recall@1 (N = 100 and the largest pool) and probe macro AUROC against ε for one target, as base64 PNG."""
    points, rows = _target_rows(sweep, cohort)
    original = next(t for t in sweep["original"] if t["cohort"] == cohort)
    xs, labels = _x_positions(points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    pools = [e["pool"] for e in original["recall_at_1"]]
    for pool in (pools[0], pools[-1]) if len(pools) > 1 else pools:
        entries = [_entry(row, pool) for row in rows]
        values = [_number(None if e is None else e.get("value")) for e in entries]
        line = left.errorbar(xs, values, yerr=_error_bars(entries, "value"), marker="o", ms=4, capsize=3,
                             label=f"DP heads, N={fmt_pool(pool)}")
        reference = _entry(original, pool)
        left.axhline(_number(reference.get("value")), color=line[0].get_color(), ls=":", lw=1,
                     label=f"original heads, N={fmt_pool(pool)}")
        left.axhline(_number(reference.get("chance")), color=line[0].get_color(), ls="--", lw=0.8, alpha=0.6,
                     label=f"chance, N={fmt_pool(pool)}")
    _epsilon_axis(left, xs, labels, "Recall@1 (expected over pools)")
    left.legend(fontsize=6)

    probes = [_probe_of(row) for row in rows]
    original_probe = _probe_of(original)
    measured = [p for p in [original_probe, *probes] if not is_missing(p.get("macro_auroc"))]
    if "skipped" not in original_probe and all("skipped" not in p for p in probes) and measured:
        values = [_number(p.get("macro_auroc")) for p in probes]
        right.errorbar(xs, values, yerr=_error_bars(probes, "macro_auroc"), marker="o", ms=4, capsize=3,
                       color="tab:green", label="DP heads")
        right.axhline(_number(original_probe.get("macro_auroc")), color="tab:green", ls=":", lw=1,
                      label="original heads")
        right.axhline(0.5, color="k", ls="--", lw=0.8, label="chance")
        right.legend(fontsize=6)
    else:
        reason = str(original_probe.get("skipped", "no label with enough positives and negatives"))
        right.text(0.5, 0.5, "no probe:\n" + reason.replace(" the training", "\nthe training"), ha="center",
                   va="center", transform=right.transAxes, fontsize=7, wrap=True)
    _epsilon_axis(right, xs, labels, "probe macro AUROC")
    fig.suptitle(cohort_title(cohort), fontsize=10)
    return to_png(fig)


def _recall_cell(entry: dict | None) -> dict:
    if entry is None:
        return {"value": "n/a", "ci": "n/a", "lift": "n/a"}
    return {"value": fmt_pct(entry.get("value")), "ci": fmt_interval(entry.get("ci95")),
            "lift": fmt_lift(entry.get("lift"))}


def _probe_of(row: dict) -> dict:
    """Return a target row's probe record, or a skipped one when the row has none."""
    probe = row.get("probe")
    return probe if isinstance(probe, dict) else {"skipped": "no probe in the results"}


def _probe_cell(probe) -> str:
    if not isinstance(probe, dict) or not probe:
        return "n/a"
    if "skipped" in probe:
        return f"skipped: {probe['skipped']}"
    if is_missing(probe.get("macro_auroc")):
        return "n/a (no label with enough positives and negatives)"
    return f"{fmt_num(probe.get('macro_auroc'))} {fmt_interval(probe.get('ci95'), fmt_num)}"


def _spent(value) -> str:
    return fmt_epsilon(value) if value == "inf" or (isinstance(value, float) and math.isinf(value)) else fmt_num(value)


def _frontier_rows(sweep: dict, original: dict) -> list[dict]:
    """Format the original heads and every ε point for one target as table rows."""
    pools = [e["pool"] for e in original["recall_at_1"]]
    rows = [{"heads": "original", "spent": "–", "formal": True,
             "recall": [_recall_cell(_entry(original, pool)) for pool in pools],
             "mnr": fmt_num(original.get("mean_normalised_rank")), "probe": _probe_cell(original.get("probe"))}]
    points, targets = _target_rows(sweep, original["cohort"])
    for point, row in zip(points, targets):
        dp = as_dict(point.get("dp"))
        spent = as_dict(dp.get("epsilon_spent"))
        rows.append({"heads": f"DP, ε = {fmt_epsilon(point.get('epsilon'))}",
                     "spent": f"{_spent(spent.get('prv'))} / {_spent(spent.get('rdp'))}",
                     "formal": dp.get("formal_guarantee") is not False,
                     "recall": [_recall_cell(_entry(row, pool)) for pool in pools],
                     "mnr": fmt_num(row.get("mean_normalised_rank")), "probe": _probe_cell(row.get("probe"))})
    return rows


def render_frontier_section(results: dict) -> str:
    """Render the privacy–linkage–utility frontier (figure and table per target) as an HTML fragment."""
    sweep = results["sweep"]
    first = sweep["points"][0].get("dp") if sweep["points"] else None
    setting = None
    if first:
        setting = {"privacy_unit": first.get("privacy_unit", "n/a"), "delta": fmt_sci(first.get("delta")),
                   "loss": first.get("loss_description") or first.get("loss", "n/a"),
                   "initialisation": first.get("initialisation", "n/a"),
                   "sample_rate": fmt_num(first.get("sample_rate"), 4), "steps_per_epoch": first.get("steps_per_epoch"),
                   "epochs": first.get("epochs"), "formal": first.get("formal_guarantee") is not False,
                   "notes": "; ".join(as_list(first.get("guarantee_notes")))}
    targets = []
    for original in sweep["original"]:
        title = cohort_title(original["cohort"])
        relation = original.get("relation", "")
        targets.append({"cohort": original["cohort"], "title": title,
                        # The demo's cohort titles already name the relation ("held-out patients").
                        "relation": "" if relation.lower() in title.lower() else relation,
                        "pools": [fmt_pool(e["pool"], original.get("n_candidates")) for e in original["recall_at_1"]],
                        "rows": _frontier_rows(sweep, original), "figure": frontier_plot(sweep, original["cohort"])})
    return environment().get_template("frontier.html").render(setting=setting, targets=targets)


def render_refit_section(results: dict) -> str:
    """Render the refit attacker (figure and table per target) as an HTML fragment, or "" without refit results."""
    refits = as_list(results.get("refit"))
    if not refits:
        return ""
    sweep = results.get("sweep") or {"original": [], "points": []}
    entries = []
    for entry in refits:
        rows = [{"method": row["method"], "k": f"{row.get('k', 'n/a')} ({row['n_aux_pairs']})",
                 "pool": fmt_pool(row.get("pool")), "value": _recall_cell(row),
                 "range": f"{fmt_pct(row.get('repeats_min'))} – {fmt_pct(row.get('repeats_max'))} "
                          f"({row.get('n_repeats', 'n/a')} draws)",
                 "mnr": fmt_num(row.get("mean_normalised_rank"))} for row in entry.get("table", [])]
        entries.append({"title": f"{cohort_title(entry['target'])}: attacker with pairs from "
                                 f"{cohort_title(entry.get('aux', 'n/a'))}",
                        "rows": rows, "figure": refit_plot(entry, sweep) if entry.get("table") else None})
    return environment().get_template("refit.html").render(entries=entries)


def render_mitigation_section(results: dict) -> str:
    """Render the frontier and the refit attacker as one HTML fragment."""
    return render_frontier_section(results) + render_refit_section(results)


def write_mitigation_report(results: dict, path: Path) -> None:
    """Write the self-contained ``linkrisk mitigate`` report (one HTML file, no external assets)."""
    section = render_mitigation_section(results)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>linkrisk mitigation report</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}"
            "img{max-width:100%}.note{color:#555;font-size:90%}.ci{display:block;font-size:85%;color:#555}"
            "</style></head><body>"
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
        ax.plot(xs, [_number(row.get("repeats_mean")) for row in rows], marker="o", ms=4, label=f"refit: {method}")
        ax.fill_between(xs, [_number(row.get("repeats_min")) for row in rows],
                        [_number(row.get("repeats_max")) for row in rows], alpha=0.15)
    original = next((t for t in sweep.get("original", []) if t["cohort"] == entry["target"]), None)
    if original is not None and _entry(original, pool) is not None:
        ax.axhline(_number(_entry(original, pool).get("value")), color="k", ls=":", lw=1, label="original heads")
        ax.axhline(_number(_entry(original, pool).get("chance")), color="k", ls="--", lw=0.8, alpha=0.6, label="chance")
    point = _nearest_reference_point(sweep.get("points", []))
    if point is not None:
        row = next((t for t in point["targets"] if t["cohort"] == entry["target"]), None)
        if row is not None and _entry(row, pool) is not None:
            ax.axhline(_number(_entry(row, pool).get("value")), color="tab:red", ls="-.", lw=1,
                       label=f"DP heads, ε = {fmt_epsilon(point['epsilon'])}")
    ax.set_xscale("log")
    ticks = sorted({row["n_aux_pairs"] for row in entry["table"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("auxiliary image-report pairs k held by the attacker")
    ax.set_ylabel(f"Recall@1, N={fmt_pool(pool)}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(f"{cohort_title(entry['target'])}: attacker with pairs from {cohort_title(entry.get('aux', 'n/a'))}",
                 fontsize=9)
    return to_png(fig)
