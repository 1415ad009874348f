"""Refit attacker: planted linear relations, ridge against scikit-learn, draws, and real COVID halves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from linkrisk.audit.refit import (
    RIDGE_ALPHAS,
    draw_aux_pairs,
    fit_procrustes_heads,
    fit_ridge_heads,
    refit_attack,
)
from linkrisk.errors import ConfigError, InputError


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_pool():
    """Run this module with one BLAS thread and one torch thread, then restore both.

    The attacks alternate many small numpy and torch calls, and two-thread
    pools then spin against each other when the cores are busy. On a 2-core
    machine already running other jobs, this module took 90 s with the
    default pools and 14 s with OMP_NUM_THREADS=1 (one measurement each).
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def _planted(seed: int, n: int, image_dim: int = 12, text_dim: int = 9, latent_dim: int = 6, noise: float = 0.01):
    """Pairs with ``text = image @ W + noise`` and ``W = Qx^T Qy``.

    Images are ``Z Qx`` plus noise, with ``Z`` a latent of decaying
    standard deviations (3 to 1, so principal axes are identifiable) and
    ``Qx``, ``Qy`` random matrices with orthonormal rows. Text is then
    ``Z Qy`` up to noise, an orthogonal relation that Procrustes can recover.
    """
    rng = np.random.default_rng(seed)
    qx = ortho_group.rvs(image_dim, random_state=rng)[:latent_dim]
    qy = ortho_group.rvs(text_dim, random_state=rng)[:latent_dim]
    latent = rng.normal(size=(n, latent_dim)) * np.linspace(3.0, 1.0, latent_dim)
    image = latent @ qx + noise * rng.normal(size=(n, image_dim))
    text = image @ (qx.T @ qy) + noise * rng.normal(size=(n, text_dim))
    return image.astype(np.float32), text.astype(np.float32)


def _cohorts(image: np.ndarray, text: np.ndarray, n_aux: int) -> tuple[tuple, tuple]:
    """Auxiliary and target cohorts: one report per image, two images per patient, disjoint patient ids."""
    def cohort(rows: slice, prefix: str) -> tuple:
        n = len(image[rows])
        return image[rows], text[rows], np.arange(n), np.array([f"{prefix}{i // 2}" for i in range(n)])

    return cohort(slice(0, n_aux), "aux"), cohort(slice(n_aux, None), "target")


def _full_pool(entry: dict) -> dict:
    [full] = [r for r in entry["recall"] if r["pool"] == "full"]
    return full


@pytest.fixture(scope="module")
def planted_attack():
    image, text = _planted(seed=0, n=260)
    aux, target = _cohorts(image, text, n_aux=160)
    return refit_attack(*aux, *target, ks=(40, "all"), methods=("ridge", "procrustes"), pools=(50, "full"),
                        n_boot=200, repeats=2)


@pytest.mark.parametrize("method", ["ridge", "procrustes"])
def test_planted_relation_relinked(planted_attack, method):
    entries = [e for e in planted_attack["entries"] if e["method"] == method]
    assert [(e["k"], e["repeat"]) for e in entries] == [(40, 0), (40, 1), ("all", 0)]
    for entry in entries:
        full = _full_pool(entry)
        assert full["chance"] == pytest.approx(1 / 100)
        assert full["value"] >= 0.95, (entry["k"], entry["repeat"], full)
        assert entry["mean_normalised_rank"] < 0.01, (entry["k"], entry["repeat"])


@pytest.mark.parametrize("method", ["ridge", "procrustes"])
def test_random_features_stay_near_chance(method):
    rng = np.random.default_rng(1)
    aux, target = _cohorts(rng.normal(size=(360, 12)).astype(np.float32),
                           rng.normal(size=(360, 9)).astype(np.float32), n_aux=160)
    result = refit_attack(*aux, *target, ks=("all",), methods=(method,), pools=("full",), n_boot=200)
    [entry] = result["entries"]
    full = _full_pool(entry)
    assert full["chance"] == pytest.approx(1 / 200)
    assert full["value"] <= 5 * full["chance"]
    assert abs(entry["mean_normalised_rank"] - 0.5) < 0.06


