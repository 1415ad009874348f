"""Cost of one DP-SGD epoch on the projection heads against the same epoch without DP.

Every part calls :func:`linkrisk.mitigate.dp.train_dp_heads` with
``DPConfig(epochs=1, init="original", batch_size=--batch-size)`` on the
same seeded synthetic features and starts from the same
``(nn.Linear(768, 512), nn.Linear(768, 512))`` heads:

- (a) without DP: ``epsilon = inf`` (the public-bank loss and Poisson
  sampling as in (b), but no per-sample gradients, clipping or noise);
- (b) DP-SGD with the public-bank loss (the default, sound loss) at
  ``--epsilon``;
- (c) DP-SGD with the in-batch loss (``loss="in_batch"``) at ``--epsilon``.

Synthetic cohort (seeded, float32): ``--pairs`` patients with one
image-report pair each. Image features are standard normal in 768
dimensions. Each report is ``image @ W`` plus standard normal noise, for
one fixed random ``W`` with entries of variance 1/768, so the heads have
a real mapping to learn. The public cohort is ``--bank`` more pairs from
the same distribution, and all of its rows form the public negative bank
(``bank_size = --bank``). Each part runs in its own child process, one
after the other in one invocation, so the times are side by side and
each peak RSS belongs to one part.

Sampling rate, steps per epoch and noise calibration are those of the
whole epoch over ``--pairs`` patients. The loop stops after
``--max-steps`` steps (0 runs the whole epoch), and the epoch time is
scaled up by step count. On the 2-core CI-class machine of
``benchmarks/README.md`` a whole epoch over 200,000 pairs takes about a
minute without DP or with ghost clipping, and about 7 minutes with
per-sample gradients (estimates scaled from measured steps). Grouping pairs by patient
(``patient_tensors``), noise calibration and the final epsilon accounting
run once per call and are timed apart from the steps. Wrappers on the
classes that ``train_dp_heads`` uses split each step into the public-bank
embedding (heads applied to the bank without gradient), the rest of the
loss forward, backward, Opacus's per-sample gradient hooks, clipping,
noise and the SGD update. Recall@1 on 2,000 held-out pairs
before and after the measured steps shows whether the heads moved.

The sequence (a), (b), (c) runs ``--repeats`` times, and ratios are taken
per repeat. Each part also reports CPU seconds per wall second over its
steps: near 2 means torch's two threads had both cores, near 1 that
another process held one of them. Other processes slow the parts
unevenly, so a ratio is only comparable between repeats whose parts show
the same figure.

    python benchmarks/dp.py                   # 200,000 pairs, expected batch 512, 25 of 391 steps, 3 repeats
    python benchmarks/dp.py --pairs 20000     # a quick run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import torch

DIM_IN = 768
DIM_OUT = 512
HELD_OUT = 2000
PART_LOSS = {"a": "public_bank", "b": "public_bank", "c": "in_batch"}
PART_NAME = {"a": "without DP (epsilon = inf), public bank", "b": "DP-SGD, public bank", "c": "DP-SGD, in-batch"}
STAGES = ("public-bank embedding", "rest of the loss forward", "backward without per-sample hooks",
          "per-sample gradient hooks", "clipping", "noise", "SGD update", "rest (sampling, indexing, zero_grad)")


def cohort(n_pairs: int, n_public: int, seed: int = 0) -> dict:
    """Return seeded private, public and held-out features, where each report is a noisy linear map of its image."""
    rng = np.random.default_rng(seed)
    mapping = rng.standard_normal((DIM_IN, DIM_IN), dtype=np.float32) / np.float32(math.sqrt(DIM_IN))

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
        image = rng.standard_normal((n, DIM_IN), dtype=np.float32)
        text = image @ mapping
        text += rng.standard_normal((n, DIM_IN), dtype=np.float32)
        return image, text

    image, text = pairs(n_pairs)
    public_image, public_text = pairs(n_public)
    held_out_image, held_out_text = pairs(HELD_OUT)
    return {"image": image, "text": text, "public_image": public_image, "public_text": public_text,
            "held_out_image": held_out_image, "held_out_text": held_out_text}


def initial_heads() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """Return the same pair of ``nn.Linear(768, 512)`` heads in every part."""
    torch.manual_seed(0)
    return torch.nn.Linear(DIM_IN, DIM_OUT), torch.nn.Linear(DIM_IN, DIM_OUT)


def recall_at_1(image_head: torch.nn.Module, text_head: torch.nn.Module, data: dict) -> float:
    """Image-to-report Recall@1 over the held-out pairs (chance 1 / 2,000)."""
    with torch.no_grad():
        u = torch.nn.functional.normalize(image_head(torch.as_tensor(data["held_out_image"])), dim=-1)
        v = torch.nn.functional.normalize(text_head(torch.as_tensor(data["held_out_text"])), dim=-1)
        hits = (u @ v.T).argmax(1) == torch.arange(len(u))
    return float(hits.float().mean())


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux ``/proc``), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(function, seconds: dict, key: str):
    """Wrap ``function`` so that each call adds its wall time to ``seconds[key]``."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
    return wrapper


