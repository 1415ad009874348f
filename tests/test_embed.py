"""The embedding run on the real COVID images: cache, resume after kill -9, outputs, precomputed input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from linkrisk.errors import ConfigError, InputError
from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights, iter_chunk_files

FAST = {"chunk_size": 16, "batch_size": 16, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def reference(demo_run):
    from linkrisk.models.adapters import load_adapter

    out, _ = demo_run
    folder = out / "models" / "original"
    return folder, load_adapter("reference", folder)


@pytest.fixture(scope="module")
def reference_run(reference, covid, tmp_path_factory):
    folder, adapter = reference
    out = tmp_path_factory.mktemp("embed-reference")
    summary = embed_cohort(adapter, covid, out, EmbedConfig(**FAST),
                           {"model": "reference", "weights_sha256": hash_weights(folder)})
    return out, summary


def test_reference_matches_demo_embeddings(demo_run, reference_run):
    demo_out, _ = demo_run
    out, summary = reference_run
    image = np.load(out / "image.npy")
    ids = pd.read_parquet(out / "images.parquet")["image_id"]
    row = pd.Series(np.arange(len(ids)), index=ids.values)
    for part in ("covid_test", "covid_train"):
        folder = demo_out / "embeddings" / part / "original"
        expected = np.load(folder / "image.npy")
        part_ids = pd.read_parquet(folder / "pairs.parquet")["image_id"]
        np.testing.assert_allclose(image[row.loc[part_ids.values].to_numpy()], expected, atol=2e-5)
    assert summary["dataset"]["n_images"] == 354
    assert summary["dataset"]["n_reports"] == 290
    assert summary["chunks"]["images"] == {"total": 23, "reused": 0, "computed": 23}


def test_outputs_are_an_audit_folder(reference_run):
    from linkrisk.audit.embeddings import audit_folder

    out, _ = reference_run
    result = audit_folder(out, [10, "full"], [1], n_boot=50)
    assert result["n_queries"] == 354
    assert result["n_candidates"] == 290
    assert result["recall"][0]["value"] > result["recall"][0]["chance"]
    written = {p.name for p in out.iterdir()}
    assert {"image_features.npy", "report_features.npy", "images.parquet", "reports.parquet", "pairs.parquet",
            "heads.json", "heads.safetensors", "image.npy", "report.npy", "embed.json"} <= written


def test_outputs_hold_no_report_text(reference_run, covid):
    out, _ = reference_run
    texts = [t for t in covid.reports["text"] if len(t) >= 40]
    for path in out.iterdir():
        if path.is_file():
            content = path.read_bytes()
            assert not any(t[:40].encode() in content for t in texts), path.name


def test_second_run_reuses_every_chunk(reference, reference_run, covid, tmp_path):
    folder, adapter = reference
    out, _ = reference_run
    copy = tmp_path / "again"
    shutil.copytree(out / "cache", copy / "cache")
    summary = embed_cohort(adapter, covid, copy, EmbedConfig(**FAST),
                           {"model": "reference", "weights_sha256": hash_weights(folder)})
    assert summary["chunks"]["images"]["computed"] == 0
    assert summary["chunks"]["reports"]["computed"] == 0
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name


def test_changed_weights_miss_the_cache(reference, reference_run, covid, tmp_path):
    folder, adapter = reference
    out, _ = reference_run
    shutil.copytree(out / "cache", tmp_path / "cache")
    summary = embed_cohort(adapter, covid, tmp_path, EmbedConfig(**FAST),
                           {"model": "reference", "weights_sha256": "0" * 64})
    assert summary["chunks"]["images"]["reused"] == 0
    assert summary["model"]["cache_key"] != json.loads((out / "embed.json").read_text())["model"]["cache_key"]


def test_resume_after_kill(reference, reference_run, data_dir, tmp_path):
    """kill -9 mid-run, resume: complete chunks are reused and the result is byte-identical."""
    folder, _ = reference
    uninterrupted, _ = reference_run
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "linkrisk.cli", "embed", "--model", "reference", "--weights", str(folder),
               "--dataset", f"covid:{data_dir / 'covid-chestxray'}", "--out", str(out), "--chunk-size", "16",
               "--batch-size", "16", "--workers", "0", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list(iter_chunk_files(out))) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no chunk written within 180 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    complete = len(list(iter_chunk_files(out)))
    assert complete < 23, "every chunk was done before the kill"

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "embed.json").read_text())
    images = summary["chunks"]["images"]
    assert images["total"] == 23
    assert images["reused"] == complete
    assert images["computed"] == 23 - complete
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_resume_is_byte_identical(reference, covid, tmp_path):
    """An interrupted run (chunks deleted after the fact) rebuilt from its cache equals a fresh run byte for byte."""
    folder, adapter = reference
    meta = {"model": "reference", "weights_sha256": hash_weights(folder)}
    config = EmbedConfig(**{**FAST, "chunk_size": 32})
    embed_cohort(adapter, covid, tmp_path / "fresh", config, meta)
    embed_cohort(adapter, covid, tmp_path / "partial", config, meta)
    chunks = sorted(iter_chunk_files(tmp_path / "partial"))
    for path in chunks[::2]:
        path.unlink()
    summary = embed_cohort(adapter, covid, tmp_path / "partial", config, meta)
    assert summary["chunks"]["images"]["computed"] + summary["chunks"]["reports"]["computed"] == len(chunks[::2])
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        assert (tmp_path / "partial" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_unreadable_images_are_dropped_and_counted(reference, covid, tmp_path):
    folder, adapter = reference
    cohort = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:12], name="covid_small")
    broken = cohort.images.copy()
    source = broken["image_path"].iloc[0]
    truncated = tmp_path / ("truncated" + os.path.splitext(source)[1])
    truncated.write_bytes(open(source, "rb").read()[:200])
    broken.loc[broken.index[0], "image_path"] = str(truncated)
    broken.loc[broken.index[1], "image_path"] = str(tmp_path / "missing.png")
    cohort.images = broken
    summary = embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**{**FAST, "workers": 2}),
                           {"model": "reference", "weights_sha256": hash_weights(folder)})
    assert summary["dataset"]["skipped"]["unreadable image file"] == 2
    assert summary["dataset"]["n_images"] == len(broken) - 2
    assert len(np.load(tmp_path / "out" / "image.npy")) == len(broken) - 2
    kept = set(pd.read_parquet(tmp_path / "out" / "images.parquet")["image_id"])
    assert broken["image_id"].iloc[0] not in kept
    assert broken["image_id"].iloc[1] not in kept


def test_workers_give_identical_features(reference, covid, tmp_path):
    folder, adapter = reference
    cohort = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:20], name="covid_small")
    meta = {"model": "reference", "weights_sha256": hash_weights(folder)}
    embed_cohort(adapter, cohort, tmp_path / "w0", EmbedConfig(**FAST), meta)
    embed_cohort(adapter, cohort, tmp_path / "w2", EmbedConfig(**{**FAST, "workers": 2}), meta)
    assert (tmp_path / "w0" / "image_features.npy").read_bytes() == (tmp_path / "w2" / "image_features.npy").read_bytes()


def test_precomputed_round_trip(reference_run, covid, tmp_path):
    from linkrisk.models.adapters import load_adapter

    out, _ = reference_run
    adapter = load_adapter("precomputed", out)
    assert adapter.pre_projection
    summary = embed_cohort(adapter, covid, tmp_path, EmbedConfig(**FAST), {"model": "precomputed"})
    assert summary["chunks"] == {}
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_precomputed_embeddings_only(demo_run, covid, tmp_path):
    """A demo embeddings folder (image.npy, report.npy, ids) enters with identity heads."""
    from linkrisk.models.precomputed import PrecomputedAdapter

    demo_out, _ = demo_run
    folder = demo_out / "embeddings" / "covid_test" / "original"
    adapter = PrecomputedAdapter(folder)
    assert not adapter.pre_projection
    ids = pd.read_parquet(folder / "pairs.parquet")["image_id"]
    cohort = covid.subset_patients(set(pd.read_parquet(folder / "pairs.parquet")["patient_id"]))
    embed_cohort(adapter, cohort, tmp_path, EmbedConfig(**FAST), {"model": "precomputed"})
    row = pd.Series(np.arange(len(ids)), index=ids.values)
    written_ids = pd.read_parquet(tmp_path / "images.parquet")["image_id"]
    expected = np.load(folder / "image.npy")[row.loc[written_ids.values].to_numpy()]
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), expected, atol=1e-6)


def test_precomputed_missing_id_is_named(demo_run, covid, tmp_path):
    from linkrisk.models.precomputed import PrecomputedAdapter

    demo_out, _ = demo_run
    adapter = PrecomputedAdapter(demo_out / "embeddings" / "covid_test" / "original")
    with pytest.raises(InputError, match="image ids of the dataset have no precomputed row"):
        embed_cohort(adapter, covid, tmp_path, EmbedConfig(**FAST), {"model": "precomputed"})


def test_precomputed_rejects_bad_folders(reference_run, tmp_path):
    from linkrisk.models.precomputed import PrecomputedAdapter

    out, _ = reference_run
    for name in ("image_features.npy", "images.parquet", "reports.parquet", "pairs.parquet"):
        shutil.copy(out / name, tmp_path / name)
    with pytest.raises(InputError, match="only one of image_features.npy and report_features.npy"):
        PrecomputedAdapter(tmp_path)
    shutil.copy(out / "report_features.npy", tmp_path / "report_features.npy")
    with pytest.raises(InputError, match="heads.json: not found"):
        PrecomputedAdapter(tmp_path)
    broken = np.load(out / "image_features.npy")[:-1]
    np.save(tmp_path / "image_features.npy", broken)
    with pytest.raises(InputError, match="rows but image_features.npy has"):
        PrecomputedAdapter(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        PrecomputedAdapter(tmp_path / "nowhere")


def test_precomputed_rejects_nan_rows(reference_run, covid, tmp_path):
    from linkrisk.models.precomputed import PrecomputedAdapter

    out, _ = reference_run
    for path in out.iterdir():
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    features = np.load(out / "image_features.npy")
    features[5, 0] = np.nan
    np.save(tmp_path / "image_features.npy", features)
    first_id = pd.read_parquet(out / "images.parquet")["image_id"].iloc[5]
    with pytest.raises(InputError, match=f"contain NaN or infinity \\(first: id {first_id}\\)"):
        PrecomputedAdapter(tmp_path).image_features_for(pd.read_parquet(out / "images.parquet")["image_id"])


def test_open_clip_model_through_embed(covid, tmp_path):
    """A tiny random native CLIP saved as a local folder: embed output rows equal the model's own embeddings."""
    import open_clip
    from safetensors.torch import save_file

    from linkrisk.data.images import read_image, to_8bit
    from linkrisk.models.adapters import load_adapter

    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))

    cohort = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:8], name="covid_small")
    adapter = load_adapter("open-clip", folder)
    embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**{**FAST, "workers": 2}),
                 {"model": "open-clip", "weights_sha256": hash_weights(folder)})

    pixels = torch.stack([adapter.preprocess(to_8bit(read_image(p))) for p in cohort.images["image_path"]])
    tokens = adapter.tokenizer(cohort.reports["text"].tolist())
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        report = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "image.npy"), image, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "report.npy"), report, atol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="precision fp16 is autocast for GPUs"):
        EmbedConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match="invalid precision 'fp64'"):
        EmbedConfig(precision="fp64").validate()
    with pytest.raises(ConfigError, match="chunk_size must be at least 1"):
        EmbedConfig(chunk_size=0).validate()
    with pytest.raises(ConfigError, match="workers must be 0 or more"):
        EmbedConfig(workers=-1).validate()


