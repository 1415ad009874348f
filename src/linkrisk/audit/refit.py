"""Refit attacker: rebuild projection heads from the public frozen encoders and auxiliary pairs.

Threat model. The released model is two frozen, public encoders (image and
report) followed by trained projection heads, and a defence such as DP
fine-tuning protects only the heads. The attacker:

- has the frozen encoders, so they can compute pre-projection features
  of any image or report;
- has ``k`` auxiliary image-report pairs with known pairing (another
  cohort, or patients disjoint from the target), drawn here by whole
  patients;
- has the target cohort's de-identified images and reports without
  their pairing, and wants to re-link each image to its report.

The attacker never uses the released heads. They fit fresh heads on the
auxiliary pairs and link target images to target reports by cosine
similarity. The linkage they reach is a lower bound on what any head-only
defence leaves open. Three ways to fit heads are implemented:

- ``infonce``: :func:`~linkrisk.models.train.fit_heads`, the same
  non-private symmetric InfoNCE fit with patient-disjoint early stopping
  that trains the original heads;
- ``ridge``: closed-form ridge regression from standardised image features
  to the top principal-component scores of the standardised report
  features (:func:`fit_ridge_heads`);
- ``procrustes``: orthogonal Procrustes between the top principal-component
  scores of both sides (:func:`fit_procrustes_heads`).

The target audit is the project's image-to-report audit at study level
(:func:`~linkrisk.audit.design.build_design` and
:func:`~linkrisk.audit.run.run_audit`), so its figures are directly
comparable with the audits of the released heads.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import numpy as np
from scipy.linalg import orthogonal_procrustes

from linkrisk._logging import logger
from linkrisk._progress import progress_bar
from linkrisk.audit.design import build_design
from linkrisk.audit.ranks import rank_counts
from linkrisk.audit.recall import normalised_rank
from linkrisk.audit.run import _check_pools_and_ks, run_audit
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.train import FitConfig, fit_heads

METHODS = ("infonce", "ridge", "procrustes")

# Ridge penalties tried by leave-patient-out selection, relative to the mean
# non-zero eigenvalue of the standardised image Gram matrix X^T X. Small values
# approach the minimum-norm least-squares map. Large ones approach X^T T up to a
# scale factor (the cross-covariance map), and cosine similarity ignores scale.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 17))
# Relative penalty used when the auxiliary pairs cover too few patients to select one.
DEFAULT_RIDGE_ALPHA = 1.0
RIDGE_FOLDS = 5
# fit_heads keeps back validation patients and needs at least 4 patients.
MIN_INFONCE_PATIENTS = 4


@dataclasses.dataclass
class LinearHeads:
    """Closed-form heads: per-feature standardisation, then one matrix per side.

    Attributes:
        image_mean, image_scale: ``[image_dim]`` standardisation of image features.
        image_weight: ``[image_dim, r]`` map of standardised image features into the shared space.
        text_mean, text_scale: ``[text_dim]`` standardisation of report features.
        text_weight: ``[text_dim, r]`` map of standardised report features into the shared space.
    """

    image_mean: np.ndarray
    image_scale: np.ndarray
    image_weight: np.ndarray
    text_mean: np.ndarray
    text_scale: np.ndarray
    text_weight: np.ndarray

    def embed(self, image_features: np.ndarray | None = None,
              text_features: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Project features and L2-normalise rows, like :meth:`DualHeads.embed`: float32 ``[n, r]`` each.

        A row that projects to the zero vector stays zero, so it ties with every candidate.
        """
        image = None if image_features is None else _project(image_features, self.image_mean, self.image_scale,
                                                              self.image_weight)
        text = None if text_features is None else _project(text_features, self.text_mean, self.text_scale,
                                                           self.text_weight)
        return image, text


