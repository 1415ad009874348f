"""Scale: the Ray engines against the single-process ones, reduced-precision scores, block sizing.

The Ray tests start a local Ray cluster with 2 CPUs inside the test
session. They embed the real COVID images with a tiny random open_clip
model through Ray Data and audit through Ray tasks. Every output is
compared with the single-process engines'.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from linkrisk.audit.ranks import (
    auto_block_size,
    plan_counts,
    score_error_bound,
    stream_counts,
)
from linkrisk.errors import ConfigError, EngineError, InputError
from linkrisk.models.embed import AdapterFactory, EmbedConfig, embed_cohort, hash_weights

ray = pytest.importorskip("ray", reason="the ray extra is part of the test install")

FAST = {"chunk_size": 64, "batch_size": 16, "text_batch_size": 32, "workers": 0, "progress": False}


def test_unreachable_cluster_is_named(monkeypatch):
    from linkrisk._ray import ray_cluster

    if ray.is_initialized():
        pytest.skip("a cluster is already joined in this process")
    monkeypatch.setenv("RAY_ADDRESS", "")
    with pytest.raises(InputError, match="could not reach a Ray cluster at 'auto'.*ray start --head"):
        with ray_cluster("auto"):
            pass


@pytest.mark.parametrize("address, error, message", [
    ("127.0.0.1:1", InputError, "could not reach a Ray cluster at '127.0.0.1:1'"),
    ("ray://127.0.0.1:1", InputError, "could not reach a Ray cluster at 'ray://127.0.0.1:1'"),
    ("not an address", ConfigError, "invalid Ray address 'not an address'"),
])
def test_bad_cluster_addresses_fail_fast(address, error, message):
    """Port 1 on loopback is closed, so the connection is refused at once instead of Ray retrying for minutes."""
    from linkrisk._ray import ray_cluster

    if ray.is_initialized():
        pytest.skip("a cluster is already joined in this process")
    with pytest.raises(error, match=message):
        with ray_cluster(address):
            pass


@pytest.fixture(scope="module")
def ray_session():
    from linkrisk._ray import import_ray

    import_ray()  # usage statistics off before the cluster starts
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def both_engines(ray_session, tiny_clip, covid, tmp_path_factory):
    """Embed every real COVID image and report with each engine into its own folder."""
    from linkrisk.models.adapters import load_adapter

    model = {"model": "open-clip", "weights": str(tiny_clip), "weights_sha256": hash_weights(tiny_clip)}
    outs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actor gets one CPU, so one thread
    try:
        for engine in ("local", "ray"):
            outs[engine] = tmp_path_factory.mktemp(f"embed-{engine}")
            embed_cohort(load_adapter("open-clip", tiny_clip), covid, outs[engine],
                         EmbedConfig(**FAST, engine=engine), model)
    finally:
        torch.set_num_threads(threads)
    return outs


def test_ray_embedding_equals_local(both_engines, covid):
    local, distributed = both_engines["local"], both_engines["ray"]
    for name in ("image_features.npy", "report_features.npy", "image.npy", "report.npy"):
        assert np.load(local / name).tobytes() == np.load(distributed / name).tobytes(), name
    for name in ("images.parquet", "reports.parquet", "pairs.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(local / name), pd.read_parquet(distributed / name))
    assert len(np.load(local / "image.npy")) == covid.n_images == 354

    # Same content-addressed cache: identical chunk names, and each engine can resume from the other's chunks.
    def chunk_names(out):
        return sorted(p.relative_to(out / "cache").as_posix() for p in (out / "cache").rglob("*.npz"))

    assert chunk_names(local) == chunk_names(distributed)
    summary = json.loads((distributed / "embed.json").read_text())
    assert summary["config"]["engine"] == "ray"
    assert summary["chunks"]["images"] == {"total": 6, "reused": 0, "computed": 6}


def test_ray_resumes_from_local_chunks(ray_session, both_engines, tiny_clip, covid, tmp_path):
    import shutil

    from linkrisk.models.adapters import load_adapter

    out = tmp_path / "resume"
    shutil.copytree(both_engines["local"], out)
    chunks = sorted((out / "cache").rglob("*.npz"))
    for path in chunks[::2]:
        path.unlink()
    summary = embed_cohort(load_adapter("open-clip", tiny_clip), covid, out, EmbedConfig(**FAST, engine="ray"),
                           {"model": "open-clip", "weights": str(tiny_clip), "weights_sha256": hash_weights(tiny_clip)})
    computed = summary["chunks"]["images"]["computed"] + summary["chunks"]["reports"]["computed"]
    assert computed == len(chunks[::2])
    assert np.load(out / "image.npy").tobytes() == np.load(both_engines["ray"] / "image.npy").tobytes()


def test_ray_audit_equals_local(ray_session, both_engines):
    from linkrisk.audit.distributed import RayEngine
    from linkrisk.audit.embeddings import audit_folder

    folder = both_engines["ray"]
    options = {"pools": [10, 100, "full"], "ks": [1, 5], "n_boot": 50, "seed": 3}
    with RayEngine() as engine:
        for view in ({}, {"direction": "report_to_image", "level": "patient"}):
            local = audit_folder(folder, **options, **view)
            distributed = audit_folder(folder, **options, **view, engine=engine, block_size=37)
            assert _without_timing(local) == _without_timing(distributed)
            assert local["recall"]
    matched_options = {**options, "negatives": "label_matched", "fallback": "nearest_label"}
    with RayEngine() as engine:
        assert _without_timing(audit_folder(folder, **matched_options)) == \
            _without_timing(audit_folder(folder, **matched_options, engine=engine, block_size=11))


def _without_timing(result: dict) -> dict:
    """The audit without its timing fields and the name of the engine that counted it."""
    from linkrisk.provenance import strip_timing

    result = json.loads(json.dumps(strip_timing(result), default=str))
    assert result["scoring"]["engine"] in ("local", "ray")
    result["scoring"]["engine"] = None
    return result


def test_ray_counts_equal_local_on_units_and_labels(ray_session):
    from linkrisk.audit.distributed import RayEngine

    rng = np.random.default_rng(5)
    candidates = _unit_rows(rng, 700, 24)
    candidates[40] = candidates[41]
    queries = _unit_rows(rng, 500, 24)
    unit = np.r_[np.arange(400), rng.integers(0, 400, 300)]
    positive = rng.integers(0, 16, 400)
    negative = rng.integers(0, 16, 400) & ~positive
    true = rng.integers(0, 400, 500)
    options = {"candidate_unit": unit, "unit_positive": positive, "unit_negative": negative, "rings": True,
               "block_size": 29}
    local = stream_counts(queries, candidates, true, **options)
    with RayEngine(tasks=5) as engine:
        distributed = stream_counts(queries, candidates, true, **options, engine=engine)
    for name in ("above", "equal", "ring_above", "ring_equal", "ring_size"):
        np.testing.assert_array_equal(getattr(local, name), getattr(distributed, name), err_msg=name)


@pytest.mark.parametrize("case", ["missing weights", "crash"])
def test_actor_errors_reach_the_caller(ray_session, covid, tmp_path, tiny_clip, case):
    """A model that cannot load in the actor raises the loader's own error, and any other failure one line."""
    import functools
    import operator

    from linkrisk.models.adapters import load_adapter

    small = covid.subset_patients(sorted(covid.images["patient_id"].unique())[:3], name="covid_small")
    if case == "missing weights":
        factory, expected = AdapterFactory("open-clip", tmp_path / "absent", offline=True), InputError
        message = "absent"
    else:
        factory, expected = functools.partial(operator.truediv, 1, 0), EngineError
        message = "the Ray engine failed while encoding images: ZeroDivisionError: division by zero"
    with pytest.raises(expected) as caught:
        embed_cohort(load_adapter("open-clip", tiny_clip), small, tmp_path / "out", EmbedConfig(**FAST, engine="ray"),
                     {}, adapter_factory=factory)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_gpu_request_without_cluster_gpu(ray_session):
    from linkrisk.audit.distributed import RayEngine

    queries = np.eye(4, dtype=np.float32)
    plan = plan_counts(queries, queries, np.arange(4))
    plan.device = "cuda"
    with RayEngine() as engine, pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
        list(engine.map_blocks(plan, plan.blocks()))


