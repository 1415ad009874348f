"""Shared fixtures: the real cohorts under LINKRISK_DATA (default ../shared/data) and one demo run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LINKRISK_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "covid-chestxray").is_dir() or not (DATA_DIR / "openi").is_dir():
        pytest.fail(f"real test data not found under {DATA_DIR}; set LINKRISK_DATA to the folder "
                    "holding covid-chestxray/ and openi/")
    return DATA_DIR


@pytest.fixture(scope="session")
def covid(data_dir):
    from linkrisk.data import load_covid

    return load_covid(data_dir / "covid-chestxray")


@pytest.fixture(scope="session")
def openi(data_dir):
    from linkrisk.data import load_openi

    return load_openi(data_dir / "openi")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def demo_run(data_dir, cache_dir, tmp_path_factory):
    """One full demo run (about a minute on 2 cores); returns ``(out_dir, results)``."""
    from linkrisk.pipeline import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    results = run_demo(DemoConfig(data_dir=data_dir, out_dir=out, cache_dir=cache_dir, n_boot=500, progress=False))
    return out, results
