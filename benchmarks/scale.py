"""Throughput of the single-process and Ray engines side by side, and the full-database audit on a GPU.

CPU mode (the default) runs, one after the other in one invocation:

- (e) embedding: the real COVID images and reports (``LINKRISK_DATA``,
  default ``../shared/data``) go through a randomly initialised open_clip
  ViT-B-32 CLIP saved in open_clip's folder format. The local engine
  uses 2 DataLoader workers. The Ray engine uses a local cluster of 2
  CPUs: one encoder actor, and decoding tasks on the other CPU. Each run
  starts with an empty cache;
- (r) rank counting on a synthetic cohort (``--m`` pairs, d = 512; see
  benchmarks/audit.py): the local engine against the Ray engine (query
  blocks as Ray tasks), and fp32 against bf16 and fp16 scores with float64
  re-scoring of near-ties, with the share of pairs re-scored;
- (s) everything in a full audit but the score matmul (the design, the
  candidate layout with duplicate detection, Recall@K over pools N = 10
  to full under three tie rules, upper bounds, power, 1,000
  patient-bootstrap resamples), measured at M = 406,241 with synthetic
  rank counts in place of the scores;
- (p) a projection of the full-database audit on one H200: the GPU rank
  counting from the published peak float32 throughput and HBM bandwidth,
  scaled by the audit-to-matmul-floor ratio measured here, plus (s).

GPU mode (``--gpu``, on a machine with a CUDA device) measures instead:

- the full audit (``run_audits``) at M = 406,241, d = 512, synthetic unit
  vectors with planted pairs, in fp32 and fp16 scores, block size from
  free device memory, and the bare fp32 matmul floor;
- the permutation test with 999 patient permutations at the same M (rows
  sorted and searched on the device);
- embedding throughput of a ViT-B/16-sized open_clip model on synthetic
  1024 x 1024 JPEGs (``--gpu-images``) through the local engine (8
  workers, bf16 autocast, pinned memory and a copy stream), against the
  bare forward on the same batches.

    python benchmarks/scale.py                       # CPU mode, M = 20,000
    python benchmarks/scale.py --gpu --json gpu.json # on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit import cohort  # noqa: E402  (the synthetic cohort of benchmarks/audit.py)

FULL_M = 406_241
POOLS = [10, 100, 1000, 10000, "full"]
KS = [1, 5, 10]

# H200 SXM figures for the projection: float32 (non-tensor) peak, the H100 SXM's published 67 TFLOP/s since both
# use the GH100 die, and the published HBM3e bandwidth of 4.8 TB/s. The efficiency is an assumption.
H200_FP32_FLOPS = 67e12
H200_HBM_BYTES_PER_S = 4.8e12
ASSUMED_EFFICIENCY = 0.7


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - start, value


def save_open_clip(name: str, folder: Path) -> Path:
    """Save a randomly initialised open_clip architecture in open_clip's local folder format."""
    import open_clip
    from safetensors.torch import save_file

    config = open_clip.get_model_config(name)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def part_embedding(data: Path, work: Path, repeats: int) -> dict:
    """(e): the same embedding run with each engine; images per second of the whole run (cache empty)."""
    import ray

    from linkrisk.data.registry import load_dataset
    from linkrisk.models.adapters import load_adapter
    from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights

    weights = save_open_clip("ViT-B-32", work / "vit-b-32")
    cohort = load_dataset(f"covid:{data / 'covid-chestxray'}")
    model = {"model": "open-clip", "weights": str(weights), "weights_sha256": hash_weights(weights)}
    adapter = load_adapter("open-clip", weights)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_seconds = time.perf_counter() - start
    rows = []
    try:
        for repeat in range(repeats):
            for engine in ("local", "ray"):
                out = work / f"embed-{engine}-{repeat}"
                config = EmbedConfig(batch_size=32, workers=2, engine=engine, progress=False)
                seconds, _ = _timed(embed_cohort, adapter, cohort, out, config, model)
                rows.append({"engine": engine, "repeat": repeat, "seconds": seconds,
                             "images_per_second": cohort.n_images / seconds})
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    local = [r["seconds"] for r in rows if r["engine"] == "local"]
    distributed = [r["seconds"] for r in rows if r["engine"] == "ray"]
    return {"images": cohort.n_images, "reports": cohort.n_reports, "runs": rows,
            "ray_cluster_start_seconds": cluster_seconds,
            "ray_over_local": float(np.median(np.divide(distributed, local)))}


