"""Held-out linkage of each frozen image encoder, side by side, on the real COVID cohort.

For every registered image encoder and each of ``--seeds`` patient-disjoint
75/25 splits: fit the InfoNCE heads on train, audit image-to-report on the
held-out patients, and record full-pool Recall@1 lift and mean normalised
rank (chance 0.5). Prints one Markdown table; the default encoder is the
one with the highest mean lift.

    python benchmarks/encoders.py --data ../shared/data --seeds 10
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from linkrisk.audit.ranks import rank_counts
from linkrisk.audit.recall import audit_counts
from linkrisk.data import load_covid, split_by_patient
from linkrisk.models.features import embed_images, embed_texts
from linkrisk.models.image_encoders import IMAGE_ENCODERS, create_image_encoder
from linkrisk.models.text_encoders import WordLlamaTextEncoder
from linkrisk.models.train import FitConfig, fit_heads
from linkrisk.pipeline import Features


def measure(name: str, cohort, text_features: np.ndarray, seeds: int, cache: Path) -> dict:
    start = time.perf_counter()
    image, kept = embed_images(cohort, create_image_encoder(name), cache, progress=False)
    encode_seconds = time.perf_counter() - start
    features = Features(kept, image, text_features)
    lifts, ranks, r10 = [], [], []
    for seed in range(seeds):
        train_cohort, test_cohort = split_by_patient(kept, 0.25, seed)
        train, test = features.part(train_cohort), features.part(test_cohort)
        heads, _ = fit_heads(train.image, train.report, train.report_row, train.patient_ids, FitConfig(seed=seed),
                             progress=False)
        u, v = heads.embed(test.image, test.report)
        above, equal = rank_counts(u, v, test.report_row)
        result = audit_counts(above, equal, len(v), test.patient_ids, pools=[10, "full"], ks=[1], n_boot=10)
        by_pool = {e["pool"]: e for e in result["recall"]}
        lifts.append(by_pool["full"]["lift"])
        r10.append(by_pool[10]["value"])
        ranks.append(result["full_pool"]["mean_normalised_rank"])
    return {"encoder": name, "dim": image.shape[1], "encode_s": encode_seconds,
            "lift": (np.mean(lifts), np.std(lifts)), "r1_n10": (np.mean(r10), np.std(r10)),
            "rank": (np.mean(ranks), np.std(ranks))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cohort = load_covid(args.data / "covid-chestxray")
    with tempfile.TemporaryDirectory() as cache:
        text = embed_texts(cohort.reports["text"].tolist(), WordLlamaTextEncoder(), Path(cache), "covid",
                           progress=False)
        rows = [measure(name, cohort, text, args.seeds, Path(cache)) for name in sorted(IMAGE_ENCODERS)]

    print(f"COVID held-out patients, {args.seeds} seeds (mean ± sd)\n")
    print("| image encoder | feature dim | encode 354 images (s) | Recall@1 lift, full pool | Recall@1 at N=10 (chance 0.10) | mean normalised rank (chance 0.5) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['encoder']} | {row['dim']} | {row['encode_s']:.1f} | {row['lift'][0]:.2f} ± {row['lift'][1]:.2f} "
              f"| {row['r1_n10'][0]:.3f} ± {row['r1_n10'][1]:.3f} | {row['rank'][0]:.3f} ± {row['rank'][1]:.3f} |")


if __name__ == "__main__":
    main()