class TimedSampler:
    """Wrap a batch sampler to record wall and CPU time at each step's start and after the last step."""

    def __init__(self, sampler, marks: list[tuple[float, float]]):
        self.sampler = sampler
        self.marks = marks

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for indices in self.sampler:
            self.marks.append((time.perf_counter(), time.process_time()))
            yield indices
        self.marks.append((time.perf_counter(), time.process_time()))


def cap_steps(dp, max_steps: int, marks: list[tuple[float, float]]) -> list[int]:
    """Stop the epoch of ``train_dp_heads`` after ``max_steps`` steps (0: run it whole) and time each step.

    Returns a list whose one entry receives the whole epoch's step count.
    """
    sampler_class = dp.UniformWithReplacementSampler
    full_epoch_steps = [0]

    def capped_sampler(*, steps: int, **kwargs):
        full_epoch_steps[0] = steps
        return TimedSampler(sampler_class(steps=min(steps, max_steps) if max_steps else steps, **kwargs), marks)

    dp.UniformWithReplacementSampler = capped_sampler
    return full_epoch_steps


def install_step_timers(seconds: dict, heads: tuple) -> None:
    """Patch what ``train_dp_heads`` calls in each step so that every stage adds its time to ``seconds``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from linkrisk.mitigate import losses

    for loss_class in (losses.PublicBankLoss, losses.InBatchLoss):
        loss_class.forward = timed(loss_class.forward, seconds, "loss forward")
    torch.Tensor.backward = timed(torch.Tensor.backward, seconds, "backward")
    # GradSampleModule binds this method when it adds its hooks, so it must be patched before one is built.
    GradSampleModule.capture_backprops_hook = timed(GradSampleModule.capture_backprops_hook, seconds,
                                                    "per-sample gradient hooks")
    DPOptimizer.clip_and_accumulate = timed(DPOptimizer.clip_and_accumulate, seconds, "clipping")
    DPOptimizer.add_noise = timed(DPOptimizer.add_noise, seconds, "noise")
    torch.optim.SGD.step = timed(torch.optim.SGD.step, seconds, "SGD update")

    # The loss embeds the public bank by calling the heads without gradient. The hooks survive
    # train_dp_heads's deep copy of the heads.
    started = {}

    def before(module, _inputs):
        started[id(module)] = time.perf_counter()

    def after(module, _inputs, _output):
        if not torch.is_grad_enabled():
            seconds["public-bank embedding"] += time.perf_counter() - started[id(module)]

    for head in heads:
        head.register_forward_pre_hook(before)
        head.register_forward_hook(after)


def step_stages(seconds: dict, steps_seconds: float) -> dict[str, float]:
    """Split the measured steps' time into :data:`STAGES`, in seconds.

    The last stage is the time that no wrapper covers. "Rest of the loss
    forward" is the batch's head calls plus its similarities to the bank.
    """
    stages = {
        "public-bank embedding": seconds["public-bank embedding"],
        "rest of the loss forward": seconds["loss forward"] - seconds["public-bank embedding"],
        "backward without per-sample hooks": seconds["backward"] - seconds["per-sample gradient hooks"],
        "per-sample gradient hooks": seconds["per-sample gradient hooks"],
        "clipping": seconds["clipping"],
        "noise": seconds["noise"],
        "SGD update": seconds["SGD update"],
    }
    stages["rest (sampling, indexing, zero_grad)"] = steps_seconds - sum(stages.values())
    return stages


def child(part: str, args: argparse.Namespace) -> None:
    """Run one part and print its times, stages and memory as one JSON line."""
    import linkrisk.mitigate.dp as dp

    imports = current_rss_mb()
    data = cohort(args.pairs, args.bank)
    heads = initial_heads()
    recall_before = recall_at_1(*heads, data)
    baseline = current_rss_mb()

    seconds: dict[str, float] = defaultdict(float)
    rss_grouped = {}
    group = dp.patient_tensors

    def grouped(*group_args):
        start = time.perf_counter()
        result = group(*group_args)
        seconds["grouping"] += time.perf_counter() - start
        rss_grouped["mb"] = current_rss_mb()
        return result

    dp.patient_tensors = grouped
    dp._noise_multiplier = timed(dp._noise_multiplier, seconds, "calibration")
    dp._spent_epsilon = timed(dp._spent_epsilon, seconds, "accounting")
    marks: list[tuple[float, float]] = []
    full_epoch_steps = cap_steps(dp, args.max_steps, marks)
    install_step_timers(seconds, heads)

    epsilon = math.inf if part == "a" else args.epsilon
    config = dp.DPConfig(epsilon=epsilon, epochs=1, batch_size=args.batch_size, bank_size=args.bank,
                         loss=PART_LOSS[part], init="original")
    rows = np.arange(args.pairs)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    trained, record = dp.train_dp_heads(data["image"], data["text"], rows, rows, data["public_image"],
                                        data["public_text"], config=config, progress=False, initial_heads=heads)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    steps = record["steps"]
    measured = marks[-1][0] - marks[0][0]
    cpu = marks[-1][1] - marks[0][1]
    step_ms = sorted(1000 * (later[0] - earlier[0]) for earlier, later in zip(marks, marks[1:]))
    scale = full_epoch_steps[0] / steps
    stages = step_stages(seconds, measured)
    print(json.dumps({
        "part": part, "seconds": total - measured + measured * scale, "epoch_seconds": measured * scale,
        "measured_seconds": measured, "measured_cpu_seconds": cpu, "steps": steps,
        "steps_per_epoch": full_epoch_steps[0], "step_ms_median": step_ms[len(step_ms) // 2],
        "step_ms_min": step_ms[0], "step_ms_max": step_ms[-1],
        "setup_seconds": total - measured, "grouping_seconds": seconds["grouping"],
        "calibration_seconds": seconds["calibration"], "accounting_seconds": seconds["accounting"],
        "ms_per_step": {name: 1000 * value / steps for name, value in stages.items()},
        "pairs_per_second": args.pairs / (measured * scale), "empty_batches": record["empty_batches"],
        "expected_batch_size": record["expected_batch_size"], "noise_multiplier": record["noise_multiplier"],
        "delta": record["delta"], "recall_at_1_before": recall_before,
        "recall_at_1_after": recall_at_1(trained.image_head, trained.text_head, data),
        "peak_rss_mb": peak, "rss_imports_mb": imports, "rss_before_mb": baseline,
        "rss_grouped_mb": rss_grouped.get("mb", math.nan),
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
    }))


def print_repeat(results: dict) -> None:
    """Print one repeat's parts as a Markdown table, then its ratios to part (a)."""
    print("\n| part | whole call (s) | epoch (s) | pairs/s in the epoch | median step (ms) | CPU s per wall s "
          "| setup (s) | of which grouping, calibration, accounting (s) | Recall@1 before -> after "
          "| peak RSS (MiB) | imports (MiB) | above grouped data (MiB) | load average before, after |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for part, r in results.items():
        print(f"| ({part}) {PART_NAME[part]} | {r['seconds']:.1f} | {r['epoch_seconds']:.1f} | "
              f"{r['pairs_per_second']:,.0f} | {r['step_ms_median']:.0f} | "
              f"{r['measured_cpu_seconds'] / r['measured_seconds']:.2f} | {r['setup_seconds']:.1f} | "
              f"{r['grouping_seconds']:.1f}, {r['calibration_seconds']:.1f}, {r['accounting_seconds']:.1f} | "
              f"{r['recall_at_1_before']:.3f} -> {r['recall_at_1_after']:.3f} | {r['peak_rss_mb']:,.0f} | "
              f"{r['rss_imports_mb']:,.0f} | {r['peak_rss_mb'] - r['rss_grouped_mb']:,.0f} | "
              f"{r['load_average_before']:.2f}, {r['load_average_after']:.2f} |")
    first = next(iter(results.values()))
    if first["steps"] < first["steps_per_epoch"]:
        print(f"epoch times: {first['steps']} of {first['steps_per_epoch']} steps measured, scaled by step count")
    for part, ratio in ratios(results).items():
        print(f"{part}: {ratio:.2f} (target <= 3)")


def ratios(results: dict) -> dict[str, float]:
    """Return the epoch and whole-call times of parts (b) and (c) over those of part (a)."""
    out = {}
    for part in "bc":
        if "a" in results and part in results:
            out[f"({part})/(a) epoch"] = results[part]["epoch_seconds"] / results["a"]["epoch_seconds"]
            out[f"({part})/(a) whole call"] = results[part]["seconds"] / results["a"]["seconds"]
    return out


def print_summary(repeats: list[dict]) -> None:
    """Print medians over repeats: ratios with their range, per-part figures and the per-step stages."""
    print(f"\nmedians over {len(repeats)} repeat(s)")
    per_repeat = [ratios(results) for results in repeats]
    for name in per_repeat[0]:
        values = [r[name] for r in per_repeat]
        print(f"{name}: median {statistics.median(values):.2f}, per repeat {', '.join(f'{v:.2f}' for v in values)}")

    parts = list(repeats[0])

    def median(part: str, key: str) -> float:
        return statistics.median(results[part][key] for results in repeats)

    print("\n| part | whole call (s) | epoch (s) | pairs/s in the epoch | peak RSS (MiB) |\n|---|---|---|---|---|")
    for part in parts:
        print(f"| ({part}) {PART_NAME[part]} | {median(part, 'seconds'):.1f} | {median(part, 'epoch_seconds'):.1f} | "
              f"{median(part, 'pairs_per_second'):,.0f} | {median(part, 'peak_rss_mb'):,.0f} |")

    print(f"\nms per step\n| stage | {' | '.join(f'({p})' for p in parts)} |\n|---|{'---|' * len(parts)}")
    for stage in STAGES:
        cells = [f"{statistics.median(results[p]['ms_per_step'][stage] for results in repeats):.0f}" for p in parts]
        print(f"| {stage} | {' | '.join(cells)} |")
    totals = [f"{statistics.median(1000 * r[p]['measured_seconds'] / r[p]['steps'] for r in repeats):.0f}"
              for p in parts]
    print(f"| step total | {' | '.join(totals)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000, help="private patients, one image-report pair each")
    parser.add_argument("--batch-size", type=int, default=512, help="expected patients per step")
    parser.add_argument("--bank", type=int, default=4096, help="public cohort pairs, all used as the negative bank")
    parser.add_argument("--epsilon", type=float, default=0.34, help="target epsilon of parts (b) and (c)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the part sequence, one after the other")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per part (0: torch's default)")
    parser.add_argument("--max-steps", type=int, default=25,
                        help="steps measured per part, scaled to the whole epoch (0: the whole epoch)")
    parser.add_argument("--parts", default="abc", help="parts to run, in order (letters a, b, c)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.2f}; pairs {args.pairs:,}, "
          f"expected batch {args.batch_size}, public bank {args.bank}, epsilon {args.epsilon}", flush=True)
    argv = ["--pairs", str(args.pairs), "--batch-size", str(args.batch_size), "--bank", str(args.bank),
            "--epsilon", str(args.epsilon), "--max-steps", str(args.max_steps), "--threads", str(args.threads)]
    repeats = []
    for repeat in range(args.repeats):
        results = {}
        for part in args.parts:
            out = subprocess.run([sys.executable, __file__, "--child", part, *argv], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"part ({part}) of repeat {repeat + 1} failed:\n{out.stderr}")
            results[part] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(results[part]), flush=True)
        print(f"\nrepeat {repeat + 1}", end="")
        print_repeat(results)
        repeats.append(results)
    print_summary(repeats)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