def test_ridge_matches_sklearn_pipeline():
    rng = np.random.default_rng(2)
    aux_image, aux_text = rng.normal(size=(40, 15)), rng.normal(size=(30, 8))
    report_row = rng.integers(0, 30, size=40)
    target_image, target_text = rng.normal(size=(25, 15)), rng.normal(size=(20, 8))
    heads, record = fit_ridge_heads(aux_image, aux_text, report_row, np.arange(40), embed_dim=5, alpha=0.3)

    scaled_image = StandardScaler().fit(aux_image)
    scaled_text = StandardScaler().fit(aux_text[report_row])
    pca = PCA(n_components=5, svd_solver="full").fit(scaled_text.transform(aux_text[report_row]))
    x = scaled_image.transform(aux_image)
    expected_lambda = 0.3 * np.mean(np.linalg.svd(x, compute_uv=False) ** 2)
    ridge = Ridge(alpha=expected_lambda).fit(x, pca.transform(scaled_text.transform(aux_text[report_row])))
    image_emb = ridge.predict(scaled_image.transform(target_image))
    text_emb = pca.transform(scaled_text.transform(target_text))
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)

    ours_image, ours_text = heads.embed(target_image, target_text)
    assert record["lambda"] == pytest.approx(expected_lambda)
    assert record["alpha_selected_by"] == "given"
    assert record["embed_dim"] == 5
    # Principal axes are defined up to sign, so compare the cosine scores, which do not depend on it.
    np.testing.assert_allclose(ours_image @ ours_text.T, image_emb @ text_emb.T, atol=1e-5)


def test_ridge_weights_match_lstsq():
    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(12, 20)), rng.normal(size=(12, 6))
    heads, record = fit_ridge_heads(image, text, np.arange(12), np.arange(12), embed_dim=6, alpha=2.0)

    x = (image - image.mean(0)) / image.std(0)
    y = (text - text.mean(0)) / text.std(0)
    targets = y @ heads.text_weight
    # Ridge as least squares on the augmented system [X; sqrt(lam) I] W = [T; 0].
    augmented = np.vstack([x, math.sqrt(record["lambda"]) * np.eye(20)])
    expected, *_ = np.linalg.lstsq(augmented, np.vstack([targets, np.zeros((20, targets.shape[1]))]), rcond=None)
    assert heads.image_weight.shape == (20, 6)
    np.testing.assert_allclose(heads.image_weight, expected, atol=1e-9)


def test_ridge_selects_alpha_on_aux_patients():
    image, text = _planted(seed=4, n=60)
    heads, record = fit_ridge_heads(image, text, np.arange(60), np.arange(60) // 2, embed_dim=9)
    assert record["alpha"] in RIDGE_ALPHAS
    assert record["alpha_selected_by"].startswith("leave-patient-out")
    assert set(record["cv_mean_normalised_rank"]) == {f"{a:.4g}" for a in RIDGE_ALPHAS}
    # A near-noiseless relation needs little shrinkage.
    assert record["alpha"] <= 1.0


def test_ridge_alpha_defaults_with_two_patients():
    image, text = _planted(seed=5, n=6)
    _, record = fit_ridge_heads(image, text, np.arange(6), np.array([0, 0, 0, 1, 1, 1]))
    assert record["alpha_selected_by"] == "default (only 2 auxiliary patients)"
    assert record["alpha"] == 1.0


@pytest.mark.parametrize("fit", [
    lambda image, text, rows: fit_ridge_heads(image, text, rows, np.arange(len(rows)), embed_dim=64),
    lambda image, text, rows: fit_procrustes_heads(image, text, rows, embed_dim=64),
], ids=["ridge", "procrustes"])
def test_few_pairs_cap_dimension(fit):
    image, text = _planted(seed=6, n=5)
    heads, record = fit(image, text, np.arange(5))
    # Five centred pairs span at most 4 dimensions.
    assert record["embed_dim"] == 4
    image_emb, text_emb = heads.embed(image, text)
    assert image_emb.shape == (5, 4)
    assert text_emb.shape == (5, 4)
    assert np.isfinite(image_emb).all()
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)