def test_engine_options_are_checked():
    with pytest.raises(ConfigError, match="unknown engine 'spark'; valid values: local, ray"):
        EmbedConfig(engine="spark").validate()
    with pytest.raises(ConfigError, match="pass --engine ray"):
        EmbedConfig(address="auto").validate()
    with pytest.raises(ConfigError, match="actors must be 0"):
        EmbedConfig(engine="ray", actors=-1).validate()


def test_adapter_factory_is_picklable_and_absolute(tiny_clip, monkeypatch, tmp_path):
    import pickle

    monkeypatch.chdir(tiny_clip.parent)
    factory = pickle.loads(pickle.dumps(AdapterFactory("open-clip", tiny_clip.name, offline=True)))
    assert factory.weights == str(tiny_clip)
    assert factory().embed_dim == 16


# Reduced-precision scores: exactness against float64 brute force.

def _unit_rows(rng, n: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _brute_force(queries, candidates, true_unit, unit=None):
    """Counts from float64 scores, one unit at a time."""
    scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
    if unit is not None:
        best = np.full((len(queries), unit.max() + 1), -np.inf)
        for column, owner in enumerate(unit):
            best[:, owner] = np.maximum(best[:, owner], scores[:, column])
        scores = best
    true = scores[np.arange(len(queries)), true_unit][:, None]
    return (scores > true).sum(1), (scores == true).sum(1) - 1


def _near_tie_cohort(seed: int = 0):
    """Queries whose true candidate has exact duplicates and neighbours within 1e-6 to 1e-3 of its score."""
    rng = np.random.default_rng(seed)
    candidates = _unit_rows(rng, 600, 48)
    queries = (candidates[:200] + 0.3 * _unit_rows(rng, 200, 48)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for i in range(0, 200, 4):
        candidates[300 + i] = candidates[i]  # exact tie with the true candidate
        nudge = candidates[i] + rng.choice([1e-6, 1e-5, 1e-4, 1e-3]) * _unit_rows(rng, 1, 48)[0]
        candidates[301 + i] = nudge / np.linalg.norm(nudge)
    return queries, candidates, np.arange(200)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_counts_equal_float64(precision):
    queries, candidates, true = _near_tie_cohort()
    above, equal = _brute_force(queries, candidates, true)
    counts = stream_counts(queries, candidates, true, precision=precision, block_size=33)
    np.testing.assert_array_equal(counts.above, above)
    np.testing.assert_array_equal(counts.equal, equal)
    assert equal[::4].min() >= 1  # the planted exact ties are there
    assert counts.rescored > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_with_units_and_labels(precision):
    rng = np.random.default_rng(2)
    queries, candidates, _ = _near_tie_cohort(2)
    unit = np.r_[np.arange(350), rng.integers(0, 350, 250)]
    true = unit[np.arange(200)]
    positive = rng.integers(0, 8, 350)
    negative = rng.integers(0, 8, 350) & ~positive
    above, equal = _brute_force(queries, candidates, true, unit)
    options = {"candidate_unit": unit, "unit_positive": positive, "unit_negative": negative, "rings": True}
    reduced = stream_counts(queries, candidates, true, **options, precision=precision, block_size=21)
    np.testing.assert_array_equal(reduced.above, above)
    np.testing.assert_array_equal(reduced.equal, equal)

    # Rings by brute force: float64 unit scores and the label distance of every unit from the true one.
    scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
    best = np.full((len(queries), 350), -np.inf)
    for column, owner in enumerate(unit):
        best[:, owner] = np.maximum(best[:, owner], scores[:, column])
    popcount = np.vectorize(lambda value: bin(int(value)).count("1"))
    for q, t in enumerate(true):
        distance = popcount(positive[t] | negative[t]) - popcount(positive[t] & positive) \
            - popcount(negative[t] & negative)
        others = np.arange(350) != t
        for ring in range(reduced.ring_above.shape[1]):
            at = (distance == ring) & others
            assert reduced.ring_above[q, ring] == (best[q, at] > best[q, t]).sum()
            assert reduced.ring_equal[q, ring] == (best[q, at] == best[q, t]).sum()
            assert reduced.ring_size[q, ring] == (distance == ring).sum()


def test_error_bound_holds(precision_cases=(("bf16", torch.bfloat16), ("fp16", torch.float16))):
    rng = np.random.default_rng(9)
    for dim in (8, 512):
        queries = _unit_rows(rng, 64, dim) * rng.uniform(0.5, 2, (64, 1)).astype(np.float32)
        candidates = _unit_rows(rng, 256, dim)
        candidates[:8, :] *= 1e-6  # tiny components reach fp16's subnormal range
        exact = queries.astype(np.float64) @ candidates.astype(np.float64).T
        for precision, dtype in precision_cases:
            low = (torch.from_numpy(queries).to(dtype) @ torch.from_numpy(candidates).to(dtype).T).double().numpy()
            bound = score_error_bound(np.linalg.norm(queries, axis=1), float(np.linalg.norm(candidates, axis=1).max()),
                                      dim, precision)
            assert (np.abs(low - exact) <= bound[:, None]).all(), (precision, dim)
            assert bound.max() < (0.02 if precision == "bf16" else 0.003) * 2


def test_reduced_precision_on_real_embeddings(demo_run):
    """On the demo's real held-out embeddings the bf16 path gives the fp32 engine's counts."""
    out, _ = demo_run
    folder = out / "embeddings" / "covid_test" / "original"
    image, report = np.load(folder / "image.npy"), np.load(folder / "report.npy")
    true = pd.read_parquet(folder / "pairs.parquet")["report_row"].to_numpy()
    fp32 = stream_counts(image, report, true)
    for precision in ("bf16", "fp16"):
        reduced = stream_counts(image, report, true, precision=precision)
        np.testing.assert_array_equal(reduced.above, fp32.above)
        np.testing.assert_array_equal(reduced.equal, fp32.equal)
        assert _brute_force(image, report, true)[0].tolist() == reduced.above.tolist()


def test_unknown_precision_is_named():
    with pytest.raises(InputError, match="unknown score precision 'fp8'; valid values: fp32, bf16, fp16"):
        stream_counts(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), np.arange(3), precision="fp8")


def test_block_size_from_free_device_memory(monkeypatch):
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    rows = auto_block_size(400_000, 400_000, 400_000, device="cuda")
    assert rows == int(free * 0.5) // (4 * 3 * 400_000 + 2 * 400_000)
    reduced = auto_block_size(400_000, 400_000, 400_000, device="cuda", precision="bf16")
    assert reduced < rows
    assert auto_block_size(1000, 1000, 1000) == 128 * 2**20 // (4 * 3000 + 2000)
    # The plan uses it when no block size is given.
    queries = np.eye(4, dtype=np.float32)
    assert plan_counts(queries, queries, np.arange(4)).block_size == auto_block_size(4, 4, 4)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])