def part_counting(m: int, d: int) -> dict:
    """(r): rank counts with each engine and each score precision, plus the fp32 matmul floor."""
    import ray

    from linkrisk.audit.distributed import RayEngine
    from linkrisk.audit.ranks import DEFAULT_BLOCK_BYTES, stream_counts

    data = cohort(m, d)
    image, report = data["image"], data["report"]
    true = np.arange(m)
    block = max(1, DEFAULT_BLOCK_BYTES // (14 * m))
    floor, _ = _timed(lambda: [torch.as_tensor(image[s:s + block]) @ torch.as_tensor(report).T
                               for s in range(0, m, block)])
    results = {"m": m, "d": d, "floor_seconds": floor}
    seconds, reference = _timed(stream_counts, image, report, true)
    results["local_fp32_seconds"] = seconds
    for precision in ("bf16", "fp16"):
        seconds, counts = _timed(stream_counts, image, report, true, precision=precision)
        assert (counts.above == reference.above).all()
        assert (counts.equal == reference.equal).all()
        results[f"local_{precision}_seconds"] = seconds
        results[f"{precision}_rescored_share"] = counts.rescored / (m * m)
    with RayEngine(num_cpus=2) as engine:
        seconds, counts = _timed(stream_counts, image, report, true, engine=engine)
    assert (counts.above == reference.above).all()
    assert (counts.equal == reference.equal).all()
    results["ray_fp32_seconds"] = seconds
    results["pairs_per_second_local"] = m * m / results["local_fp32_seconds"]
    results["floor_flops_per_second"] = 2 * m * m * d / floor
    results["counting_over_floor"] = results["local_fp32_seconds"] / floor
    assert not ray.is_initialized()
    return results


class _CountsWithoutMatmul:
    """A counting engine that returns prepared rank counts instead of scoring, so (s) times everything else."""

    name = "synthetic"

    def __init__(self, above: np.ndarray, equal: np.ndarray):
        self.above, self.equal = above, equal

    def map_blocks(self, plan, blocks):
        from linkrisk.audit.ranks import BlockCounts

        for rows in blocks:
            yield BlockCounts(rows, self.above[rows], self.equal[rows])


def part_summary(m: int, d: int = 512, n_boot: int = 1000) -> dict:
    """(s): a whole ``run_audits`` at M pairs (design, candidate layout, Recall@K, bounds, bootstrap) without the matmul."""
    from linkrisk.audit.design import build_design
    from linkrisk.audit.run import run_audits

    data = cohort(m, d)
    rng = np.random.default_rng(0)
    above = np.minimum(rng.geometric(1e-3, size=m) - 1, m - 1).astype(np.int64)
    equal = (rng.random(m) < 0.01).astype(np.int64)
    start = time.perf_counter()
    design = build_design(data["image"], data["report"], np.arange(m), data["patients"])
    run_audits(design, POOLS, KS, n_boot=n_boot, engine=_CountsWithoutMatmul(above, equal))
    return {"m": m, "n_boot": n_boot, "seconds": time.perf_counter() - start}


def projection(counting: dict, summary: dict, d: int = 512) -> dict:
    """(p): projected full-database audit on one H200 (a projection, not a measurement)."""
    flops = 2 * FULL_M * FULL_M * d
    floor = flops / (H200_FP32_FLOPS * ASSUMED_EFFICIENCY)
    # Scores are written once and read by the two comparisons; masks are 1 byte each.
    traffic = FULL_M * FULL_M * (4 * 3 + 2 * 1)
    memory = traffic / H200_HBM_BYTES_PER_S
    counting_seconds = max(floor * counting["counting_over_floor"], floor + memory)
    return {"m": FULL_M, "d": d, "matmul_flops": flops, "gpu_floor_seconds": floor,
            "gpu_memory_seconds": memory, "gpu_counting_seconds": counting_seconds,
            "summary_seconds": summary["seconds"], "total_seconds": counting_seconds + summary["seconds"],
            "assumptions": f"H200 fp32 peak {H200_FP32_FLOPS:.3g} FLOP/s at {ASSUMED_EFFICIENCY:.0%} efficiency, "
                           f"HBM {H200_HBM_BYTES_PER_S:.3g} B/s; the CPU ratio of counting to matmul floor "
                           f"({counting['counting_over_floor']:.2f}) carried over; summary measured on this CPU"}


def gpu_audit(d: int = 512) -> dict:
    """Measure the full audit at M = 406,241 on the GPU in fp32 and fp16 scores."""
    from linkrisk.audit.design import build_design
    from linkrisk.audit.ranks import auto_block_size, stream_counts
    from linkrisk.audit.run import run_audits
    from linkrisk.audit.stats import permutation_test

    data = cohort(FULL_M, d)
    image, report = data["image"], data["report"]
    device = "cuda"
    results = {"m": FULL_M, "d": d, "block_size": auto_block_size(FULL_M, FULL_M, FULL_M, device=device)}
    report_t = torch.as_tensor(report, device=device)
    block = results["block_size"]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(0, FULL_M, block):
        torch.as_tensor(image[s:s + block], device=device) @ report_t.T
    torch.cuda.synchronize()
    results["floor_seconds"] = time.perf_counter() - start
    del report_t
    design = build_design(image, report, np.arange(FULL_M), data["patients"])
    for precision in ("fp32", "fp16"):
        torch.cuda.synchronize()
        seconds, runs = _timed(run_audits, design, POOLS, KS, n_boot=1000, device=device, precision=precision)
        results[f"audit_{precision}_seconds"] = seconds
        results[f"recall_at_1_{precision}"] = {e["pool"]: e["value"] for e in runs[0]["recall"] if e["k"] == 1}
        seconds, counts = _timed(stream_counts, image, report, np.arange(FULL_M), device=device,
                                 precision=precision)
        results[f"counting_{precision}_seconds"] = seconds
        results[f"rescored_{precision}"] = counts.rescored
    seconds, _ = _timed(permutation_test, image, report, np.arange(FULL_M), data["patients"], pools=POOLS, ks=KS,
                        n_permutations=999, device=device)
    results["permutation_test_999_seconds"] = seconds
    return results


def gpu_embedding(work: Path, n_images: int) -> dict:
    """ViT-B/16-sized embedding throughput on synthetic JPEGs, against the bare forward on the same batches."""
    import pandas as pd
    from PIL import Image

    from linkrisk.data.registry import load_dataset
    from linkrisk.models.adapters import load_adapter
    from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights

    rng = np.random.default_rng(0)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        path = images / f"{i}.jpg"
        pixels = (rng.random((256, 256)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((1024, 1024)).save(path, quality=90)
        rows.append({"image_id": f"i{i}", "patient_id": f"p{i // 2}", "report_id": f"r{i}",
                     "report_text": f"synthetic report {i}", "image_path": str(path)})
    manifest = work / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    weights = save_open_clip("ViT-B-16", work / "vit-b-16")
    adapter = load_adapter("open-clip", weights)
    cohort_ = load_dataset(f"manifest:{manifest}")
    config = EmbedConfig(batch_size=128, text_batch_size=256, workers=8, device="cuda", precision="bf16",
                         progress=False)
    seconds, _ = _timed(embed_cohort, adapter, cohort_, work / "out", config,
                        {"model": "open-clip", "weights": str(weights), "weights_sha256": hash_weights(weights)})
    pixels = torch.randn(128, 3, 224, 224, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        adapter.encode_image_features(pixels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(0, n_images, 128):
            adapter.encode_image_features(pixels).float().cpu()
        torch.cuda.synchronize()
    forward = time.perf_counter() - start
    return {"images": n_images, "run_seconds": seconds, "images_per_second": n_images / seconds,
            "bare_forward_seconds": forward, "run_over_forward": seconds / forward}


def machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=20_000, help="pairs of the synthetic counting cohort (CPU mode)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each embedding run (CPU mode)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LINKRISK_DATA", "../shared/data")))
    parser.add_argument("--gpu", action="store_true", help="measure on a CUDA device instead")
    parser.add_argument("--gpu-images", type=int, default=4096, help="synthetic JPEGs of the GPU embedding run")
    parser.add_argument("--skip-embedding", action="store_true", help="CPU mode: leave out part (e)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    results = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="linkrisk-scale-") as tmp:
        work = Path(tmp)
        if args.gpu:
            if not torch.cuda.is_available():
                sys.exit("--gpu needs a CUDA device")
            results["gpu_audit"] = gpu_audit()
            print(json.dumps(results["gpu_audit"]), flush=True)
            results["gpu_embedding"] = gpu_embedding(work, args.gpu_images)
        else:
            if not args.skip_embedding:
                results["embedding"] = part_embedding(args.data, work, args.repeats)
                print(json.dumps(results["embedding"]), flush=True)
            results["counting"] = part_counting(args.m, 512)
            print(json.dumps(results["counting"]), flush=True)
            results["summary"] = part_summary(FULL_M)
            results["projection"] = projection(results["counting"], results["summary"])
    print(json.dumps(results, indent=2))
    if args.json:
        with contextlib.suppress(FileNotFoundError):
            args.json.unlink()
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
