"""Progress bars: where they draw, what they show, and that no step's result depends on them.

Each step test runs the step twice on a tiny input, once with ``progress=False`` and
once with ``progress=True`` drawn on a forced-terminal console over the captured
stderr. It checks that the bar was drawn there, that stdout stayed empty and that
both results are equal.
"""

from __future__ import annotations

import io
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from rich.console import Console
from rich.errors import LiveError
from torch import nn

import linkrisk._progress as progress_module
from linkrisk._logging import configure_logging, reset_logging
from linkrisk._progress import progress_bar


def _terminal(file=None) -> Console:
    """Create a console that draws live bars on any output; ``file`` None writes to sys.stderr."""
    return Console(file=file, stderr=file is None, force_terminal=True, width=160, color_system=None)


@pytest.fixture
def stderr_terminal(monkeypatch):
    """Make every progress bar draw on the captured stderr, as on an interactive terminal."""
    console = _terminal()
    monkeypatch.setattr(progress_module, "_console", lambda: console)
    return console


def _drawn(capsys, unit: str) -> str:
    """Return the captured stderr after checking that a ``unit`` bar was drawn there and stdout is empty."""
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{unit}/s" in captured.err
    return captured.err


# progress_bar itself


def test_disabled_bar_writes_nothing():
    output = io.StringIO()
    with progress_bar(False, "images", console=_terminal(output)) as bar:
        task = bar.add_task("image features", total=10)
        bar.advance(task, 4)
    assert output.getvalue() == ""


def test_enabled_bar_shows_rate_and_count():
    output = io.StringIO()
    with progress_bar(True, "images", console=_terminal(output)) as bar:
        task = bar.add_task("image features", total=10)
        bar.advance(task, 3)
    text = output.getvalue()
    assert "image features" in text
    assert "3/10" in text
    assert "images/s" in text


def test_non_terminal_gets_no_bar():
    output = io.StringIO()
    with progress_bar(True, "images", console=Console(file=output)) as bar:
        task = bar.add_task("image features", total=10)
        bar.advance(task, 3)
    assert output.getvalue() == ""


def test_rate_column_formats():
    column = progress_module.RateColumn("points")

    class Task:
        finished_speed = None
        speed = None

    task = Task()
    assert str(column.render(task)) == "- points/s"
    task.speed = 0.04
    assert str(column.render(task)) == "0.04 points/s"
    task.speed = 1234.56
    assert str(column.render(task)) == "1,234.6 points/s"


def test_default_console_is_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "_stderr_console", _terminal())
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no log handler console to share
    with progress_bar(True, "steps") as bar:
        bar.advance(bar.add_task("fitting", total=2))
    _drawn(capsys, "steps")


def test_bar_shares_log_handler_console():
    console = _terminal(io.StringIO())
    configure_logging(console=console)
    try:
        assert progress_bar(True, "steps").console is console
    finally:
        reset_logging()


def test_nested_bars_draw_on_one_console():
    output = io.StringIO()
    console = _terminal(output)
    with progress_bar(True, "points", console=console) as outer:
        outer_task = outer.add_task("epsilon sweep", total=2)
        with progress_bar(True, "steps", console=console) as inner:
            inner.advance(inner.add_task("DP-SGD", total=3))
            nested = not inner.disable
        outer.advance(outer_task)
    assert "points/s" in output.getvalue()
    if nested:  # rich releases that nest live displays draw the inner bar below the outer one
        assert "steps/s" in output.getvalue()


def test_inner_bar_hidden_where_rich_cannot_nest(monkeypatch):
    output = io.StringIO()
    console = _terminal(output)

    def reject_second_live(live):
        raise LiveError("Only one live display may be active at once")

    with progress_bar(True, "points", console=console) as outer:
        outer_task = outer.add_task("epsilon sweep", total=2)
        monkeypatch.setattr(console, "set_live", reject_second_live)
        with progress_bar(True, "steps", console=console) as inner:
            inner.advance(inner.add_task("DP-SGD", total=3))
            assert inner.disable
        outer.advance(outer_task)
    assert "points/s" in output.getvalue()
    assert "steps/s" not in output.getvalue()


# Feature encoding (models/features.py) and the embedding run (models/embed.py)


def _bmp_cohort(tmp_path, n: int = 5):
    from linkrisk.data.cohort import PairedCohort

    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, size=(48, 48), dtype=np.uint8)
        paths.append(str(tmp_path / f"image{i}.bmp"))
        Image.fromarray(pixels, mode="L").save(paths[-1], format="BMP")
    images = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "image_path": paths,
                           "study_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                           "report_id": [f"r{i}" for i in range(n)], "view": "PA"})
    reports = pd.DataFrame({"report_id": [f"r{i}" for i in range(n)],
                            "text": [f"Finding number {i}. " * (i + 1) for i in range(n)]})
    return PairedCohort("bmp", images, reports, source=str(tmp_path))