def test_procrustes_rotation_is_orthogonal():
    image, text = _planted(seed=7, n=50)
    heads, record = fit_procrustes_heads(image, text, np.arange(50), embed_dim=5)
    assert record["embed_dim"] == 5
    # image_weight = image axes @ R, with orthonormal image axes and orthogonal R.
    np.testing.assert_allclose(heads.image_weight.T @ heads.image_weight, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(heads.text_weight.T @ heads.text_weight, np.eye(5), atol=1e-10)


def test_draw_takes_whole_patients():
    patients = np.repeat([f"p{i}" for i in range(30)], np.tile([1, 2, 3], 10))
    first = draw_aux_pairs(patients, 20, seed=0)
    assert len(first) == 20
    assert np.array_equal(first, np.sort(first))
    drawn = set(patients[first])
    assert sorted(first) == sorted(np.flatnonzero(np.isin(patients, list(drawn))))
    np.testing.assert_array_equal(draw_aux_pairs(patients, 20, seed=0), first)
    assert not np.array_equal(draw_aux_pairs(patients, 20, seed=1), first)
    assert len(draw_aux_pairs(patients, len(patients), seed=0)) == len(patients)


def test_entries_and_summary_layout(caplog):
    image, text = _planted(seed=8, n=140)
    aux, target = _cohorts(image, text, n_aux=80)
    result = refit_attack(*aux, *target, ks=(20, "all", 500), pools=(10, "full"), n_boot=50, repeats=2)
    assert "exceed the 80 auxiliary pairs" in caplog.text
    json.dumps(result, allow_nan=False)

    keys = [(e["method"], e["k"], e["repeat"]) for e in result["entries"]]
    assert keys == [(m, 20, r) for r in (0, 1) for m in ("infonce", "ridge", "procrustes")] + \
        [(m, "all", 0) for m in ("infonce", "ridge", "procrustes")]
    for entry in result["entries"]:
        assert entry["n_aux_pairs"] == (80 if entry["k"] == "all" else 20)
        assert entry["n_aux_patients"] == entry["n_aux_pairs"] // 2
        assert entry["n_queries"] == 60
        assert [r["pool"] for r in entry["recall"]] == [10, "full"]
        for recall in entry["recall"]:
            assert recall["k"] == 1
            assert recall["lift"] == pytest.approx(recall["value"] / recall["chance"])
            assert recall["ci95"][0] <= recall["value"] <= recall["ci95"][1]

    summary = {(s["method"], s["k"]): s for s in result["summary"]}
    assert set(summary) == {(m, k) for m in ("infonce", "ridge", "procrustes") for k in (20, "all")}
    ridge_20 = summary[("ridge", 20)]
    values = [_full_pool(e)["value"] for e in result["entries"] if e["method"] == "ridge" and e["k"] == 20]
    assert ridge_20["n_repeats"] == 2
    assert _full_pool(ridge_20)["mean"] == pytest.approx(np.mean(values))
    assert _full_pool(ridge_20)["sd"] == pytest.approx(np.std(values, ddof=1))
    assert summary[("ridge", "all")]["mean_normalised_rank"]["sd"] is None


def test_infonce_left_out_below_four_patients(caplog):
    image, text = _planted(seed=9, n=60)
    aux, target = _cohorts(image, text, n_aux=30)
    result = refit_attack(*aux, *target, ks=(6,), pools=("full",), n_boot=20, repeats=1)
    assert [e["method"] for e in result["entries"]] == ["ridge", "procrustes"]
    assert "InfoNCE needs at least 4 auxiliary patients" in caplog.text


@pytest.mark.parametrize("options, error", [
    ({"ks": (1,)}, ConfigError),
    ({"ks": (True,)}, ConfigError),
    ({"ks": ("half",)}, ConfigError),
    ({"ks": ()}, ConfigError),
    ({"methods": ("cca",)}, ConfigError),
    ({"methods": ()}, ConfigError),
    ({"repeats": 0}, ConfigError),
    ({"embed_dim": 0}, ConfigError),
    ({"n_boot": 0}, ConfigError),
    ({"pools": (1,)}, ConfigError),
])
def test_invalid_options_raise(options, error):
    image, text = _planted(seed=10, n=40)
    aux, target = _cohorts(image, text, n_aux=20)
    with pytest.raises(error):
        refit_attack(*aux, *target, **options)


def test_mismatched_inputs_raise():
    image, text = _planted(seed=11, n=40)
    aux, target = _cohorts(image, text, n_aux=20)
    with pytest.raises(InputError, match="image features differ in dimension"):
        refit_attack(aux[0][:, :10], *aux[1:], *target)
    with pytest.raises(InputError, match="report rows must lie in"):
        refit_attack(aux[0], aux[1], aux[2] + 5, aux[3], *target)
    nan_text = target[1].copy()
    nan_text[3, 0] = np.nan
    with pytest.raises(InputError, match="target report feature rows contain NaN"):
        refit_attack(*aux, target[0], nan_text, *target[2:])


@pytest.fixture(scope="module")
def covid_halves(covid, cache_dir):
    """Reference-model features of two patient-disjoint COVID halves, computed as the demo does."""
    from linkrisk.data import split_by_patient
    from linkrisk.models.features import embed_images, embed_texts
    from linkrisk.models.image_encoders import create_image_encoder
    from linkrisk.models.text_encoders import WordLlamaTextEncoder
    from linkrisk.pipeline import Features

    image, cohort = embed_images(covid, create_image_encoder("randconv"), cache_dir, progress=False)
    report = embed_texts(cohort.reports["text"].tolist(), WordLlamaTextEncoder(), cache_dir, cohort.name,
                         progress=False)
    features = Features(cohort, image, report)
    half_a, half_b = split_by_patient(cohort, 0.5, seed=0)

    def arrays(part):
        sub = features.part(part)
        return sub.image, sub.report, sub.report_row, sub.patient_ids

    return arrays(half_a), arrays(half_b)


def test_refit_attack_covid_halves(covid_halves):
    aux, target = covid_halves
    result = refit_attack(*aux, *target, ks=(50, "all"), pools=(100, "full"), n_boot=300, repeats=2)
    assert result["n_shared_patient_ids"] == 0
    assert len(result["entries"]) == 3 * 3

    for entry in result["entries"]:
        where = (entry["method"], entry["k"], entry["repeat"])
        assert entry["n_aux_pairs"] == (len(aux[0]) if entry["k"] == "all" else 50), where
        assert [r["pool"] for r in entry["recall"]] == [100, "full"], where
        for recall in entry["recall"]:
            assert math.isfinite(recall["value"]), where
            assert math.isfinite(recall["lift"]), where
            assert recall["ci95"][0] <= recall["value"] <= recall["ci95"][1], where
        rank, (low, high) = entry["mean_normalised_rank"], entry["mean_normalised_rank_ci95"]
        assert math.isfinite(rank), where
        assert low <= rank <= high, where

    at_all = {e["method"]: e for e in result["entries"] if e["k"] == "all"}
    assert at_all["ridge"]["mean_normalised_rank"] < 0.5
    assert at_all["infonce"]["mean_normalised_rank"] < 0.5
    # Measured on this split: 0.407, interval 0.356 to 0.464, over 180 target images.
    assert at_all["ridge"]["mean_normalised_rank_ci95"][1] < 0.5
