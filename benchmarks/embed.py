"""Images per second of the embedding run against the bare model forward on the same batches.

Model: open_clip's ViT-B-32 (or ``--model-config``) with random weights,
saved as a ``local-dir`` folder and loaded through the ``open-clip``
adapter, so the run uses the same loading and preprocessing code as a
real checkpoint. Data: the real COVID-19 collection's images. Parts,
measured one after the other in one process and repeated ``--repeats``
times in alternation:

- (a) bare forward: every image decoded and preprocessed beforehand and
  held in memory; only ``encode_image_features`` over the batches is timed;
- (b) the embedding run's image side (:func:`linkrisk.models.embed.embed_cohort`
  internals: DataLoader with ``--workers`` decoding processes, forward,
  chunk writes) into a fresh cache;
- (c) the same with one decoding worker;
- (d) the same with decoding in the main process (``workers = 0``);
- (e) as (b) with ``fast_decode`` (JPEGs decoded at reduced scale).

The figure of merit is (b)/(a): the cost of data loading and caching on
top of the forward pass. Each repeat measures (a) right before (b), (c)
and (d), and the ratios are taken per repeat, then the median over
repeats, so a burst of load from other processes skews one repeat only.

    python benchmarks/embed.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model_folder(folder: Path, model_config: str) -> Path:
    """Save open_clip's ``model_config`` with random weights as a local-dir folder."""
    import open_clip
    from safetensors.torch import save_file

    config = open_clip.get_model_config(model_config)
    torch.manual_seed(0)
    model = open_clip.create_model(model_config, pretrained=None)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def bare_forward(adapter, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for batch in batches:
        adapter.encode_image_features(batch)
    return time.perf_counter() - start


def embedding_run(adapter, cohort, cache: Path, config) -> float:
    from linkrisk.models.embed import _embed_images, image_store

    start = time.perf_counter()
    _embed_images(adapter, cohort, image_store(cohort, cache, "benchmark", config.chunk_size), config)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LINKRISK_DATA", "../shared/data")))
    parser.add_argument("--model-config", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="Use only the first LIMIT images (0: all).")
    args = parser.parse_args()

    from linkrisk.data import load_covid
    from linkrisk.data.images import read_image, to_8bit
    from linkrisk.models.adapters import load_adapter
    from linkrisk.models.embed import EmbedConfig

    cohort = load_covid(args.data / "covid-chestxray")
    if args.limit:
        cohort.images = cohort.images.iloc[: args.limit]
    n = cohort.n_images
    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_adapter("open-clip", build_model_folder(Path(tmp), args.model_config))
        pixels = torch.stack([adapter.preprocess(to_8bit(read_image(path))) for path in cohort.images["image_path"]])
        batches = list(torch.split(pixels, args.batch_size))
        # One warm-up batch so that one-time allocations count in neither part.
        adapter.encode_image_features(batches[0])

        times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": [], "e": []}
        for repeat in range(args.repeats):
            times["a"].append(bare_forward(adapter, batches))
            for part, workers, fast in (("b", args.workers, False), ("c", 1, False), ("d", 0, False),
                                        ("e", args.workers, True)):
                config = EmbedConfig(batch_size=args.batch_size, chunk_size=512, workers=workers, fast_decode=fast,
                                     progress=False)
                times[part].append(embedding_run(adapter, cohort, Path(tmp) / f"cache-{part}-{repeat}", config))

    median = {part: statistics.median(values) for part, values in times.items()}
    ratios = {f"{part}_over_a": [round(t / a, 3) for t, a in zip(times[part], times["a"])] for part in "bcde"}
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": args.model_config, "images": n, "batch_size": args.batch_size, "workers": args.workers,
        "seconds": {part: [round(v, 2) for v in values] for part, values in times.items()},
        "images_per_second": {part: round(n / value, 2) for part, value in median.items()},
        "ratios_per_repeat": ratios,
        "median_ratio": {name: statistics.median(values) for name, values in ratios.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