def test_weights_hash(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"abc")
    (tmp_path / "a" / "config.json").write_text("{}")
    folder_hash = hash_weights(tmp_path / "a")
    assert hash_weights(tmp_path / "a") == folder_hash
    assert hash_weights(tmp_path / "a" / "w.bin") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "a" / "w.bin").write_bytes(b"abd")
    assert hash_weights(tmp_path / "a") != folder_hash
    with pytest.raises(InputError, match="weights not found"):
        hash_weights(tmp_path / "missing")


def test_cli_embed_and_errors(reference, data_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from linkrisk.cli import app

    folder, _ = reference
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["embed", "--model", "reference", "--weights", str(folder), "--dataset",
                                 f"covid:{data_dir / 'covid-chestxray'}", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "audit with: linkrisk audit" in result.output
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    result = runner.invoke(app, ["embed", "--model", "medclip", "--weights", str(folder), "--dataset",
                                 f"covid:{data_dir / 'covid-chestxray'}", "--out", str(tmp_path / "o2"), "--quiet"])
    assert result.exit_code == 2
    assert "unknown model 'medclip'; supported:" in result.output
    result = runner.invoke(app, ["embed", "--model", "reference", "--weights", str(folder), "--dataset",
                                 f"covid:{data_dir / 'covid-chestxray'}", "--out", str(tmp_path / "o3"),
                                 "--precision", "bf16", "--quiet"])
    assert result.exit_code == 2
    assert "precision bf16 is autocast for GPUs; use fp32 on cpu" in result.output


def test_reference_rejects_other_wordllama_weights(reference, tmp_path):
    from linkrisk.models.reference_adapter import ReferenceAdapter

    folder, _ = reference
    shutil.copytree(folder, tmp_path / "heads")
    metadata = json.loads((tmp_path / "heads" / "heads.json").read_text())
    metadata["text_encoder"]["weights_sha256"] = "f" * 64
    (tmp_path / "heads" / "heads.json").write_text(json.dumps(metadata))
    with pytest.raises(InputError, match="heads were fitted on WordLlama weights with SHA-256 f{64}"):
        ReferenceAdapter(tmp_path / "heads")
    del metadata["image_encoder"]
    (tmp_path / "heads" / "heads.json").write_text(json.dumps(metadata))
    with pytest.raises(InputError, match="no image_encoder entry"):
        ReferenceAdapter(tmp_path / "heads")


def test_hub_name_needs_allow_download(data_dir, tmp_path):
    from typer.testing import CliRunner

    from linkrisk.cli import app

    result = CliRunner().invoke(app, ["embed", "--model", "biomedclip", "--weights", "hf-hub:org/model", "--dataset",
                                      f"covid:{data_dir / 'covid-chestxray'}", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert "hf-hub:org/model would be downloaded from the Hugging Face Hub; pass --allow-download" in result.output


def test_chunk_with_other_rows_is_recomputed(reference, covid, tmp_path, caplog):
    folder, adapter = reference
    meta = {"model": "reference", "weights_sha256": hash_weights(folder)}
    config = EmbedConfig(**{**FAST, "chunk_size": 64})
    embed_cohort(adapter, covid, tmp_path, config, meta)
    before = (tmp_path / "image_features.npy").read_bytes()
    first, second = sorted((tmp_path / "cache").rglob("images/*.npz"))[:2]
    shutil.copy(first, second)
    with caplog.at_level("WARNING", logger="linkrisk"):
        summary = embed_cohort(adapter, covid, tmp_path, config, meta)
    assert "lists other rows than expected; recomputing it" in caplog.text
    assert summary["chunks"]["images"]["computed"] == 1
    assert (tmp_path / "image_features.npy").read_bytes() == before


def test_precomputed_patch_grid_features(covid, tmp_path):
    """Patch-grid image features ([rows, patches, dim], as BioViL's) enter with their patch-wise head."""
    from torch import nn

    from linkrisk.models.head_io import PatchMean, save_heads
    from linkrisk.models.precomputed import PrecomputedAdapter

    cohort = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:6], name="covid_small")
    rng = np.random.default_rng(0)
    image_features = rng.standard_normal((cohort.n_images, 4, 6)).astype(np.float32)
    report_features = rng.standard_normal((cohort.n_reports, 5)).astype(np.float32)
    torch.manual_seed(0)
    image_head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), PatchMean())
    text_head = nn.Linear(5, 3)
    folder = tmp_path / "patches"
    folder.mkdir()
    np.save(folder / "image_features.npy", image_features)
    np.save(folder / "report_features.npy", report_features)
    cohort.images[["image_id"]].to_parquet(folder / "images.parquet")
    cohort.reports[["report_id"]].to_parquet(folder / "reports.parquet")
    save_heads(folder, image_head, text_head)

    adapter = PrecomputedAdapter(folder)
    assert adapter.embed_dim == 3
    embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**FAST), {"model": "precomputed"})
    with torch.no_grad():
        expected = nn.functional.normalize(image_head(torch.from_numpy(image_features)), dim=-1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "image.npy"), expected, atol=1e-6)
    assert np.load(tmp_path / "out" / "image_features.npy").shape == (cohort.n_images, 4, 6)


