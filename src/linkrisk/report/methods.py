"""The report's methods section, written from the ``config`` and run fields of a results dict.

Each item states a definition or setting as the results record it. An
item whose fields are absent is left out.
"""

from __future__ import annotations

from linkrisk.report.format import (
    as_dict, as_list, direction_title, fmt_count, fmt_epsilon, fmt_num, fmt_pool, fmt_sci, group_title, heads_title,
    image_level_title, is_missing)
from linkrisk.report.sections import Group

LABEL_POLICIES = {
    "zeros": "uncertain (−1) and blank labels count as negative",
    "ones": "uncertain (−1) labels count as positive and blank ones as negative",
    "ignore": "observations that the true report has as uncertain or blank are left out of the comparison",
}
TIE_RULES = {
    "random": "candidates scoring exactly equal to the true one (for example identical texts) are ordered at random, "
              "and the value is the expectation over tie orders",
    "optimistic": "the true candidate wins every tie",
    "pessimistic": "the true candidate loses every tie",
}


def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def _pools_item(results: dict, runs: list[dict]) -> dict | None:
    config = as_dict(results.get("config"))
    pools = as_list(config.get("pools"))
    if not pools:
        pools = list(dict.fromkeys(e["pool"] for run in runs for e in run.get("recall", [])))
    ks = as_list(config.get("ks")) or sorted({e["k"] for run in runs for e in run.get("recall", [])})
    if not pools:
        return None
    return {"title": "Candidate pools and chance", "text": (
        "A pool of size N is the query's true candidate plus N − 1 other candidates drawn uniformly without "
        "replacement from the cohort; \"full\" is every candidate. Recall@K is the exact expectation over all such "
        "pools (hypergeometric closed form), not a sampled estimate. Chance is K/N (K/M in the full pool of M "
        "candidates) and lift is Recall@K divided by chance. "
        f"Pools requested: {_join(fmt_pool(p) for p in pools)}. K values: {_join(ks)}. A pool that is not smaller "
        "than a cohort's candidate set is left out because the full pool covers it, and so is K ≥ N.")}


def _ties_item(groups: list[Group]) -> dict | None:
    runs = [run for group in groups for run in group.main]
    rules = list(dict.fromkeys(run.get("tie_rule") for run in runs if run.get("tie_rule")))
    if not rules:
        return None
    described = "; ".join(f"{rule}: {TIE_RULES.get(rule, rule)}" for rule in rules)
    parts = []
    for group in groups:
        counts = {run["heads"]: f"{fmt_count(run.get('queries_with_ties'))} of {fmt_count(run.get('n_queries'))}"
                  for run in group.main if "queries_with_ties" in run}
        if len(set(counts.values())) == 1:
            parts.append(f"{group.title}: {next(iter(counts.values()))}")
        else:
            parts.extend(f"{group.title}, {heads_title(heads)}: {count}" for heads, count in counts.items())
    counts = "; ".join(parts)
    text = (f"Tie rule of every value and interval: {described}. Optimistic and pessimistic values are in the "
            "Recall@K tables.")
    if counts:
        text += f" Queries whose true candidate ties with another: {counts}."
    return {"title": "Ties", "text": text}


def _units_item(runs: list[dict]) -> dict | None:
    kinds = list(dict.fromkeys(
        (run.get("direction", "image_to_report"), run.get("level", "study"), run.get("image_level", "image"),
         run.get("candidate_unit"), bool(run.get("merge_identical"))) for run in runs if run.get("candidate_unit")))
    if not kinds:
        return None
    parts = []
    for direction, level, image_level, unit, merged in kinds:
        part = (f"{direction_title(direction)}, {level} level, {image_level_title(image_level)}: one candidate is a "
                f"{unit}")
        parts.append(part + (" (identical report texts merged)" if merged else ""))
    return {"title": "Queries and candidate units", "text": (
        "At study level only the query's own study is a hit; at patient level any study of the same patient is, "
        "and pools are pools of patients. A candidate made of several rows scores its best row. "
        + "; ".join(parts) + ".")}


def _negatives_item(groups: list[Group]) -> dict | None:
    matched = [run for group in groups for run in group.matched]
    if not matched:
        return None
    policies = list(dict.fromkeys(str(run.get("label_policy")) for run in matched))
    fallbacks = list(dict.fromkeys(str(run.get("fallback") or "none") for run in matched))
    policy_text = "; ".join(f"{p}: {LABEL_POLICIES.get(p, p)}" for p in policies)
    return {"title": "Pathology-matched negatives", "text": (
        "Pathology-matched pools draw the other candidates only from those whose label vector equals the true "
        "report's after the label policy, which removes linkage by pathology alone. Candidates without any known "
        f"label are left out. Label policy: {policy_text}. A label group smaller than N caps the pool at the "
        "group; the tables give the effective pool sizes and the share of queries whose own group filled the pool, "
        f"and chance is the mean of min(1, K/N_q). Fallback: {_join(fallbacks)}.")}


