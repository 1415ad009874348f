"""Self-contained HTML report: figures embedded as base64 PNG, no external assets.

The report shows counts, rates and settings only; it never includes
report text or record ids.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from linkrisk._io import write_text  # noqa: E402

COHORT_TITLES = {
    "covid_test": "COVID-19 collection, held-out patients",
    "covid_train": "COVID-19 collection, training patients",
    "openi": "Open-i (external, no retraining)",
}
HEADS_TITLES = {"original": "original heads", "dp": "DP heads"}
PROBE_TITLES = {"covid": "the COVID-19 collection (findings)", "openi": "Open-i (CheXpert labels)"}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _recall_plot(runs: list[dict], cohort: str) -> str:
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    chance_drawn = False
    floor = 1.0
    for run in runs:
        if run["cohort"] != cohort or run["negatives"] != "random" or not run["recall_at_1_curve"]:
            continue
        curve = run["recall_at_1_curve"]
        pools = [p["pool"] for p in curve]
        ax.plot(pools, [p["value"] for p in curve], marker="o", ms=3, label=HEADS_TITLES.get(run["heads"], run["heads"]))
        ax.fill_between(pools, [p["ci95"][0] for p in curve], [p["ci95"][1] for p in curve], alpha=0.2)
        floor = min(floor, min(p["chance"] for p in curve) / 10.0)
        if not chance_drawn:
            ax.plot(pools, [p["chance"] for p in curve], "k--", lw=1, label="chance (1/N)")
            chance_drawn = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Expected recall falls towards 0 far below chance; cut the axis a decade under the lowest chance.
    ax.set_ylim(bottom=floor, top=1.5)
    ax.set_xlabel("candidate pool size N")
    ax.set_ylabel("Recall@1 (expected over pools)")
    ax.set_title(COHORT_TITLES.get(cohort, cohort), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _headline(run: dict) -> dict | None:
    """Recall@1 at N = 100 when the cohort has more candidates, else at the full pool."""
    entries = {e["pool"]: e for e in run["recall"] if e["k"] == 1}
    return entries.get(100) or entries.get("full")


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def render_html(results: dict) -> str:
    """Render the report for a results dict as produced by the demo pipeline."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("linkrisk", "report/templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.filters["pct"] = _pct
    env.filters["num"] = lambda v, digits=2: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
    main = [run for run in results["runs"] if run.get("view") != "extra"]
    random_runs = [run for run in main if run["negatives"] == "random"]
    matched_runs = [run for run in main if run["negatives"] == "label_matched"]
    extra_runs = [run for run in results["runs"] if run.get("view") == "extra"]
    cohorts = list(dict.fromkeys(run["cohort"] for run in random_runs))
    plots = {cohort: _recall_plot(random_runs, cohort) for cohort in cohorts}
    headlines = {(run["cohort"], run["heads"]): _headline(run) for run in random_runs}
    mitigation_html = ""
    if results.get("sweep"):
        from linkrisk.report.mitigation import render_mitigation_section

        mitigation_html = render_mitigation_section(results)
    return env.get_template("report.html").render(
        results=results, mitigation_html=mitigation_html, random_runs=random_runs, matched_runs=matched_runs, cohorts=cohorts, plots=plots,
        headlines=headlines, extra_rows=[(run, _headline(run)) for run in extra_runs],
        cohort_titles=COHORT_TITLES, heads_titles=HEADS_TITLES, probe_titles=PROBE_TITLES,
    )


def write_html_report(results: dict, path: Path) -> None:
    write_text(Path(path), render_html(results))
