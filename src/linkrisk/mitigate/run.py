"""``linkrisk mitigate``: the ε sweep, the refit attacker and their report, from ``linkrisk embed`` folders."""

from __future__ import annotations

import datetime
import math
import platform
from pathlib import Path

import numpy as np

from linkrisk import __version__
from linkrisk._io import write_json
from linkrisk._logging import stage
from linkrisk.errors import ConfigError, InputError
from linkrisk.audit.refit import refit_attack
from linkrisk.mitigate.dp import DPConfig
from linkrisk.mitigate.sweep import epsilon_sweep, headline_pools
from linkrisk.models.precomputed import FeatureCohort, load_feature_cohort
from linkrisk.report.mitigation import write_mitigation_report


def refit_on_targets(aux: FeatureCohort, targets: list[FeatureCohort], ks: list, n_boot: int, seed: int,
                     progress: bool = False) -> list[dict]:
    """Run the refit attacker with ``aux`` pairs against every target; one entry per target.

    ``progress`` shows the attacker's progress bars (see :func:`~linkrisk.audit.refit.refit_attack`).
    """
    entries = []
    for target in targets:
        with stage(f"refit attacker: {aux.name} pairs against {target.name}"):
            result = refit_attack(aux.image_features, aux.report_features, aux.report_row, aux.patient_ids,
                                  target.image_features, target.report_features, target.report_row,
                                  target.patient_ids, ks=ks, pools=headline_pools(len(target.report_features)),
                                  n_boot=n_boot, seed=seed, progress=progress)
        entries.append({"target": target.name, "aux": aux.name, **result, "table": refit_table(result)})
    return entries


def refit_table(result: dict) -> list[dict]:
    """Summarise the attack per (method, k): the first draw's Recall@1 at the smallest pool with its CI, and the spread over draws."""
    rows = []
    for summary in result["summary"]:
        first = next(e for e in result["entries"] if e["method"] == summary["method"] and e["k"] == summary["k"])
        recall, spread = first["recall"][0], summary["recall"][0]
        rows.append({"method": summary["method"], "k": summary["k"], "n_aux_pairs": first["n_aux_pairs"],
                     "pool": recall["pool"], "value": recall["value"], "ci95": recall["ci95"], "lift": recall["lift"],
                     "mean_normalised_rank": first["mean_normalised_rank"], "n_repeats": summary["n_repeats"],
                     "repeats_min": spread["min"], "repeats_max": spread["max"], "repeats_mean": spread["mean"]})
    return rows


def split_holdout(cohort: FeatureCohort, fraction: float, seed: int) -> tuple[FeatureCohort, FeatureCohort]:
    """Split ``cohort`` patient-disjointly into (training part, held-out part); ``fraction`` of patients held out."""
    if not 0 < fraction < 1:
        raise ConfigError(f"holdout fraction must be in (0, 1), got {fraction}")
    patients = np.unique(cohort.patient_ids)
    n_held = int(round(fraction * len(patients)))
    if n_held < 1 or n_held >= len(patients):
        raise InputError(f"{cohort.name}: {len(patients)} patients cannot be split with holdout {fraction}; "
                         "each part needs at least one patient")
    held = set(np.random.default_rng(seed).permutation(patients)[:n_held])
    return (cohort.subset(set(patients) - held, f"{cohort.name}_train"),
            cohort.subset(held, f"{cohort.name}_heldout"))


def run_mitigation(train_dir: Path, public_dir: Path, target_dirs: list[Path], out: Path, epsilons: list[float],
                   config: DPConfig, refit_aux: Path | None = None, refit_ks: list = (50, 200, "all"),
                   holdout: float = 0.0, n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Run the sweep (and the refit attacker) and write ``mitigate.json`` and ``report.html`` into ``out``.

    With ``holdout`` > 0, that fraction of the training folder's patients is kept out of DP training
    and audited as "held-out patients"; the training patients are always audited too.
    """
    started = datetime.datetime.now(datetime.timezone.utc)
    train = load_feature_cohort(train_dir)
    targets = []
    if holdout:
        train, held_out = split_holdout(train, holdout, seed)
        targets.append(held_out)
    public = load_feature_cohort(public_dir)
    targets += [train] + [load_feature_cohort(folder) for folder in target_dirs]
    sweep = epsilon_sweep(train, public, targets, epsilons, config, n_boot=n_boot, seed=seed,
                          checkpoint_dir=Path(out) / "heads", progress=progress)
    refit = refit_on_targets(load_feature_cohort(refit_aux), targets, list(refit_ks), n_boot, seed,
                             progress=progress) if refit_aux else []
    results = {
        "linkrisk_version": __version__,
        "kind": "mitigation",
        "inputs": {"train": str(train_dir), "public": str(public_dir), "targets": [str(t) for t in target_dirs],
                   "refit_aux": str(refit_aux) if refit_aux else None, "holdout": holdout},
        "epsilons": [e if math.isfinite(e) else "inf" for e in epsilons],
        "config": {key: (value if not isinstance(value, float) or math.isfinite(value) else "inf")
                   for key, value in vars(config).items()},
        "n_boot": n_boot, "seed": seed,
        "sweep": sweep,
        "refit": refit,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    write_json(Path(out) / "mitigate.json", results)
    write_mitigation_report(results, Path(out) / "report.html")
    return results
