"""Figures of the HTML report, each returned as a base64 PNG for an inline ``data:`` URL.

The functions take run, probe and histogram dicts as ``results.json``
stores them and draw only what is present. Values that are missing
(None or NaN) are left out of a plot.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from linkrisk.report.format import (  # noqa: E402
    as_list, direction_title, fmt_count, fmt_pool, heads_title, image_level_title, is_missing)

DPI = 100
HEADS_COLORS = {"original": "tab:blue", "dp": "tab:orange"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
K_MARKERS = {5: "s", 10: "^"}


def to_png(fig) -> str:
    """Render ``fig`` as a base64 PNG and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heads_colors(heads_names: list[str]) -> dict[str, str]:
    """Give the original and DP heads fixed colours, and any other heads the next free ones."""
    colors = {}
    others = iter(OTHER_COLORS * (1 + len(heads_names) // len(OTHER_COLORS)))
    for heads in heads_names:
        colors[heads] = HEADS_COLORS.get(heads) or next(others)
    return colors


def _value(entry: dict | None) -> float:
    if entry is None or is_missing(entry.get("value")):
        return math.nan
    return float(entry["value"])


def _error(entry: dict | None, key: str = "ci95", value_key: str = "value") -> tuple[float, float]:
    """Return the (below, above) error-bar lengths of an entry's interval, or zeros where it is absent."""
    if entry is None or is_missing(entry.get(value_key)):
        return 0.0, 0.0
    ci = entry.get(key)
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or is_missing(ci[0]) or is_missing(ci[1]):
        return 0.0, 0.0
    value = float(entry[value_key])
    # Clamped at 0: a value a rounding error outside its interval would make matplotlib reject the bar.
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def _pool_x(pool, n_candidates) -> float:
    """Return the x position of a pool: N, or the candidate count for the full pool (NaN when unknown)."""
    size = n_candidates if pool == "full" else pool
    return math.nan if is_missing(size) else float(size)


def _plain_log_ticks(axis, subs=(1.0,)) -> None:
    """Label a log axis at ``subs`` times each power of ten as plain numbers (10, 100, 1,000), minor ticks blank."""
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _log_floor(values: list[float]) -> float:
    """Return a lower y limit for a log axis: a decade under the smallest positive value."""
    positive = [v for v in values if not is_missing(v) and v > 0]
    return min(positive) / 10.0 if positive else 1e-3


def _draw_curve(ax, run: dict, color: str) -> list[tuple[float, float]]:
    """Draw a run's Recall@1 curve with its interval band, and return the (N, chance) of its points."""
    curve = [p for p in as_list(run.get("recall_at_1_curve")) if not is_missing(p.get("value"))]
    if not curve:
        return []
    pools = [p["pool"] for p in curve]
    ax.plot(pools, [p["value"] for p in curve], color=color, lw=1.5, label=f"{heads_title(run['heads'])}, K=1")
    low = [math.nan if is_missing(p["ci95"][0]) else p["ci95"][0] for p in curve]
    high = [math.nan if is_missing(p["ci95"][1]) else p["ci95"][1] for p in curve]
    ax.fill_between(pools, low, high, color=color, alpha=0.18, lw=0)
    return [(p["pool"], p.get("chance")) for p in curve]


def _draw_k_points(ax, run: dict, color: str, skip_k1: bool) -> list[tuple[float, float]]:
    """Draw a run's Recall@K entries as points with intervals, one marker per K, and return their (N, chance)."""
    drawn = []
    for k in sorted({e["k"] for e in run.get("recall", [])}):
        entries = [e for e in run["recall"] if e["k"] == k and not is_missing(e.get("value"))
                   and not is_missing(_pool_x(e["pool"], run.get("n_candidates")))]
        if not entries or (k == 1 and skip_k1):
            continue
        xs = [_pool_x(e["pool"], run.get("n_candidates")) for e in entries]
        errors = np.array([_error(e) for e in entries]).T
        ax.errorbar(xs, [e["value"] for e in entries], yerr=errors, color=color, ls="none",
                    marker=K_MARKERS.get(k, "o"), ms=4, capsize=2, mfc="white",
                    label=f"{heads_title(run['heads'])}, K={k}")
        drawn.extend((x, e.get("chance")) for x, e in zip(xs, entries))
    return drawn


def recall_by_pool_plot(runs: list[dict], title: str) -> str:
    """Plot Recall@1 against N (curve with interval band), Recall@5 and @10 points, and chance K/N, on log axes."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    colors = heads_colors([run["heads"] for run in runs])
    points = []  # (N, chance) of everything drawn, for the axis limits
    for run in runs:
        points.extend(_draw_curve(ax, run, colors[run["heads"]]))
        points.extend(_draw_k_points(ax, run, colors[run["heads"]], skip_k1=bool(run.get("recall_at_1_curve"))))
    chances = [chance for _, chance in points]
    largest = max([2.0] + [pool for pool, _ in points])

    ks = sorted({e["k"] for run in runs for e in run.get("recall", [])} | {1})
    grid = np.geomspace(1.0, largest, 64)
    for k in ks:
        style = {"color": "k", "lw": 1, "ls": "--"} if k == 1 else {"color": "0.45", "lw": 0.8, "ls": ":"}
        ax.plot(grid, np.minimum(1.0, k / grid), **style, label=f"chance K/N, K={k}")

    ax.set_xscale("log")
    ax.set_yscale("log")
    # Expected recall far below chance tends to 0, so the axis stops a decade under the lowest chance.
    ax.set_ylim(bottom=_log_floor(chances), top=1.5)
    ax.set_xlim(left=1.5)
    _plain_log_ticks(ax.xaxis, subs=(1.0, 2.0, 5.0))
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("candidate pool size N (log scale)")
    ax.set_ylabel("Recall@K (expected over pools, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return to_png(fig)


def negatives_plot(pools: list, rows: dict, heads_names: list[str], title: str) -> str:
    """Plot Recall@1 per pool with uniform and with pathology-matched negatives, in two panels on one y axis.

    ``rows[(heads, pool)]`` is ``{"random": entry, "label_matched": entry}`` with either entry possibly None.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    colors = heads_colors(heads_names)
    width = 0.8 / max(1, len(heads_names))
    positions = np.arange(len(pools))
    for ax, negatives, panel in zip(axes, ("random", "label_matched"),
                                    ("random negatives (uniform pools)", "pathology-matched negatives")):
        for index, heads in enumerate(heads_names):
            entries = [rows.get((heads, pool), {}).get(negatives) for pool in pools]
            xs = positions + (index - (len(heads_names) - 1) / 2) * width
            values = [_value(e) for e in entries]
            errors = np.array([_error(e) for e in entries]).T
            ax.errorbar(xs, values, yerr=errors, color=colors[heads], ls="none", marker="o", ms=4, capsize=3,
                        label=heads_title(heads))
            for x, entry in zip(xs, entries):
                if entry is not None and not is_missing(entry.get("chance")):
                    ax.hlines(entry["chance"], x - width / 2, x + width / 2, color="k", lw=1.2)
        ax.set_xticks(positions, [fmt_pool(p) for p in pools])
        ax.set_xlabel("pool size N")
        ax.set_title(panel, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("Recall@1 (black bar: chance)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


def views_plot(rows: list[dict], title: str) -> str:
    """Plot lift over chance with its interval for each (heads, direction, level, image level) row, where 1 is chance.

    Each row is ``{"run": run, "entry": recall entry}``.
    """
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(rows) + 1.2))
    colors = heads_colors([row["run"]["heads"] for row in rows])
    labels = []
    for position, row in enumerate(rows):
        run, entry = row["run"], row["entry"]
        labels.append(f"{heads_title(run['heads'])}: {direction_title(run.get('direction', 'image_to_report'))}, "
                      f"{run.get('level', 'study')} level, {image_level_title(run.get('image_level', 'image'))}, "
                      f"N={fmt_pool(entry['pool'])}")
        below, above = _error(entry, "lift_ci95", "lift")
        lift = entry.get("lift")
        if is_missing(lift):
            continue
        ax.errorbar([lift], [position], xerr=[[below], [above]], color=colors[run["heads"]], marker="o", ms=4,
                    capsize=3)
    ax.axvline(1.0, color="k", ls="--", lw=1, label="chance (lift 1)")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Recall@1 / chance (lift), 95% interval")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    return to_png(fig)


def assignment_plot(runs: list[dict], title: str) -> str:
    """Plot the share of pairs an optimal one-to-one matching recovers against batch size, and image-by-image argmax."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    colors = heads_colors([run["heads"] for run in runs])
    sizes = sorted({a["batch_size"] for run in runs for a in run["assignment"]})
    for run in runs:
        entries = sorted(run["assignment"], key=lambda a: a["batch_size"])
        xs = [a["batch_size"] for a in entries]
        errors = np.array([_error(a) for a in entries]).T
        color = colors[run["heads"]]
        ax.errorbar(xs, [_value(a) for a in entries], yerr=errors, color=color, marker="o", ms=4, capsize=3,
                    label=f"{heads_title(run['heads'])}, one-to-one matching")
        argmax = [a.get("argmax_value") for a in entries]
        ax.plot(xs, [math.nan if is_missing(v) else v for v in argmax], color=color, ls=":", marker="o", ms=4,
                mfc="white", label=f"{heads_title(run['heads'])}, image by image")
    ax.plot(sizes, [1.0 / n for n in sizes], "k--", lw=1, label="chance 1/N")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [fmt_count(n) for n in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size N (images and their N reports)")
    ax.set_ylabel("share of pairs recovered")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return to_png(fig)


def probe_plot(label_rows: list[dict], heads_names: list[str], title: str) -> str:
    """Plot per-label probe AUROC with its interval per heads, macro AUROC first. 0.5 is no information.

    Each row is ``{"name": label, "entries": {heads: {"auroc": .., "ci95": ..} or None}}``.
    """
    fig, ax = plt.subplots(figsize=(6.4, 0.42 * len(label_rows) * max(1, len(heads_names)) / 1.6 + 1.3))
    colors = heads_colors(heads_names)
    step = 0.7 / max(1, len(heads_names))
    for index, heads in enumerate(heads_names):
        labelled = False
        for position, row in enumerate(label_rows):
            entry = row["entries"].get(heads)
            if entry is None or is_missing(entry.get("auroc")):
                continue
            below, above = _error(entry, "ci95", "auroc")
            y = position + (index - (len(heads_names) - 1) / 2) * step
            ax.errorbar([entry["auroc"]], [y], xerr=[[below], [above]], color=colors[heads], marker="o", ms=4,
                        capsize=2, label=None if labelled else heads_title(heads))
            labelled = True
    ax.axvline(0.5, color="k", ls="--", lw=1, label="no information (0.5)")
    ax.set_yticks(range(len(label_rows)), [row["name"] for row in label_rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test AUROC, 95% patient-bootstrap interval")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return to_png(fig)


def bin_labels(edges: list[int]) -> list[str]:
    """Name each rank bin ``[edges[i], edges[i + 1])`` by its ranks: "1", "3–5", ..."""
    labels = []
    for low, high in zip(edges[:-1], edges[1:]):
        last = high - 1
        labels.append(fmt_count(low) if last == low else f"{fmt_count(low)}–{fmt_count(last)}")
    return labels


def rank_histogram_plot(runs: list[dict], title: str) -> str:
    """Plot the share of images per full-pool rank bin for each heads, beside the share chance puts there.

    Every run must carry a ``rank_histogram`` with the same bins.
    """
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    colors = heads_colors([run["heads"] for run in runs])
    edges = runs[0]["rank_histogram"]["bin_edges"]
    positions = np.arange(len(edges) - 1)
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        histogram = run["rank_histogram"]
        shares = np.asarray(histogram["counts"], dtype=float) / max(1, histogram["n_queries"])
        xs = positions[:len(shares)] + (index - (len(runs) - 1) / 2) * width
        ax.bar(xs, shares, width=width, color=colors[run["heads"]], label=heads_title(run["heads"]))
    n_candidates = runs[0]["rank_histogram"]["n_candidates"]
    chance = np.diff(edges) / n_candidates
    ax.hlines(chance, positions - 0.45, positions + 0.45, color="k", lw=1.5, label="chance (rank uniform)")
    ax.set_xticks(positions, bin_labels(edges), fontsize=8, rotation=30)
    ax.set_xlabel(f"rank of the image's own report among all {fmt_count(n_candidates)} candidates (log-spaced bins)")
    ax.set_ylabel("share of images")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return to_png(fig)