def test_fp16_scores_of_large_norm_rows(scale):
    """Rows whose scores exceed fp16's range are scaled before the matmul, so the counts stay exact."""
    queries, candidates, true = _near_tie_cohort(4)
    queries, candidates = (queries * scale).astype(np.float32), (candidates * scale).astype(np.float32)
    above, equal = _brute_force(queries, candidates, true)
    counts = stream_counts(queries, candidates, true, precision="fp16", block_size=50)
    np.testing.assert_array_equal(counts.above, above)
    np.testing.assert_array_equal(counts.equal, equal)


class _Cluster:
    """Stand-in for the ``ray`` module's resource query."""

    def __init__(self, cpus: float, gpus: float = 0):
        self.resources = {"CPU": cpus, "GPU": gpus}

    def cluster_resources(self) -> dict:
        return self.resources


@pytest.mark.parametrize("cpus, gpus, device, actors, expected", [
    (1, 0, "cpu", 0, (1, {"num_cpus": 0.5})),
    (2, 0, "cpu", 0, (1, {"num_cpus": 1.0})),
    (2, 0, "cpu", 2, (2, {"num_cpus": 0.5})),
    (16, 0, "cpu", 0, (7, {"num_cpus": 2.0})),
    (16, 2, "cuda", 0, (2, {"num_gpus": 1, "num_cpus": 1.0})),
    (1, 1, "cuda", 0, (1, {"num_gpus": 1, "num_cpus": 0.5})),
])
def test_actors_leave_a_cpu_for_decoding(cpus, gpus, device, actors, expected):
    from linkrisk.models.ray_embed import _actor_plan, decode_cpus

    cluster = _Cluster(cpus, gpus)
    count, resources = _actor_plan(cluster, device, actors)
    assert (count, resources) == expected
    assert count * resources["num_cpus"] + decode_cpus(cluster) <= cpus


@pytest.mark.parametrize("cpus, gpus, device, actors, message", [
    (2, 0, "cpu", 3, "--actors 3 leaves less than half a CPU per encoder actor on a Ray cluster of 2 CPUs"),
    (8, 1, "cuda", 2, "--actors 2 asks for one GPU each, but the Ray cluster has 1 GPUs"),
    (8, 0, "cuda", 0, "the Ray cluster has no GPU"),
])
def test_impossible_actor_counts_are_rejected(cpus, gpus, device, actors, message):
    from linkrisk.models.ray_embed import _actor_plan

    with pytest.raises(ConfigError, match=message):
        _actor_plan(_Cluster(cpus, gpus), device, actors)
