"""Shared fixtures: the real cohorts under LINKRISK_DATA (default ../shared/data), one demo run and a tiny CLIP."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A seeded, randomly initialised open_clip CLIP with 32-pixel inputs, saved as a local model folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
