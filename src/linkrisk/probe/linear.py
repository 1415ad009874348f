"""Linear-probe AUROC: one logistic regression per label on image embeddings.

A label is scored only when its known values include at least ``min_count``
positives and ``min_count`` negatives in the training split and in the test
split. Otherwise it is listed as skipped with the reason and its counts.
Uncertain (-1) and unknown (NaN) values are left out of that label's fit
and score.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from linkrisk.errors import ConfigError, InputError
from linkrisk.probe.bootstrap import weighted_auroc
from linkrisk.probe.summary import (DEFAULT_MIN_COUNT, check_labels, check_min_count, class_counts, count_fields,
                                    shortfall, summarise_aurocs)

__all__ = ["DEFAULT_C_GRID", "DEFAULT_TIE_TOLERANCE", "probe_macro_auroc", "select_c", "weighted_auroc"]

# Inverse regularisation strengths tried when C="cv": 1e-3 to 1e3, one per decade.
DEFAULT_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 7))
DEFAULT_CV_FOLDS = 5
# Mean cross-validated AUROCs closer than this count as tied. Differences
# this small can come from the solver's stopping tolerance or from one
# swapped pair in a small fold, so they should not decide C.
DEFAULT_TIE_TOLERANCE = 1e-3
MAX_ITER = 5000


def probe_macro_auroc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                      test_groups: np.ndarray, label_names: list[str], n_boot: int = 1000, seed: int = 0,
                      C: float | str = 1.0, min_count: int = DEFAULT_MIN_COUNT, train_groups: np.ndarray | None = None,
                      c_grid: tuple[float, ...] = DEFAULT_C_GRID, cv_folds: int = DEFAULT_CV_FOLDS) -> dict:
    """Fit one probe per label and report per-label and macro AUROC on the test split, with patient-bootstrap CIs.

    Args:
        train_x, test_x: ``[n, D]`` image embeddings.
        train_y, test_y: ``[n, L]`` labels (1, 0, -1 uncertain, NaN unknown).
        test_groups: ``[n_test]`` patient ids; the bootstrap resamples patients.
        label_names: ``L`` names.
        n_boot, seed: bootstrap resamples and their seed (see :mod:`linkrisk.probe.bootstrap`).
            ``seed`` also shuffles the cross-validation folds of ``C="cv"``.
        C: inverse L2 regularisation strength of scikit-learn's
            ``LogisticRegression``, or ``"cv"`` to choose it per label from
            ``c_grid`` by patient-grouped cross-validation on the training
            split only (see :func:`select_c`).
        min_count: a label is used only with at least this many positives
            and this many negatives in each split. The default of 5 keeps
            out test AUROCs that rest on one or two positive images.
        train_groups: ``[n_train]`` patient ids, required when ``C="cv"``
            so that no patient is in both a fold's fit and its held-out part.
        c_grid, cv_folds: candidate values and number of folds for ``C="cv"``.

    Returns:
        ``{"macro_auroc", "ci95", "bootstrap_resamples_used", "n_boot", "C", "min_count", "labels", "skipped_labels"}``.
        Each ``labels`` entry has ``name``, ``auroc``, ``ci95``, ``C``, the
        counts ``n_{train,test}_{pos,neg,excluded}`` and, with ``C="cv"``,
        ``cv`` (:func:`select_c`'s record). Each ``skipped_labels`` entry
        has ``name``, ``reason`` and the same counts. ``macro_auroc`` is the
        mean over ``labels`` and is NaN, with a warning, when no label is usable.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y = check_labels(train_y, len(train_x), label_names, "train")
    test_y = check_labels(test_y, len(test_x), label_names, "test")
    _check_inputs(train_x, test_x, test_groups, min_count)
    if isinstance(C, str):
        if C != "cv":
            raise ConfigError(f'C must be a positive number or "cv", got {C!r}')
        if train_groups is None:
            raise ConfigError('C="cv" needs train_groups (patient id of each training row) so that '
                              "cross-validation folds are patient-disjoint")
        train_groups = np.asarray(train_groups)
        if len(train_groups) != len(train_x):
            raise InputError(f"{len(train_groups)} train patient ids for {len(train_x)} training rows")
    elif isinstance(C, bool) or not isinstance(C, (int, float, np.integer, np.floating)) or not C > 0:
        raise ConfigError(f'C must be a positive number or "cv", got {C!r}')

    scores: dict[int, np.ndarray] = {}
    entries, skipped = [], []
    for j, name in enumerate(label_names):
        counts = {"train": class_counts(train_y[:, j]), "test": class_counts(test_y[:, j])}
        reason = shortfall(counts, min_count)
        if reason is not None:
            skipped.append({"name": name, "reason": reason, **count_fields(counts)})
            continue
        train_rows = np.isin(train_y[:, j], (0.0, 1.0))
        test_rows = np.isin(test_y[:, j], (0.0, 1.0))
        entry = {"name": name, **count_fields(counts)}
        label_c = C
        if C == "cv":
            entry["cv"] = select_c(train_x[train_rows], train_y[train_rows, j], train_groups[train_rows], c_grid,
                                   cv_folds, seed)
            label_c = entry["cv"]["C"]
        entry["C"] = float(label_c)
        model = _fit(train_x[train_rows], train_y[train_rows, j], label_c)
        score = np.full(len(test_x), np.nan)
        score[test_rows] = model.decision_function(test_x[test_rows])
        scores[j] = score
        entries.append(entry)

    result = summarise_aurocs(test_y, scores, entries, skipped, np.asarray(test_groups), n_boot, seed,
                              "linear probe")
    return {**result, "C": C if C == "cv" else float(C), "min_count": int(min_count)}


def select_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c_grid: tuple[float, ...] = DEFAULT_C_GRID,
             n_folds: int = DEFAULT_CV_FOLDS, seed: int = 0, tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> dict:
    """Choose C for one label by patient-grouped cross-validated AUROC.

    Folds come from scikit-learn's ``StratifiedGroupKFold`` (shuffled with
    ``seed``), so no patient is in both parts of a fold and positives are
    spread over the folds. Each C is scored by its mean held-out AUROC over
    the folds whose fitting and held-out parts both contain both classes.
    The smallest C (strongest regularisation) whose mean is within
    ``tie_tolerance`` of the best mean wins. When no fold can be scored, C
    falls back to 1.0.

    Args:
        x: ``[n, D]`` training embeddings, only rows with a known label.
        y: ``[n]`` labels in {0, 1}.
        groups: ``[n]`` patient ids.

    Returns:
        ``{"C", "grid", "mean_auroc", "n_folds", "n_folds_scored", "fallback"}``,
        with ``mean_auroc`` aligned to the ascending ``grid`` (NaN where no
        fold was scored).
    """
    grid = sorted(float(c) for c in c_grid)
    if not grid or min(grid) <= 0:
        raise ConfigError(f"the C grid must contain positive values, got {list(c_grid)}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {n_folds!r}")
    if not tie_tolerance >= 0:
        raise ConfigError(f"tie tolerance must be at least 0, got {tie_tolerance!r}")
    n_patients = len(np.unique(groups))
    folds = min(n_folds, n_patients)
    if folds < 2:
        return {"C": 1.0, "grid": grid, "mean_auroc": [float("nan")] * len(grid), "n_folds": 0, "n_folds_scored": 0,
                "fallback": f"only {n_patients} patient in the training split; used C=1.0"}

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare labels have fewer positives than folds. The folds left without a positive are skipped below.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(x, y, groups))
    scored = [(fit, held_out) for fit, held_out in splits
              if len(np.unique(y[fit])) == 2 and len(np.unique(y[held_out])) == 2]
    if not scored:
        return {"C": 1.0, "grid": grid, "mean_auroc": [float("nan")] * len(grid), "n_folds": folds,
                "n_folds_scored": 0, "fallback": "no fold had both classes in both parts; used C=1.0"}

    # Each fold walks the grid in ascending order and starts each fit from the
    # previous solution. The L2-regularised loss is strictly convex, so the
    # result differs from a cold start only within the solver's tolerance.
    fold_aurocs = np.empty((len(scored), len(grid)))
    for i, (fit, held_out) in enumerate(scored):
        model = LogisticRegression(max_iter=MAX_ITER, warm_start=True)
        for k, c in enumerate(grid):
            model.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x[fit], y[fit])
            fold_aurocs[i, k] = roc_auc_score(y[held_out], model.decision_function(x[held_out]))
    means = [float(value) for value in fold_aurocs.mean(axis=0)]
    best = int(np.flatnonzero(np.array(means) >= max(means) - tie_tolerance)[0])
    return {"C": grid[best], "grid": grid, "mean_auroc": means, "n_folds": folds, "n_folds_scored": len(scored),
            "fallback": None}


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    model = LogisticRegression(C=c, max_iter=MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _check_inputs(train_x: np.ndarray, test_x: np.ndarray, test_groups: np.ndarray, min_count: int) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise InputError(f"train embeddings {train_x.shape} and test embeddings {test_x.shape} must be [n, D] "
                         "with the same D")
    if len(np.asarray(test_groups)) != len(test_x):
        raise InputError(f"{len(np.asarray(test_groups))} test patient ids for {len(test_x)} test rows")
    for split, x in (("train", train_x), ("test", test_x)):
        if not np.isfinite(x).all():
            raise InputError(f"{split} embeddings contain {int((~np.isfinite(x)).sum())} NaN or infinite values")
    check_min_count(min_count)