def _bmp(path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path, format="BMP")


def _bmp_cohort(covid, tmp_path, n: int = 3):
    """A cohort of the first ``n`` COVID patients' records whose images are replaced by small BMP files."""
    cohort = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:n], name="covid_bmp")
    images = cohort.images.copy()
    paths = []
    for i in range(len(images)):
        path = tmp_path / f"image{i}.bmp"
        _bmp(path, i)
        paths.append(str(path))
    images["image_path"] = paths
    cohort.images = images
    return cohort


def test_transient_read_failure_is_retried(reference, covid, tmp_path, monkeypatch):
    import linkrisk.models.embed as embed_module
    from linkrisk.data.images import ImageReadError

    folder, adapter = reference
    cohort = _bmp_cohort(covid, tmp_path)
    flaky = cohort.images["image_path"].iloc[0]
    real_read = embed_module.read_image

    def failing_once(path, draft_size=None):
        if str(path) == flaky:
            raise ImageReadError(f"{path}: permission denied")
        return real_read(path, draft_size)

    meta = {"model": "reference", "weights_sha256": hash_weights(folder)}
    monkeypatch.setattr(embed_module, "read_image", failing_once)
    first = embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**FAST), meta)
    assert first["dataset"]["n_images"] == cohort.n_images - 1
    monkeypatch.setattr(embed_module, "read_image", real_read)
    second = embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**FAST), meta)
    assert second["dataset"]["n_images"] == cohort.n_images
    assert second["chunks"]["images"]["computed"] == 1


