"""The privacy–linkage–utility frontier: DP heads at several ε, each audited and probed.

For every ε of the sweep, :func:`epsilon_sweep` trains heads with
:func:`~linkrisk.mitigate.dp.train_dp_heads` on the private training
cohort, embeds every target cohort with them and reports image→report
Recall@1 at N = 100 and N = 10,000 (pools the target cannot fill become
the full pool) with patient-bootstrap intervals, and probe macro AUROC
(probes fitted on the training cohort's image embeddings, scored on the
target's). The model's original heads are reported the same way as the
reference point. Targets carry their relation to the training cohort:
``training patients``, ``held-out patients`` (same source, disjoint
patients) or ``transfer`` (another cohort, heads applied unchanged).

Every finished ε point is written to ``<checkpoint_dir>/eps-<ε>.json``
with its heads in ``<checkpoint_dir>/eps-<ε>/``, and a rerun with the
same inputs and options reuses it. While a point trains, its DP training
state is saved after every epoch to ``<checkpoint_dir>/eps-<ε>/dp-training.pt``
(see :mod:`linkrisk.mitigate.dp`), so a killed run resumes after the
last complete epoch. That file is deleted once the point is finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from torch import nn

from linkrisk._io import write_json
from linkrisk._logging import logger, stage
from linkrisk._progress import progress_bar
from linkrisk.audit.design import build_design
from linkrisk.audit.run import run_audit
from linkrisk.errors import InputError
from linkrisk.mitigate.dp import DPConfig, train_dp_heads
from linkrisk.models.head_io import save_heads
from linkrisk.models.heads import embed_rows, plain_head
from linkrisk.models.precomputed import FeatureCohort
from linkrisk.probe import probe_macro_auroc

HEADLINE_POOLS = (100, 10_000)


def relation(target: FeatureCohort, train: FeatureCohort) -> str:
    """Return how ``target`` relates to ``train``: training patients, held-out patients or transfer."""
    target_patients, train_patients = set(target.patient_ids), set(train.patient_ids)
    if target.source == train.source and target_patients <= train_patients:
        return "training patients"
    if target.source == train.source and not target_patients & train_patients:
        return "held-out patients"
    if target.source == train.source:
        return "overlapping patients"
    return "transfer"


def headline_pools(n_candidates: int) -> list[int | str]:
    """Return the pools N = 100 and 10,000 that fit below the candidate count, then ``"full"``."""
    return [pool for pool in HEADLINE_POOLS if pool < n_candidates] + ["full"]


def audit_with_heads(image_head: nn.Module, text_head: nn.Module, target: FeatureCohort, n_boot: int,
                     seed: int) -> dict:
    """Embed ``target`` with the heads; return Recall@1 entries (with CIs) and the full-pool mean normalised rank."""
    image = embed_rows(image_head.eval(), target.image_features)
    report = embed_rows(text_head.eval(), target.report_features)
    design = build_design(image, report, target.report_row, target.patient_ids)
    result = run_audit(design, pools=headline_pools(len(report)), ks=[1], n_boot=n_boot, seed=seed)
    return {"recall_at_1": [{key: entry[key] for key in ("pool", "value", "ci95", "chance", "lift")}
                            for entry in result["recall"]],
            "mean_normalised_rank": result["full_pool"]["mean_normalised_rank"],
            "mean_normalised_rank_ci95": result["full_pool"].get("mean_normalised_rank_ci95"),
            "n_queries": result["n_queries"], "n_candidates": result["n_candidates"]}


def probe_with_heads(image_head: nn.Module, train: FeatureCohort, target: FeatureCohort, n_boot: int,
                     seed: int) -> dict:
    """Fit label probes on the training cohort's image embeddings and score them on the target's.

    Returns the probe result, or ``{"skipped": reason}`` when the target shares no label with the
    training cohort or shares patients with it. A probe scored on its own training patients would
    not measure utility.
    """
    labels = [name for name in train.label_names if name in target.label_names]
    if not labels:
        return {"skipped": "no label shared with the training cohort"}
    if set(target.patient_ids) & set(train.patient_ids):
        return {"skipped": "the target shares patients with the training cohort the probes are fitted on"}
    train_x = embed_rows(image_head.eval(), train.image_features)
    test_x = embed_rows(image_head.eval(), target.image_features)
    train_y = train.image_labels[:, [train.label_names.index(name) for name in labels]]
    test_y = target.image_labels[:, [target.label_names.index(name) for name in labels]]
    return probe_macro_auroc(train_x, train_y, test_x, test_y, target.patient_ids, labels, n_boot=n_boot, seed=seed)


TRAINING_STATE_NAME = "dp-training.pt"


def _heads_digest(*heads: nn.Module) -> str:
    """Hash the weights of ``heads``, which a cohort's fingerprint (features and ids only) does not cover."""
    digest = hashlib.sha256()
    for head in heads:
        for name, tensor in head.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _point_key(epsilon: float, train: FeatureCohort, public: FeatureCohort, targets: list[FeatureCohort],
               config: DPConfig, n_boot: int, seed: int) -> str:
    # The training cohort's heads are the starting point with init "original", so they key the point too.
    text = json.dumps({"epsilon": str(epsilon), "config": dataclasses.asdict(config), "n_boot": n_boot, "seed": seed,
                       "cohorts": [c.fingerprint for c in (train, public, *targets)],
                       "train_heads": _heads_digest(train.image_head, train.text_head)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _evaluate(name: str, image_head: nn.Module, text_head: nn.Module, train: FeatureCohort,
              targets: list[FeatureCohort], n_boot: int, seed: int) -> list[dict]:
    rows = []
    for target in targets:
        with stage(f"{name}: audit and probe {target.name}"):
            rows.append({"cohort": target.name, "relation": relation(target, train),
                         **audit_with_heads(image_head, text_head, target, n_boot, seed),
                         "probe": probe_with_heads(image_head, train, target, n_boot, seed)})
    return rows


def epsilon_sweep(train: FeatureCohort, public: FeatureCohort, targets: list[FeatureCohort],
                  epsilons: list[float], config: DPConfig = DPConfig(), n_boot: int = 1000, seed: int = 0,
                  checkpoint_dir: Path | None = None, progress: bool = True) -> dict:
    """Train DP heads at each ε and report linkage and utility on every target.

    Args:
        train: the private training cohort (pre-projection features, ids, patients, labels).
        public: the cohort marked public; its features form the negative bank and, with
            ``config.init == "public"``, the heads' starting point.
        targets: cohorts to audit and probe with each set of heads.
        epsilons: target ε values; ``math.inf`` trains without DP.
        config: DP options shared by every point (its ``epsilon`` is replaced).
        checkpoint_dir: folder for finished points and their heads; None keeps nothing.
        progress: show a progress bar over the ε points and one over each point's DP-SGD steps.

    Returns:
        ``{"original": [...], "points": [{"epsilon", "dp": record, "targets": [...]}, ...]}``.
    """
    if not targets:
        raise InputError("the sweep needs at least one target cohort to audit")
    with stage("original heads: audit and probe"):
        original = _evaluate("original heads", train.image_head, train.text_head, train, targets, n_boot, seed)
    points, to_train = [], len(epsilons)
    with progress_bar(progress, "points") as bar:
        task = bar.add_task("epsilon sweep", total=to_train)
        for epsilon in epsilons:
            key = _point_key(epsilon, train, public, targets, config, n_boot, seed)
            path = checkpoint_dir / f"eps-{epsilon:g}.json" if checkpoint_dir else None
            training_state = checkpoint_dir / f"eps-{epsilon:g}" / TRAINING_STATE_NAME if checkpoint_dir else None
            if path is not None and path.is_file():
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("key") == key:
                    logger.info("epsilon %g: reusing the finished point %s", epsilon, path)
                    points.append(stored["point"])
                    # A run killed after writing the point but before deleting the training state left it behind.
                    training_state.unlink(missing_ok=True)
                    # A reused point leaves the total, so the time remaining counts trained points only.
                    to_train -= 1
                    bar.update(task, total=to_train)
                    continue
            with stage(f"epsilon {epsilon:g}: train heads"):
                heads, record = train_dp_heads(train.image_features, train.report_features, train.report_row,
                                               train.patient_ids, public.image_features, public.report_features,
                                               dataclasses.replace(config, epsilon=epsilon), progress=progress,
                                               initial_heads=(train.image_head, train.text_head),
                                               checkpoint=training_state)
            point = {"epsilon": epsilon if math.isfinite(epsilon) else "inf", "dp": record,
                     "targets": _evaluate(f"epsilon {epsilon:g}", heads.image_head, heads.text_head, train, targets,
                                          n_boot, seed)}
            if path is not None:
                save_heads(checkpoint_dir / f"eps-{epsilon:g}", plain_head(heads.image_head),
                           plain_head(heads.text_head), {"dp": record})
                write_json(path, {"key": key, "point": point})
                training_state.unlink(missing_ok=True)
            points.append(point)
            bar.advance(task)
    return {"original": original, "points": points}


__all__ = ["HEADLINE_POOLS", "audit_with_heads", "epsilon_sweep", "headline_pools", "probe_with_heads", "relation"]