def _project(features: np.ndarray, mean: np.ndarray, scale: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Standardise, map by ``weight`` and L2-normalise rows (zero rows stay zero): float32 ``[n, r]``."""
    projected = ((np.asarray(features, dtype=np.float64) - mean) / scale) @ weight
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    return (projected / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean and population standard deviation per column. A constant column gets scale 1."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    return mean, np.where(std > 1e-6, std, 1.0)


def _principal_axes(centred: np.ndarray, max_dim: int) -> np.ndarray:
    """Return the top principal axes ``[D, r]`` of centred rows, ``r = min(max_dim, numerical rank)``."""
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    rank = _numerical_rank(singular, centred.shape)
    return vt[:min(max_dim, rank)].T


def _numerical_rank(singular: np.ndarray, shape: tuple[int, int]) -> int:
    """Count the singular values above numpy's ``matrix_rank`` tolerance ``s_max * max(shape) * eps``."""
    if not len(singular) or singular[0] == 0:
        return 0
    return int((singular > singular[0] * max(shape) * np.finfo(np.float64).eps).sum())


def _pair_arrays(image_features: np.ndarray, text_features: np.ndarray,
                 report_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return image rows and their reports' rows as aligned float64 pairs ``[n, image_dim]``, ``[n, text_dim]``."""
    return (np.asarray(image_features, dtype=np.float64),
            np.asarray(text_features, dtype=np.float64)[np.asarray(report_row, dtype=np.int64)])


def _ridge_weights(image_std: np.ndarray, targets: np.ndarray,
                   alphas: tuple[float, ...]) -> list[tuple[float, np.ndarray]]:
    """Solve ridge ``W = (X^T X + lam I)^-1 X^T T`` for each relative penalty, from one SVD of ``X``.

    ``lam = alpha * mean(s_i^2)`` over the non-zero singular values ``s_i``
    of ``X``. Returns ``(lam, W [image_dim, r])`` per alpha.
    """
    u, singular, vt = np.linalg.svd(image_std, full_matrices=False)
    rank = _numerical_rank(singular, image_std.shape)
    if rank == 0:
        raise InputError("the auxiliary image features have no variance, so no ridge map can be fitted; "
                         "draw more auxiliary pairs")
    u, singular, vt = u[:, :rank], singular[:rank], vt[:rank]
    projected = u.T @ targets
    base = float(np.mean(singular ** 2))
    weights = []
    for alpha in alphas:
        lam = alpha * base
        weights.append((lam, vt.T @ ((singular / (singular ** 2 + lam))[:, None] * projected)))
    return weights


def _ridge_parts(image: np.ndarray, text: np.ndarray, embed_dim: int):
    """Standardise both sides of the pairs and project the reports onto their principal axes, for a ridge fit."""
    image_mean, image_scale = _standardiser(image)
    text_mean, text_scale = _standardiser(text)
    image_std = (image - image_mean) / image_scale
    text_std = (text - text_mean) / text_scale
    axes = _principal_axes(text_std, embed_dim)
    if axes.shape[1] == 0:
        raise InputError("the auxiliary report features have no variance (all drawn pairs share one report), so "
                         "no ridge map can be fitted; draw more auxiliary pairs")
    return image_mean, image_scale, text_mean, text_scale, image_std, text_std @ axes, axes


def fit_ridge_heads(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                    patient_ids: np.ndarray, *, embed_dim: int = 64, alpha: float | None = None,
                    seed: int = 0) -> tuple[LinearHeads, dict]:
    """Fit closed-form ridge heads on paired features.

    Every image and its report form one pair. Both sides are standardised
    per feature on the pairs (mean 0, population std 1). The report side is
    reduced to its top ``r`` principal axes, ``r = min(embed_dim, numerical
    rank)``, and its embedding is the principal-component scores ``T``. The
    image embedding is the ridge prediction of ``T``:
    ``W = argmin ||T - X W||^2 + lam ||W||^2``, without intercept because
    both sides are centred. With ``r`` equal to the text dimension this is
    ridge from image features to the whole standardised text space. When
    there are fewer pairs than image features, ``W`` lies in the span of the
    pairs' image rows.

    ``lam = alpha * mean(s_i^2)``, where ``s_i`` are the non-zero singular
    values of the standardised image features. With ``alpha=None``, alpha
    is chosen from ``RIDGE_ALPHAS`` by leave-patient-out cross-validation on
    these pairs only. The criterion is the mean normalised rank of held-out
    images among the held-out reports, the same linkage the attack measures.
    Ties go to the higher mean cosine between held-out images and their own
    reports. With fewer than 3 patients, ``DEFAULT_RIDGE_ALPHA`` is used.

    Args:
        image_features: ``[n_images, image_dim]`` frozen image features.
        text_features: ``[n_reports, text_dim]`` frozen report features.
        report_row: ``[n_images]`` row of each image's report in ``text_features``.
        patient_ids: ``[n_images]`` patient of each image (the cross-validation groups).
        embed_dim: maximum dimension ``r`` of the shared space.
        alpha: relative ridge penalty; None selects it as above.
        seed: seed of the assignment of patients to folds.

    Returns:
        ``(heads, record)``: the record contains ``alpha``, the absolute penalty
        ``lambda``, ``alpha_selected_by``, ``embed_dim`` (the ``r`` reached)
        and, after selection, ``cv_mean_normalised_rank`` and
        ``cv_mean_true_cosine`` per alpha.
    """
    image, text = _pair_arrays(image_features, text_features, report_row)
    record: dict = {}
    if alpha is None:
        alpha, record = _select_ridge_alpha(image_features, text_features, report_row, patient_ids, embed_dim, seed)
    image_mean, image_scale, text_mean, text_scale, image_std, targets, axes = _ridge_parts(image, text, embed_dim)
    [(lam, weight)] = _ridge_weights(image_std, targets, (float(alpha),))
    heads = LinearHeads(image_mean, image_scale, weight, text_mean, text_scale, axes)
    return heads, {"alpha": float(alpha), "lambda": lam, "alpha_selected_by": record.get("selected_by", "given"),
                   "embed_dim": int(axes.shape[1]), **{k: v for k, v in record.items() if k != "selected_by"}}


def _patient_folds(patient_ids: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Assign each row a fold: patients are shuffled with ``seed`` and dealt round-robin into ``n_folds`` folds."""
    patients, index = np.unique(patient_ids, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of_patient = np.empty(len(patients), dtype=np.int64)
    fold_of_patient[order] = np.arange(len(patients)) % n_folds
    return fold_of_patient[index.reshape(-1)]


def _select_ridge_alpha(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray,
                        patient_ids: np.ndarray, embed_dim: int, seed: int) -> tuple[float, dict]:
    """Choose the relative penalty with the lowest leave-patient-out mean normalised rank; returns it and its record."""
    patient_ids = np.asarray(patient_ids).astype(str)
    report_row = np.asarray(report_row, dtype=np.int64)
    n_patients = len(np.unique(patient_ids))
    if n_patients < 3:
        return DEFAULT_RIDGE_ALPHA, {"selected_by": f"default (only {n_patients} auxiliary patients)"}

    folds = _patient_folds(patient_ids, min(RIDGE_FOLDS, n_patients), seed)
    rank_sums, cosine_sums, n_queries = np.zeros(len(RIDGE_ALPHAS)), np.zeros(len(RIDGE_ALPHAS)), 0
    for fold in np.unique(folds):
        held_out, training = folds == fold, folds != fold
        held_reports, true_index = np.unique(report_row[held_out], return_inverse=True)
        if len(held_reports) < 2:
            continue  # a normalised rank needs at least two candidates
        image, text = _pair_arrays(image_features[training], text_features, report_row[training])
        try:
            image_mean, image_scale, text_mean, text_scale, image_std, targets, axes = _ridge_parts(image, text,
                                                                                                   embed_dim)
            fits = _ridge_weights(image_std, targets, RIDGE_ALPHAS)
        except InputError:
            continue  # this fold's training part has no variance, so only the other folds vote
        # The report embeddings do not depend on alpha, so the queries of every alpha are ranked in one pass.
        true_index = true_index.reshape(-1)
        candidates = _project(text_features[held_reports], text_mean, text_scale, axes)
        queries = np.concatenate([_project(image_features[held_out], image_mean, image_scale, weight)
                                  for _, weight in fits])
        above, equal = rank_counts(queries, candidates, np.tile(true_index, len(fits)))
        ranks = normalised_rank(above, equal, len(held_reports)).reshape(len(fits), -1)
        cosines = np.einsum("aij,ij->ai", queries.reshape(len(fits), len(true_index), -1),
                            candidates[true_index], dtype=np.float64)
        rank_sums += ranks.sum(axis=1)
        cosine_sums += cosines.sum(axis=1)
        n_queries += len(true_index)
    if n_queries == 0:
        return DEFAULT_RIDGE_ALPHA, {"selected_by": "default (no fold had two held-out reports)"}

    cv_rank, cv_cosine = rank_sums / n_queries, cosine_sums / n_queries
    # Small folds or near-perfect linkage tie many alphas on the rank, so the
    # mean cosine between each held-out image and its own report breaks ties.
    best = int(np.lexsort((-cv_cosine, cv_rank))[0])
    return RIDGE_ALPHAS[best], {
        "selected_by": "leave-patient-out mean normalised rank, then mean true-pair cosine",
        "cv_mean_normalised_rank": {f"{a:.4g}": float(r) for a, r in zip(RIDGE_ALPHAS, cv_rank)},
        "cv_mean_true_cosine": {f"{a:.4g}": float(c) for a, c in zip(RIDGE_ALPHAS, cv_cosine)},
    }


def fit_procrustes_heads(image_features: np.ndarray, text_features: np.ndarray, report_row: np.ndarray, *,
                         embed_dim: int = 64) -> tuple[LinearHeads, dict]:
    """Fit orthogonal-Procrustes heads on paired features.

    Both sides are standardised per feature on the pairs and reduced to
    their top ``r`` principal axes, ``r = min(embed_dim, numerical rank of
    either side)``. The rank of centred pairs is at most ``n_pairs - 1`` and
    at most each feature dimension. The image scores ``A`` (``[n, r]``, not
    whitened) are rotated onto the report scores ``B`` by the orthogonal
    ``R = argmin ||A R - B||_F`` (``scipy.linalg.orthogonal_procrustes``).
    Image embedding: ``A R``. Report embedding: ``B``. Unwhitened scores
    keep low-variance components from weighing as much as the leading ones.
    The map is exact only when the two sides' principal scores differ by a
    rotation, so it captures a general linear relation only in part.

    Returns:
        ``(heads, record)`` with ``embed_dim``, the ``r`` reached.
    """
    image, text = _pair_arrays(image_features, text_features, report_row)
    image_mean, image_scale = _standardiser(image)
    text_mean, text_scale = _standardiser(text)
    image_std = (image - image_mean) / image_scale
    text_std = (text - text_mean) / text_scale
    image_axes = _principal_axes(image_std, embed_dim)
    text_axes = _principal_axes(text_std, embed_dim)
    r = min(image_axes.shape[1], text_axes.shape[1])
    if r == 0:
        raise InputError("the auxiliary image or report features have no variance, so no Procrustes map can be "
                         "fitted; draw more auxiliary pairs")
    image_axes, text_axes = image_axes[:, :r], text_axes[:, :r]
    rotation, _ = orthogonal_procrustes(image_std @ image_axes, text_std @ text_axes)
    heads = LinearHeads(image_mean, image_scale, image_axes @ rotation, text_mean, text_scale, text_axes)
    return heads, {"embed_dim": int(r)}


def draw_aux_pairs(patient_ids: np.ndarray, n_pairs: int, seed: int) -> np.ndarray:
    """Draw about ``n_pairs`` auxiliary pairs by whole patients and return their sorted row indices.

    Patients are shuffled with ``seed`` and taken in that order whenever all
    their pairs still fit within ``n_pairs`` (first fit). The draw therefore
    contains exactly ``n_pairs`` pairs unless no combination reached in
    this order does. A patient skipped for being too large may be followed
    by smaller ones, which slightly favours patients with few images near
    the end of a draw.
    """
    patients, index = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    index = index.reshape(-1)
    sizes = np.bincount(index, minlength=len(patients))
    chosen, total = [], 0
    for patient in np.random.default_rng(seed).permutation(len(patients)):
        if total + sizes[patient] <= n_pairs:
            chosen.append(patient)
            total += sizes[patient]
        if total == n_pairs:
            break
    return np.flatnonzero(np.isin(index, chosen))


def _check_features(name: str, image: np.ndarray, text: np.ndarray, report_row: np.ndarray,
                    patients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float32)
    text = np.asarray(text, dtype=np.float32)
    report_row = np.asarray(report_row)
    patients = np.asarray(patients).astype(str)
    if image.ndim != 2 or text.ndim != 2:
        raise InputError(f"{name} features must be 2-D, got image {image.shape} and report {text.shape}")
    if report_row.size and not np.issubdtype(report_row.dtype, np.integer):
        raise InputError(f"{name} report rows must be integers, got dtype {report_row.dtype}")
    report_row = report_row.astype(np.int64)
    if len(report_row) != len(image) or len(patients) != len(image):
        raise InputError(f"{name}: {len(image)} images but {len(report_row)} report rows and "
                         f"{len(patients)} patient ids")
    if len(report_row) and (report_row.min() < 0 or report_row.max() >= len(text)):
        raise InputError(f"{name} report rows must lie in [0, {len(text)}), got "
                         f"{report_row.min()}..{report_row.max()}")
    for side, array in (("image", image), ("report", text)):
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise InputError(f"{bad.sum()} {name} {side} feature rows contain NaN or inf "
                             f"(first row {np.flatnonzero(bad)[0]})")
    return image, text, report_row, patients


def _check_options(ks, methods, pools, repeats: int, embed_dim: int, n_boot: int) -> tuple[list, list[str]]:
    _check_pools_and_ks(pools, [1])
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ConfigError(f"no method requested; choose from {', '.join(METHODS)}")
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown refit method {method!r}; valid methods: {', '.join(METHODS)}")
    ks = list(dict.fromkeys(ks))
    if not ks:
        raise ConfigError("no auxiliary size k given; use for example ks=[50, 200, 'all']")
    for k in ks:
        if k != "all" and not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 2):
            raise ConfigError(f"invalid auxiliary size {k!r}; k is a number of pairs >= 2 or 'all'")
    for value, option in ((repeats, "repeats"), (embed_dim, "embed_dim"), (n_boot, "n_boot")):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{option} must be an integer >= 1, got {value!r}")
    return ks, methods


def _draw_seed(seed: int, repeat: int) -> int:
    """Derive the seed of one repeat's patient order, ridge folds and InfoNCE fit."""
    return int(np.random.SeedSequence([seed, repeat]).generate_state(1)[0])


def _fit(method: str, image: np.ndarray, text: np.ndarray, report_row: np.ndarray, patients: np.ndarray,
         embed_dim: int, seed: int, fit_config: FitConfig | None, progress: bool = False):
    """Fit one method on the drawn pairs. Returns ``(heads, record)``, where heads have ``embed`` like DualHeads."""
    if method == "ridge":
        return fit_ridge_heads(image, text, report_row, patients, embed_dim=embed_dim, seed=seed)
    if method == "procrustes":
        return fit_procrustes_heads(image, text, report_row, embed_dim=embed_dim)
    config = dataclasses.replace(fit_config or FitConfig(embed_dim=embed_dim), seed=seed)
    return fit_heads(image, text, report_row, patients, config, progress=progress)


def _audit_entry(heads, target: tuple, pools: list, n_boot: int, seed: int) -> dict:
    """Audit the refit heads on the target: image-to-report Recall@1 per pool and the full-pool mean normalised rank."""
    target_image, target_text, target_report_row, target_patients = target
    image_emb, report_emb = heads.embed(target_image, target_text)
    design = build_design(image_emb, report_emb, target_report_row, target_patients)
    audit = run_audit(design, pools=pools, ks=[1], n_boot=n_boot, seed=seed)
    recall = [{"pool": e["pool"], "k": e["k"], "value": e["value"], "ci95": e["ci95"], "chance": e["chance"],
               "lift": e["lift"], "lift_ci95": [float(v) for v in e["lift_ci95"]]} for e in audit["recall"]]
    return {"n_queries": audit["n_queries"], "n_candidates": audit["n_candidates"], "recall": recall,
            "mean_normalised_rank": audit["full_pool"]["mean_normalised_rank"],
            "mean_normalised_rank_ci95": audit["full_pool"]["mean_normalised_rank_ci95"]}


def refit_attack(aux_image: np.ndarray, aux_text: np.ndarray, aux_report_row: np.ndarray, aux_patients: np.ndarray,
                 target_image: np.ndarray, target_text: np.ndarray, target_report_row: np.ndarray,
                 target_patients: np.ndarray, ks: list[int | str] = (50, 200, "all"),
                 methods: list[str] = METHODS, pools: list[int | str] = (100, "full"), n_boot: int = 1000,
                 seed: int = 0, repeats: int = 5, embed_dim: int = 64,
                 fit_config: FitConfig | None = None, progress: bool = False) -> dict:
    """Fit fresh heads on auxiliary pairs and audit how well they re-link the target cohort.

    See the module docstring for the threat model. All features are frozen
    encoder outputs before any projection head, in the encoders' own units.
    Image and report features may differ in dimension, but the auxiliary
    and target sets must share each side's dimension.

    Args:
        aux_image: ``[n_aux_images, image_dim]`` features of the attacker's images.
        aux_text: ``[n_aux_reports, text_dim]`` features of the attacker's reports.
        aux_report_row: ``[n_aux_images]`` row of each auxiliary image's report in ``aux_text``.
        aux_patients: ``[n_aux_images]`` patient of each auxiliary image; draws take whole patients.
        target_image, target_text, target_report_row, target_patients: the
            same for the target cohort. The attacker does not use its pairing,
            which serves only to score the attack.
        ks: auxiliary sizes, each a number of image-report pairs (one pair
            per auxiliary image) or ``"all"``. A k above the number of
            auxiliary pairs is left out with a warning.
        methods: from ``METHODS``.
        pools: target pool sizes ``N`` and/or ``"full"``, as in :func:`run_audit`.
        n_boot: patient-bootstrap resamples of each interval (over target patients).
        seed: seed of the draws, the fits and the bootstrap.
        repeats: independent draws per integer k. ``"all"`` has a single
            draw, so it runs once.
        embed_dim: maximum dimension of the refit shared space (every method).
        fit_config: InfoNCE options (default ``FitConfig(embed_dim=embed_dim)``).
            Its ``embed_dim`` then applies to InfoNCE, and its seed is
            replaced by each repeat's seed.
        progress: show a progress bar over the (method, k, repeat) fits and one over
            each InfoNCE fit's steps.

    Returns:
        ``{"entries", "summary", ...facts}``. ``entries`` contains one dict per
        (method, k, repeat): ``method``, ``k``, ``repeat``, ``n_aux_pairs``,
        ``n_aux_patients``, ``n_aux_reports``, ``recall`` (per pool:
        ``pool``, ``k`` = 1 the Recall cut-off, ``value``, ``ci95``,
        ``chance`` = 1/N, ``lift`` = value/chance, ``lift_ci95``),
        ``mean_normalised_rank`` in the full pool (0 best, chance 0.5) with
        ``mean_normalised_rank_ci95``, ``fit`` (the method's record) and
        ``fit_seconds``. Intervals come from the target's patient
        bootstrap for fixed heads. ``summary`` contains one dict per (method, k)
        with the mean, standard deviation, minimum and maximum across
        repeats, which is the spread due to the draw of auxiliary pairs and,
        for InfoNCE, its optimisation seed.
    """
    ks, methods = _check_options(ks, methods, pools, repeats, embed_dim, n_boot)
    aux = _check_features("auxiliary", aux_image, aux_text, aux_report_row, aux_patients)
    target = _check_features("target", target_image, target_text, target_report_row, target_patients)
    for side, position in (("image", 0), ("report", 1)):
        if aux[position].shape[1] != target[position].shape[1]:
            raise InputError(f"auxiliary and target {side} features differ in dimension "
                             f"({aux[position].shape[1]} vs {target[position].shape[1]}); encode both with the "
                             "same frozen encoders")
    n_aux_pairs = len(aux[0])
    if n_aux_pairs < 2:
        raise InputError(f"the attacker needs at least 2 auxiliary pairs, got {n_aux_pairs}")
    shared = np.intersect1d(aux[3], target[3])
    if len(shared):
        logger.warning("refit attack: %d patient ids appear in both the auxiliary and the target cohort (first %r); "
                       "the attacker's pairs should come from other patients", len(shared), str(shared[0]))
    too_large = [int(k) for k in ks if k != "all" and k > n_aux_pairs]
    if too_large:
        logger.warning("refit attack: auxiliary sizes %s exceed the %d auxiliary pairs; left out", too_large,
                       n_aux_pairs)

    entries = []
    n_draws = sum(1 if k == "all" else repeats for k in ks if k == "all" or k <= n_aux_pairs)
    with progress_bar(progress, "fits") as bar:
        task = bar.add_task("refit attack", total=n_draws * len(methods))
        for k in ks:
            if k != "all" and k > n_aux_pairs:
                continue
            for repeat in range(1 if k == "all" else repeats):
                draw_seed = _draw_seed(seed, repeat)
                rows = np.arange(n_aux_pairs) if k == "all" else draw_aux_pairs(aux[3], int(k), draw_seed)
                advance = functools.partial(bar.advance, task)
                entries.extend(_attack_draw(aux, rows, k, repeat, draw_seed, methods, target, list(pools), n_boot,
                                            seed, embed_dim, fit_config, advance, progress))

    return {"threat_model": "frozen public encoders plus auxiliary image-report pairs; fresh heads, "
                            "image-to-report linkage by cosine similarity",
            "direction": "image_to_report", "level": "study",
            "n_aux_images": int(n_aux_pairs), "n_aux_reports": int(len(np.unique(aux[2]))),
            "n_aux_patients": int(len(np.unique(aux[3]))), "n_target_images": int(len(target[0])),
            "n_target_reports": int(len(target[1])), "n_target_patients": int(len(np.unique(target[3]))),
            "n_shared_patient_ids": int(len(shared)), "ks": [k if k == "all" else int(k) for k in ks],
            "methods": methods, "pools": list(pools), "repeats": int(repeats), "embed_dim": int(embed_dim),
            "n_boot": int(n_boot), "seed": int(seed), "entries": entries, "summary": summarise_repeats(entries)}


def _attack_draw(aux: tuple, rows: np.ndarray, k, repeat: int, draw_seed: int, methods: list[str], target: tuple,
                 pools: list, n_boot: int, seed: int, embed_dim: int, fit_config: FitConfig | None,
                 advance: Callable[[], None], progress: bool) -> list[dict]:
    """Fit every method on one draw of auxiliary pairs and audit each on the target.

    ``advance`` is called once per method, fitted or left out, and moves the attack's progress bar.
    ``progress`` shows a bar over each InfoNCE fit's steps.
    """
    image, text, report_row, patients = aux
    reports, drawn_row = np.unique(report_row[rows], return_inverse=True)
    drawn = (image[rows], text[reports], drawn_row.reshape(-1), patients[rows])
    n_patients = len(np.unique(drawn[3]))
    facts = {"k": k if k == "all" else int(k), "repeat": int(repeat), "n_aux_pairs": int(len(rows)),
             "n_aux_patients": int(n_patients), "n_aux_reports": int(len(reports))}
    entries = []
    for method in methods:
        if method == "infonce" and n_patients < MIN_INFONCE_PATIENTS:
            logger.warning("refit attack: InfoNCE needs at least %d auxiliary patients, draw %s of k = %s has %d; "
                           "left out", MIN_INFONCE_PATIENTS, repeat, k, n_patients)
            advance()
            continue
        started = time.perf_counter()
        heads, record = _fit(method, *drawn, embed_dim, draw_seed, fit_config, progress)
        fit_seconds = time.perf_counter() - started
        entry = {"method": method, **facts, **_audit_entry(heads, target, pools, n_boot, seed), "fit": record,
                 "fit_seconds": round(fit_seconds, 3)}
        r1 = ", ".join(f"N={e['pool']}: {e['value']:.3f} ({e['lift']:.1f}x chance)" for e in entry["recall"])
        logger.info("refit attack %s, k = %s (%d pairs), repeat %d: Recall@1 %s, mean normalised rank %.3f",
                    method, k, len(rows), repeat, r1, entry["mean_normalised_rank"])
        entries.append(entry)
        advance()
    return entries


def _spread(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else None,
            "min": float(array.min()), "max": float(array.max())}


def summarise_repeats(entries: list[dict]) -> list[dict]:
    """Summarise each figure across repeats per (method, k): mean, sd (None for one repeat), min and max."""
    groups: dict[tuple, list[dict]] = {}
    for entry in entries:
        groups.setdefault((entry["method"], entry["k"]), []).append(entry)
    summary = []
    for (method, k), group in groups.items():
        recall = []
        for position, first in enumerate(group[0]["recall"]):
            values = [entry["recall"][position]["value"] for entry in group]
            recall.append({"pool": first["pool"], "k": first["k"], "chance": first["chance"], **_spread(values),
                           "lift_mean": float(np.mean(values)) / first["chance"]})
        summary.append({"method": method, "k": k, "n_repeats": len(group),
                        "n_aux_pairs": _spread([entry["n_aux_pairs"] for entry in group]), "recall": recall,
                        "mean_normalised_rank": _spread([entry["mean_normalised_rank"] for entry in group])})
    return summary