def _intervals_item(results: dict, groups: list[Group]) -> dict | None:
    config = as_dict(results.get("config"))
    n_boot = config.get("n_boot")
    if is_missing(n_boot):
        n_boot = next((p.get("n_boot") for p in as_list(results.get("probe")) if not is_missing(p.get("n_boot"))), None)
    if n_boot is None:
        return None
    seed = config.get("seed")
    small = [f"{group.title} ({fmt_count(run.get('n_patients'))} patients)" for group in groups
             for run in group.main[:1] if not is_missing(run.get("n_patients")) and run["n_patients"] < 30]
    text = (f"95% percentile intervals from {fmt_count(n_boot)} bootstrap resamples of patients"
            + (f" (seed {fmt_count(seed)})" if not is_missing(seed) else "")
            + ": all images of a drawn patient enter together, and all intervals of one run share the resamples. "
            "The candidate set stays fixed, so an interval covers the choice of queried patients only.")
    if small:
        text += (" With fewer than about 30 patients such intervals cover less than their nominal 95%, which "
                 f"applies here to {_join(small)}.")
    return {"title": "Intervals", "text": text}


def _assignment_item(runs: list[dict]) -> dict | None:
    entries = [a for run in runs for a in as_list(run.get("assignment"))]
    if not entries:
        return None
    batches = _join(sorted({fmt_count(a.get("n_batches")) for a in entries}))
    return {"title": "One-to-one assignment attack", "text": (
        "An attacker holding N images and their N reports matches all of them at once (each report to exactly one "
        "image, maximising the total similarity). The value is the share of pairs recovered, averaged over "
        f"{batches} random batches per N; \"image by image\" links each image to its best report in the same "
        "batches. Chance is 1/N.")}


def _risk_item(runs: list[dict]) -> dict | None:
    if not any(run.get("rank_histogram") for run in runs):
        return None
    return {"title": "Per-record risk", "text": (
        "The histogram counts each image's rank of its own report in the full pool over bins of 1, 2, 3–5, 6–10, "
        "11–20, 21–50, ... ranks. With random ties an image whose report ties with others has its rank spread "
        "evenly over the tied ranks, so counts are expected counts. Chance puts each rank with probability 1/M.")}


def _dp_rows(mitigation: dict) -> list[tuple[str, str]]:
    spent = as_dict(mitigation.get("epsilon_spent"))
    rows = [
        ("target ε", fmt_epsilon(mitigation.get("epsilon"))),
        ("ε spent (PRV / RDP accountant)", f"{fmt_num(spent.get('prv'), 4)} / {fmt_num(spent.get('rdp'), 4)}"),
        ("δ", fmt_sci(mitigation.get("delta"))),
        ("accountant used to calibrate the noise", str(mitigation.get("accountant", "n/a"))),
        ("noise multiplier", fmt_num(mitigation.get("noise_multiplier"))),
        ("sampling", f"Poisson, rate {fmt_num(mitigation.get('sample_rate'))}, expected batch "
                     f"{fmt_num(mitigation.get('expected_batch_size'), 1)}"),
        ("steps (empty batches)",
         f"{fmt_count(mitigation.get('steps'))} ({fmt_count(mitigation.get('empty_batches'))})"),
        ("clipping norm", fmt_num(mitigation.get("max_grad_norm"), 2)),
        ("loss", str(mitigation.get("loss_description") or mitigation.get("loss", "n/a"))),
        ("privacy unit", f"{mitigation.get('privacy_unit', 'n/a')} ({fmt_count(mitigation.get('n_private_patients'))} "
                         "in training)"),
        ("initialisation", str(mitigation.get("initialisation", "n/a"))),
        ("secure mode", "on" if mitigation.get("secure_mode") else "off"),
        ("ε is a formal guarantee", {True: "yes", False: "no"}.get(mitigation.get("formal_guarantee"), "n/a")),
    ]
    return [(name, value) for name, value in rows if value not in ("n/a", "n/a / n/a")]


def _dp_item(results: dict) -> dict | None:
    mitigation = results.get("mitigation")
    if not isinstance(mitigation, dict) or "epsilon" not in mitigation:
        return None
    text = ("New projection heads trained with DP-SGD (Opacus), the encoders frozen. The noise is calibrated so that "
            "both the PRV and the RDP accountant stay within the target ε for a fixed noise multiplier.")
    notes = [str(note) for note in as_list(mitigation.get("guarantee_notes"))]
    return {"title": "Differentially private training", "text": text, "table": _dp_rows(mitigation), "notes": notes}


