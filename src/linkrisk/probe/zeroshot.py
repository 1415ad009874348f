"""Zero-shot classification: score images against a positive and a negative prompt per label.

The score of image ``i`` for label ``l`` is
``cos(image_i, positive_l) - cos(image_i, negative_l)``, with the prompts
embedded by the model's text tower and projection head. Per-label AUROC,
patient-bootstrap intervals, macro average and skips follow the same rules
as the linear probe, with ``min_count`` applied to the test labels only
because nothing is fitted.

Typical use, with ``encode`` mapping a list of texts to ``[m, d]``
embeddings in the shared space::

    prompts = label_prompts(label_names)
    result = zeroshot_macro_auroc(image_embeddings, prompt_embeddings(prompts, encode), labels,
                                  patient_ids, label_names)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from linkrisk.errors import ConfigError, InputError
from linkrisk.probe.summary import (DEFAULT_MIN_COUNT, check_labels, check_min_count, class_counts, count_fields,
                                    shortfall, summarise_aurocs)

# Default (positive, negative) prompt per CheXpert label, written as short
# report-style sentences because the text towers are trained on reports.
DEFAULT_PROMPTS: dict[str, tuple[str, str]] = {
    "No Finding": ("No abnormality is seen on this chest radiograph.",
                   "This chest radiograph shows an abnormality."),
    "Enlarged Cardiomediastinum": ("The cardiomediastinal silhouette is enlarged.",
                                   "The cardiomediastinal silhouette is normal in size."),
    "Cardiomegaly": ("The heart is enlarged.", "The heart size is normal."),
    "Lung Opacity": ("There is an opacity in the lung.", "The lungs are clear without opacity."),
    "Lung Lesion": ("There is a lung nodule or mass.", "No lung nodule or mass is seen."),
    "Edema": ("There is pulmonary edema.", "There is no pulmonary edema."),
    "Consolidation": ("There is consolidation in the lung.", "There is no consolidation."),
    "Pneumonia": ("The findings are consistent with pneumonia.", "There is no evidence of pneumonia."),
    "Atelectasis": ("There is atelectasis.", "There is no atelectasis."),
    "Pneumothorax": ("There is a pneumothorax.", "There is no pneumothorax."),
    "Pleural Effusion": ("There is a pleural effusion.", "There is no pleural effusion."),
    "Pleural Other": ("There is pleural thickening or another pleural abnormality.", "The pleura are normal."),
    "Fracture": ("There is a fracture of a rib or another bone.", "No fracture is seen."),
    "Support Devices": ("A tube, line or other support device is present.",
                        "No tubes, lines or support devices are present."),
}


def label_prompts(label_names: Sequence[str], custom: Mapping[str, tuple[str, str]] | None = None,
                  template: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """Build the ``(positive, negative)`` prompt pair for each label, in the order of ``label_names``.

    A pair in ``custom`` wins over the default in :data:`DEFAULT_PROMPTS`.
    Labels with neither get ``template``, a pair of format strings with a
    ``{label}`` field such as ``("Findings of {label}.", "No findings of {label}.")``.
    Without a template such labels raise ``ConfigError``.
    """
    custom = dict(custom or {})
    unknown = sorted(set(custom) - set(label_names))
    if unknown:
        raise ConfigError(f"custom prompts given for labels not in label_names: {unknown}")
    if template is not None:
        _check_pair("template", template)
        if any("{label}" not in part for part in template):
            raise ConfigError(f"both template strings need a {{label}} field, got {template!r}")

    prompts, missing = [], []
    for name in label_names:
        if name in custom:
            pair = tuple(custom[name])
        elif name in DEFAULT_PROMPTS:
            pair = DEFAULT_PROMPTS[name]
        elif template is not None:
            pair = (template[0].format(label=name), template[1].format(label=name))
        else:
            missing.append(name)
            continue
        _check_pair(name, pair)
        prompts.append(pair)
    if missing:
        raise ConfigError(f"no default prompts for labels {missing}. Pass custom={{label: (positive, negative)}} "
                          "or a template such as ('Findings of {label}.', 'No findings of {label}.')")
    return prompts


def _check_pair(name: str, pair: tuple) -> None:
    if len(pair) != 2 or not all(isinstance(text, str) and text.strip() for text in pair):
        raise ConfigError(f"prompts for {name!r} must be two non-empty strings (positive, negative), got {pair!r}")
    if pair[0].strip() == pair[1].strip():
        raise ConfigError(f"positive and negative prompts for {name!r} are the same text {pair[0]!r}")


def prompt_embeddings(prompts: Sequence[tuple[str, str]], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Embed prompt pairs with ``encode``, which maps texts to ``[m, d]``, into float64 ``[L, 2, d]``."""
    texts = [text for pair in prompts for text in pair]
    embedded = np.asarray(encode(texts), dtype=np.float64)
    if embedded.ndim != 2 or len(embedded) != len(texts):
        raise InputError(f"encode returned shape {embedded.shape} for {len(texts)} prompts, expected [{len(texts)}, d]")
    return embedded.reshape(len(prompts), 2, embedded.shape[1])