class _CharacterEncoder:
    """Text encoder stand-in: character, word and sentence counts per report."""

    name = "characters"
    feature_dim = 3

    def config(self) -> dict:
        return {"name": self.name}

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.array([[len(t), t.count(" "), t.count(".")] for t in texts], dtype=np.float32)


def test_feature_encoding_same_with_progress(tmp_path, stderr_terminal, capsys):
    from linkrisk.models.features import embed_images, embed_texts
    from linkrisk.models.image_encoders import RandomConvEncoder

    cohort = _bmp_cohort(tmp_path)
    encoder = RandomConvEncoder(image_size=32, n_filters=4, grid=2)
    texts = cohort.reports["text"].tolist()
    quiet_images, _ = embed_images(cohort, encoder, tmp_path / "quiet", chunk_size=2, progress=False)
    quiet_texts = embed_texts(texts, _CharacterEncoder(), tmp_path / "quiet", "bmp", chunk_size=2, progress=False)
    capsys.readouterr()

    images, readable = embed_images(cohort, encoder, tmp_path / "with_bars", chunk_size=2, progress=True)
    _drawn(capsys, "images")
    reports = embed_texts(texts, _CharacterEncoder(), tmp_path / "with_bars", "bmp", chunk_size=2, progress=True)
    _drawn(capsys, "reports")
    np.testing.assert_array_equal(images, quiet_images)
    np.testing.assert_array_equal(reports, quiet_texts)
    assert readable.n_images == cohort.n_images


def test_cached_chunks_same_with_progress(tmp_path, stderr_terminal, capsys):
    from linkrisk.models.features import embed_images
    from linkrisk.models.image_encoders import RandomConvEncoder

    cohort = _bmp_cohort(tmp_path)
    encoder = RandomConvEncoder(image_size=32, n_filters=4, grid=2)
    first, _ = embed_images(cohort, encoder, tmp_path / "cache", chunk_size=2, progress=False)
    # One chunk file removed: the rerun reuses two chunks, which leave the bar's total, and computes one.
    chunk_files = sorted((tmp_path / "cache" / "features" / encoder.name).glob("*.npz"))
    assert len(chunk_files) == 3
    chunk_files[0].unlink()
    capsys.readouterr()
    again, _ = embed_images(cohort, encoder, tmp_path / "cache", chunk_size=2, progress=True)
    _drawn(capsys, "images")
    np.testing.assert_array_equal(again, first)


class _TinyAdapter:
    """Model adapter stand-in for embed_cohort: 8x8 thumbnails, text counts, seeded linear heads."""

    name = "tiny"
    tokenizer = None
    context_length = None
    embed_dim = 4

    def __init__(self):
        torch.manual_seed(0)
        self.image_head = nn.Linear(64, 4)
        self.text_head = nn.Linear(3, 4)

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.as_tensor(np.asarray(image.resize((8, 8)), dtype=np.float32).reshape(-1) / 255.0)

    def encode_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def encode_text_features(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(_CharacterEncoder().encode(texts))

    def warn_truncated(self) -> None:
        pass


def test_embed_cohort_same_with_progress(tmp_path, stderr_terminal, capsys):
    from linkrisk.models.embed import EmbedConfig, embed_cohort

    cohort = _bmp_cohort(tmp_path)
    adapter = _TinyAdapter()
    options = {"chunk_size": 2, "batch_size": 2, "text_batch_size": 2, "workers": 0}
    embed_cohort(adapter, cohort, tmp_path / "quiet", EmbedConfig(**options, progress=False), {"model": "tiny"})
    capsys.readouterr()
    embed_cohort(adapter, cohort, tmp_path / "with_bars", EmbedConfig(**options, progress=True), {"model": "tiny"})
    err = _drawn(capsys, "images")
    assert "reports/s" in err
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "with_bars" / name), np.load(tmp_path / "quiet" / name))


# Head fitting (models/train.py), DP-SGD (mitigate/dp.py) and the ε sweep (mitigate/sweep.py)


