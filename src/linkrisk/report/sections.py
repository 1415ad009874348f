"""Select what each report section shows from a results dict, as display-ready rows and figures.

Runs are grouped by (model, cohort): the demo's runs name no model, and
runs of a config-driven audit of several models carry ``"model"``. A
section whose data are absent from the results gets no entry, and the
template leaves it out.
"""

from __future__ import annotations

import dataclasses

from linkrisk.report import figures
from linkrisk.report.format import (
    as_dict, as_list, direction_title, fmt_count, fmt_epsilon, fmt_interval, fmt_lift, fmt_num, fmt_pct, fmt_points,
    fmt_pool, fmt_sci, fmt_signed, group_title, heads_title, image_level_title, is_missing, probe_heading, probe_title)

# The main audit: each image queries its own study's report. Other runs are shown as other directions and levels.
MAIN_VIEW = {"direction": "image_to_report", "level": "study", "image_level": "image"}
HEADLINE_POOL = 100
LARGE_POOL = 10_000


@dataclasses.dataclass
class Group:
    """The runs of one (model, cohort), heads in display order."""

    model: str | None
    cohort: str
    main: list[dict]
    matched: list[dict]
    views: list[dict]

    @property
    def title(self) -> str:
        return group_title(self.model, self.cohort)


def is_main_run(run: dict) -> bool:
    """Return True for the main audit (image → report, study level, each image), False for other views."""
    if run.get("view") == "extra":
        return False
    return all(run.get(key, default) == default for key, default in MAIN_VIEW.items())


def heads_order(heads_names) -> list[str]:
    """Order heads names: original first, DP second, others as they first appear."""
    names = list(dict.fromkeys(heads_names))
    rank = {"original": 0, "dp": 1}
    return sorted(names, key=lambda name: (rank.get(name, 2), names.index(name)))


def _sort_by_heads(runs: list[dict]) -> list[dict]:
    order = heads_order(run["heads"] for run in runs)
    return sorted(runs, key=lambda run: order.index(run["heads"]))


def build_groups(runs: list[dict]) -> list[Group]:
    """Group runs by (model, cohort) in order of first appearance."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (run.get("model"), run["cohort"])
        group = groups.setdefault(key, Group(key[0], key[1], [], [], []))
        if not is_main_run(run):
            group.views.append(run)
        elif run.get("negatives", "random") == "label_matched":
            group.matched.append(run)
        else:
            group.main.append(run)
    for group in groups.values():
        group.main = _sort_by_heads(group.main)
        group.matched = _sort_by_heads(group.matched)
        group.views = _sort_by_heads(group.views)
    return list(groups.values())


def recall_entry(run: dict, pool, k: int = 1) -> dict | None:
    return next((e for e in run.get("recall", []) if e.get("pool") == pool and e.get("k") == k), None)


def headline_entries(run: dict) -> tuple[dict | None, dict | None]:
    """Return Recall@1 at N = 100 and at N = 10,000, each replaced by the full pool when the cohort is smaller.

    The second is None when it would repeat the first (cohorts of at most 100 candidates).
    """
    full = recall_entry(run, "full")
    n_candidates = run.get("n_candidates")
    small = recall_entry(run, HEADLINE_POOL)
    if small is None and not is_missing(n_candidates) and n_candidates <= HEADLINE_POOL:
        small = full
    large = recall_entry(run, LARGE_POOL) or full
    return small, (None if large is small else large)


def chance_verdict(entry: dict | None) -> str:
    """Place an entry's 95% interval against chance: ``above``, ``below``, ``includes`` or ``unknown``."""
    if entry is None:
        return "unknown"
    ci, chance = entry.get("ci95"), entry.get("chance")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(is_missing(v) for v in (*ci, chance)):
        return "unknown"
    if ci[0] > chance:
        return "above"
    if ci[1] < chance:
        return "below"
    return "includes"


def _unit_plural(run: dict) -> str:
    plurals = {"report": "reports", "distinct report text": "distinct report texts"}
    return plurals.get(run.get("candidate_unit", "report"), "candidates")