def zeroshot_scores(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray) -> np.ndarray:
    """Compute ``cos(image, positive) - cos(image, negative)`` per image and label: float64 ``[n, L]``.

    Both inputs are L2-normalised here, so unnormalised embeddings give the
    same scores. A zero vector raises ``InputError`` because its cosine is undefined.
    """
    images = _unit_rows(np.asarray(image_embeddings, dtype=np.float64), "image embeddings")
    prompts = np.asarray(prompt_embeddings, dtype=np.float64)
    if prompts.ndim != 3 or prompts.shape[1] != 2 or prompts.shape[2] != images.shape[1]:
        raise InputError(f"prompt embeddings have shape {prompts.shape}, expected [L, 2, {images.shape[1]}] "
                         "(positive then negative prompt per label)")
    prompts = _unit_rows(prompts.reshape(-1, prompts.shape[2]), "prompt embeddings").reshape(prompts.shape)
    return images @ prompts[:, 0, :].T - images @ prompts[:, 1, :].T


def _unit_rows(x: np.ndarray, array_name: str) -> np.ndarray:
    if x.ndim != 2:
        raise InputError(f"{array_name} have shape {x.shape}, expected [n, d]")
    if not np.isfinite(x).all():
        raise InputError(f"{array_name} contain {int((~np.isfinite(x)).sum())} NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"{array_name} contain {int((norms == 0).sum())} zero vectors, whose cosine is undefined")
    return x / norms


def zeroshot_macro_auroc(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray, test_y: np.ndarray,
                         test_groups: np.ndarray, label_names: list[str], n_boot: int = 1000, seed: int = 0,
                         min_count: int = DEFAULT_MIN_COUNT) -> dict:
    """Score images against each label's prompt pair and report per-label and macro AUROC with patient-bootstrap CIs.

    Args:
        image_embeddings: ``[n, d]`` image embeddings in the shared space.
        prompt_embeddings: ``[L, 2, d]`` positive and negative prompt
            embeddings per label, for example from :func:`prompt_embeddings`.
        test_y: ``[n, L]`` labels (1, 0, -1 uncertain, NaN unknown).
        test_groups: ``[n]`` patient ids; the bootstrap resamples patients.
        label_names: ``L`` names.
        n_boot, seed: bootstrap resamples and their seed (see :mod:`linkrisk.probe.bootstrap`).
        min_count: a label is used only with at least this many positives
            and this many negatives among the test labels.

    Returns:
        ``{"macro_auroc", "ci95", "bootstrap_resamples_used", "n_boot", "min_count", "labels", "skipped_labels"}``.
        ``labels`` entries have ``name``, ``auroc``, ``ci95`` and
        ``n_test_{pos,neg,excluded}``. Skipped entries have ``name``,
        ``reason`` and the same counts.
    """
    scores = zeroshot_scores(image_embeddings, prompt_embeddings)
    if scores.shape[1] != len(label_names):
        raise InputError(f"{scores.shape[1]} prompt pairs for {len(label_names)} label names")
    test_y = check_labels(test_y, len(scores), label_names, "test")
    test_groups = np.asarray(test_groups)
    if len(test_groups) != len(scores):
        raise InputError(f"{len(test_groups)} test patient ids for {len(scores)} images")
    check_min_count(min_count)

    used: dict[int, np.ndarray] = {}
    entries, skipped = [], []
    for j, name in enumerate(label_names):
        counts = {"test": class_counts(test_y[:, j])}
        reason = shortfall(counts, min_count)
        if reason is not None:
            skipped.append({"name": name, "reason": reason, **count_fields(counts)})
            continue
        used[j] = scores[:, j]
        entries.append({"name": name, **count_fields(counts)})
    result = summarise_aurocs(test_y, used, entries, skipped, test_groups, n_boot, seed, "zero-shot")
    return {**result, "min_count": int(min_count)}