def test_replaced_file_with_same_mtime_misses_cache(reference, covid, tmp_path):
    folder, adapter = reference
    cohort = _bmp_cohort(covid, tmp_path)
    meta = {"model": "reference", "weights_sha256": hash_weights(folder)}
    embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**FAST), meta)
    path = cohort.images["image_path"].iloc[0]
    stat = os.stat(path)
    _bmp(path, 99)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    summary = embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**FAST), meta)
    assert summary["chunks"]["images"]["computed"] == 1


def test_second_writer_is_rejected(reference, covid, tmp_path):
    import fcntl

    folder, adapter = reference
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".embed.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another linkrisk embed run is writing this folder"):
            embed_cohort(adapter, covid, tmp_path, EmbedConfig(**FAST), {"model": "reference"})


def test_stale_temp_files_are_removed(reference, covid, tmp_path):
    folder, adapter = reference
    cohort = _bmp_cohort(covid, tmp_path)
    stale = tmp_path / "out" / "cache" / ".abc.npz.x1.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    embed_cohort(adapter, cohort, tmp_path / "out", EmbedConfig(**FAST), {"model": "reference"})
    assert not stale.exists()


def test_zero_embeddings_are_rejected(reference_run, covid, tmp_path):
    from linkrisk.models.precomputed import PrecomputedAdapter

    out, _ = reference_run
    for path in out.iterdir():
        if path.is_file() and path.suffix in (".parquet",):
            shutil.copy(path, tmp_path / path.name)
    np.save(tmp_path / "image.npy", np.zeros((354, 8), np.float32))
    np.save(tmp_path / "report.npy", np.ones((290, 8), np.float32))
    with pytest.raises(InputError, match="354 image embeddings are zero or not finite"):
        embed_cohort(PrecomputedAdapter(tmp_path), covid, tmp_path / "o", EmbedConfig(**FAST), {})