def _pool_phrase(entry: dict, run: dict) -> str:
    if entry["pool"] == "full":
        return f"among all {fmt_count(run.get('n_candidates'))} candidate {_unit_plural(run)}"
    return f"in pools of {fmt_count(entry['pool'])} candidate {_unit_plural(run)}"


def format_recall(entry: dict | None) -> dict:
    """Format one recall entry's cells: value, interval, chance, lift and lift interval."""
    if entry is None:
        return {"pool": "", "value": "n/a", "ci": "n/a", "chance": "n/a", "lift": "n/a", "lift_ci": "n/a",
                "verdict": "unknown"}
    return {"pool": fmt_pool(entry.get("pool")), "value": fmt_pct(entry.get("value")),
            "ci": fmt_interval(entry.get("ci95")), "chance": fmt_pct(entry.get("chance")),
            "lift": fmt_lift(entry.get("lift")), "lift_ci": fmt_interval(entry.get("lift_ci95"), fmt_lift),
            "verdict": chance_verdict(entry)}


def _verdict_sentences(entry: dict, run: dict) -> list[str]:
    """Say where a headline entry's interval lies against chance, with the mean normalised rank when it helps."""
    verdict = chance_verdict(entry)
    if verdict == "above":
        return ["The whole interval lies above chance: the model links these images to their reports more often "
                "than guessing would."]
    if verdict == "below":
        return ["The whole interval lies below chance."]
    if verdict == "unknown":
        return ["No interval is available for this figure."]
    sentences = ["The interval includes chance, so at this pool size this audit cannot tell the linkage apart from "
                 "guessing."]
    full_pool = as_dict(run.get("full_pool"))
    ci = full_pool.get("mean_normalised_rank_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not is_missing(ci[1]) and ci[1] < 0.5:
        sentences.append(f"The mean normalised rank, {fmt_num(full_pool.get('mean_normalised_rank'))} "
                         f"{fmt_interval(ci, fmt_num)}, does lie below 0.5 (chance): the own report tends to rank "
                         "above a random other report.")
    return sentences


def _mitigation_sentences(entry: dict, mitigated: dict) -> list[str]:
    """Compare the DP heads' Recall@1 with the baseline ``entry`` at the same pool size."""
    after = recall_entry(mitigated, entry["pool"])
    if after is None:
        return ["The DP heads have no figure at the same pool size."]
    where = {"above": "that interval lies above chance", "below": "that interval lies below chance",
             "includes": "that interval includes chance", "unknown": "no interval"}[chance_verdict(after)]
    sentences = [f"With the DP heads it is {fmt_pct(after.get('value'))} (95% CI {fmt_interval(after.get('ci95'))}, "
                 f"{fmt_lift(after.get('lift'))} chance; {where})."]
    if is_missing(after.get("value")) or is_missing(entry.get("value")):
        return sentences
    change = after["value"] - entry["value"]
    sentences.append(f"DP lowered Recall@1 by {fmt_points(-change).lstrip('+')}." if change < 0
                     else "DP did not lower Recall@1 here.")
    before_ci, after_ci = entry.get("ci95"), after.get("ci95")
    if (isinstance(before_ci, (list, tuple)) and isinstance(after_ci, (list, tuple))
            and len(before_ci) == 2 and len(after_ci) == 2
            and not any(is_missing(v) for v in (*before_ci, *after_ci))
            and after_ci[0] <= before_ci[1] and before_ci[0] <= after_ci[1]):
        sentences.append("The two intervals overlap, so the change is not clearly larger than the uncertainty of "
                         "this cohort.")
    return sentences


def _linkage_sentences(group: Group) -> list[str]:
    """Describe a group's headline Recall@1 for a non-specialist: against chance, then with the DP heads."""
    baseline = next((run for run in group.main if run["heads"] == "original"), group.main[0])
    small, large = headline_entries(baseline)
    entry = small or large
    if entry is None:
        return [f"No Recall@1 figure is available for the {heads_title(baseline['heads'])}."]
    sentences = [
        f"With the {heads_title(baseline['heads'])}, the image's own report ranks first "
        f"{_pool_phrase(entry, baseline)} "
        f"for {fmt_pct(entry.get('value'))} of {fmt_count(baseline.get('n_queries'))} images "
        f"(95% CI {fmt_interval(entry.get('ci95'))}). Guessing would give {fmt_pct(entry.get('chance'))}, "
        f"so this is {fmt_lift(entry.get('lift'))} chance."]
    sentences.extend(_verdict_sentences(entry, baseline))
    if baseline.get("verdict"):
        sentences.append(f"Verdict: {baseline['verdict']}.")
    mitigated = next((run for run in group.main if run["heads"] == "dp" and run is not baseline), None)
    if mitigated is not None:
        sentences.extend(_mitigation_sentences(entry, mitigated))
    return sentences


def _utility_sentences(results: dict) -> list[str]:
    sentences = []
    for group in probe_groups(as_list(results.get("probe"))):
        by_heads = {probe["heads"]: probe for probe in group["probes"]}
        where = probe_title(group["cohort"]) + (f" ({group['model']})" if group["model"] else "")
        present = [heads for heads in heads_order(by_heads) if not is_missing(by_heads[heads].get("macro_auroc"))]
        if not present:
            minimum = by_heads[next(iter(by_heads))].get("min_count")
            need = f"at least {minimum} positive and {minimum} negative images" if minimum else "enough images"
            sentences.append(f"Diagnostic usefulness on {where} could not be measured: no label had {need} "
                             "in both the training and the test split.")
            continue
        parts = [f"{fmt_num(by_heads[h]['macro_auroc'])} {fmt_interval(by_heads[h].get('ci95'), fmt_num)} with the "
                 f"{heads_title(h)}" for h in present]
        sentence = (f"Diagnostic usefulness on {where}, as linear-probe macro AUROC (0.5 = no information, "
                    f"1 = perfect): {' and '.join(parts)}")
        if "original" in present and "dp" in present:
            change = by_heads["dp"]["macro_auroc"] - by_heads["original"]["macro_auroc"]
            sentence += f", a change of {fmt_signed(change)} from DP"
        sentences.append(sentence + ".")
    return sentences


def _privacy_sentences(results: dict) -> list[str]:
    mitigation = results.get("mitigation")
    sentences = []
    if isinstance(mitigation, dict) and "epsilon" in mitigation:
        sentence = (f"The DP heads were trained with differentially private SGD at ε = "
                    f"{fmt_epsilon(mitigation.get('epsilon'))}, δ = {fmt_sci(mitigation.get('delta'))} per "
                    f"{mitigation.get('privacy_unit', 'record')}.")
        guarantee = mitigation.get("formal_guarantee")
        if guarantee is True:
            sentence += " This ε is a formal guarantee under the assumptions listed in the methods."
        elif guarantee is False:
            sentence += " This ε is not a formal guarantee for this run (see the methods for why)."
        sentences.append(sentence)
    sweep = results.get("sweep")
    if isinstance(sweep, dict) and sweep.get("points"):
        values = ", ".join(fmt_epsilon(point.get("epsilon")) for point in sweep["points"])
        sentences.append(f"The frontier section repeats the trade-off at ε = {values}.")
    return sentences


def plain_words(results: dict, groups: list[Group]) -> dict:
    """Build the non-specialist summary: linkage per group, utility per probe and the DP setting."""
    linkage = [{"title": group.title, "sentences": _linkage_sentences(group)} for group in groups if group.main]
    return {"linkage": linkage, "utility": _utility_sentences(results), "privacy": _privacy_sentences(results)}


def summary_rows(groups: list[Group]) -> list[dict]:
    """Build one row per (group, heads) main audit with uniform pools: Recall@1 at N = 100 and at the large pool."""
    rows = []
    for group in groups:
        for run in group.main:
            small, large = headline_entries(run)
            full_pool = as_dict(run.get("full_pool"))
            rows.append({
                "group": group.title, "heads": heads_title(run["heads"]),
                "queries": fmt_count(run.get("n_queries")), "patients": fmt_count(run.get("n_patients")),
                "candidates": fmt_count(run.get("n_candidates")),
                "small": format_recall(small), "large": format_recall(large) if large else None,
                "mnr": fmt_num(full_pool.get("mean_normalised_rank")),
                "mnr_ci": fmt_interval(full_pool.get("mean_normalised_rank_ci95"), fmt_num),
            })
    return rows


def recall_sections(groups: list[Group]) -> list[dict]:
    """Build, per group, the Recall@K-against-N figure and the full Recall@K table of each heads."""
    sections = []
    for group in groups:
        runs = [run for run in group.main if run.get("recall") or run.get("recall_at_1_curve")]
        if not runs:
            continue
        tables = []
        for run in runs:
            rows = []
            for entry in run.get("recall", []):
                rows.append({"k": fmt_count(entry.get("k")), **format_recall(entry),
                             "pool": fmt_pool(entry.get("pool"), run.get("n_candidates")),
                             "optimistic": fmt_pct(entry.get("optimistic")),
                             "pessimistic": fmt_pct(entry.get("pessimistic"))})
            full_pool = as_dict(run.get("full_pool"))
            tables.append({
                "heads": heads_title(run["heads"]), "rows": rows,
                "queries": fmt_count(run.get("n_queries")), "patients": fmt_count(run.get("n_patients")),
                "candidates": fmt_count(run.get("n_candidates")), "ties": fmt_count(run.get("queries_with_ties")),
                "median_rank": fmt_num(full_pool.get("median_rank"), 1),
                "mrr": fmt_num(full_pool.get("mean_reciprocal_rank")),
                "mrr_ci": fmt_interval(full_pool.get("mean_reciprocal_rank_ci95"), fmt_num),
            })
        sections.append({"title": group.title, "figure": figures.recall_by_pool_plot(runs, group.title),
                         "tables": tables})
    return sections


def _pool_order(pools) -> list:
    numeric = sorted({p for p in pools if p != "full"})
    return numeric + (["full"] if "full" in pools else [])


def negatives_sections(groups: list[Group]) -> list[dict]:
    """Build, per group with pathology-matched runs, Recall@1 per pool with uniform and matched negatives."""
    sections = []
    for group in groups:
        if not group.matched:
            continue
        heads_names = heads_order([run["heads"] for run in group.main + group.matched])
        random_runs = {run["heads"]: run for run in group.main}
        matched_runs = {run["heads"]: run for run in group.matched}
        pools = _pool_order({e["pool"] for run in group.main + group.matched for e in run.get("recall", [])
                             if e.get("k") == 1})
        cells: dict[tuple, dict] = {}
        rows = []
        for pool in pools:
            for heads in heads_names:
                uniform = recall_entry(random_runs[heads], pool) if heads in random_runs else None
                matched = recall_entry(matched_runs[heads], pool) if heads in matched_runs else None
                if uniform is None and matched is None:
                    continue
                cells[(heads, pool)] = {"random": uniform, "label_matched": matched}
                effective = as_dict(as_dict(matched).get("effective_pool"))
                rows.append({
                    "pool": fmt_pool(pool), "heads": heads_title(heads),
                    "random": format_recall(uniform), "matched": format_recall(matched),
                    "effective": " / ".join(fmt_count(effective.get(key)) for key in ("min", "median", "max"))
                    if effective else "n/a",
                    "full_share": fmt_pct(as_dict(matched).get("full_pool_share")),
                })
        details = []
        for heads in heads_names:
            run = matched_runs.get(heads)
            if run is None:
                continue
            group_size = as_dict(run.get("group_size"))
            details.append({
                "heads": heads_title(heads), "queries": fmt_count(run.get("n_queries")),
                "candidates": fmt_count(run.get("n_candidates")),
                "without_labels": fmt_count(run.get("n_queries_without_labels")),
                "alone": fmt_count(run.get("queries_without_matched_negatives")),
                "group_size": " / ".join(fmt_count(group_size.get(key)) for key in ("min", "median", "max"))
                if group_size else "n/a",
                "label_policy": str(run.get("label_policy", "n/a")),
                "fallback": str(run.get("fallback") or "none"),
            })
        sections.append({"title": group.title, "rows": rows, "details": details,
                         "figure": figures.negatives_plot(pools, cells, heads_names, group.title)})
    return sections


def views_sections(groups: list[Group]) -> list[dict]:
    """Build, per group with other directions or levels, Recall@1 at the headline pool of every view."""
    sections = []
    for group in groups:
        if not group.views:
            continue
        plot_rows, rows = [], []
        for run in group.main + group.views:
            small, large = headline_entries(run)
            entry = small or large
            rows.append({
                "heads": heads_title(run["heads"]),
                "direction": direction_title(run.get("direction", MAIN_VIEW["direction"])),
                "level": str(run.get("level", MAIN_VIEW["level"])),
                "image_level": image_level_title(run.get("image_level", MAIN_VIEW["image_level"])),
                "negatives": "pathology-matched" if run.get("negatives") == "label_matched" else "random",
                "unit": str(run.get("candidate_unit", "report")),
                "queries": fmt_count(run.get("n_queries")), "candidates": fmt_count(run.get("n_candidates")),
                "recall": format_recall(entry),
                "entry_pool": fmt_pool(entry["pool"], run.get("n_candidates")) if entry else "n/a",
            })
            if entry is not None:
                plot_rows.append({"run": run, "entry": entry})
        sections.append({"title": group.title, "rows": rows,
                         "figure": figures.views_plot(plot_rows, group.title) if plot_rows else None})
    return sections


def assignment_sections(groups: list[Group]) -> list[dict]:
    """Build, per group, the one-to-one assignment attack table and figure of each heads."""
    sections = []
    for group in groups:
        runs = [run for run in group.main if run.get("assignment")]
        if not runs:
            continue
        rows = []
        for run in runs:
            for entry in sorted(run["assignment"], key=lambda a: a["batch_size"]):
                rows.append({"heads": heads_title(run["heads"]), "batch_size": fmt_count(entry["batch_size"]),
                             "n_batches": fmt_count(entry.get("n_batches")), **format_recall(entry),
                             "argmax": fmt_pct(entry.get("argmax_value"))})
        sections.append({"title": group.title, "rows": rows, "figure": figures.assignment_plot(runs, group.title)})
    return sections


def probe_groups(probes: list[dict]) -> list[dict]:
    """Group probe entries by (model, cohort), heads in display order."""
    groups: dict[tuple, list[dict]] = {}
    for probe in probes:
        groups.setdefault((probe.get("model"), probe["cohort"]), []).append(probe)
    result = []
    for (model, cohort), members in groups.items():
        order = heads_order(p["heads"] for p in members)
        result.append({"model": model, "cohort": cohort,
                       "probes": sorted(members, key=lambda p: order.index(p["heads"]))})
    return result


def _auroc_cell(entry: dict | None) -> str:
    if entry is None or is_missing(entry.get("auroc")):
        return "n/a"
    return f"{fmt_num(entry['auroc'])} {fmt_interval(entry.get('ci95'), fmt_num)}"


def probe_sections(probes: list[dict]) -> list[dict]:
    """Build, per probed cohort, macro and per-label AUROC with intervals for each heads, and the skipped labels."""
    sections = []
    for group in probe_groups(probes):
        heads_names = [p["heads"] for p in group["probes"]]
        by_heads = {p["heads"]: p for p in group["probes"]}
        names = list(dict.fromkeys(label["name"] for p in group["probes"] for label in as_list(p.get("labels"))))
        label_rows = [{"name": "macro AUROC", "entries": {
            h: {"auroc": p.get("macro_auroc"), "ci95": p.get("ci95")} for h, p in by_heads.items()}}]
        for name in names:
            label_rows.append({"name": str(name), "entries": {
                h: next((label for label in as_list(p.get("labels")) if label["name"] == name), None)
                for h, p in by_heads.items()}})
        table = []
        for row in label_rows:
            counts = next((e for e in row["entries"].values() if e and "n_test_pos" in e), None)
            table.append({
                "name": row["name"],
                "test_counts": f"{fmt_count(counts['n_test_pos'])} / {fmt_count(counts.get('n_test_neg'))}"
                if counts else "",
                "cells": [_auroc_cell(row["entries"].get(h)) for h in heads_names],
            })
        skipped = {}
        for probe in group["probes"]:
            for label in as_list(probe.get("skipped_labels")):
                skipped.setdefault(str(label.get("name")), str(label.get("reason", "")))
        first = group["probes"][0]
        title = probe_heading(group["cohort"]) + (f" ({group['model']})" if group["model"] else "")
        has_values = any(not is_missing(as_dict(e).get("auroc")) for row in label_rows for e in row["entries"].values())
        minimum = first.get("min_count")
        sections.append({
            "title": title, "heads": [heads_title(h) for h in heads_names], "table": table if has_values else [],
            "no_values": None if has_values else (
                "No label had " + (f"at least {minimum} positive and {minimum} negative images" if minimum else
                                   "enough positive and negative images") + " in both splits, so no AUROC is defined."),
            "skipped": sorted(skipped.items()),
            "images": f"{fmt_count(first.get('n_train_images'))} training / {fmt_count(first.get('n_test_images'))} "
                      "test images",
            "resamples": ", ".join(f"{heads_title(p['heads'])}: {fmt_count(p.get('bootstrap_resamples_used'))} of "
                                   f"{fmt_count(p.get('n_boot'))}" for p in group["probes"]),
            "figure": figures.probe_plot(label_rows, heads_names, title) if has_values else None,
        })
    return sections


def _share_up_to(histogram: dict, last_rank: int) -> tuple[float, float]:
    """Return the share of queries, and the share under chance, with a full-pool rank of at most ``last_rank``."""
    edges, counts = histogram["bin_edges"], histogram["counts"]
    included = [i for i in range(len(counts)) if edges[i + 1] - 1 <= last_rank]
    share = sum(counts[i] for i in included) / histogram["n_queries"] if histogram["n_queries"] else float("nan")
    chance = (edges[included[-1] + 1] - 1) / histogram["n_candidates"] if included else 0.0
    return share, chance


def risk_sections(groups: list[Group]) -> list[dict]:
    """Build, per group, the histogram of full-pool ranks of each heads, with the shares at rank 1 and in the top 10."""
    sections = []
    for group in groups:
        runs = [run for run in group.main if run.get("rank_histogram")]
        if not runs:
            continue
        rows = []
        for run in runs:
            histogram = run["rank_histogram"]
            top1, top1_chance = _share_up_to(histogram, 1)
            top10, top10_chance = _share_up_to(histogram, 10)
            rows.append({"heads": heads_title(run["heads"]), "queries": fmt_count(histogram["n_queries"]),
                         "candidates": fmt_count(histogram["n_candidates"]),
                         "top1": fmt_pct(top1), "top1_chance": fmt_pct(top1_chance),
                         "top10": fmt_pct(top10) if histogram["n_candidates"] > 10 else "n/a",
                         "top10_chance": fmt_pct(top10_chance) if histogram["n_candidates"] > 10 else "n/a"})
        # Runs of one group normally share their candidates and so their bins. Otherwise each set of bins gets a figure.
        by_edges: dict[tuple, list[dict]] = {}
        for run in runs:
            by_edges.setdefault(tuple(run["rank_histogram"]["bin_edges"]), []).append(run)
        plots = [figures.rank_histogram_plot(members, group.title) for members in by_edges.values()]
        sections.append({"title": group.title, "rows": rows, "figures": plots})
    return sections
