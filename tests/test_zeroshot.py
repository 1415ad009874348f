"""Zero-shot classification: scores, intervals, planted prompts, default prompts and a real cohort."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from linkrisk.data.cohort import CHEXPERT_LABELS
from linkrisk.errors import ConfigError, InputError
from linkrisk.probe import (DEFAULT_PROMPTS, label_prompts, probe_split, prompt_embeddings, zeroshot_macro_auroc,
                            zeroshot_scores)
from test_probe import brute_force_bootstrap


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted(seed: int, n_patients: int, n_labels: int, dim: int = 32, strength: float = 1.5):
    """Images that carry label ``l`` along direction ``l``; prompts are +/- that direction plus noise."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), 2).astype(str)
    y = (rng.random((len(groups), n_labels)) < 0.4).astype(float)
    directions = np.eye(dim)[:n_labels]
    images = rng.normal(size=(len(groups), dim)) * 0.3 + strength * (2 * y - 1) @ directions
    prompts = np.stack([directions, -directions], axis=1) + 0.1 * rng.normal(size=(n_labels, 2, dim))
    return images, prompts, y, groups


def test_scores_are_cosine_difference():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 8)) * 3.0  # not normalised on purpose
    prompts = rng.normal(size=(4, 2, 8))
    got = zeroshot_scores(images, prompts)
    for i in range(20):
        for label in range(4):
            image = images[i] / np.linalg.norm(images[i])
            positive = prompts[label, 0] / np.linalg.norm(prompts[label, 0])
            negative = prompts[label, 1] / np.linalg.norm(prompts[label, 1])
            assert got[i, label] == pytest.approx(image @ positive - image @ negative)


def test_auroc_equals_sklearn_on_score_difference():
    rng = np.random.default_rng(1)
    images = _unit(rng.normal(size=(60, 8)))
    prompts = _unit(rng.normal(size=(3, 2, 8)))
    y = (rng.random((60, 3)) < 0.5).astype(float)
    y[::9, 2] = np.nan
    result = zeroshot_macro_auroc(images, prompts, y, np.arange(60), ["a", "b", "c"], n_boot=50)
    difference = images @ prompts[:, 0].T - images @ prompts[:, 1].T
    for label, entry in enumerate(result["labels"]):
        known = ~np.isnan(y[:, label])
        assert entry["auroc"] == pytest.approx(roc_auc_score(y[known, label], difference[known, label]))
    assert result["macro_auroc"] == pytest.approx(np.mean([entry["auroc"] for entry in result["labels"]]))
    assert result["labels"][2]["n_test_excluded"] == int(np.isnan(y[:, 2]).sum())


def test_intervals_match_brute_force_bootstrap():
    images, prompts, y, groups = _planted(2, 15, 2, strength=0.15)
    result = zeroshot_macro_auroc(images, prompts, y, groups, ["a", "b"], n_boot=120, seed=7)
    label_ci, macro_ci, used = brute_force_bootstrap(y, zeroshot_scores(images, prompts), groups, 120, 7)
    assert result["bootstrap_resamples_used"] == used
    assert result["ci95"] == pytest.approx(list(macro_ci), abs=1e-12)
    for entry, expected in zip(result["labels"], label_ci):
        assert entry["ci95"] == pytest.approx(list(expected), abs=1e-12)
        assert entry["ci95"][0] <= entry["auroc"] <= entry["ci95"][1]


def test_planted_prompts_score_near_one():
    images, prompts, y, groups = _planted(3, 50, 4)
    result = zeroshot_macro_auroc(images, prompts, y, groups, ["a", "b", "c", "d"], n_boot=100)
    assert result["macro_auroc"] > 0.98
    assert result["ci95"][0] > 0.95
    for entry in result["labels"]:
        assert entry["auroc"] > 0.97, entry

    swapped = zeroshot_macro_auroc(images, prompts[:, ::-1], y, groups, ["a", "b", "c", "d"], n_boot=20)
    assert swapped["macro_auroc"] == pytest.approx(1.0 - result["macro_auroc"])


def test_rare_label_skipped_with_counts():
    images, prompts, y, groups = _planted(4, 30, 2)
    y[:, 1] = 0.0
    y[:4, 1] = 1.0
    y[10:13, 1] = -1.0
    result = zeroshot_macro_auroc(images, prompts, y, groups, ["a", "rare"], n_boot=20)
    (skip,) = result["skipped_labels"]
    assert skip["name"] == "rare"
    assert skip["n_test_pos"] == 4
    assert skip["n_test_neg"] == len(y) - 7
    assert skip["n_test_excluded"] == 3
    assert "test split has 4 positives" in skip["reason"]
    assert [entry["name"] for entry in result["labels"]] == ["a"]


