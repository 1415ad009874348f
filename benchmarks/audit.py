"""Cost of the full audit against the matmul floor, Monte Carlo pools and a CLIP-benchmark-style evaluation.

Synthetic cohort (seeded): M reports are random unit vectors in d
dimensions. Each image is its report plus Gaussian noise, re-normalised,
which plants the true-pair signal. About 200 label groups of 14
CheXpert-style observations have Zipf-like sizes, and a patient id has
three images on average. Every part runs in its own child process, one after
the other in one invocation, so times are side by side and each peak RSS
belongs to one part:

- (a) floor: one blockwise fp32 ``[M, d] x [d, M]`` matmul, results discarded;
- (b) full audit: rank counts; exact pools N = 10, 100, 1k, 10k and full
  with K = 1, 5, 10 under all three tie rules; pathology-matched pools;
  patient-bootstrap intervals with 1,000 resamples (``run_audits``);
- (c) Monte Carlo: 1,000 sampled pools per query at the same N and K,
  measured on ``--mc-queries`` queries and scaled to M by query count;
- (d) CLIP-benchmark style: the whole score matrix, a one-hot matrix of
  true pairs, then batched top-k and one-hot products for K = 1, 5, 10
  (full pool only, as such evaluators report).

It then projects (b) to M = 406,241 from the measured pairs per second.

    python benchmarks/audit.py            # M = 43,793, d = 512
    python benchmarks/audit.py --m 5000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

POOLS = [10, 100, 1000, 10000, "full"]
KS = [1, 5, 10]
N_LABELS = 14


def cohort(m: int, d: int, seed: int = 0) -> dict:
    """Seeded synthetic cohort: embeddings, patients and labels."""
    rng = np.random.default_rng(seed)
    report = rng.standard_normal((m, d), dtype=np.float32)
    report /= np.linalg.norm(report, axis=1, keepdims=True)
    # Noise of total norm about sqrt(30) puts the true pair's cosine near 0.18, others near 0 +- 1/sqrt(d).
    # In-place steps keep the generator's peak memory at the two arrays.
    image = rng.standard_normal((m, d), dtype=np.float32)
    image *= np.float32(np.sqrt(30.0 / d))
    image += report
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    vectors = np.unique(rng.integers(0, 2, size=(400, N_LABELS)), axis=0)[:200]
    weights = 1.0 / np.arange(1, len(vectors) + 1)
    group = rng.choice(len(vectors), size=m, p=weights / weights.sum())
    labels = vectors[group].astype(np.float64)
    patients = rng.integers(0, max(1, m // 3), size=m).astype(str)
    return {"image": image, "report": report, "labels": labels, "patients": patients,
            "n_groups": int(len(np.unique(group)))}


def part_a(data: dict) -> dict:
    from linkrisk.audit.ranks import DEFAULT_BLOCK_BYTES

    image, report = torch.as_tensor(data["image"]), torch.as_tensor(data["report"])
    m = len(report)
    block = max(1, DEFAULT_BLOCK_BYTES // (14 * m))  # the audit's block size for single-report units
    for start in range(0, m, block):
        image[start:start + block] @ report.T
    return {}


def part_b(data: dict) -> dict:
    from linkrisk.audit.design import build_design
    from linkrisk.audit.run import run_audits

    m = len(data["report"])
    design = build_design(data["image"], data["report"], np.arange(m), data["patients"],
                          report_labels=data["labels"])
    random, matched = run_audits(design, POOLS, KS, n_boot=1000, negatives=("random", "label_matched"))
    r1 = {e["pool"]: round(e["value"], 4) for e in random["recall"] if e["k"] == 1}
    m1 = {e["pool"]: round(e["value"], 4) for e in matched["recall"] if e["k"] == 1}
    return {"recall_at_1": r1, "matched_recall_at_1": m1, "label_groups": data["n_groups"]}


def part_c(data: dict, n_queries: int) -> dict:
    from linkrisk.audit.montecarlo import monte_carlo_recall

    m = len(data["report"])
    rows = np.random.default_rng(1).choice(m, size=min(n_queries, m), replace=False)
    sizes = [m if p == "full" else p for p in POOLS if p == "full" or p < m]
    start = time.perf_counter()
    monte_carlo_recall(data["image"][rows], data["report"], rows, sizes, KS, n_pools=1000, seed=0)
    measured = time.perf_counter() - start
    return {"measured_queries": int(len(rows)), "measured_seconds": measured, "scale": m / len(rows)}


def part_d(data: dict) -> dict:
    image, report = torch.as_tensor(data["image"]), torch.as_tensor(data["report"])
    m = len(report)
    scores = image @ report.T  # the whole [M, M] matrix, as such evaluators hold it
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(m), torch.arange(m)] = True
    recall = {}
    for k in KS:
        hits = []
        for start in range(0, m, 64):
            top = torch.topk(scores[start:start + 64], k, dim=1).indices
            one_hot = torch.nn.functional.one_hot(top, num_classes=m)
            true_positive = (one_hot * positive[start:start + 64].view(len(top), 1, m)).sum(dim=(1, 2))
            hits.append(true_positive / positive[start:start + 64].sum(1))
        recall[k] = float((torch.cat(hits) > 0).float().mean())
    return {"recall_full_pool": recall}


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux ``/proc``), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(part: str, m: int, d: int, mc_queries: int) -> None:
    import linkrisk.audit.montecarlo  # noqa: F401  (imports are not the audit's working memory)
    import linkrisk.audit.run  # noqa: F401

    imports = current_rss_mb()
    data = cohort(m, d)
    baseline = current_rss_mb()
    start = time.perf_counter()
    extra = {"a": part_a, "b": part_b, "d": part_d}[part](data) if part != "c" else part_c(data, mc_queries)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"part": part, "seconds": seconds, "peak_rss_mb": peak, "rss_imports_mb": imports,
                      "rss_before_mb": baseline, **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=43793, help="pairs (images = reports)")
    parser.add_argument("--d", type=int, default=512, help="embedding dimension")
    parser.add_argument("--mc-queries", type=int, default=64, help="queries the Monte Carlo part is timed on")
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.m, args.d, args.mc_queries)
        return

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); M = {args.m}, d = {args.d}", flush=True)
    results = {}
    for part in args.parts:
        out = subprocess.run([sys.executable, __file__, "--child", part, "--m", str(args.m), "--d", str(args.d),
                              "--mc-queries", str(args.mc_queries)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"part ({part}) failed:\n{out.stderr}")
        results[part] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[part]), flush=True)

    seconds = {p: r["seconds"] * (r.get("scale", 1.0)) for p, r in results.items()}
    print("\n| part | seconds | peak RSS (MiB) | of which imports (MiB) | peak above imports and data (MiB) |\n"
          "|---|---|---|---|---|")
    for part, result in results.items():
        note = f" (measured on {result['measured_queries']} queries, scaled)" if part == "c" else ""
        print(f"| ({part}) | {seconds[part]:.1f}{note} | {result['peak_rss_mb']:.0f} | {result['rss_imports_mb']:.0f} | "
              f"{result['peak_rss_mb'] - result['rss_before_mb']:.0f} |")
    if "a" in seconds and "b" in seconds:
        print(f"\n(b)/(a) = {seconds['b'] / seconds['a']:.2f} (target <= 1.3)")
        if "c" in seconds:
            print(f"(c)/(b) = {seconds['c'] / seconds['b']:.1f} (target >= 10)")
        if "d" in seconds:
            print(f"(d)/(b) = {seconds['d'] / seconds['b']:.1f} (target >= 5)")
        pairs_per_second = args.m ** 2 / seconds["b"]
        print(f"full audit throughput {pairs_per_second / 1e6:.1f} M pairs/s; projected at M = 406,241: "
              f"{406241 ** 2 / pairs_per_second / 60:.0f} min on this machine")


if __name__ == "__main__":
    main()
