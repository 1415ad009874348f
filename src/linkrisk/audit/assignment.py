"""One-to-one assignment attack: re-link a whole released batch at once.

An attacker holding N images and their N reports can use the fact that
each report belongs to exactly one image. Solving the assignment problem (maximum
total cosine similarity, ``scipy.optimize.linear_sum_assignment``) uses
that constraint and can beat linking each image to its own best report.
Batches hold N distinct reports, each with one of its images drawn at
random; chance is 1/N (a random one-to-one matching gets one pair right
on average).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from linkrisk._logging import logger
from linkrisk._progress import progress_bar
from linkrisk.audit.recall import cluster_bootstrap_ci


def assignment_attack(image_emb: np.ndarray, report_emb: np.ndarray, report_row: np.ndarray,
                      batch_sizes: list[int] = (10, 100, 1000), n_batches: int = 100, n_boot: int = 1000,
                      seed: int = 0, progress: bool = False) -> list[dict]:
    """Fraction of pairs an optimal one-to-one assignment recovers, per batch size.

    Args:
        image_emb: ``[n_images, d]`` L2-normalised image embeddings.
        report_emb: ``[n_reports, d]`` L2-normalised report embeddings.
        report_row: ``[n_images]`` row of each image's true report.
        batch_sizes: N values; an N larger than the number of reports with
            an image is left out with a warning.
        n_batches: random batches per N (seeded).
        progress: show a progress bar over the batches of every N.

    Returns:
        One entry per N: ``{batch_size, n_batches, value, ci95, chance, lift,
        argmax_value}``. ``value`` is the mean fraction matched correctly and
        ``ci95`` a percentile bootstrap over batches. ``argmax_value`` links
        the same batches image by image: each image to its highest-scoring
        report in the batch, ties broken at random.
    """
    rng = np.random.default_rng(seed)
    reports_with_images = np.unique(report_row)
    images_of = {r: np.flatnonzero(report_row == r) for r in reports_with_images}
    usable_sizes = [size for size in batch_sizes if size <= len(reports_with_images)]
    results = []
    with progress_bar(progress, "batches") as bar:
        task = bar.add_task("assignment attack", total=n_batches * len(usable_sizes))
        for size in batch_sizes:
            if size > len(reports_with_images):
                logger.warning("assignment attack: batch size %d exceeds the %d reports with an image; left out",
                               size, len(reports_with_images))
                continue
            assigned, argmax = np.empty(n_batches), np.empty(n_batches)
            for b in range(n_batches):
                reports = rng.choice(reports_with_images, size=size, replace=False)
                images = np.array([rng.choice(images_of[r]) for r in reports])
                scores = image_emb[images].astype(np.float64) @ report_emb[reports].astype(np.float64).T
                _, columns = linear_sum_assignment(scores, maximize=True)
                assigned[b] = np.mean(columns == np.arange(size))
                best = scores == scores.max(axis=1, keepdims=True)
                argmax[b] = np.mean(np.diag(best) / best.sum(axis=1))  # expected hit under random tie-breaking
                bar.advance(task)
            low, high = cluster_bootstrap_ci(assigned, np.arange(n_batches), n_boot=n_boot, seed=seed)
            value = float(assigned.mean())
            results.append({"batch_size": int(size), "n_batches": int(n_batches), "value": value, "ci95": [low, high],
                            "chance": 1.0 / size, "lift": value * size, "argmax_value": float(argmax.mean())})
    return results