@pytest.fixture(scope="module")
def toy():
    """60 images of 30 patients, 30 reports, plus a public cohort, from a seeded generator."""
    rng = np.random.default_rng(0)
    reports = rng.normal(size=(30, 12)).astype(np.float32)
    report_row = np.repeat(np.arange(30), 2)
    images = (reports[report_row] @ rng.normal(size=(12, 20)) + 0.1 * rng.normal(size=(60, 20))).astype(np.float32)
    patients = np.repeat(np.arange(30), 2).astype(str)
    public_images = rng.normal(size=(25, 20)).astype(np.float32)
    public_reports = rng.normal(size=(40, 12)).astype(np.float32)
    return images, reports, report_row, patients, public_images, public_reports


def _assert_same_state(first: nn.Module, second: nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name in first_state:
        assert torch.equal(first_state[name], second_state[name]), name


def test_fit_heads_same_with_progress(toy, stderr_terminal, capsys):
    from linkrisk.models.train import FitConfig, fit_heads

    config = FitConfig(embed_dim=8, max_steps=30)
    quiet_heads, quiet_history = fit_heads(*toy[:4], config, progress=False)
    capsys.readouterr()
    heads, history = fit_heads(*toy[:4], config, progress=True)
    _drawn(capsys, "steps")
    assert history == quiet_history
    _assert_same_state(heads, quiet_heads)


def test_dp_training_same_with_progress(toy, stderr_terminal, capsys, caplog):
    from linkrisk.mitigate import DPConfig, train_dp_heads

    # At epsilon 0.1 the noise search takes well under a second. At 1 it took 8 s on 2 CPU cores.
    config = DPConfig(epsilon=0.1, delta=1e-5, epochs=2, batch_size=10, embed_dim=8, bank_size=40, noise_seed=7)
    quiet_heads, quiet_record = train_dp_heads(*toy, config, progress=False)
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="linkrisk"):
        heads, record = train_dp_heads(*toy, config, progress=True)
    err = _drawn(capsys, "steps")
    assert f"/{record['steps']}" in err  # the bar counts steps, not epochs
    assert record == quiet_record
    _assert_same_state(heads, quiet_heads)
    calibration = [r.getMessage() for r in caplog.records if "noise calibration" in r.getMessage()]
    assert len(calibration) == 2
    assert calibration[0].endswith("started")
    assert "finished in" in calibration[1]


def test_dp_fixed_noise_logs_no_calibration(toy, caplog):
    from linkrisk.mitigate import DPConfig, train_dp_heads

    config = DPConfig(epsilon=1.0, delta=1e-5, epochs=1, batch_size=10, embed_dim=8, bank_size=40,
                      noise_multiplier=1.0, noise_seed=7)
    with caplog.at_level(logging.INFO, logger="linkrisk"):
        train_dp_heads(*toy, config, progress=False)
    assert not [r for r in caplog.records if "noise calibration" in r.getMessage()]


def _feature_cohort(name: str, features: tuple, patient_prefix: str, heads: tuple, seed: int):
    from linkrisk.models.precomputed import FeatureCohort

    images, reports, report_row, patients = features
    labels = np.random.default_rng(seed).integers(0, 2, size=(len(images), 1)).astype(float)
    return FeatureCohort(name, "toy", images, reports, report_row, np.char.add(patient_prefix, patients), labels,
                         ["Finding"], *heads)


@pytest.fixture(scope="module")
def cohorts(toy):
    """Training, held-out and public feature cohorts of one source with disjoint patients, sharing seeded heads."""
    images, reports, report_row, patients, public_images, public_reports = toy
    torch.manual_seed(0)
    heads = (nn.Linear(images.shape[1], 8), nn.Linear(reports.shape[1], 8))
    rng = np.random.default_rng(1)
    held_reports = rng.normal(size=(20, 12)).astype(np.float32)
    held_row = np.repeat(np.arange(20), 2)
    held_images = (held_reports[held_row] @ rng.normal(size=(12, 20))).astype(np.float32)
    held_patients = np.repeat(np.arange(20), 2).astype(str)
    train = _feature_cohort("train", (images, reports, report_row, patients), "train", heads, 0)
    heldout = _feature_cohort("heldout", (held_images, held_reports, held_row, held_patients), "held", heads, 1)
    public = _feature_cohort("public", (public_images, public_reports, np.arange(25), np.arange(25).astype(str)),
                             "public", heads, 2)
    return train, heldout, public