def test_precomputed_head_mismatch_is_named(reference_run, tmp_path):
    from linkrisk.models.precomputed import PrecomputedAdapter

    out, _ = reference_run
    for path in out.iterdir():
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    np.save(tmp_path / "image_features.npy", np.ones((354, 100), np.float32))
    with pytest.raises(InputError, match="the image head does not accept features of shape \\[100\\]"):
        PrecomputedAdapter(tmp_path)
    np.savez(tmp_path / "image.npz", a=np.ones(3))
    shutil.move(tmp_path / "image.npz", tmp_path / "image_features.npy")
    with pytest.raises(InputError, match="is an .npz archive"):
        PrecomputedAdapter(tmp_path)


def test_damaged_reference_heads_are_named(reference, tmp_path):
    from linkrisk.models.reference_adapter import ReferenceAdapter

    folder, _ = reference
    for name, damage in (("list", "[1, 2]"), ("types", None)):
        target = tmp_path / name
        shutil.copytree(folder, target)
        if damage:
            (target / "heads.json").write_text(damage)
        else:
            metadata = json.loads((target / "heads.json").read_text())
            metadata["image_encoder"]["unknown_option"] = 1
            (target / "heads.json").write_text(json.dumps(metadata))
        with pytest.raises(InputError):
            ReferenceAdapter(target)
    target = tmp_path / "truncated"
    shutil.copytree(folder, target)
    data = (target / "heads.safetensors").read_bytes()
    (target / "heads.safetensors").write_bytes(data[:20])
    with pytest.raises(InputError, match="not a heads folder written by linkrisk demo, or a damaged one"):
        ReferenceAdapter(target)


