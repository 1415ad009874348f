"""Self-contained HTML report: figures embedded as base64 PNG, no external assets.

The report is rendered from the results dict alone (the content of
``results.json``). It shows counts, rates and settings only; it never
includes report text or record ids, which ``results.json`` does not contain.
"""

from __future__ import annotations

from pathlib import Path

from linkrisk._io import write_text
from linkrisk.report import evidence, sections
# The titles are re-exported for callers of the former html module.
from linkrisk.report.format import COHORT_TITLES, HEADS_TITLES, PROBE_TITLES, as_list  # noqa: F401
from linkrisk.report.methods import methods_items, uses_reference_model
from linkrisk.report.mitigation import render_frontier_section, render_refit_section
from linkrisk.report.templating import environment
from linkrisk.report.validate import check_results

SECTION_TITLES = (
    ("plain-words", "In plain words"), ("summary", "Summary"), ("recall-by-pool", "Recall@K against pool size"),
    ("negatives", "Random and pathology-matched negatives"), ("views", "Other directions and levels"),
    ("evidence", "Tests, bounds and attribute shortcuts"), ("splits", "Split audit"),
    ("assignment", "One-to-one assignment attack"), ("frontier", "Mitigation across ε"),
    ("refit", "Refit attacker"), ("probes", "Utility: linear probes"), ("risk", "Per-record risk"),
    ("methods", "Methods"),
)


def _header(results: dict) -> str:
    parts = []
    if results.get("linkrisk_version"):
        parts.append(f"linkrisk {results['linkrisk_version']}")
    if results.get("started"):
        parts.append(f"run started {results['started']}, finished {results.get('finished', 'n/a')}")
    parts.append(f"results schema {results.get('schema_version', 'n/a')}")
    return " · ".join(parts)


def render_report(results: dict) -> str:
    """Render the HTML report of a results dict (the content of ``results.json``).

    Sections whose data are absent are left out. Raises ``InputError`` when
    the dict does not have the structure of ``results.json``.
    """
    check_results(results, "results")
    groups = sections.build_groups(as_list(results.get("runs")))
    sweep = results.get("sweep")
    context = {
        "header": _header(results),
        "plain": sections.plain_words(results, groups),
        "reference_model": uses_reference_model(results),
        "summary": sections.summary_rows(groups),
        "recall": sections.recall_sections(groups),
        "negatives": sections.negatives_sections(groups),
        "views": sections.views_sections(groups),
        "evidence": evidence.evidence_sections(groups),
        "splits": evidence.split_sections(results),
        "assignment": sections.assignment_sections(groups),
        "frontier": render_frontier_section(results) if isinstance(sweep, dict) and sweep.get("original") else "",
        "refit": render_refit_section(results),
        "probes": sections.probe_sections(as_list(results.get("probe"))),
        "risk": sections.risk_sections(groups),
        "methods": methods_items(results, groups),
    }
    plain = context["plain"]
    present = {
        "plain-words": bool(plain["linkage"] or plain["utility"] or plain["privacy"]),
        **{key: bool(context[key]) for key in ("summary", "negatives", "views", "evidence", "splits", "assignment",
                                               "frontier", "refit", "probes", "risk", "methods")},
        "recall-by-pool": bool(context["recall"]),
    }
    context["contents"] = [(key, title) for key, title in SECTION_TITLES if present[key]]
    return environment().get_template("report.html").render(**context)


def write_report(results: dict, path) -> Path:
    """Render the report of ``results`` and write it to ``path`` atomically, and return the path."""
    path = Path(path)
    write_text(path, render_report(results))
    return path


# The demo pipeline's name for write_report.
write_html_report = write_report