def test_epsilon_sweep_same_with_progress(cohorts, stderr_terminal, capsys, tmp_path):
    from linkrisk.mitigate import DPConfig
    from linkrisk.mitigate.sweep import epsilon_sweep

    train, heldout, public = cohorts
    config = DPConfig(delta=1e-5, epochs=1, batch_size=10, bank_size=40, init="original", noise_multiplier=1.0,
                      noise_seed=3)
    options = {"epsilons": [1.0, math.inf], "config": config, "n_boot": 20, "seed": 0}
    quiet = epsilon_sweep(train, public, [heldout], **options, progress=False)
    capsys.readouterr()
    with_bars = epsilon_sweep(train, public, [heldout], **options, checkpoint_dir=tmp_path, progress=True)
    _drawn(capsys, "points")
    assert json.dumps(with_bars, sort_keys=True, default=str) == json.dumps(quiet, sort_keys=True, default=str)

    # A rerun reuses both finished points: they leave the bar's total and the result is the same.
    again = epsilon_sweep(train, public, [heldout], **options, checkpoint_dir=tmp_path, progress=True)
    assert json.dumps(again, sort_keys=True, default=str) == json.dumps(quiet, sort_keys=True, default=str)


# The refit attacker (audit/refit.py, mitigate/run.py)


def _without_timings(result: dict) -> dict:
    entries = [{key: value for key, value in entry.items() if key != "fit_seconds"} for entry in result["entries"]]
    return {**result, "entries": entries}


def _refit_cohorts():
    rng = np.random.default_rng(4)
    latent = rng.normal(size=(100, 6))
    image = (latent @ rng.normal(size=(6, 12)) + 0.05 * rng.normal(size=(100, 12))).astype(np.float32)
    text = (latent @ rng.normal(size=(6, 9)) + 0.05 * rng.normal(size=(100, 9))).astype(np.float32)

    def cohort(rows: slice, prefix: str) -> tuple:
        n = len(image[rows])
        return image[rows], text[rows], np.arange(n), np.array([f"{prefix}{i // 2}" for i in range(n)])

    return cohort(slice(0, 60), "aux"), cohort(slice(60, None), "target")


def test_refit_attack_same_with_progress(stderr_terminal, capsys):
    from linkrisk.audit.refit import refit_attack

    aux, target = _refit_cohorts()
    options = {"ks": (20, "all"), "pools": ("full",), "n_boot": 20, "repeats": 2, "embed_dim": 4}
    quiet = refit_attack(*aux, *target, **options)
    capsys.readouterr()
    with_bars = refit_attack(*aux, *target, **options, progress=True)
    _drawn(capsys, "fits")
    assert [e["method"] for e in with_bars["entries"]].count("infonce") == 3
    assert _without_timings(with_bars) == _without_timings(quiet)


def test_refit_on_targets_passes_progress(cohorts, stderr_terminal, capsys):
    from linkrisk.mitigate.run import refit_on_targets

    train, heldout, _ = cohorts
    quiet = refit_on_targets(train, [heldout], [20], n_boot=20, seed=0)
    assert "fits/s" not in capsys.readouterr().err
    with_bars = refit_on_targets(train, [heldout], [20], n_boot=20, seed=0, progress=True)
    _drawn(capsys, "fits")
    assert [_without_timings(entry) for entry in with_bars] == [_without_timings(entry) for entry in quiet]


# Audit steps (audit/assignment.py, audit/montecarlo.py)


def _unit_rows(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    rows = rng.normal(size=(n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_assignment_attack_same_with_progress(stderr_terminal, capsys):
    from linkrisk.audit.assignment import assignment_attack

    rng = np.random.default_rng(5)
    reports = _unit_rows(rng, 50)
    report_row = np.repeat(np.arange(50), 2)
    images = reports[report_row] + 0.5 * _unit_rows(rng, 100)
    options = {"batch_sizes": [10, 40, 80], "n_batches": 5, "n_boot": 50, "seed": 0}
    quiet = assignment_attack(images, reports, report_row, **options)
    capsys.readouterr()
    with_bars = assignment_attack(images, reports, report_row, **options, progress=True)
    err = _drawn(capsys, "batches")
    assert "/10" in err  # 5 batches for each of the two batch sizes that fit
    assert with_bars == quiet


def test_monte_carlo_same_with_progress(stderr_terminal, capsys):
    from linkrisk.audit.montecarlo import monte_carlo_recall

    rng = np.random.default_rng(6)
    candidates = _unit_rows(rng, 60)
    queries = candidates[:30] + 0.5 * _unit_rows(rng, 30)
    options = {"pool_sizes": [10, 60], "ks": [1, 5], "n_pools": 20, "seed": 0, "block_size": 8}
    quiet = monte_carlo_recall(queries, candidates, np.arange(30), **options)
    capsys.readouterr()
    with_bars = monte_carlo_recall(queries, candidates, np.arange(30), **options, progress=True)
    _drawn(capsys, "queries")
    np.testing.assert_array_equal(with_bars, quiet)