def test_cli_rejects_bad_out(reference, data_dir, tmp_path):
    from typer.testing import CliRunner

    from linkrisk.cli import app

    folder, _ = reference
    dataset = f"covid:{data_dir / 'covid-chestxray'}"
    runner = CliRunner()
    result = runner.invoke(app, ["embed", "--model", "reference", "--weights", str(folder), "--dataset", dataset,
                                 "--out", "", "--quiet"])
    assert result.exit_code == 2
    assert "--out is empty" in result.output
    result = runner.invoke(app, ["embed", "--model", "reference", "--weights", str(folder), "--dataset", dataset,
                                 "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code == 2
    assert "is inside the weights folder" in result.output


def test_fast_decode_is_close_and_keyed_apart(reference, covid, tmp_path):
    folder, adapter = reference
    cohort = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:30], name="covid_small")
    meta = {"model": "reference", "weights_sha256": hash_weights(folder)}
    exact = embed_cohort(adapter, cohort, tmp_path / "exact", EmbedConfig(**FAST), meta)
    fast = embed_cohort(adapter, cohort, tmp_path / "fast", EmbedConfig(**{**FAST, "fast_decode": True}), meta)
    assert fast["model"]["cache_key"] != exact["model"]["cache_key"]
    a = np.load(tmp_path / "exact" / "image.npy")
    b = np.load(tmp_path / "fast" / "image.npy")
    cosine = (a * b).sum(axis=1)
    assert np.median(cosine) > 0.999
    assert cosine.min() > 0.95
    assert not np.array_equal(a, b)


def test_images_table_carries_attributes(reference_run, covid):
    out, _ = reference_run
    images = pd.read_parquet(out / "images.parquet")
    assert images["image_id"].tolist() == covid.images["image_id"].tolist()
    assert {"view", "sex", "age_band", "site", "source", "file_bytes", "width", "height", "aspect_ratio",
            "pil_mode", "file_format", "size_band", "aspect_band"} <= set(images.columns)
    assert images["file_bytes"].notna().all()


def test_cli_match_on_embed_folder(reference_run, tmp_path):
    from typer.testing import CliRunner

    from linkrisk.cli import app

    out, _ = reference_run
    path = tmp_path / "audit.json"
    result = CliRunner().invoke(app, ["audit", str(out), "--match", "view,sex,labels,file_format", "--pools",
                                      "10,100,full", "--ks", "1,5", "--n-boot", "50", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "attribute-matched pools on view, sex, labels, file_format" in result.output
    audit = json.loads(path.read_text())
    assert audit["attribute_oracle"]["attributes"] == ["view", "sex", "labels", "file_format"]
    assert audit["attribute_matched"]["n_candidates_with_missing"] > 0
    pools = {(e["pool"], e["k"]) for e in audit["attribute_matched"]["recall"]}
    assert (10, 1) in pools
    assert ("full", 5) in pools
    for entry in audit["oracle_comparison"]:
        assert entry["excess"] == pytest.approx(entry["model"] - entry["oracle"])


def test_old_folder_without_attributes_still_audits(reference_run, tmp_path, caplog):
    from linkrisk.audit.extras import folder_oracle_audits

    out, _ = reference_run
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("cache"))
    ids = pd.read_parquet(old / "images.parquet")[["image_id", "study_id", "patient_id", "report_id"]]
    ids.to_parquet(old / "images.parquet", index=False)
    with caplog.at_level("INFO", logger="linkrisk"):
        result = folder_oracle_audits(old, [10, "full"], [1], n_boot=20, seed=0)
    assert result["attribute_oracle"]["attributes"] == ["labels"]
    assert result["attribute_oracle"]["attributes_missing"] == ["view", "sex", "age_band"]
    assert "file_metadata_oracle" not in result
    assert "images.parquet" in result["file_metadata_oracle_skipped"]
    assert "file-metadata oracle skipped" in caplog.text