def test_no_usable_label_is_nan_with_warning():
    images, prompts, y, groups = _planted(5, 10, 1)
    y[:] = 0.0
    with pytest.warns(RuntimeWarning, match="undefined"):
        result = zeroshot_macro_auroc(images, prompts, y, groups, ["a"], n_boot=10)
    assert np.isnan(result["macro_auroc"])
    assert result["skipped_labels"][0]["n_test_pos"] == 0


def test_score_input_errors():
    images = np.ones((4, 3))
    with pytest.raises(InputError, match="expected \\[L, 2, 3\\]"):
        zeroshot_scores(images, np.ones((2, 3, 3)))
    with pytest.raises(InputError, match="zero vectors"):
        zeroshot_scores(np.vstack([images, np.zeros((1, 3))]), np.ones((2, 2, 3)))
    with pytest.raises(InputError, match="prompt pairs"):
        zeroshot_macro_auroc(images, np.ones((2, 2, 3)), np.zeros((4, 3)), np.arange(4), ["a", "b", "c"])


def test_default_prompts_cover_chexpert_labels():
    prompts = label_prompts(list(CHEXPERT_LABELS))
    assert len(prompts) == len(CHEXPERT_LABELS)
    assert set(DEFAULT_PROMPTS) == set(CHEXPERT_LABELS)
    for positive, negative in prompts:
        assert positive.strip()
        assert negative.strip()
        assert positive != negative
    texts = [text for pair in prompts for text in pair]
    assert len(set(texts)) == len(texts)


def test_custom_prompts_and_template():
    custom = {"Edema": ("Fluid in the lungs.", "No fluid in the lungs.")}
    prompts = label_prompts(["Edema", "Fracture", "COVID-19"], custom=custom,
                            template=("Findings of {label}.", "No findings of {label}."))
    assert prompts[0] == custom["Edema"]
    assert prompts[1] == DEFAULT_PROMPTS["Fracture"]
    assert prompts[2] == ("Findings of COVID-19.", "No findings of COVID-19.")


def test_prompt_errors():
    with pytest.raises(ConfigError, match="COVID-19"):
        label_prompts(["Edema", "COVID-19"])
    with pytest.raises(ConfigError, match="not in label_names"):
        label_prompts(["Edema"], custom={"Edemaa": ("a", "b")})
    with pytest.raises(ConfigError, match="same text"):
        label_prompts(["Edema"], custom={"Edema": ("a", "a")})
    with pytest.raises(ConfigError, match="\\{label\\} field"):
        label_prompts(["X"], template=("X present.", "No {label}."))


def test_prompt_embeddings_order_and_shape():
    prompts = label_prompts(["Edema", "Fracture"])
    seen = []

    def encode(texts):
        seen.extend(texts)
        return np.arange(len(texts) * 3, dtype=float).reshape(len(texts), 3)

    embedded = prompt_embeddings(prompts, encode)
    assert embedded.shape == (2, 2, 3)
    assert seen == [prompts[0][0], prompts[0][1], prompts[1][0], prompts[1][1]]
    assert embedded[1, 0].tolist() == [6.0, 7.0, 8.0]
    with pytest.raises(InputError, match="encode returned"):
        prompt_embeddings(prompts, lambda texts: np.ones((3, 3)))


def test_zeroshot_on_openi_report_labels(openi):
    # Open-i report labels with random unit embeddings and random prompt
    # embeddings: finite values near chance, and every label used or skipped.
    labels = openi.label_matrix()
    patients = openi.reports["report_id"].to_numpy()
    _, test = probe_split(patients, 0.3, seed=1)
    rng = np.random.default_rng(11)
    images = _unit(rng.normal(size=(len(test), 32)))
    prompts = _unit(rng.normal(size=(len(openi.label_names), 2, 32)))
    names = list(openi.label_names)
    result = zeroshot_macro_auroc(images, prompts, labels[test], patients[test], names, n_boot=200)

    assert np.isfinite(result["macro_auroc"])
    assert np.isfinite(result["ci95"]).all()
    assert 0.4 < result["macro_auroc"] < 0.6
    seen = [entry["name"] for entry in result["labels"]] + [entry["name"] for entry in result["skipped_labels"]]
    assert sorted(seen) == sorted(names)
    for entry in result["labels"]:
        assert min(entry["n_test_pos"], entry["n_test_neg"]) >= 5
        assert np.isfinite(entry["ci95"]).all()
    for entry in result["skipped_labels"]:
        assert min(entry["n_test_pos"], entry["n_test_neg"]) < 5