def _sweep_item(results: dict) -> dict | None:
    sweep = results.get("sweep")
    if not isinstance(sweep, dict) or not sweep.get("points"):
        return None
    formal = [fmt_epsilon(p.get("epsilon")) for p in sweep["points"] if as_dict(p.get("dp")).get("formal_guarantee")]
    informal = [fmt_epsilon(p.get("epsilon")) for p in sweep["points"]
                if as_dict(p.get("dp")).get("formal_guarantee") is False]
    losses = list(dict.fromkeys(str(as_dict(p.get("dp")).get("loss_description")) for p in sweep["points"]
                                if as_dict(p.get("dp")).get("loss_description")))
    deltas = list(dict.fromkeys(fmt_sci(as_dict(p.get("dp")).get("delta")) for p in sweep["points"]
                                if as_dict(p.get("dp")).get("delta") is not None))
    text = ("Each ε of the frontier trains new DP heads on the training cohort and audits and probes every target "
            "with them; a transfer target is another cohort, the heads applied unchanged.")
    if losses:
        text += f" Loss: {_join(losses)}."
    if deltas:
        text += f" δ: {_join(deltas)}."
    if formal:
        text += f" ε is a formal guarantee at ε = {_join(formal)}."
    if informal:
        text += (f" It is not at ε = {_join(informal)} (ε = ∞ trains without clipping or noise; in-batch negatives "
                 "or seeded sampling and noise also void it).")
    return {"title": "ε sweep", "text": text}


def _model_item(results: dict, runs: list[dict]) -> dict | None:
    model = results.get("model")
    if isinstance(model, dict) and model.get("image_encoder"):
        image, text = as_dict(model.get("image_encoder")), as_dict(model.get("text_encoder"))
        described = (f"Frozen image encoder {image.get('name', 'n/a')}, frozen text encoder {text.get('name', 'n/a')}"
                     + (f" ({text['config_name']}, {text.get('dim')}-d)" if text.get("config_name") else "")
                     + "; linear projection heads to a shared space fitted with symmetric InfoNCE on the training "
                       "patients, stopped early on a patient-disjoint validation part.")
        history = as_dict(as_dict(model.get("original_heads")).get("history"))
        if history.get("n_val_patients") is not None:
            described += (f" The training patients include the {fmt_count(history['n_val_patients'])} that the "
                          "original heads kept back for early stopping and never fitted on.")
        return {"title": "Model", "text": described}
    names = list(dict.fromkeys(str(run["model"]) for run in runs if run.get("model")))
    if names:
        return {"title": "Models", "text": f"Audited models: {_join(names)}."}
    return None


def _probe_item(results: dict) -> dict | None:
    probes = as_list(results.get("probe"))
    if not probes:
        return None
    minimum = next((p.get("min_count") for p in probes if p.get("min_count") is not None), None)
    c_values = _join(dict.fromkeys(str(p.get("C")) for p in probes if p.get("C") is not None))
    return {"title": "Linear probes", "text": (
        "One logistic regression per label on the image embeddings, fitted on the training split and scored by "
        "AUROC on the test split; uncertain and unknown labels are left out of that label's fit and score. The macro "
        "AUROC averages the labels used"
        + (f", those with at least {minimum} positive and {minimum} negative images in each split" if minimum else "")
        + ". Per-label and macro intervals use the patient resamples in which every used label has both classes."
        + (f" Regularisation C: {c_values}." if c_values else ""))}


def _refit_item(results: dict) -> dict | None:
    refits = as_list(results.get("refit"))
    if not refits:
        return None
    parts = []
    for entry in refits:
        parts.append(f"{group_title(None, entry.get('target'))} attacked with pairs from "
                     f"{group_title(None, entry.get('aux'))}: {entry.get('threat_model', 'n/a')}; methods "
                     f"{_join(as_list(entry.get('methods')))}; k = {_join(as_list(entry.get('ks')))}; "
                     f"{fmt_count(entry.get('repeats'))} draws per numeric k")
    return {"title": "Refit attacker", "text": "; ".join(parts) + "."}


def _software_item(results: dict) -> dict | None:
    machine = as_dict(results.get("machine"))
    parts = []
    if results.get("linkrisk_version"):
        parts.append(f"linkrisk {results['linkrisk_version']}")
    if machine.get("python"):
        parts.append(f"Python {machine['python']}")
    if results.get("started"):
        parts.append(f"started {results['started']}, finished {results.get('finished', 'n/a')}")
    return {"title": "Software", "text": "; ".join(parts) + "."} if parts else None


def methods_items(results: dict, groups: list[Group]) -> list[dict]:
    """Return the methods items, ``{title, text}`` and for DP training also ``table`` and ``notes``."""
    runs = as_list(results.get("runs"))
    main_runs = [run for group in groups for run in group.main]
    items = [
        _pools_item(results, runs), _ties_item(groups), _units_item(runs), _negatives_item(groups),
        _intervals_item(results, groups), _assignment_item(main_runs), _risk_item(main_runs), _dp_item(results),
        _sweep_item(results),
        _model_item(results, runs), _probe_item(results), _refit_item(results), _software_item(results),
    ]
    return [item for item in items if item is not None]


def uses_reference_model(results: dict) -> bool:
    """Return True when the image encoder is the offline reference model, which has no chest X-ray weights."""
    image = as_dict(results.get("model")).get("image_encoder") if isinstance(results.get("model"), dict) else None
    return isinstance(image, dict) and image.get("name") in ("randconv", "histdct")
